"""The `colt5-hf` command: demo, train, evaluate, generate, convert, uptrain, inspect. One module per command holds
its options (`add_parser`) and its work (`run`); common.py holds what they share. docs/command.md documents the
command.

    colt5-hf demo                                   # CoLT5 vs local attention on a long-input task, CPU, minutes
    colt5-hf train --model colt5-tiny --train-file train.jsonl --eval-file dev.jsonl --output-dir runs/my-model
    colt5-hf evaluate runs/my-model --file test.jsonl
    colt5-hf generate runs/my-model --text "a long document ..."
    colt5-hf convert google/flan-t5-base runs/flan-colt5-base
    colt5-hf uptrain runs/flan-colt5-base --train-files docs/*.txt --length 16384 --output-dir runs/flan-colt5-ul2
    colt5-hf inspect runs/my-model --text "a long document ..." --output routing.png

A failure is one line on stderr, `colt5-hf COMMAND: error: MESSAGE`, and an exit status: 0 done, 1 the work failed
(a write refused, the disk full, an unexpected error), 2 a usage error (options, files, folders, data), 130
interrupted (Ctrl-C). `--debug` or COLT5_HF_DEBUG=1 shows the traceback instead.
"""

import argparse
import os
import sys

import torch

from ..data import DataError
from . import convert, demo, evaluate, generate, inspect, train, uptrain
from .common import CommandError, one_line


COMMANDS = (demo, train, evaluate, generate, convert, uptrain, inspect)
EXIT_STATUS = ("exit status: 0 done, 1 the work failed, 2 usage error (options, files, data), 130 interrupted; "
               "--debug or COLT5_HF_DEBUG=1 shows the traceback of an error")


def build_parser():
    parser = argparse.ArgumentParser(prog="colt5-hf", description="CoLT5 (conditional long T5) for Transformers.",
                                     epilog=EXIT_STATUS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        subparser = command.add_parser(commands)
        subparser.add_argument("--debug", action="store_true",
                               help="show the traceback of an error (also COLT5_HF_DEBUG=1)")
        subparser.epilog = EXIT_STATUS
        subparser.set_defaults(function=command.run)
    return parser


def failure(error):
    """(exit status, one-line message) for an error that ended a command."""
    if isinstance(error, KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(error, CommandError) and error.status == 130:
        return 130, one_line(error)
    if isinstance(error, (CommandError, DataError)):
        return getattr(error, "status", 2), f"error: {one_line(error)}"
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return 1, f"error: out of memory ({one_line(error)}); use a smaller --batch-size or shorter inputs"
    return 1, f"error: {type(error).__name__}: {one_line(error)} (--debug shows the traceback)"


def main(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["demo", *argv]  # the demo is the default command
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("COLT5_HF_DEBUG", "") not in ("", "0")
    try:
        args.function(args)
    except (Exception, KeyboardInterrupt) as error:
        if debug:
            raise
        status, message = failure(error)
        print(f"colt5-hf {args.command}: {message}", file=sys.stderr)
        sys.exit(status)


__all__ = ["build_parser", "main"]
