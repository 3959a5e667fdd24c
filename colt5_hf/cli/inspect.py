"""colt5-hf inspect: which tokens every router of a saved model picks for one input, as a PNG and as text."""

import json
from pathlib import Path

import datasets
import torch

from ..inspection import plot_routing, routing_rows
from .common import (
    CommandError,
    add_data_options,
    check_saved_model,
    check_text,
    check_writable_file,
    decodable,
    demo_evaluation_pairs,
    load_saved_model,
    load_tokenizer,
    non_negative_int,
    positive_int,
    read_pairs,
    tokenize,
    writing,
)


def add_parser(commands):
    parser = commands.add_parser("inspect", help="plot which tokens every router picks (PNG)")
    parser.add_argument("model", help="saved model folder")
    parser.add_argument("--text", help="input text")
    parser.add_argument("--file", help="data file; plots example --index")
    parser.add_argument("--demo-task", action="store_true", help="an evaluation example of the demo task")
    parser.add_argument("--index", type=non_negative_int, default=0)
    parser.add_argument("--output", default="routing.png", help="PNG file to write (default: routing.png)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=32)
    add_data_options(parser, targets=False)
    return parser


def check_image_file(path):
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()  # matplotlib picks the format by the file name's suffix
    if Path(path).suffix.lower().lstrip(".") not in formats:
        raise CommandError(f"--output {path}: name an image file ending in one of "
                           f"{', '.join('.' + name for name in sorted(formats))}")


def run(args):
    if sum((args.text is not None, args.file is not None, args.demo_task)) != 1:
        raise CommandError("give one of --text, --file or --demo-task")
    check_text([args.text] if args.text is not None else [])
    check_image_file(args.output)
    check_writable_file(args.output, "--output")
    pairs = read_pairs(args, args.file, with_targets=False) if args.file is not None else None
    check_saved_model(args.model)
    tokenizer = load_tokenizer(args.tokenizer, args.model)
    model = load_saved_model(args.model)
    if args.text is not None:
        text = args.text
    else:
        if pairs is None:  # --demo-task
            pairs = demo_evaluation_pairs(model.config, args.index + 1, args.demo_length)
        if args.index >= len(pairs):
            raise CommandError(f"--index {args.index}: the input holds {len(pairs)} examples")
        text = pairs[args.index]["source"]
    tokenized = tokenize(args, tokenizer, model.config, datasets.Dataset.from_list([{"source": text}]), "input")
    input_ids = torch.tensor([tokenized[0]["input_ids"]])
    with torch.no_grad(), model.record_routing() as routing:
        generated = model.generate(input_ids=input_ids, max_new_tokens=args.max_new_tokens,
                                   logits_processor=decodable(tokenizer, model.config))
    tokens = tokenizer.convert_ids_to_tokens(input_ids[0].tolist())
    output_text = tokenizer.decode(generated[0], skip_special_tokens=True)
    with writing(f"--output {args.output}", Path(args.output).parent, "free space there or choose another --output"):
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
