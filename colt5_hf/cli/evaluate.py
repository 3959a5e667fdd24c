"""colt5-hf evaluate: loss and exact match (greedy generation) of a saved model on a data file."""

import json
from pathlib import Path

import torch

from .common import (
    CommandError,
    add_data_options,
    add_device_options,
    apply_compile_option,
    batches,
    check_saved_model,
    check_writable_file,
    collator,
    decodable,
    demo_evaluation_pairs,
    device_of,
    load_saved_model,
    load_tokenizer,
    positive_int,
    read_pairs,
    tokenize,
    writing,
)


def add_parser(commands):
    parser = commands.add_parser("evaluate", help="loss and exact match (greedy generation) of a saved model")
    parser.add_argument("model", help="saved model folder")
    parser.add_argument("--file", help="JSONL, JSON, CSV or Parquet file of source/target pairs")
    parser.add_argument("--demo-task", action="store_true", help="the demo task's evaluation examples")
    parser.add_argument("--eval-examples", type=positive_int, default=256)
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--max-new-tokens", type=positive_int, help="(default: the longest target + 8)")
    parser.add_argument("--num-beams", type=positive_int, default=1)
    parser.add_argument("--predictions", help="write source/target/prediction JSONL here")
    add_data_options(parser)
    add_device_options(parser)
    return parser


def run(args):
    if (args.file is None) == (not args.demo_task):
        raise CommandError("give --file or --demo-task")
    if args.predictions is not None:
        check_writable_file(args.predictions, "--predictions")
    pairs = read_pairs(args, args.file) if args.file is not None else None
    check_saved_model(args.model)
    tokenizer = load_tokenizer(args.tokenizer, args.model)
    device = device_of(args)
    model = apply_compile_option(load_saved_model(args.model), args).to(device)
    if pairs is None:
        pairs = demo_evaluation_pairs(model.config, args.eval_examples, args.demo_length)
    tokenized = tokenize(args, tokenizer, model.config, pairs, args.file or "demo task")
    collate = collator(tokenizer)
    logits_processor = decodable(tokenizer, model.config)
    loss_sum, token_count, correct, predictions = 0.0, 0, 0, []
    rows = [tokenized[i] for i in range(len(tokenized))]
    with torch.no_grad():
        for start, chunk in zip(range(0, len(rows), args.batch_size), batches(rows, args.batch_size)):
            batch = collate(chunk).to(device)
            labels = batch["labels"]
            output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
            count = int((labels != -100).sum())
            loss_sum, token_count = loss_sum + output.loss.item() * count, token_count + count
            generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       max_new_tokens=args.max_new_tokens or labels.shape[1] + 8,
                                       num_beams=args.num_beams,
                                       logits_processor=logits_processor)
            for offset, text in enumerate(tokenizer.batch_decode(generated, skip_special_tokens=True)):
                target = pairs[start + offset]["target"]
                correct += text.strip() == target.strip()
                predictions.append({"source": pairs[start + offset]["source"], "target": target,
                                    "prediction": text})
    metrics = {"examples": len(rows), "loss": loss_sum / max(token_count, 1),
               "exact_match": correct / max(len(rows), 1)}
    if args.predictions is not None:
        path = Path(args.predictions)
        with writing(f"--predictions {path}", path.parent, "free space there or choose another --predictions file"):
            with open(path, "w", encoding="utf-8") as handle:
                for prediction in predictions:
                    handle.write(json.dumps(prediction) + "\n")
        metrics["predictions"] = str(path)
    print(json.dumps(metrics))
