"""colt5-hf uptrain: continued pre-training of a (converted) model on plain text with UL2's mixture of denoisers, the
way CoLT5 was built from T5.1.1 checkpoints (colt5_hf/denoising.py makes the examples)."""

import sys
from pathlib import Path

import torch

from ..configuration_colt5 import preset_names
from ..data import load_documents, load_hub_documents
from ..denoising import (Examples, MixtureError, check_lengths, denoising_data, encode, load_mixture, mixture_names,
                         pack, token_stream)
from .common import (
    CommandError,
    add_device_options,
    add_run_options,
    add_training_options,
    apply_compile_option,
    batches,
    check_saved_model,
    check_vocabulary,
    data_file_cache,
    is_main_process,
    load_model,
    load_tokenizer,
    parse_overrides,
    positive_int,
    run_training,
)
from .train import prepare_run, summary


DEFAULT_LENGTH = 16384  # the CoLT5 paper's long inputs; a model with max_input_length uses that instead


def add_parser(commands):
    parser = commands.add_parser("uptrain", help="continued pre-training on text with UL2's mixture of denoisers")
    parser.add_argument("model", metavar="MODEL", help="converted or saved model folder, preset name (" +
                        ", ".join(preset_names()) + ") or config JSON")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="config override for a new model (repeatable)")
    parser.add_argument("--train-files", nargs="+", metavar="FILE",
                        help="text files (one document each) and JSONL, JSON, CSV or Parquet files (one document a row, "
                             "in --text-field)")
    parser.add_argument("--dataset", metavar="NAME", help="a text dataset on the Hugging Face Hub, streamed (needs the "
                        "network), instead of --train-files")
    parser.add_argument("--dataset-config", help="the --dataset's configuration, e.g. en")
    parser.add_argument("--dataset-split", default="train", help="(default: train)")
    parser.add_argument("--max-documents", type=positive_int, default=100_000,
                        help="documents read from --dataset (default: 100000)")
    parser.add_argument("--eval-files", nargs="+", metavar="FILE",
                        help="evaluation documents: the loss of each denoiser every --eval-steps")
    parser.add_argument("--text-field", default="text", help="text field of JSONL/CSV/Parquet rows (default: text)")
    parser.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: the model folder's, else ByT5 bytes); "
                        "it needs T5's sentinel tokens <extra_id_N>")
    parser.add_argument("--denoisers", default="colt5", metavar="MIXTURE",
                        help=f"mixture of denoisers: {', '.join(mixture_names())} or a JSON file (default: colt5; "
                             "docs/command.md lists them)")
    parser.add_argument("--no-mode-tokens", action="store_true",
                        help="no mode prefix ([NLU], [NLG], [S2S]) at the start of the inputs")
    parser.add_argument("--length", type=positive_int,
                        help=f"input length in tokens that documents are packed to (default: the model's "
                             f"max_input_length, else {DEFAULT_LENGTH})")
    parser.add_argument("--max-target-length", type=positive_int,
                        help="longest target in tokens (default: a quarter of --length)")
    add_training_options(parser, steps=None, eval_steps=500, learning_rate=1e-4, warmup_steps=100,
                         eval_examples_help="evaluation examples per denoiser, the first of its set (default: 256)")
    add_run_options(parser, epochs=1.0)
    parser.add_argument("--eval-on-start", action="store_true",
                        help="evaluate before the first step too: the loss the model starts from")
    add_device_options(parser, "train")
    return parser


def check_sources(args):
    if (args.train_files is None) == (args.dataset is None):
        raise CommandError("give the training text: --train-files FILE ... or --dataset NAME (not both)")
    if args.dataset is None and args.dataset_config is not None:
        raise CommandError("--dataset-config goes with --dataset")


def read_documents(args, files):
    """The text of every document, the files in the order given, before any model or tokenizer is loaded. Tables are
    read into memory (or datasets' cache where HF_DATASETS_CACHE says): their text is held in memory anyway."""
    documents = []
    for file in files:
        documents += load_documents(file, args.text_field, **data_file_cache())
    return documents


def tokenized_stream(tokenizer, documents, data):
    ids = []
    for batch in batches(documents, 256):
        ids += encode(tokenizer, batch)
    return token_stream(ids, data.eos)


def denoising_setup(args, tokenizer, mixture, length):
    """The tokenizer's sentinels and mode prefixes for the mixture, checked against the lengths (with `length`
    None: the model's, not known yet, so only the tokenizer is checked)."""
    try:
        data = denoising_data(tokenizer, mixture, mode_tokens=not args.no_mode_tokens)
        if length is not None:
            check_lengths(mixture, data, length, target_limit(args, length))
    except MixtureError as error:
        raise CommandError(str(error)) from None
    return data


def target_limit(args, length):
    return args.max_target_length or max(length // 4, 1)


def training_examples(args, tokenizer, data, mixture, documents, length):
    """The documents packed into examples, each with a denoiser drawn from the mixture."""
    return pack(tokenized_stream(tokenizer, documents, data), mixture, data, length, target_limit(args, length),
                args.seed)


def evaluation_examples(args, tokenizer, data, mixture, documents, length):
    """{denoiser name: Examples}: every denoiser on the whole evaluation text, so that each loss measures the same
    documents; the first --eval-examples of each."""
    stream = tokenized_stream(tokenizer, documents, data)
    return {denoiser.name: Examples(pack(stream, mixture, data, length, target_limit(args, length), args.seed,
                                         only=denoiser.name)[:args.eval_examples]) for denoiser in mixture}


def describe(description, model, mixture, train, evaluation, length, max_target_length):
    counts = [sum(1 for example in train if example["denoiser"] == i) for i in range(len(mixture))]
    tokens = sum(len(example["input_ids"]) for example in train)
    mix = ", ".join(f"{denoiser.name} {count}" for denoiser, count in zip(mixture, counts))
    line = (f"{description}: {sum(p.numel() for p in model.parameters()):,} parameters; {len(train):,} training "
            f"examples ({mix}) of at most {length} input and {max_target_length} target tokens, {tokens:,} input "
            "tokens")
    if evaluation is not None:
        line += f"; {sum(len(examples) for examples in evaluation.values()):,} evaluation examples"
    print(line, file=sys.stderr)


def run(args, callbacks=(), model=None):
    """`callbacks`: extra TrainerCallbacks (the tests stop a run with one). `model`: a model to train instead of
    loading MODEL (benchmarks/uptrain.py trains its dense T5 baseline through the same loop); MODEL then only names
    the tokenizer's folder."""
    check_sources(args)
    try:
        mixture = load_mixture(args.denoisers)
    except MixtureError as error:
        raise CommandError(f"--denoisers: {error}") from None
    resume_from, done = prepare_run(args)
    if done:
        return
    if args.dataset is not None:
        train_documents = load_hub_documents(args.dataset, args.dataset_config, args.dataset_split, args.text_field,
                                             args.max_documents)
    else:
        train_documents = read_documents(args, args.train_files)
    eval_documents = read_documents(args, args.eval_files) if args.eval_files else None
    model_folder = args.model if Path(args.model).is_dir() else None
    if model_folder is not None and model is None:
        check_saved_model(model_folder)
    tokenizer = load_tokenizer(args.tokenizer, model_folder)
    data = denoising_setup(args, tokenizer, mixture, args.length)
    if model is None:
        torch.manual_seed(args.seed)
        model, description = load_model(args.model, parse_overrides(args.set))
        apply_compile_option(model, args)
    else:
        description = type(model).__name__
    check_vocabulary(tokenizer, model.config)
    length = args.length or getattr(model.config, "max_input_length", None) or DEFAULT_LENGTH
    denoising_setup(args, tokenizer, mixture, length)
    train = training_examples(args, tokenizer, data, mixture, train_documents, length)
    evaluation = None if eval_documents is None else evaluation_examples(args, tokenizer, data, mixture,
                                                                         eval_documents, length)
    if is_main_process():
        describe(description, model, mixture, train, evaluation, length, target_limit(args, length))
    trainer = run_training(args, model, tokenizer, Examples(train), evaluation, callbacks, resume_from=resume_from,
                           exact_match=False)
    if is_main_process():
        print(summary(args.output_dir, trainer.state.global_step, trainer.state.log_history))
