"""colt5-hf inspect: which tokens every router of a saved model picks for one input, as a PNG and as text."""

import json

import datasets
import torch

from ..data import demo_examples, load_pairs, tokenize_pairs
from ..inspection import plot_routing, routing_rows
from .common import (
    DEMO_EVAL_SEED,
    CommandError,
    add_data_options,
    demo_reach,
    load_saved_model,
    load_tokenizer,
    print_data_report,
    source_limit,
)


def add_parser(commands):
    parser = commands.add_parser("inspect", help="plot which tokens every router picks (PNG)")
    parser.add_argument("model", help="saved model folder")
    parser.add_argument("--text", help="input text")
    parser.add_argument("--file", help="data file; plots example --index")
    parser.add_argument("--demo-task", action="store_true", help="an evaluation example of the demo task")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--output", default="routing.png", help="PNG file to write (default: routing.png)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    add_data_options(parser, targets=False)
    return parser


def run(args):
    model = load_saved_model(args.model)
    tokenizer = load_tokenizer(args.tokenizer, args.model)
    if sum((args.text is not None, args.file is not None, args.demo_task)) != 1:
        raise CommandError("give one of --text, --file or --demo-task")
    if args.text is not None:
        text = args.text
    else:
        if args.file is not None:
            pairs = load_pairs(args.file, args.source_field, None)
        else:
            pairs = demo_examples(args.index + 1, DEMO_EVAL_SEED, args.demo_length, demo_reach(model.config))
        if not 0 <= args.index < len(pairs):
            raise CommandError(f"--index {args.index}: the input holds {len(pairs)} examples")
        text = pairs[args.index]["source"]
    tokenized, report = tokenize_pairs(datasets.Dataset.from_list([{"source": text}]), tokenizer,
                                       source_limit(args, model.config), None, args.truncate, "input")
    print_data_report(report)
    input_ids = torch.tensor([tokenized[0]["input_ids"]])
    with torch.no_grad(), model.record_routing() as routing:
        generated = model.generate(input_ids=input_ids, max_new_tokens=args.max_new_tokens)
    tokens = tokenizer.convert_ids_to_tokens(input_ids[0].tolist())
    output_text = tokenizer.decode(generated[0], skip_special_tokens=True)
    plot_routing(routing, tokens, args.output, title=f"{args.model}: output {output_text!r}")
    occurrences = {}
    for token in tokens:
        occurrences[token] = occurrences.get(token, 0) + 1
    print(f"{'router':<28} {'picked':>12}  picks, tokens that occur once in the input first (token@position)")
    for label, positions in routing_rows(routing).items():
        ordered = sorted(positions, key=lambda i: (occurrences[tokens[i]] > 1, i))
        shown = " ".join(f"{tokens[i]!r}@{i}" for i in ordered[:8]) + (" ..." if len(ordered) > 8 else "")
        print(f"{label:<28} {len(positions):>5} / {len(tokens):<5} {shown}")
    print(json.dumps({"output": output_text, "plot": str(args.output)}))


# ------------------------------------------------------------------------------------------------------------ parser
