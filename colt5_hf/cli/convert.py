"""colt5-hf convert: a CoLT5 model from a T5.1.1 / FLAN-T5 / mT5 / LongT5 (local attention) checkpoint."""

import json
from pathlib import Path

import torch

from ..conversion import convert_checkpoint
from .common import (
    TOKENIZER_FILES,
    CommandError,
    check_vocabulary,
    check_writable_folder,
    has_tokenizer_files,
    is_model_folder,
    load_tokenizer,
    looks_like_a_path,
    one_line,
    parse_overrides,
    writing,
)


def add_parser(commands):
    parser = commands.add_parser("convert", help="CoLT5 from a T5.1.1 / FLAN-T5 / mT5 / LongT5 (local) checkpoint")
    parser.add_argument("source", help="checkpoint folder or Hub id")
    parser.add_argument("output", help="folder for the CoLT5 model")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="CoLT5 config field, e.g. num_light_heads=4, local_radius=127 (repeatable)")
    parser.add_argument("--tokenizer", help="tokenizer folder or Hub id to copy next to the model (default: the "
                        "source checkpoint's; a source folder without one is an error)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="also read pytorch_model.bin (a pickle, which can run code when loaded: only for a "
                        "checkpoint you trust); by default only safetensors weights are read")
    parser.add_argument("--overwrite-output-dir", action="store_true")
    return parser


def run(args):
    source = Path(args.source)
    if not source.exists() and looks_like_a_path(args.source):
        raise CommandError(f"checkpoint folder not found: {source}")
    if source.is_dir() and not is_model_folder(source):
        raise CommandError(f"{source} is not a checkpoint folder (no config.json)")
    output = Path(args.output)
    if output.is_dir() and any(output.iterdir()) and not args.overwrite_output_dir:
        raise CommandError(f"{output} is not empty: choose another folder or pass --overwrite-output-dir")
    check_writable_folder(output, "OUTPUT")
    # the tokenizer before anything is written: Transformers builds an empty one for a folder that has none
    if args.tokenizer is None and source.is_dir() and not has_tokenizer_files(source):
        raise CommandError(f"{source} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): pass --tokenizer "
                           "with the one the checkpoint was trained with, e.g. --tokenizer google/flan-t5-base")
    tokenizer_source = args.tokenizer or args.source
    tokenizer = load_tokenizer(tokenizer_source)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    try:
        model = convert_checkpoint(args.source, dtype=dtype, allow_pickle=args.allow_pickle,
                                   **parse_overrides(args.set))
    except (OSError, ValueError) as error:
        raise CommandError(one_line(error)) from error
    check_vocabulary(tokenizer, model.config)
    with writing(f"the model to {output}", output, "free space there or choose another OUTPUT folder"):
        model.save_pretrained(str(output))
        tokenizer.save_pretrained(str(output))
    config = model.config
    print(json.dumps({
        "output": str(output),
        "encoder_heads": {"light": config.num_light_heads, "heavy": config.num_heavy_heads},
        "encoder_feed_forward": {"light": config.light_d_ff, "heavy": config.heavy_d_ff},
        "cross_attention": {"routes": config.num_cross_attention_routes,
                            "kv_heads_per_route": config.num_cross_attention_kv_heads},
        "local_radius": config.local_radius,
        "tokenizer": f"copied from {tokenizer_source}",
    }))
