"""colt5-hf convert: a CoLT5 model from a T5.1.1 / FLAN-T5 / mT5 / LongT5 (local attention) checkpoint."""

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

from ..conversion import convert_checkpoint
from .common import CommandError, is_model_folder, parse_overrides


def add_parser(commands):
    parser = commands.add_parser("convert", help="CoLT5 from a T5.1.1 / FLAN-T5 / mT5 / LongT5 (local) checkpoint")
    parser.add_argument("source", help="checkpoint folder or Hub id")
    parser.add_argument("output", help="folder for the CoLT5 model")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="CoLT5 config field, e.g. num_light_heads=4, local_radius=127 (repeatable)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--overwrite-output-dir", action="store_true")
    return parser


def run(args):
    source = Path(args.source)
    if not source.exists() and (args.source.startswith((".", "/")) or source.suffix):
        raise CommandError(f"checkpoint folder not found: {source}")
    if source.is_dir() and not is_model_folder(source):
        raise CommandError(f"{source} is not a checkpoint folder (no config.json)")
    output = Path(args.output)
    if output.exists() and any(output.iterdir()) and not args.overwrite_output_dir:
        raise CommandError(f"{output} is not empty: choose another folder or pass --overwrite-output-dir")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    try:
        model = convert_checkpoint(args.source, dtype=dtype, **parse_overrides(args.set))
    except (OSError, ValueError) as error:
        raise CommandError(str(error)) from error
    model.save_pretrained(str(output))
    try:
        AutoTokenizer.from_pretrained(args.source).save_pretrained(str(output))
        tokenizer_note = "tokenizer copied"
    except (OSError, ValueError):
        tokenizer_note = "no tokenizer found beside the checkpoint: pass --tokenizer to train/evaluate/generate"
    config = model.config
    print(json.dumps({
        "output": str(output),
        "encoder_heads": {"light": config.num_light_heads, "heavy": config.num_heavy_heads},
        "encoder_feed_forward": {"light": config.light_d_ff, "heavy": config.heavy_d_ff},
        "cross_attention": {"routes": config.num_cross_attention_routes,
                            "kv_heads_per_route": config.num_cross_attention_kv_heads},
        "local_radius": config.local_radius,
        "tokenizer": tokenizer_note,
    }))
