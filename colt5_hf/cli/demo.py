"""colt5-hf demo (the default command): the tiny preset trained twice on a long-input task, with and without its heavy
branch, on the CPU in minutes."""

import argparse
import concurrent.futures
import multiprocessing
import os
import re
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from .. import synthetic
from ..data import tokenize_pairs
from ..synthetic import switch_off_heavy_branch
from .common import (
    DEMO_LENGTH,
    DEMO_TASK,
    add_training_options,
    check_writable_folder,
    demo_evaluation_pairs,
    demo_pairs,
    load_model,
    load_tokenizer,
    positive_int,
    run_training,
)


def add_parser(commands):
    parser = commands.add_parser("demo", help="CoLT5 vs local attention on a long-input task (the default command)")
    parser.add_argument("--model", default="colt5-tiny", help="preset or config file (default: colt5-tiny)")
    add_training_options(parser, steps=1000, eval_steps=250, learning_rate=1e-3, warmup_steps=100,
                         output_dir="runs/demo")
    parser.add_argument("--demo-length", type=positive_int, default=DEMO_LENGTH,
                        help=f"length of the inputs in tokens (default: {DEMO_LENGTH})")
    parser.set_defaults(batch_size=32, epochs=1.0, gradient_accumulation_steps=1, weight_decay=0.0, logging_steps=None,
                        save_steps=None, save_total_limit=1, bf16=False, cpu=True, overwrite_output_dir=True)
    return parser


class RowPrinter(TrainerCallback):
    """Prints one table row per evaluation: step, last logged train loss, eval exact match, and the time spent
    training so far (evaluation time excluded)."""

    def __init__(self, label, rows):
        self.label, self.rows = label, rows

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.eval_time = time.perf_counter(), 0.0

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.eval_time += metrics.get("eval_runtime", 0.0)
        train_losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
        row = {"model": self.label, "step": state.global_step,
               "train_loss": train_losses[-1] if train_losses else float("nan"),
               "eval_exact_match": metrics.get("eval_exact_match", float("nan")),
               "seconds": time.perf_counter() - self.start - self.eval_time}
        self.rows.append(row)
        # above the progress bar, when there is one; the line and its newline in one write: the demo's two trainings
        # print to one stdout, and unbuffered (PYTHONUNBUFFERED) separate writes of the two could interleave
        tqdm.write(format_row(row) + "\n", end="")
        sys.stdout.flush()


def format_row(row):
    return (f"{row['model']:<24} {row['step']:>6} {row['train_loss']:>11.3f} {100 * row['eval_exact_match']:>17.1f}% "
            f"{row['seconds']:>9.0f}s")


TABLE_HEADER = f"{'model':<24} {'step':>6} {'train loss':>11} {'eval exact match':>18} {'time':>10}"



DEMO_RUNS = (("CoLT5 (routed)", True, "colt5"), ("local attention only", False, "local-only"))


def demo_run(args, heavy: bool, threads: int):
    """One of the demo's two trainings (run in its own process): the tiny model with or without its heavy branch.
    Returns the table rows."""
    import transformers

    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    label, _, folder = next(run for run in DEMO_RUNS if run[1] == heavy)
    tokenizer = load_tokenizer(None)
    torch.manual_seed(args.seed)
    model, _ = load_model(args.model)
    train_pairs = demo_pairs(model.config, args.steps * args.batch_size, args.seed, args.demo_length)
    eval_pairs = demo_evaluation_pairs(model.config, args.eval_examples, args.demo_length)
    train_dataset, _ = tokenize_pairs(train_pairs, tokenizer, None, None)
    eval_dataset, _ = tokenize_pairs(eval_pairs, tokenizer, None, None)
    if not heavy:
        switch_off_heavy_branch(model)
    run_args = argparse.Namespace(**vars(args))
    run_args.output_dir, run_args.quiet = Path(args.output_dir) / folder, True
    rows = []
    run_training(run_args, model, tokenizer, train_dataset, eval_dataset, callbacks=[RowPrinter(label, rows)],
                 show_logs=False)
    return rows


def run(args):
    """Train the tiny preset twice on the demo task, with and without the heavy branch (in parallel, one process
    each when there are two cores), and print the table."""
    check_writable_folder(args.output_dir, "--output-dir")
    config = load_model(args.model)[0].config
    geometry = synthetic.Geometry.of(config)
    example = demo_pairs(config, 1, args.seed, args.demo_length)[0]
    jobs = 2 if (os.cpu_count() or 1) >= 2 else 1
    threads = max(1, min(4, (os.cpu_count() or 1) // jobs))
    shown = re.sub(r"\.{4,}", lambda run: f"[{len(run.group())} dots]", example["source"])
    print(f"Task: {args.demo_length - 1} characters of '.' holding an anchor '#' and two capital letters, one of them "
          f"{geometry.gap}-{geometry.near_max} positions from the anchor, the other at least {geometry.far_min}; the "
          f"answer is the letter nearer the anchor, e.g.\n  {shown} -> {example['target']}\n"
          f"Model: {args.model} (local radius {config.local_radius}), {args.steps} steps of {args.batch_size} examples "
          f"on the CPU ({jobs} process{'es' if jobs > 1 else ''}, {threads} thread{'s' if threads > 1 else ''} each), "
          f"exact match on {args.eval_examples} held-out examples (half of them the other half's mirrors) every "
          f"{args.eval_steps} steps.\n", flush=True)
    print(TABLE_HEADER, flush=True)
    start = time.perf_counter()
    if jobs == 1:
        results = [demo_run(args, heavy, threads) for _, heavy, _ in DEMO_RUNS]
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            futures = [pool.submit(demo_run, args, heavy, threads) for _, heavy, _ in DEMO_RUNS]
            results = [future.result() for future in futures]
    print(f"\nAfter {args.steps} steps ({time.perf_counter() - start:.0f}s in all):")
    print(TABLE_HEADER)
    for rows in results:
        print(format_row(rows[-1]))
    shortcut = synthetic.calibration(DEMO_TASK, args.demo_length, geometry)["shortcut"]
    print(f"\nLocal attention sees {geometry.reach} positions on each side of a token through the encoder, and every "
          "item lies farther than that from the others: it finds the letters but not which is nearer the anchor, and "
          "answers an example and its mirror (the letters swapped) alike: 50% on the evaluation set, which holds both. "
          f"Where the items sit tells at most {100 * shortcut:.0f}%. CoLT5's routers send tokens to the heavy branch, "
          "whose attention spans the input with relative positions: it can compare the two distances.\n"
          f"Models: {args.output_dir}/colt5 and {args.output_dir}/local-only. What did the routers pick?\n"
          f"  colt5-hf inspect {args.output_dir}/colt5 --demo-task --output {args.output_dir}/routing.png")
