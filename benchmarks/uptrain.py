"""UL2 uptraining of a converted CoLT5 against its dense T5.1.1 source, at equal extra steps (issue 27).

The recipe of the CoLT5 paper at a small scale, every step on one device:

1. Corpus: the .py, .md and .rst files of installed Python packages (`--packages`, where the Python running this
   script imports them from), one document per file (files that are empty or not UTF-8 are left out). Ordered by a hash of
   their path, every 50th file goes to the evaluation set, of the others one in three to the uptraining part and the
   rest to the pre-training part.
2. Dense source: a T5.1.1-shaped transformers T5ForConditionalGeneration (gated-GELU, untied head, no dropout, ByT5's
   byte vocabulary), pre-trained from random weights for `--pretrain-steps` on the pre-training part with
   `colt5-hf uptrain`'s data and loop (UL2's mixture, `--denoisers`, packed to `--length` bytes).
3. Conversion (colt5_hf.conversion): all tokens routed, a radius covering the input and multi-head cross-attention
   (must give the source's loss), and the presets' routing: queries n/16, keys/values n/8, feed-forward n/16, radius
   127, multi-query cross-attention.
4. The same `--steps` more on the uptraining part, same data order, learning rate and seed, for the dense model
   (continued, a fresh optimizer) and for the converted one (`colt5-hf uptrain`).

Reported: the evaluation loss of each denoiser on the evaluation set (Trainer's eval loss: the mean over examples of
each batch's mean token loss) and their mean, at the start of step 4 and every `--eval-steps`; the forward FLOPs of
one example (matrix products only, counted from the shapes: the encoder, the decoder and LM head at the target bound,
--max-target-length, which overstates both sides' decoder alike; CoLT5's light attention as its 2 * radius + 1 window,
its routers' scores included, their coordinate descent left out) and the measured seconds per optimizer step of each
side (a TrainerCallback around each step, evaluation left out; the table says when some of CoLT5's layers failed to
compile and ran eagerly). Writes OUT/uptrain.json and OUT/uptrain.png (OUT: --out, else $OUT, else benchmarks/out) and
prints the table; `--from-json` prints the table of an earlier run. The corpus and the models go to --work (default
OUT); with `--stage pretrain` and then `--stage compare` the two halves run as two processes (for machines that limit
a job's time), --work a folder that lasts between them.

    nice -n 10 python benchmarks/uptrain.py                      # CPU, one thread: the README's table
    # a GPU, in two processes (on an H100 the first takes 7 minutes, 0.38 s a dense step; the second's dense side
    # 3.5 minutes):
    python benchmarks/uptrain.py --stage pretrain --work runs/uptrain-gpu --device cuda --bf16 --size small \
        --length 4096 --batch-size 4 --learning-rate 5e-4 --warmup-steps 100 --eval-steps 100 \
        --pretrain-steps 1000 --steps 500 --packages torch transformers
    python benchmarks/uptrain.py --stage compare ...              # the same options
"""

import argparse
import importlib.metadata
import importlib.util
import json
import os
import statistics
import sys
import time
import zlib
from pathlib import Path

import torch
from transformers import TrainerCallback


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SIZES = {
    # a T5.1.1 shape small enough for one CPU thread: d_ff = 2 * d_model as in T5.1.1-small
    "tiny": dict(d_model=128, d_kv=32, num_heads=4, d_ff=256, num_layers=3, num_decoder_layers=3),
    # T5.1.1-small (google/t5-v1_1-small) with 8 heads of 64 instead of 6, so that a quarter of them are light
    "small": dict(d_model=512, d_kv=64, num_heads=8, d_ff=1024, num_layers=8, num_decoder_layers=8),
}
PACKAGES = ("accelerate", "datasets", "huggingface_hub", "peft")
SUFFIXES = (".py", ".md", ".rst")


# ---------------------------------------------------------------------------------------------------------- corpus


def build_corpus(packages, folder):
    """OUT/corpus/{pretrain,uptrain,eval}.jsonl from the packages' files; returns what went where. The files, ordered
    by a hash of their path (the split does not follow packages or folders), go in turn: every 50th to the evaluation
    set, of the others one in three to the uptraining part and the rest to the pre-training part."""
    files, roots = [], {}
    skipped = 0
    for package in packages:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"package {package!r} is not installed for {sys.executable}")
        top = Path(next(iter(spec.submodule_search_locations)))
        roots[package] = str(top.parent)
        for path in sorted(top.rglob("*")):
            if path.suffix not in SUFFIXES or not path.is_file():
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                skipped += 1
                continue
            if text.strip():
                name = str(path.relative_to(top.parent))  # e.g. "peft/tuners/lora/model.py"
                files.append((zlib.crc32(name.encode()), name, text))
    parts = {"pretrain": [], "uptrain": [], "eval": []}
    for index, (_, _, text) in enumerate(sorted(files)):
        parts["eval" if index % 50 == 0 else "uptrain" if index % 3 == 0 else "pretrain"].append(text)
    if not all(parts.values()):
        raise SystemExit(f"{len(files)} files in {', '.join(packages)}: too few for the three parts; add --packages")
    folder.mkdir(parents=True, exist_ok=True)
    for name, texts in parts.items():
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as file:
            for text in texts:
                file.write(json.dumps({"text": text}) + "\n")
    versions = {package: version_of(package) for package in packages}
    return {"roots": roots, "packages": versions, "suffixes": list(SUFFIXES), "unreadable_files": skipped,
            **{name: {"files": len(texts), "bytes": sum(len(t.encode()) for t in texts)} for name, texts in parts.items()}}


def version_of(package):
    try:
        return importlib.metadata.version(package.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------------------- models


def dense_source(size, seed):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=384, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **SIZES[size])
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config)


def routing_settings(length, num_heads):
    """The conversions: every token routed and the source's function (radius covering the input, one key/value head
    per query head), and the presets' routing (their fractions, radius and multi-query cross-attention)."""
    from colt5_hf import CoLT5Config

    preset = CoLT5Config.from_preset("base")
    return {
        "all-routed": dict(attention_q_fraction=1.0, attention_kv_fraction=1.0, feed_forward_fraction=1.0,
                           local_radius=length, num_cross_attention_kv_heads=num_heads),
        "preset": {name: getattr(preset, name) for name in (
            "attention_q_fraction", "attention_kv_fraction", "feed_forward_fraction", "local_radius",
            "num_cross_attention_kv_heads", "min_routed_tokens", "router_iterations")},
    }


# ----------------------------------------------------------------------------------------------------------- FLOPs


def forward_flops(config, n, target):
    """Matrix-product FLOPs (2 per multiply-add) of one example's forward: `n` input and `target` target tokens.
    A CoLT5 config counts its routed branches at their routed counts; a T5 config is the dense model."""
    d, d_kv, heads = config.d_model, config.d_kv, config.num_heads
    inner = heads * d_kv
    colt5 = hasattr(config, "routed_count")
    encoder = 0
    for _ in range(config.num_layers):
        if colt5:
            light, heavy = config.num_light_heads * d_kv, config.num_heavy_heads * d_kv
            m_q, m_kv = config.routed_count(config.attention_q_fraction, n), config.routed_count(
                config.attention_kv_fraction, n)
            m_ff = config.routed_count(config.feed_forward_fraction, n)
            window = min(2 * config.local_radius + 1, n)
            encoder += 4 * n * d * light + 2 * 2 * n * window * light  # light projections, local scores and values
            encoder += 2 * m_q * d * heavy + 2 * m_kv * d * heavy + 2 * 2 * m_q * m_kv * heavy  # heavy branch
            encoder += 3 * n * d  # three routers' scores
            encoder += 3 * n * d * config.light_d_ff + 3 * m_ff * d * config.heavy_d_ff
        else:
            encoder += 4 * n * d * inner + 2 * 2 * n * n * inner + 3 * n * d * config.d_ff
    kv_inner = (config.num_cross_attention_routes * config.num_cross_attention_kv_heads * d_kv) if colt5 else inner
    decoder = 0
    for _ in range(config.num_decoder_layers):
        decoder += 4 * target * d * inner + 2 * 2 * target * target * inner  # self-attention
        decoder += 2 * target * d * inner + 2 * n * d * kv_inner + 2 * 2 * target * n * inner  # cross-attention
        decoder += 3 * target * d * config.d_ff
    head = target * d * config.vocab_size
    return 2 * (encoder + decoder + head)


# ------------------------------------------------------------------------------------------------------- the runs


class StepTimer(TrainerCallback):
    """Seconds of each optimizer step (evaluation left out), synchronising CUDA at both ends."""

    def __init__(self):
        self.times = []

    def on_step_begin(self, args, state, control, **kwargs):
        synchronize()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        synchronize()
        self.times.append(time.perf_counter() - self.start)


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def uptrain_argv(options, model, output, train_file, steps, eval_steps, seed):
    argv = ["uptrain", str(model), "--train-files", str(train_file), "--eval-files", str(options.work / "corpus" /
            "eval.jsonl"), "--denoisers", options.denoisers, "--length", str(options.length), "--max-target-length",
            str(options.max_target_length), "--batch-size", str(options.batch_size), "--learning-rate",
            str(options.learning_rate), "--warmup-steps", str(options.warmup_steps), "--steps", str(steps),
            "--eval-steps", str(eval_steps), "--save-steps", str(steps), "--eval-examples", str(options.eval_examples),
            "--seed", str(seed), "--output-dir", str(output), "--overwrite-output-dir", "--eval-on-start", "--quiet"]
    if options.device == "cpu":
        argv.append("--cpu")
    if options.bf16:
        argv.append("--bf16")
    return argv


def train_run(options, label, model_folder, output, train_file, steps, eval_steps, seed, model=None):
    """One `colt5-hf uptrain` run (the dense T5 passed in as `model`); returns its record."""
    from colt5_hf.cli import build_parser
    from colt5_hf.cli import uptrain

    from colt5_hf import fast_path

    timer = StepTimer()
    args = build_parser().parse_args(uptrain_argv(options, model_folder, output, train_file, steps, eval_steps, seed))
    print(f"--- {label}: {steps} steps", file=sys.stderr, flush=True)
    started, failures = time.perf_counter(), fast_path._compile_failures
    uptrain.run(args, callbacks=[timer], model=model)
    state = json.loads((output / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    evaluations = {}
    for entry in state["log_history"]:
        for key, value in entry.items():
            if key.startswith("eval_") and key.endswith("_loss"):
                evaluations.setdefault(entry["step"], {})[key[len("eval_"):-len("_loss")]] = value
    steady = options.timing_skip if len(timer.times) > options.timing_skip else 0
    return {"label": label, "steps": steps, "wall_s": time.perf_counter() - started,
            "step_s": statistics.median(timer.times[steady:]), "first_step_s": timer.times[0],
            "train_losses": [(e["step"], e["loss"]) for e in state["log_history"] if "loss" in e],
            # layer variants that failed to compile and ran eagerly (fast_path.CompiledLayer): their steps are slower
            "eager_fallbacks": fast_path._compile_failures - failures,
            "eval": {str(step): losses for step, losses in sorted(evaluations.items())}}


def evaluate(options, model_folder):
    """{denoiser name: evaluation loss} of a saved model, with the evaluation sets and Trainer settings of
    `colt5-hf uptrain` (its --eval-on-start numbers)."""
    from transformers import AutoModelForSeq2SeqLM, ByT5Tokenizer, Seq2SeqTrainer

    from colt5_hf.cli import build_parser
    from colt5_hf.cli.common import collator, training_arguments
    from colt5_hf.cli.uptrain import denoising_setup, evaluation_examples, read_documents
    from colt5_hf.denoising import load_mixture

    args = build_parser().parse_args(uptrain_argv(options, model_folder, options.work / "runs" / "evaluation",
                                                  options.work / "corpus" / "eval.jsonl", 1, 1, options.seed))
    tokenizer, mixture = ByT5Tokenizer(), load_mixture(args.denoisers)
    data = denoising_setup(args, tokenizer, mixture, args.length)
    sets = evaluation_examples(args, tokenizer, data, mixture, read_documents(args, args.eval_files), args.length)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_folder)
    trainer = Seq2SeqTrainer(model=model, args=training_arguments(args, has_eval=True), data_collator=collator(tokenizer),
                             eval_dataset=sets, processing_class=tokenizer)
    metrics = trainer.evaluate()
    return {name: metrics[f"eval_{name}_loss"] for name in sets}


def mean_loss(losses):
    return sum(losses.values()) / len(losses)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--length", type=int, default=512, help="input tokens (bytes) per example")
    parser.add_argument("--max-target-length", type=int, help="(default: a quarter of --length)")
    parser.add_argument("--denoisers", default="colt5")
    parser.add_argument("--pretrain-steps", type=int, default=500)
    parser.add_argument("--steps", type=int, default=250, help="extra steps of each side after the conversion")
    parser.add_argument("--eval-steps", type=int, default=50)
    parser.add_argument("--eval-examples", type=int, default=16, help="evaluation examples per denoiser")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--packages", nargs="+", default=list(PACKAGES))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (for --device cuda)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--timing-skip", type=int, default=5, help="steps left out of the step time (compilation)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "benchmarks" / "out")))
    parser.add_argument("--work", type=Path, help="the corpus and the models (default: --out)")
    parser.add_argument("--stage", choices=("all", "pretrain", "compare"), default="all",
                        help="pretrain: steps 1-2; compare: steps 3-4 from --work's source (two processes)")
    parser.add_argument("--from-json", type=Path, help="print the table of an earlier uptrain.json")
    options = parser.parse_args()
    if options.from_json:
        print(table(json.loads(options.from_json.read_text())))
        return
    options.max_target_length = options.max_target_length or options.length // 4
    options.work = options.work or options.out
    options.out.mkdir(parents=True, exist_ok=True)
    if options.device == "cpu":
        torch.set_num_threads(options.threads)
    elif not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU here")
    import transformers

    transformers.logging.set_verbosity_error()
    if options.stage in ("all", "pretrain"):
        pretrain(options)
    if options.stage in ("all", "compare"):
        record = compare(options)
        (options.out / "uptrain.json").write_text(json.dumps(record, indent=1))
        plot(record, options.out / "uptrain.png")
        print(table(record))


def pretrain(options):
    """Steps 1 and 2: the corpus and the pre-trained dense source in --work; their record in WORK/pretrain.json (and
    OUT/uptrain-pretrain.json)."""
    from transformers import ByT5Tokenizer

    from common import environment

    corpus = build_corpus(options.packages, options.work / "corpus")
    print(json.dumps(corpus), file=sys.stderr)
    runs = options.work / "runs"
    record = {"environment": environment(), "corpus": corpus}
    source = dense_source(options.size, options.seed)
    source.save_pretrained(runs / "source-init")
    ByT5Tokenizer().save_pretrained(runs / "source-init")
    record["pretrain"] = train_run(options, "dense pre-training", runs / "source-init", runs / "source",
                                   options.work / "corpus" / "pretrain.jsonl", options.pretrain_steps,
                                   options.eval_steps * 2, options.seed, model=source)
    for path in (options.work / "pretrain.json", options.out / "uptrain-pretrain.json"):
        path.write_text(json.dumps(record, indent=1))


def compare(options):
    """Steps 3 and 4 from --work's pre-trained source: the conversions, their starting losses, the same extra steps
    on both sides. Returns the whole record."""
    from transformers import ByT5Tokenizer, T5ForConditionalGeneration

    from colt5_hf import CoLT5Config
    from colt5_hf.conversion import convert_checkpoint
    from common import environment

    runs = options.work / "runs"
    record = {"environment": environment(), "options": {key: str(value) if isinstance(value, Path) else value
                                                        for key, value in vars(options).items()},
              **{key: value for key, value in json.loads((options.work / "pretrain.json").read_text()).items()
                 if key != "environment"}}
    source_folder = runs / "source"
    dense = T5ForConditionalGeneration.from_pretrained(source_folder)
    record["conversions"] = {}
    for name, overrides in routing_settings(options.length, dense.config.num_heads).items():
        converted = convert_checkpoint(str(source_folder), dropout_rate=0.0, encoder_compile="auto"
                                       if options.device == "cuda" else "off", **overrides)
        converted.save_pretrained(runs / f"colt5-{name}")
        ByT5Tokenizer().save_pretrained(runs / f"colt5-{name}")
        record["conversions"][name] = {"overrides": overrides, "config": converted.config.to_dict()}
        del converted
    record["start"] = {"dense source": evaluate(options, source_folder),
                       "CoLT5, all routed": evaluate(options, runs / "colt5-all-routed")}
    # the uptraining part is other text than the pre-training part: the same seed repeats nothing
    uptrain_file = options.work / "corpus" / "uptrain.jsonl"
    record["dense"] = train_run(options, "dense, continued", source_folder, runs / "dense-continued", uptrain_file,
                                options.steps, options.eval_steps, options.seed, model=dense)
    record["colt5"] = train_run(options, "CoLT5, uptrained", runs / "colt5-preset", runs / "colt5-uptrained",
                                uptrain_file, options.steps, options.eval_steps, options.seed)
    target = options.max_target_length  # the bound, for both sides alike: an upper bound of the decoder's share
    record["flops_per_example"] = {
        "dense": forward_flops(dense.config, options.length, target),
        "colt5": forward_flops(CoLT5Config.from_pretrained(runs / "colt5-preset"), options.length, target),
        "target_tokens": target}
    return record


# ---------------------------------------------------------------------------------------------------- the report


def rows(record):
    steps = record["dense"]["steps"]
    flops = record["flops_per_example"]
    return [
        ("dense T5.1.1 source", 0, record["start"]["dense source"], flops["dense"], None),
        ("CoLT5, all tokens routed", 0, record["start"]["CoLT5, all routed"], None, None),
        ("CoLT5, preset routing", 0, record["colt5"]["eval"]["0"], flops["colt5"], None),
        (f"dense, +{steps} steps", steps, record["dense"]["eval"][str(steps)], flops["dense"],
         record["dense"]["step_s"]),
        (f"CoLT5 uptrained {steps} steps", steps, record["colt5"]["eval"][str(steps)], flops["colt5"],
         record["colt5"]["step_s"]),
    ]


def table(record):
    names = list(record["colt5"]["eval"]["0"])
    dense_final = mean_loss(record["dense"]["eval"][str(record["dense"]["steps"])])
    lines = ["| model | extra steps | " + " | ".join(f"{name} loss" for name in names) +
             " | mean | vs dense +N | forward GFLOPs / example | s / step |",
             "|" + "---|" * (len(names) + 6)]
    for label, steps, losses, flops, step_s in rows(record):
        mean = mean_loss(losses)
        lines.append(f"| {label} | {steps} | " + " | ".join(f"{losses[name]:.4f}" for name in names) +
                     f" | {mean:.4f} | {100 * (mean / dense_final - 1):+.1f}% | "
                     f"{'' if flops is None else f'{flops / 1e9:.2f}'} | {'' if step_s is None else f'{step_s:.2f}'} |")
    fallbacks = record["colt5"].get("eager_fallbacks", 0)
    if fallbacks:
        lines.append(f"\nCoLT5's s / step: {fallbacks} layer variant(s) failed to compile and ran eagerly.")
    return "\n".join(lines)


def plot(record, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2))
    pretrain = record["pretrain"]
    steps = sorted(pretrain["eval"], key=int)[1:]  # its start, random weights, is off the scale
    axis.plot([int(s) - pretrain["steps"] for s in steps], [mean_loss(pretrain["eval"][s]) for s in steps], "o-",
              color="gray", label="dense T5.1.1, pre-training")
    for key, label, color in (("dense", "dense T5.1.1, continued", "tab:blue"),
                              ("colt5", "CoLT5 (converted), uptrained", "tab:red")):
        steps = sorted(record[key]["eval"], key=int)
        axis.plot([int(s) for s in steps], [mean_loss(record[key]["eval"][s]) for s in steps], "o-", color=color,
                  label=label)
    axis.axhline(mean_loss(record["start"]["CoLT5, all routed"]), color="gray", linestyle=":",
                 label="converted, all tokens routed (= source)")
    axis.set_xlabel("training steps after the conversion (before it: the source's pre-training)")
    axis.set_ylabel("evaluation loss, mean over denoisers")
    length = record["options"]["length"]
    axis.set_title(f"UL2 uptraining at {length} tokens ({record['environment']['device']})")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
