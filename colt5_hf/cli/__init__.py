"""The `colt5-hf` command: demo, train, evaluate, generate, convert, inspect. One module per command holds its options
(`add_parser`) and its work (`run`); common.py holds what they share.

    colt5-hf demo                                   # CoLT5 vs local attention on a long-input task, CPU, minutes
    colt5-hf train --model colt5-tiny --train-file train.jsonl --eval-file dev.jsonl --output-dir runs/my-model
    colt5-hf evaluate runs/my-model --file test.jsonl
    colt5-hf generate runs/my-model --text "a long document ..."
    colt5-hf convert google/flan-t5-base runs/flan-colt5-base
    colt5-hf inspect runs/my-model --text "a long document ..." --output routing.png
"""

import argparse
import sys

from ..data import DataError
from . import convert, demo, evaluate, generate, inspect, train
from .common import CommandError


COMMANDS = (demo, train, evaluate, generate, convert, inspect)


def build_parser():
    parser = argparse.ArgumentParser(prog="colt5-hf", description="CoLT5 (conditional long T5) for Transformers.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands).set_defaults(function=command.run)
    return parser


def main(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["demo", *argv]  # the demo is the default command
    args = parser.parse_args(argv)
    if getattr(args, "output_dir", "") is None:
        parser.error(f"{args.command}: --output-dir is required")
    try:
        args.function(args)
    except (CommandError, DataError) as error:
        parser.exit(2, f"colt5-hf {args.command}: error: {error}\n")


__all__ = ["build_parser", "main"]
