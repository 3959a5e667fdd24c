"""colt5-hf train: fine-tune a preset, a config or a saved/converted model with Seq2SeqTrainer."""

import json
import os
import sys
from pathlib import Path

import torch
import transformers

from ..checkpoints import has_complete_weights, last_complete_checkpoint
from ..configuration_colt5 import preset_names
from ..modeling_colt5 import CoLT5ForConditionalGeneration
from .common import (
    CommandError,
    DATA_CACHE,
    add_data_options,
    add_device_options,
    add_run_options,
    add_training_options,
    apply_compile_option,
    check_one_process_per_gpu,
    check_saved_model,
    check_vocabulary,
    check_writable_folder,
    demo_evaluation_pairs,
    demo_pairs,
    is_main_process,
    load_model,
    load_tokenizer,
    parse_overrides,
    read_pairs,
    run_training,
    tokenize,
    write_advice,
    writing,
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
    add_run_options(parser, epochs=3.0)
    add_device_options(parser, "train")
    return parser


def check_output_dir(args):
    """Before any work: --output-dir can be written, and is empty unless --resume or --overwrite-output-dir say what
    to do with what it holds (its data cache aside). Returns the checkpoint to resume from, or None."""
    output_dir = Path(args.output_dir)
    check_writable_folder(output_dir, "--output-dir")
    if args.resume:
        checkpoint = last_complete_checkpoint(output_dir)  # skips folders a killed run left half-written
        if checkpoint is None:
            raise CommandError(f"--resume: no complete checkpoint-* folder in {output_dir} to resume from")
        return checkpoint
    held = [path for path in output_dir.iterdir() if path.name != DATA_CACHE] if output_dir.is_dir() else []
    if held and not args.overwrite_output_dir:
        raise CommandError(f"{output_dir} is not empty: pass --resume to continue its last checkpoint, "
                           "--overwrite-output-dir to start over in it, or another --output-dir")
    return None


def summary(output_dir, steps, log_history):
    """The command's last line on stdout: where the model is, its steps, its last losses (uptrain: one evaluation
    loss per denoiser, eval_NAME_loss) and exact match."""
    metrics = {key: value for entry in log_history for key, value in entry.items()}
    kept = {key: value for key, value in metrics.items()
            if key == "train_loss" or key.startswith("eval_") and key.endswith(("_loss", "_exact_match"))}
    return json.dumps({"output_dir": str(output_dir), "steps": steps, **kept})


def finished(args, checkpoint):
    """--resume of a run whose last checkpoint reached its steps: say so and train nothing. The final model is saved
    from that checkpoint if the run died before saving it whole; otherwise nothing is written."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    steps = state["global_step"]
    planned = args.steps if args.steps is not None else state.get("max_steps")
    if planned is None or steps < planned:
        return False
    output_dir, name = Path(args.output_dir), Path(checkpoint).name
    if has_complete_weights(output_dir) and (output_dir / "config.json").is_file():
        note = (f"nothing left to do: the run finished at step {steps} of {planned} ({name}); its model is in "
                f"{output_dir}")
    else:
        with writing(f"the model to {output_dir}", output_dir, write_advice(resumable=True)):
            CoLT5ForConditionalGeneration.from_pretrained(checkpoint).save_pretrained(output_dir)
            load_tokenizer(None, checkpoint).save_pretrained(output_dir)
        note = (f"the run had finished at step {steps} of {planned} ({name}) but {output_dir} held no complete model: "
                f"saved it from {name}")
    if is_main_process():
        print(note, file=sys.stderr)
        print(summary(output_dir, steps, state.get("log_history", [])))
    return True


def prepare_run(args):
    """What the training commands (train, uptrain) do before reading data: one process per GPU, quiet progress bars,
    the output folder checked. Returns (the checkpoint to resume from or None, whether --resume found the run
    finished, which then has nothing left to do)."""
    check_one_process_per_gpu(args)
    if args.quiet:  # also Transformers' own bars (loading and writing weights)
        transformers.logging.disable_progress_bar()
    resume_from = check_output_dir(args)
    return resume_from, resume_from is not None and finished(args, resume_from)


def run(args, callbacks=()):
    """`callbacks`: extra TrainerCallbacks (the tests stop a run with one)."""
    if args.train_file is None and not args.demo_task:
        raise CommandError("give --train-file (JSONL, CSV or Parquet) or --demo-task")
    if args.train_file is not None and args.demo_task:
        raise CommandError("give either --train-file or --demo-task, not both")
    if args.steps is None and args.demo_task:
        raise CommandError("--demo-task generates examples for a number of --steps: give --steps")
    resume_from, done = prepare_run(args)
    if done:
        return
    cache_dir = Path(args.output_dir) / DATA_CACHE
    train_pairs = read_pairs(args, args.train_file, cache_dir=cache_dir) if args.train_file is not None else None
    eval_pairs = read_pairs(args, args.eval_file, cache_dir=cache_dir) if args.eval_file is not None else None
    model_folder = args.model if Path(args.model).is_dir() else None
    if model_folder is not None:
        check_saved_model(model_folder)
    tokenizer = load_tokenizer(args.tokenizer, model_folder)
    torch.manual_seed(args.seed)
    model, description = load_model(args.model, parse_overrides(args.set))
    apply_compile_option(model, args)
    check_vocabulary(tokenizer, model.config)
    if args.demo_task:
        # examples per optimizer step across every process (`accelerate launch` sets WORLD_SIZE)
        batch = args.batch_size * args.gradient_accumulation_steps * int(os.environ.get("WORLD_SIZE", "1"))
        train_pairs = demo_pairs(model.config, args.steps * batch, args.seed, args.demo_length)
        if eval_pairs is None:
            eval_pairs = demo_evaluation_pairs(model.config, args.eval_examples, args.demo_length)
    train_dataset = tokenize(args, tokenizer, model.config, train_pairs, args.train_file or "train")
    eval_dataset = None if eval_pairs is None else tokenize(args, tokenizer, model.config, eval_pairs,
                                                             args.eval_file or "eval")
    if is_main_process():
        print(f"{description}: {sum(p.numel() for p in model.parameters()):,} parameters; "
              f"{len(train_dataset):,} training examples" +
              (f", {len(eval_dataset):,} evaluation examples" if eval_dataset is not None else ""), file=sys.stderr)
    trainer = run_training(args, model, tokenizer, train_dataset, eval_dataset, callbacks, resume_from=resume_from)
    if is_main_process():
        print(summary(args.output_dir, trainer.state.global_step, trainer.state.log_history))
