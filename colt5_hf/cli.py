"""The `colt5-hf` command: demo, train, evaluate, generate, convert, inspect.

    colt5-hf demo                                   # CoLT5 vs local attention on a long-input task, CPU, minutes
    colt5-hf train --model colt5-tiny --train-file train.jsonl --eval-file dev.jsonl --output-dir runs/my-model
    colt5-hf evaluate runs/my-model --file test.jsonl
    colt5-hf generate runs/my-model --text "a long document ..."
    colt5-hf convert google/flan-t5-base runs/flan-colt5-base
    colt5-hf inspect runs/my-model --text "a long document ..." --output routing.png
"""

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import datasets
import torch
from tqdm.auto import tqdm
from transformers import (
    AutoTokenizer,
    ByT5Tokenizer,
    DataCollatorForSeq2Seq,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    TrainerCallback,
)
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .checkpoints import last_complete_checkpoint
from .configuration_colt5 import CoLT5Config, preset_names
from .data import DataError, demo_examples, load_pairs, tokenize_pairs
from .modeling_colt5 import CoLT5ForConditionalGeneration


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
    if is_main_process():
        for line in report:
            print(line, file=sys.stderr)
    return pairs, tokenized


def is_main_process():
    """False in every process but the first of a distributed run (`accelerate launch` and torchrun set RANK), so that
    a run reports once."""
    return os.environ.get("RANK", "0") == "0"


def demo_reach(config):
    """How far the model's local attention sees through all encoder layers: the demo task keeps its letters twice
    as far apart."""
    return config.num_layers * config.local_radius


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


# -------------------------------------------------------------------------------------------------------- training


def switch_off_heavy_branch(model):
    """Local attention only (LongT5-local style): zero the output weights of every encoder layer's heavy attention
    and heavy feed-forward and freeze them with the routers, so the heavy branch adds exactly zero, before and after
    training. The light branch, the decoder and every size stay those of the CoLT5 model."""
    with torch.no_grad():
        for block in model.encoder.block:
            attention, feed_forward = block.attention, block.feed_forward
            attention.heavy_attention.o.weight.zero_()
            feed_forward.heavy_feed_forward.wo.weight.zero_()
            for module in (attention.heavy_attention, attention.q_router, attention.kv_router,
                           feed_forward.heavy_feed_forward, feed_forward.router):
                module.requires_grad_(False)
    return model


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


def command_train(args, callbacks=()):
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
    reach = demo_reach(model.config)
    train_pairs = demo_examples(args.steps * args.batch_size, args.seed, args.demo_length, reach)
    eval_pairs = demo_examples(args.eval_examples, DEMO_EVAL_SEED, args.demo_length, reach)
    train_dataset, _ = tokenize_pairs(datasets.Dataset.from_list(train_pairs), tokenizer, None, None)
    eval_dataset, _ = tokenize_pairs(datasets.Dataset.from_list(eval_pairs), tokenizer, None, None)
    if not heavy:
        switch_off_heavy_branch(model)
    run_args = argparse.Namespace(**vars(args))
    run_args.output_dir, run_args.overwrite_output_dir, run_args.quiet = Path(args.output_dir) / folder, True, True
    rows = []
    run_training(run_args, model, tokenizer, train_dataset, eval_dataset, callbacks=[RowPrinter(label, rows)],
                 show_logs=False)
    return rows


def command_demo(args):
    """Train the tiny preset twice on the demo task, with and without the heavy branch (in parallel, one process
    each when there are two cores), and print the table."""
    import concurrent.futures
    import multiprocessing
    import os

    config = load_model(args.model)[0].config
    example = demo_examples(1, args.seed, args.demo_length, demo_reach(config))[0]
    jobs = 2 if (os.cpu_count() or 1) >= 2 else 1
    threads = max(1, min(4, (os.cpu_count() or 1) // jobs))
    shown = re.sub(r"\.{4,}", lambda run: f"[{len(run.group())} dots]", example["source"])
    print(f"Task: {args.demo_length - 1} characters of '.' holding two capital letters at least "
          f"{2 * demo_reach(config) + 4} apart; the answer "
          f"is the letter that comes first, e.g.\n  {shown} -> {example['target']}\n"
          f"Model: {args.model} (local radius {config.local_radius}), {args.steps} steps of {args.batch_size} examples "
          f"on the CPU ({jobs} process{'es' if jobs > 1 else ''}, {threads} thread{'s' if threads > 1 else ''} each), "
          f"exact match on {args.eval_examples} held-out examples every {args.eval_steps} steps.\n", flush=True)
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
    window = 2 * config.local_radius + 1
    print(f"\nLocal attention sees {window} positions around each token per layer. Through the decoder's "
          "cross-attention it finds both letters, but nothing tells it which one comes first: swapping them only "
          "moves its encoder outputs, so it is right half the time (50%, give or take "
          f"{50 / args.eval_examples ** 0.5:.0f}% on {args.eval_examples} examples). CoLT5's routers send tokens to the "
          "heavy branch, whose attention spans the input with relative positions: it can tell where a letter sits "
          "between the two ends of the input, each at least "
          f"{2 * demo_reach(config) + 4} positions away.\n"
          f"Models: {args.output_dir}/colt5 and {args.output_dir}/local-only. What did the routers pick?\n"
          f"  colt5-hf inspect {args.output_dir}/colt5 --demo-task --output {args.output_dir}/routing.png")


# ------------------------------------------------------------------------------------------- evaluate / generate


def load_saved_model(path):
    path = Path(path)
    if not path.exists():
        raise CommandError(f"model folder not found: {path}")
    if not is_model_folder(path):
        raise CommandError(f"{path} is not a saved model folder (no config.json)")
    model, _ = load_model(str(path))
    return model.eval()


def batches(items, size):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def command_evaluate(args):
    model = load_saved_model(args.model)
    tokenizer = load_tokenizer(args.tokenizer, args.model)
    if (args.file is None) == (not args.demo_task):
        raise CommandError("give --file or --demo-task")
    pairs, tokenized = read_dataset(args, tokenizer, model.config, args.file, "eval",
                                    demo_count=args.eval_examples, demo_seed=DEMO_EVAL_SEED)
    collate = collator(tokenizer)
    loss_sum, token_count, correct, predictions = 0.0, 0, 0, []
    rows = [tokenized[i] for i in range(len(tokenized))]
    with torch.no_grad():
        for start, chunk in zip(range(0, len(rows), args.batch_size), batches(rows, args.batch_size)):
            batch = collate(chunk)
            labels = batch["labels"]
            output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
            count = int((labels != -100).sum())
            loss_sum, token_count = loss_sum + output.loss.item() * count, token_count + count
            generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       max_new_tokens=args.max_new_tokens or labels.shape[1] + 8,
                                       num_beams=args.num_beams)
            for offset, text in enumerate(tokenizer.batch_decode(generated, skip_special_tokens=True)):
                target = pairs[start + offset]["target"]
                correct += text.strip() == target.strip()
                predictions.append({"source": pairs[start + offset]["source"], "target": target,
                                    "prediction": text})
    metrics = {"examples": len(rows), "loss": loss_sum / max(token_count, 1),
               "exact_match": correct / max(len(rows), 1)}
    if args.predictions is not None:
        with open(args.predictions, "w") as handle:
            for prediction in predictions:
                handle.write(json.dumps(prediction) + "\n")
        metrics["predictions"] = str(args.predictions)
    print(json.dumps(metrics))


def command_generate(args):
    model = load_saved_model(args.model)
    tokenizer = load_tokenizer(args.tokenizer, args.model)
    if (args.file is None) == (not args.text):
        raise CommandError("give --text (repeatable) or --file")
    if args.text:
        pairs = datasets.Dataset.from_list([{"source": text} for text in args.text])
        tokenized, report = tokenize_pairs(pairs, tokenizer, source_limit(args, model.config), None, args.truncate,
                                           "--text")
        for line in report:
            print(line, file=sys.stderr)
    else:
        pairs, tokenized = read_dataset(args, tokenizer, model.config, args.file, "input", with_targets=False)
    collate = collator(tokenizer)
    rows = [tokenized[i] for i in range(len(tokenized))]
    with torch.no_grad():
        for chunk in batches(rows, args.batch_size):
            batch = collate(chunk)
            generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
            for text in tokenizer.batch_decode(generated, skip_special_tokens=True):
                print(text)


# ---------------------------------------------------------------------------------------------- convert / inspect


def command_convert(args):
    from .conversion import convert_checkpoint

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


def command_inspect(args):
    from .inspection import plot_routing, routing_rows

    model = load_saved_model(args.model)
    tokenizer = load_tokenizer(args.tokenizer, args.model)
    if sum((args.text is not None, args.file is not None, args.demo_task)) != 1:
        raise CommandError("give one of --text, --file or --demo-task")
    if args.text is not None:
        text = args.text
    else:
        if args.file is not None:
            pairs = load_pairs(args.file, args.source_field, None)
        else:
            pairs = demo_examples(args.index + 1, DEMO_EVAL_SEED, args.demo_length, demo_reach(model.config))
        if not 0 <= args.index < len(pairs):
            raise CommandError(f"--index {args.index}: the input holds {len(pairs)} examples")
        text = pairs[args.index]["source"]
    tokenized, report = tokenize_pairs(datasets.Dataset.from_list([{"source": text}]), tokenizer,
                                       source_limit(args, model.config), None, args.truncate, "input")
    for line in report:
        print(line, file=sys.stderr)
    input_ids = torch.tensor([tokenized[0]["input_ids"]])
    with torch.no_grad(), model.record_routing() as routing:
        generated = model.generate(input_ids=input_ids, max_new_tokens=args.max_new_tokens)
    tokens = tokenizer.convert_ids_to_tokens(input_ids[0].tolist())
    output_text = tokenizer.decode(generated[0], skip_special_tokens=True)
    plot_routing(routing, tokens, args.output, title=f"{args.model}: output {output_text!r}")
    occurrences = {}
    for token in tokens:
        occurrences[token] = occurrences.get(token, 0) + 1
    print(f"{'router':<28} {'picked':>12}  picks, tokens that occur once in the input first (token@position)")
    for label, positions in routing_rows(routing).items():
        ordered = sorted(positions, key=lambda i: (occurrences[tokens[i]] > 1, i))
        shown = " ".join(f"{tokens[i]!r}@{i}" for i in ordered[:8]) + (" ..." if len(ordered) > 8 else "")
        print(f"{label:<28} {len(positions):>5} / {len(tokens):<5} {shown}")
    print(json.dumps({"output": output_text, "plot": str(args.output)}))


# ------------------------------------------------------------------------------------------------------------ parser


def build_parser():
    parser = argparse.ArgumentParser(prog="colt5-hf", description="CoLT5 (conditional long T5) for Transformers.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def data_options(sub, targets=True):
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

    def training_options(sub, steps, eval_steps, learning_rate, warmup_steps=0):
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

    demo = commands.add_parser("demo", help="CoLT5 vs local attention on a long-input task (the default command)")
    demo.add_argument("--model", default="colt5-tiny", help="preset or config file (default: colt5-tiny)")
    training_options(demo, steps=2000, eval_steps=250, learning_rate=5e-4, warmup_steps=100)
    demo.add_argument("--demo-length", type=int, default=256, help="length of the inputs in tokens (default: 256)")
    demo.set_defaults(output_dir="runs/demo", function=command_demo, epochs=1.0, gradient_accumulation_steps=1,
                      weight_decay=0.0, logging_steps=None, save_steps=None, save_total_limit=1, bf16=False,
                      cpu=True, resume=False)

    train = commands.add_parser("train", help="fine-tune with Seq2SeqTrainer")
    train.add_argument("--model", required=True,
                       help="preset name (" + ", ".join(preset_names()) + "), config JSON, or saved/converted model folder")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override for a new model (repeatable)")
    train.add_argument("--train-file", help="JSONL, JSON, CSV or Parquet file of source/target pairs")
    train.add_argument("--eval-file", help="evaluation file (loss and exact match every --eval-steps)")
    train.add_argument("--demo-task", action="store_true", help="train on the bundled synthetic task")
    data_options(train)
    training_options(train, steps=None, eval_steps=500, learning_rate=5e-4)
    train.add_argument("--epochs", type=float, default=3.0, help="passes over the data when --steps is not given")
    train.add_argument("--gradient-accumulation-steps", type=int, default=1)
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--logging-steps", type=int, help="(default: --eval-steps)")
    train.add_argument("--save-steps", type=int, help="checkpoint every N steps (default: --eval-steps)")
    train.add_argument("--save-total-limit", type=int, help="keep only the last N checkpoints")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    train.add_argument("--overwrite-output-dir", action="store_true")
    train.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision")
    train.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is there")
    train.set_defaults(function=command_train)

    evaluate = commands.add_parser("evaluate", help="loss and exact match (greedy generation) of a saved model")
    evaluate.add_argument("model", help="saved model folder")
    evaluate.add_argument("--file", help="JSONL, JSON, CSV or Parquet file of source/target pairs")
    evaluate.add_argument("--demo-task", action="store_true", help="the demo task's evaluation examples")
    evaluate.add_argument("--eval-examples", type=int, default=256)
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--max-new-tokens", type=int, help="(default: the longest target + 8)")
    evaluate.add_argument("--num-beams", type=int, default=1)
    evaluate.add_argument("--predictions", help="write source/target/prediction JSONL here")
    data_options(evaluate)
    evaluate.set_defaults(function=command_evaluate)

    generate = commands.add_parser("generate", help="generate from a saved model")
    generate.add_argument("model", help="saved model folder")
    generate.add_argument("--text", action="append", help="input text (repeatable)")
    generate.add_argument("--file", help="JSONL, JSON, CSV or Parquet file of inputs (--source-field)")
    generate.add_argument("--batch-size", type=int, default=16)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--num-beams", type=int, default=1)
    data_options(generate, targets=False)
    generate.set_defaults(function=command_generate)

    convert = commands.add_parser("convert", help="CoLT5 from a T5.1.1 / FLAN-T5 / mT5 / LongT5 (local) checkpoint")
    convert.add_argument("source", help="checkpoint folder or Hub id")
    convert.add_argument("output", help="folder for the CoLT5 model")
    convert.add_argument("--set", action="append", metavar="KEY=VALUE",
                         help="CoLT5 config field, e.g. num_light_heads=4, local_radius=127 (repeatable)")
    convert.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    convert.add_argument("--overwrite-output-dir", action="store_true")
    convert.set_defaults(function=command_convert)

    inspect = commands.add_parser("inspect", help="plot which tokens every router picks (PNG)")
    inspect.add_argument("model", help="saved model folder")
    inspect.add_argument("--text", help="input text")
    inspect.add_argument("--file", help="data file; plots example --index")
    inspect.add_argument("--demo-task", action="store_true", help="an evaluation example of the demo task")
    inspect.add_argument("--index", type=int, default=0)
    inspect.add_argument("--output", default="routing.png", help="PNG file to write (default: routing.png)")
    inspect.add_argument("--max-new-tokens", type=int, default=32)
    data_options(inspect, targets=False)
    inspect.set_defaults(function=command_inspect)
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


if __name__ == "__main__":
    main()
