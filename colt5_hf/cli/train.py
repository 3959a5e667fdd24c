"""colt5-hf train: fine-tune a preset, a config or a saved/converted model with Seq2SeqTrainer."""

import json
import os
import sys
from pathlib import Path

import torch

from ..configuration_colt5 import preset_names
from .common import (
    DEMO_EVAL_SEED,
    CommandError,
    add_data_options,
    add_training_options,
    check_vocabulary,
    is_main_process,
    is_model_folder,
    load_model,
    load_tokenizer,
    parse_overrides,
    read_dataset,
    run_training,
)


def add_parser(commands):
    parser = commands.add_parser("train", help="fine-tune with Seq2SeqTrainer")
    parser.add_argument("--model", required=True, help="preset name (" + ", ".join(preset_names()) +
                        "), config JSON, or saved/converted model folder")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="config override for a new model (repeatable)")
    parser.add_argument("--train-file", help="JSONL, JSON, CSV or Parquet file of source/target pairs")
    parser.add_argument("--eval-file", help="evaluation file (loss and exact match every --eval-steps)")
    parser.add_argument("--demo-task", action="store_true", help="train on the bundled synthetic task")
    add_data_options(parser)
    add_training_options(parser, steps=None, eval_steps=500, learning_rate=5e-4)
    parser.add_argument("--epochs", type=float, default=3.0, help="passes over the data when --steps is not given")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--logging-steps", type=int, help="(default: --eval-steps)")
    parser.add_argument("--save-steps", type=int, help="checkpoint every N steps (default: --eval-steps)")
    parser.add_argument("--save-total-limit", type=int, help="keep only the last N checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    parser.add_argument("--overwrite-output-dir", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is there")
    return parser


def run(args, callbacks=()):
    """`callbacks`: extra TrainerCallbacks (the tests stop a run with one)."""
    torch.manual_seed(args.seed)
    model, description = load_model(args.model, parse_overrides(args.set))
    model_folder = args.model if is_model_folder(Path(args.model)) else None
    tokenizer = load_tokenizer(args.tokenizer, model_folder)
    check_vocabulary(tokenizer, model.config)
    if args.train_file is None and not args.demo_task:
        raise CommandError("give --train-file (JSONL, CSV or Parquet) or --demo-task")
    if args.train_file is not None and args.demo_task:
        raise CommandError("give either --train-file or --demo-task, not both")
    if args.steps is None and args.demo_task:
        raise CommandError("--demo-task generates examples for a number of --steps: give --steps")
    # examples per optimizer step across every process (`accelerate launch` sets WORLD_SIZE)
    batch = args.batch_size * args.gradient_accumulation_steps * int(os.environ.get("WORLD_SIZE", "1"))
    _, train_dataset = read_dataset(args, tokenizer, model.config, args.train_file, "train",
                                    demo_count=(args.steps or 0) * batch, demo_seed=args.seed)
    eval_dataset = None
    if args.eval_file is not None or args.demo_task:
        _, eval_dataset = read_dataset(args, tokenizer, model.config, args.eval_file, "eval",
                                       demo_count=args.eval_examples, demo_seed=DEMO_EVAL_SEED)
    if is_main_process():
        print(f"{description}: {sum(p.numel() for p in model.parameters()):,} parameters; "
              f"{len(train_dataset):,} training examples" +
              (f", {len(eval_dataset):,} evaluation examples" if eval_dataset is not None else ""), file=sys.stderr)
    trainer = run_training(args, model, tokenizer, train_dataset, eval_dataset, callbacks)
    metrics = {k: v for entry in trainer.state.log_history for k, v in entry.items()}
    summary = {k: metrics[k] for k in ("train_loss", "eval_loss", "eval_exact_match") if k in metrics}
    if is_main_process():
        print(json.dumps({"output_dir": str(args.output_dir), "steps": trainer.state.global_step, **summary}))


# ------------------------------------------------------------------------------------------------------------ demo

