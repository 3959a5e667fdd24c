"""colt5-hf generate: outputs of a saved model for --text inputs or a data file, one line each."""

import datasets
import torch

from ..data import tokenize_pairs
from .common import (
    CommandError,
    add_data_options,
    batches,
    collator,
    load_saved_model,
    load_tokenizer,
    print_data_report,
    read_dataset,
    source_limit,
)


def add_parser(commands):
    parser = commands.add_parser("generate", help="generate from a saved model")
    parser.add_argument("model", help="saved model folder")
    parser.add_argument("--text", action="append", help="input text (repeatable)")
    parser.add_argument("--file", help="JSONL, JSON, CSV or Parquet file of inputs (--source-field)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--num-beams", type=int, default=1)
    add_data_options(parser, targets=False)
    return parser


def run(args):
    model = load_saved_model(args.model)
    tokenizer = load_tokenizer(args.tokenizer, args.model)
    if (args.file is None) == (not args.text):
        raise CommandError("give --text (repeatable) or --file")
    if args.text:
        pairs = datasets.Dataset.from_list([{"source": text} for text in args.text])
        tokenized, report = tokenize_pairs(pairs, tokenizer, source_limit(args, model.config), None, args.truncate,
                                           "--text")
        print_data_report(report)
    else:
        pairs, tokenized = read_dataset(args, tokenizer, model.config, args.file, "input", with_targets=False)
    collate = collator(tokenizer)
    rows = [tokenized[i] for i in range(len(tokenized))]
    with torch.no_grad():
        for chunk in batches(rows, args.batch_size):
            batch = collate(chunk)
            generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
            for text in tokenizer.batch_decode(generated, skip_special_tokens=True):
                print(text)


# ---------------------------------------------------------------------------------------------- convert / inspect
