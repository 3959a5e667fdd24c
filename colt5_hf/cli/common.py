"""What the colt5-hf commands share: loading models and tokenizers, reading data, the options and the Trainer set-up
of the training commands (train, demo)."""

import json
import os
import shutil
import sys
from pathlib import Path

import datasets
import torch
from transformers import AutoTokenizer, ByT5Tokenizer, DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..checkpoints import last_complete_checkpoint
from ..configuration_colt5 import CoLT5Config, preset_names
from ..data import demo_examples, load_pairs, tokenize_pairs
from ..modeling_colt5 import CoLT5ForConditionalGeneration


DEMO_EVAL_SEED = 1_000_003  # the demo task's evaluation examples: a seed no training run uses


class CommandError(Exception):
    """A user error: printed as `colt5-hf <command>: error: <message>`, exit status 2."""


# ---------------------------------------------------------------------------------------------------------- models


def parse_overrides(pairs):
    """`--set key=value` pairs -> dict; values are JSON (numbers, true/false, null, strings need no quotes)."""
    fields = set(CoLT5Config.__dataclass_fields__)
    overrides = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep:
            raise CommandError(f"--set expects KEY=VALUE, got {pair!r}")
        if key not in fields:
            raise CommandError(f"--set {key}: not a CoLT5Config field")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def is_model_folder(path: Path):
    return path.is_dir() and (path / "config.json").is_file()


def load_model(spec: str, overrides=None):
    """A CoLT5ForConditionalGeneration from a saved/converted model folder (weights kept), a config JSON file or a
    preset shipped with the package (fresh weights). Returns (model, description)."""
    overrides = overrides or {}
    path = Path(spec)
    if path.is_dir():
        if not is_model_folder(path):
            raise CommandError(f"{path} is a folder without config.json: not a saved model")
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if model_type != "colt5":
            raise CommandError(
                f"{path} holds a {model_type!r} model, not CoLT5: convert it first with `colt5-hf convert {path} OUT`"
            )
        try:
            model = CoLT5ForConditionalGeneration.from_pretrained(path, **overrides)
        except (OSError, ValueError) as error:
            raise CommandError(f"could not load the model in {path}: {error}") from error
        return model, f"model {path}"
    if path.suffix != ".json" and not path.exists():
        if not {spec, f"colt5-{spec}"} & set(preset_names()):
            raise CommandError(f"{spec!r} is not a model folder, a config file or a preset; the presets are "
                               f"{', '.join(preset_names())}")
        try:
            return CoLT5ForConditionalGeneration(CoLT5Config.from_preset(spec, **overrides)), f"new model {spec}"
        except (ValueError, TypeError) as error:
            raise CommandError(f"preset {spec}: {error}") from error
    if not path.is_file():
        raise CommandError(f"config file not found: {path}")
    try:
        config = CoLT5Config.from_dict(json.loads(path.read_text()), **overrides)
    except (ValueError, TypeError) as error:
        raise CommandError(f"{path}: {error}") from error
    return CoLT5ForConditionalGeneration(config), f"new model from {path}"


def load_saved_model(path):
    path = Path(path)
    if not path.exists():
        raise CommandError(f"model folder not found: {path}")
    if not is_model_folder(path):
        raise CommandError(f"{path} is not a saved model folder (no config.json)")
    model, _ = load_model(str(path))
    return model.eval()


def load_tokenizer(spec, model_folder=None):
    """A transformers tokenizer from `spec` (a folder or Hub id), else the model folder's, else ByT5's byte
    tokenizer (needs no files; its 384 tokens fit every preset)."""
    if spec is not None:
        try:
            return AutoTokenizer.from_pretrained(spec)
        except (OSError, ValueError) as error:
            raise CommandError(f"could not load a tokenizer from {spec}: {error}") from error
    if model_folder is not None and (Path(model_folder) / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(model_folder)
    return ByT5Tokenizer()


def check_vocabulary(tokenizer, config):
    if len(tokenizer) > config.vocab_size:
        raise CommandError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}: use a "
            f"matching tokenizer, or a config with --set vocab_size={len(tokenizer)}"
        )


def source_limit(args, config):
    """--max-source-length, defaulting to (and never beyond) the model's max_input_length."""
    limit = args.max_source_length
    if config.max_input_length is not None:
        if limit is not None and limit > config.max_input_length:
            raise CommandError(f"--max-source-length {limit} exceeds the model's max_input_length "
                               f"({config.max_input_length})")
        limit = limit or config.max_input_length
    return limit


# ------------------------------------------------------------------------------------------------------------ data


def read_dataset(args, tokenizer, config, file, name, with_targets=True, demo_count=None, demo_seed=None):
    """Tokenised dataset from a file or the demo task; prints what --truncate cut."""
    if file is not None:
        pairs = load_pairs(file, args.source_field, args.target_field if with_targets else None)
        name = str(file)
    else:
        pairs = datasets.Dataset.from_list(demo_examples(demo_count, demo_seed, args.demo_length, demo_reach(config)))
    tokenized, report = tokenize_pairs(pairs, tokenizer, source_limit(args, config),
                                       getattr(args, "max_target_length", None), args.truncate, name)
    print_data_report(report)
    return pairs, tokenized


def print_data_report(report):
    """What tokenize_pairs cut (--truncate), on stderr, once per run."""
    if is_main_process():
        for line in report:
            print(line, file=sys.stderr)


def is_main_process():
    """False in every process but the first of a distributed run (`accelerate launch` and torchrun set RANK), so that
    a run reports once."""
    return os.environ.get("RANK", "0") == "0"


def demo_reach(config):
    """How far the model's local attention sees through all encoder layers: the demo task keeps its letters twice
    as far apart."""
    return config.num_layers * config.local_radius


def batches(items, size):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def collator(tokenizer):
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)


def exact_match_metrics(eval_prediction):
    """Share of examples whose every label token is the argmax under teacher forcing; this is exactly the share
    that greedy decoding gets right (greedy reproduces the labels iff each step's argmax given the correct prefix
    is the label, end-of-sequence token included)."""
    predictions, labels = eval_prediction.predictions, eval_prediction.label_ids
    labels = torch.as_tensor(labels)
    predictions = torch.as_tensor(predictions)[:, : labels.shape[1]]
    correct = (predictions == labels) | (labels == -100)
    return {"exact_match": correct.all(-1).float().mean().item()}


def argmax_logits(logits, labels):
    return (logits[0] if isinstance(logits, tuple) else logits).argmax(-1)


# ---------------------------------------------------------------------------------------------------------- options


def add_data_options(sub, targets=True):
    """Options of the commands that read data: fields, tokenizer, length limits."""
    sub.add_argument("--source-field", default="source", help="input text field of the data file (default: source)")
    if targets:
        sub.add_argument("--target-field", default="target", help="output text field (default: target)")
    sub.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: the model folder's, else ByT5 bytes)")
    sub.add_argument("--max-source-length", type=int,
                     help="longer inputs are an error (default: the model's max_input_length, else no limit)")
    if targets:
        sub.add_argument("--max-target-length", type=int, help="longer targets are an error")
    sub.add_argument("--truncate", action="store_true", help="cut inputs to the limits instead, and report it")
    sub.add_argument("--demo-length", type=int, default=256, help="length of the demo task's inputs in tokens")


def add_training_options(sub, steps, eval_steps, learning_rate, warmup_steps=0):
    """Options of the training commands (train, demo) with their defaults."""
    sub.add_argument("--output-dir", default=None, help="checkpoints and the final model (safetensors)")
    sub.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    sub.add_argument("--batch-size", type=int, default=8, help="examples per step and device")
    sub.add_argument("--eval-batch-size", type=int, help="(default: --batch-size)")
    sub.add_argument("--learning-rate", type=float, default=learning_rate)
    sub.add_argument("--warmup-steps", type=int, default=warmup_steps)
    sub.add_argument("--eval-steps", type=int, default=eval_steps, help="evaluate (and log) every N steps")
    sub.add_argument("--eval-examples", type=int, default=256, help="examples of the demo task's evaluation set")
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--quiet", action="store_true", help="no progress bars")


# ----------------------------------------------------------------------------------------------------------- training


def training_arguments(args, has_eval):
    if not args.cpu and torch.cuda.device_count() > 1 and "WORLD_SIZE" not in os.environ:
        # Trainer would wrap the model in nn.DataParallel over every visible GPU, which runs without mixed precision
        # (no autocast: Transformers 5.17 prepares only an unwrapped model with accelerate) and multiplies the batch
        raise CommandError(
            f"{torch.cuda.device_count()} GPUs are visible to a single process: train on several GPUs with "
            "`accelerate launch` (accelerate_configs/ddp.yaml or fsdp.yaml), or on one with CUDA_VISIBLE_DEVICES=0"
        )
    eval_steps = args.eval_steps
    return Seq2SeqTrainingArguments(
        output_dir=str(args.output_dir),
        max_steps=args.steps if args.steps is not None else -1,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size or args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type="linear",
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps,
        logging_steps=args.logging_steps or eval_steps,
        save_strategy="steps",
        save_steps=args.save_steps or eval_steps,
        save_total_limit=args.save_total_limit,
        seed=args.seed,
        bf16=args.bf16,
        use_cpu=args.cpu,
        report_to="none",
        disable_tqdm=args.quiet,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )



def run_training(args, model, tokenizer, train_dataset, eval_dataset, callbacks=(), show_logs=True):
    """Seq2SeqTrainer on the tokenised datasets; returns the trainer after training and saving to output_dir."""
    output_dir = Path(args.output_dir)
    last_checkpoint = last_complete_checkpoint(output_dir)  # skips folders a killed run left half-written
    if args.resume and last_checkpoint is None:
        raise CommandError(f"--resume: no complete checkpoint-* folder in {output_dir} to resume from")
    if not args.resume and not args.overwrite_output_dir and output_dir.is_dir() and any(output_dir.iterdir()):
        raise CommandError(f"{output_dir} is not empty: pass --resume to continue its last checkpoint, "
                           "--overwrite-output-dir to start over in it, or another --output-dir")
    if args.overwrite_output_dir and not args.resume:  # a stale checkpoint must not be resumed later
        for stale in output_dir.glob("checkpoint-*"):
            shutil.rmtree(stale)
    trainer = Seq2SeqTrainer(
        model=model,
        args=training_arguments(args, eval_dataset is not None),
        data_collator=collator(tokenizer),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        compute_metrics=exact_match_metrics if eval_dataset is not None else None,
        preprocess_logits_for_metrics=argmax_logits if eval_dataset is not None else None,
        callbacks=list(callbacks),
    )
    if not show_logs:  # the callbacks print what matters
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    trainer.train(resume_from_checkpoint=last_checkpoint if args.resume else None)
    trainer.save_model(str(output_dir))  # safetensors + config: ready for from_pretrained
    tokenizer.save_pretrained(str(output_dir))
    return trainer

