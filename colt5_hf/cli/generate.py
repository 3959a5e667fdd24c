"""colt5-hf generate: outputs of a saved model for --text inputs or a data file, one line each (line breaks inside an
output written as escapes, `\\n`)."""

import datasets
import torch

from .common import (
    CommandError,
    add_data_options,
    add_device_options,
    apply_compile_option,
    batches,
    check_saved_model,
    check_text,
    collator,
    decodable,
    device_of,
    load_saved_model,
    load_tokenizer,
    positive_int,
    read_pairs,
    tokenize,
)


# what str.splitlines() breaks a line at, each written as its Python escape
LINE_BREAKS = {ord(c): c.encode("unicode_escape").decode() for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}


def one_line(text: str) -> str:
    """`text` with its line breaks escaped: a model's output may hold them, and each output is one line."""
    return text.translate(LINE_BREAKS)


def add_parser(commands):
    parser = commands.add_parser("generate", help="generate from a saved model")
    parser.add_argument("model", help="saved model folder")
    parser.add_argument("--text", action="append", help="input text (repeatable)")
    parser.add_argument("--file", help="JSONL, JSON, CSV or Parquet file of inputs (--source-field)")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    parser.add_argument("--num-beams", type=positive_int, default=1)
    add_data_options(parser, targets=False)
    add_device_options(parser)
    return parser


def run(args):
    if (args.file is None) == (not args.text):
        raise CommandError("give --text (repeatable) or --file")
    check_text(args.text or ())
    if args.text:
        pairs = datasets.Dataset.from_list([{"source": text} for text in args.text])
    else:
        pairs = read_pairs(args, args.file, with_targets=False)
    check_saved_model(args.model)
    tokenizer = load_tokenizer(args.tokenizer, args.model)
    device = device_of(args)
    model = apply_compile_option(load_saved_model(args.model), args).to(device)
    tokenized = tokenize(args, tokenizer, model.config, pairs, "--text" if args.text else args.file)
    collate = collator(tokenizer)
    logits_processor = decodable(tokenizer, model.config)
    rows = [tokenized[i] for i in range(len(tokenized))]
    with torch.no_grad():
        for chunk in batches(rows, args.batch_size):
            batch = collate(chunk).to(device)
            generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                                       logits_processor=logits_processor)
            for text in tokenizer.batch_decode(generated, skip_special_tokens=True):
                print(one_line(text))
