"""What the colt5-hf commands share: their errors and option types, the checks of output paths, loading models and
tokenizers, reading data, the Trainer set-up of the training commands (train, demo, uptrain)."""

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import datasets
import torch
from transformers import (
    AutoTokenizer,
    ByT5Tokenizer,
    DataCollatorForSeq2Seq,
    LogitsProcessor,
    LogitsProcessorList,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
)
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..checkpoints import last_complete_checkpoint
from ..configuration_colt5 import CoLT5Config, preset_names
from .. import synthetic
from ..data import DataError, load_pairs, tokenize_pairs
from ..modeling_colt5 import CoLT5ForConditionalGeneration


DEMO_TASK = "nearest"  # which of two letters lies nearer an anchor: no position shortcut, no local-attention answer
DEMO_LENGTH = 512
DEMO_EVAL_SEED = 1_000_003  # the demo task's evaluation examples: a seed no training run uses
DATA_CACHE = "data-cache"  # train's Arrow files of its data files, inside --output-dir (docs/command.md)
# the files a tokenizer folder holds one of (fast tokenizers, SentencePiece, BPE and WordPiece vocabularies)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "tokenizer.model",
                   "sentencepiece.bpe.model", "vocab.json", "vocab.txt")


# ---------------------------------------------------------------------------------------------------------- errors


class CommandError(Exception):
    """A problem with the command line or with what it names (an option, a file, a folder, the data): printed as
    `colt5-hf COMMAND: error: MESSAGE`, exit status 2."""

    status = 2


class RunError(CommandError):
    """The work failed (a write refused, the disk full): one line, exit status 1."""

    status = 1


class Interrupted(CommandError):
    """Ctrl-C: one line saying where the run stopped, exit status 130 (how a shell reports SIGINT)."""

    status = 130


def one_line(error) -> str:
    """An exception's message on one line (Transformers' and datasets' messages span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def free_space(folder) -> str:
    try:
        folder = Path(folder)
        while not folder.exists():
            folder = folder.parent
        return f"{shutil.disk_usage(folder).free / 2**20:,.0f} MiB free"
    except OSError:
        return "free space unknown"


@contextlib.contextmanager
def writing(what, folder, advice):
    """A failed write inside the block (safetensors, torch.save, json: each words a full disk its own way) becomes
    one line naming `what` was written, the free space in `folder` and `advice`."""
    try:
        yield
    except Exception as error:
        raise RunError(f"could not write {what}: {one_line(error)} ({free_space(folder)} there); {advice}") from error


# --------------------------------------------------------------------------------------------------------- options


def _number(kind, text, positive):
    try:
        value = kind(text)
    except ValueError:
        kind_name = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {kind_name}, got {text!r}") from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise argparse.ArgumentTypeError(f"must be {'positive' if positive else 'at least 0'}, got {text}")
    return value


def positive_int(text):
    return _number(int, text, positive=True)


def non_negative_int(text):
    return _number(int, text, positive=False)


def positive_float(text):
    return _number(float, text, positive=True)


def non_negative_float(text):
    return _number(float, text, positive=False)


def add_data_options(parser, targets=True):
    """Options of the commands that read data: fields, tokenizer, length limits."""
    parser.add_argument("--source-field", default="source",
                        help="input text field of the data file (default: source)")
    if targets:
        parser.add_argument("--target-field", default="target", help="output text field (default: target)")
    parser.add_argument("--tokenizer",
                        help="tokenizer folder or Hub id (default: the model folder's, else ByT5 bytes)")
    parser.add_argument("--max-source-length", type=positive_int,
                        help="longer inputs are an error (default: the model's max_input_length, else no limit)")
    if targets:
        parser.add_argument("--max-target-length", type=positive_int, help="longer targets are an error")
    parser.add_argument("--truncate", action="store_true", help="cut inputs to the limits instead, and report it")
    parser.add_argument("--demo-length", type=positive_int, default=DEMO_LENGTH,
                        help=f"length of the demo task's inputs in tokens (default: {DEMO_LENGTH})")


def add_device_options(parser, running="run"):
    """--cpu and --no-compile: where the model runs, and whether its encoder compiles there."""
    parser.add_argument("--cpu", action="store_true", help=f"{running} on the CPU even when a GPU is there")
    parser.add_argument("--no-compile", action="store_true",
                        help="run the encoder eagerly (on a GPU it compiles by default for inputs of 2048 tokens or "
                             "more, once per length bucket: see docs/performance.md)")


def device_of(args):
    return torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")


def apply_compile_option(model, args):
    if args.no_compile:
        model.config.encoder_compile = "off"
    return model


def add_training_options(parser, steps, eval_steps, learning_rate, warmup_steps=0, output_dir=None,
                         eval_examples_help="examples of the demo task's evaluation set"):
    """Options of the training commands (train, demo, uptrain) with their defaults; no `output_dir` default:
    required."""
    parser.add_argument("--output-dir", default=output_dir, required=output_dir is None,
                        help="checkpoints and the final model (safetensors)"
                        + (f" (default: {output_dir})" if output_dir else ""))
    parser.add_argument("--steps", type=positive_int, default=steps, help="optimizer steps")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="examples per step and device")
    parser.add_argument("--eval-batch-size", type=positive_int, help="(default: --batch-size)")
    parser.add_argument("--learning-rate", type=positive_float, default=learning_rate)
    parser.add_argument("--warmup-steps", type=non_negative_int, default=warmup_steps)
    parser.add_argument("--eval-steps", type=positive_int, default=eval_steps, help="evaluate (and log) every N steps")
    parser.add_argument("--eval-examples", type=positive_int, default=256, help=eval_examples_help)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_run_options(parser, epochs):
    """Options of the commands that train from files (train, uptrain): the length of the run, the optimizer's
    extras, logging, checkpoints and resuming, precision."""
    parser.add_argument("--epochs", type=positive_float, default=epochs,
                        help="passes over the data when --steps is not given")
    parser.add_argument("--gradient-accumulation-steps", type=positive_int, default=1)
    parser.add_argument("--weight-decay", type=non_negative_float, default=0.0)
    parser.add_argument("--logging-steps", type=positive_int, help="(default: --eval-steps)")
    parser.add_argument("--save-steps", type=positive_int, help="checkpoint every N steps (default: --eval-steps)")
    parser.add_argument("--save-total-limit", type=positive_int, help="keep only the last N checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    parser.add_argument("--overwrite-output-dir", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision")


def check_text(texts):
    """Text from the command line is UTF-8 or an error: Python keeps undecodable bytes of argv as lone surrogates,
    which the tokenizer cannot encode."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise CommandError(f"--text is not UTF-8 text (byte 0x{ord(text[error.start]) & 0xFF:02x} at "
                               f"character {error.start + 1}); pass UTF-8 text") from None


# ------------------------------------------------------------------------------------------------ output checks


def check_writable_folder(path, option):
    """Before any work: the output folder `path` can be written, itself if it exists, else the nearest folder above
    it, where it will be made (by a probe file that leaves no trace: as root, permission bits stop no write, a
    read-only file system does). Creates nothing."""
    path = Path(path)
    try:
        existing = path
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise CommandError(f"{option} {path}: {existing} is a file, not a folder")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise CommandError(f"{option} {path}: cannot write there ({error.strerror or error}); choose a folder you "
                           "can write to") from None


def check_writable_file(path, option):
    """Before any work: the output file `path` can be written (appending nothing to an existing one)."""
    path = Path(path)
    try:
        if path.is_dir():
            raise CommandError(f"{option} {path} is a folder: give a file name")
        if not path.parent.is_dir():
            raise CommandError(f"{option} {path}: the folder {path.parent} does not exist")
        if path.exists():
            open(path, "ab").close()
        else:
            with tempfile.TemporaryFile(dir=path.parent):
                pass
    except OSError as error:
        raise CommandError(f"{option} {path}: cannot write it ({error.strerror or error}); choose a file you can "
                           "write") from None


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


def read_config_file(path):
    """The fields of a config file: a JSON object with "model_type". Anything else is one line naming the file."""
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CommandError(f"{path} is not UTF-8 text: a config is a JSON object of CoLT5Config fields") from None
    except json.JSONDecodeError as error:
        raise CommandError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})"
                           ) from None
    except OSError as error:
        raise CommandError(f"cannot read {path} ({error.strerror or error})") from None
    if not isinstance(values, dict):
        raise CommandError(f"{path} holds a JSON {type(values).__name__}, not a config (a JSON object of fields)")
    if "model_type" not in values:
        raise CommandError(f'{path} has no "model_type": a CoLT5 config says "model_type": "colt5"')
    return values


def load_model(spec: str, overrides=None):
    """A CoLT5ForConditionalGeneration from a saved/converted model folder (weights kept), a config JSON file or a
    preset shipped with the package (fresh weights). Returns (model, description)."""
    overrides = overrides or {}
    path = Path(spec)
    if path.is_dir():
        check_saved_model(path)
        try:
            model = CoLT5ForConditionalGeneration.from_pretrained(path, **overrides)
        except (OSError, ValueError) as error:
            raise CommandError(f"could not load the model in {path}: {one_line(error)}") from error
        return model, f"model {path}"
    if path.suffix != ".json" and not path.exists():
        if not {spec, f"colt5-{spec}"} & set(preset_names()):
            raise CommandError(f"{spec!r} is not a model folder, a config file or a preset; the presets are "
                               f"{', '.join(preset_names())}")
        try:
            return CoLT5ForConditionalGeneration(CoLT5Config.from_preset(spec, **overrides)), f"new model {spec}"
        except (ValueError, TypeError) as error:
            raise CommandError(f"preset {spec}: {one_line(error)}") from error
    if not path.is_file():
        raise CommandError(f"config file not found: {path}")
    values = read_config_file(path)
    if values["model_type"] != "colt5":
        raise CommandError(f"{path} is the config of a {values['model_type']!r} model, not of CoLT5")
    try:
        config = CoLT5Config.from_dict(values, **overrides)
    except (ValueError, TypeError) as error:
        raise CommandError(f"{path}: {one_line(error)}") from error
    return CoLT5ForConditionalGeneration(config), f"new model from {path}"


def check_saved_model(path):
    """A saved CoLT5 model folder: its config.json a JSON object of model type colt5. Cheap: the commands check it
    before loading the tokenizer (which reads config.json too) and the weights."""
    path = Path(path)
    if not path.exists():
        raise CommandError(f"model folder not found: {path}")
    if not is_model_folder(path):
        raise CommandError(f"{path} is not a saved model folder (no config.json)")
    model_type = read_config_file(path / "config.json")["model_type"]
    if model_type != "colt5":
        raise CommandError(
            f"{path} holds a {model_type!r} model, not CoLT5: convert it first with `colt5-hf convert {path} OUT`"
        )


def load_saved_model(path):
    model, _ = load_model(str(path))
    return model.eval()


def has_tokenizer_files(folder):
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def looks_like_a_path(spec: str):
    """A Hub id is NAME or OWNER/NAME; anything else that does not exist here is a missing folder."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec or spec.endswith("/")


def load_tokenizer(spec, model_folder=None):
    """A transformers tokenizer from `spec` (a folder or Hub id), else the model folder's, else ByT5's byte
    tokenizer (needs no files; its 384 tokens fit every preset)."""
    if spec is not None:
        path = Path(spec).expanduser()
        if path.exists() or looks_like_a_path(spec):
            if not path.is_dir():
                raise CommandError(f"no tokenizer at {spec}: {'not a folder' if path.exists() else 'no such folder'}")
            if not has_tokenizer_files(path):
                raise CommandError(f"no tokenizer at {spec}: the folder holds none of {', '.join(TOKENIZER_FILES)}")
        return checked_tokenizer(str(path) if path.exists() else spec)
    if model_folder is not None and has_tokenizer_files(model_folder):
        return checked_tokenizer(model_folder)
    return ByT5Tokenizer()


def checked_tokenizer(source):
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as error:  # the tokenizers library raises a bare Exception for a corrupt tokenizer.json
        raise CommandError(f"could not load a tokenizer from {source}: {one_line(error)}") from error
    check_has_vocabulary(tokenizer, source)
    return tokenizer


def check_has_vocabulary(tokenizer, source):
    """A tokenizer built from a folder without vocabulary files holds only its special tokens and maps every word to
    the unknown token: an error, never a silent <unk> training run. Real vocabularies hold hundreds or more."""
    special = set(tokenizer.get_added_vocab())
    words = len(set(tokenizer.get_vocab()) - special)
    if words < 32:
        raise CommandError(f"the tokenizer from {source} has no vocabulary ({words} tokens besides {len(special)} "
                           f"special ones): it maps words to {tokenizer.unk_token}; give the tokenizer the model was "
                           "trained with (--tokenizer)")


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


def data_file_cache(cache_dir=None):
    """Where datasets keeps the Arrow files of a data file (docs/command.md): in its own cache where the user set
    HF_DATASETS_CACHE; else in `cache_dir` (train: --output-dir/data-cache, reused by --resume); else nowhere, the
    file read into memory. Never datasets' hidden default cache under ~/.cache."""
    if "HF_DATASETS_CACHE" in os.environ:
        return {}
    return {"cache_dir": cache_dir} if cache_dir is not None else {"in_memory": True}


def read_pairs(args, file, with_targets=True, cache_dir=None):
    """The source (and target) texts of a data file, read before any model is loaded, so that its errors come first."""
    return load_pairs(file, args.source_field, args.target_field if with_targets else None,
                      **data_file_cache(cache_dir))


def demo_pairs(config, count, seed, length):
    """`count` examples of the demo task (synthetic.py's `nearest`) at the geometry of a model of `config`."""
    try:
        pairs = synthetic.examples(DEMO_TASK, count, seed, length, synthetic.Geometry.of(config))
    except ValueError as error:
        raise DataError(f"the demo task: {error}") from None
    return datasets.Dataset.from_list(pairs)


def demo_evaluation_pairs(config, count, length):
    """The demo task's evaluation set: examples each followed by its mirror, the same input with the two letters
    swapped (the other letter the answer). A model blind to the relation answers an example and its mirror alike and
    scores exactly 50% here, whichever letters it prefers; on independent examples its score would stray from 50% by
    how often its favourites happen to be the answer."""
    mirrored = []
    for pair in demo_pairs(config, (count + 1) // 2, DEMO_EVAL_SEED, length):
        source, answer = pair["source"], pair["target"]
        other = next(c for c in source if c.isupper() and c != answer)
        swapped = source.translate(str.maketrans({answer: other, other: answer}))
        mirrored += [pair, {"source": swapped, "target": other}]
    return datasets.Dataset.from_list(mirrored[:count])


def tokenize(args, tokenizer, config, pairs, name):
    """The tokenised pairs within the length options (--max-source-length, --max-target-length, --truncate); prints
    what was cut."""
    tokenized, report = tokenize_pairs(pairs, tokenizer, source_limit(args, config),
                                       getattr(args, "max_target_length", None), args.truncate, name)
    print_data_report(report)
    return tokenized


def print_data_report(report):
    """What tokenize_pairs cut (--truncate), on stderr, once per run."""
    if is_main_process():
        for line in report:
            print(line, file=sys.stderr)


def is_main_process():
    """False in every process but the first of a distributed run (`accelerate launch` and torchrun set RANK), so that
    a run reports once."""
    return os.environ.get("RANK", "0") == "0"


def batches(items, size):
    for start in range(0, len(items), size):
        yield items[start:start + size]


class TokenizerVocabulary(LogitsProcessor):
    """Generation keeps to the ids the tokenizer decodes: a model's vocab_size may exceed its tokenizer (T5's 32128
    rows for 32100 tokens, a preset's 32128 with the ByT5 byte tokenizer's 384), and an id beyond the tokenizer cannot
    be written out (ByT5 raises)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, input_ids, scores):
        return scores.index_fill(-1, torch.arange(self.size, scores.shape[-1], device=scores.device), float("-inf"))


def decodable(tokenizer, config):
    """generate()'s `logits_processor` that keeps it to `tokenizer`'s ids (TokenizerVocabulary), where the model's
    vocabulary is larger."""
    if len(tokenizer) >= config.vocab_size:
        return LogitsProcessorList()
    return LogitsProcessorList([TokenizerVocabulary(len(tokenizer))])


def collator(tokenizer):
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)


# -------------------------------------------------------------------------------------------------------- training


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


def check_one_process_per_gpu(args):
    if not args.cpu and torch.cuda.device_count() > 1 and "WORLD_SIZE" not in os.environ:
        # Trainer would wrap the model in nn.DataParallel over every visible GPU, which runs without mixed precision
        # (no autocast: Transformers 5.17 prepares only an unwrapped model with accelerate) and multiplies the batch
        raise CommandError(
            f"{torch.cuda.device_count()} GPUs are visible to a single process: train on several GPUs with "
            "`accelerate launch` (accelerate_configs/ddp.yaml or fsdp.yaml), or on one with CUDA_VISIBLE_DEVICES=0"
        )


def training_arguments(args, has_eval):
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
        eval_on_start=has_eval and getattr(args, "eval_on_start", False),
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


def write_advice(resumable):
    return "free space there or choose another --output-dir" + (
        "; --resume continues from the last complete checkpoint" if resumable else "")


class CommandTrainer(Seq2SeqTrainer):
    """Seq2SeqTrainer whose failed checkpoint write (a full disk) is one line naming the checkpoint folder."""

    def __init__(self, *args, resumable, **kwargs):
        super().__init__(*args, **kwargs)
        self.resumable = resumable

    def _save_checkpoint(self, *args, **kwargs):
        output_dir = Path(self.args.output_dir)
        with writing(output_dir / f"checkpoint-{self.state.global_step}", output_dir, write_advice(self.resumable)):
            return super()._save_checkpoint(*args, **kwargs)


def run_training(args, model, tokenizer, train_dataset, eval_dataset, callbacks=(), show_logs=True,
                 resume_from=None, exact_match=True):
    """Seq2SeqTrainer on the tokenised datasets (`eval_dataset` one dataset, or a dict of them, each evaluated and
    logged under its name), from the checkpoint `resume_from` if given; returns the trainer after training and saving
    to output_dir. `exact_match`: evaluation reports the exact match besides the loss. Ctrl-C is one line saying where
    the run stopped. `args` of a command without --resume (the demo) get no advice to resume."""
    output_dir = Path(args.output_dir)
    resumable = hasattr(args, "resume")
    if args.overwrite_output_dir and resume_from is None:  # a stale checkpoint must not be resumed later
        for stale in output_dir.glob("checkpoint-*"):
            shutil.rmtree(stale)
    trainer = CommandTrainer(
        model=model,
        args=training_arguments(args, eval_dataset is not None),
        data_collator=collator(tokenizer),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        compute_metrics=exact_match_metrics if eval_dataset is not None and exact_match else None,
        preprocess_logits_for_metrics=argmax_logits if eval_dataset is not None and exact_match else None,
        callbacks=list(callbacks),
        resumable=resumable,
    )
    if not show_logs:  # the callbacks print what matters
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except KeyboardInterrupt:
        message = f"interrupted at step {trainer.state.global_step} of {trainer.state.max_steps}"
        if resumable:
            last = last_complete_checkpoint(output_dir)
            message += f"; --resume continues from {Path(last).name}" if last else "; no checkpoint yet to resume"
        raise Interrupted(message) from None
    with writing(f"the model to {output_dir}", output_dir, write_advice(resumable)):
        trainer.save_model(str(output_dir))  # safetensors + config: ready for from_pretrained
        tokenizer.save_pretrained(str(output_dir))
    return trainer
