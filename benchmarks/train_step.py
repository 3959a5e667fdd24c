"""End-to-end training: tokens per second, peak memory and first-step (compile) time of Seq2SeqTrainer runs.

One process, one GPU, every model and input length side by side. Each row is one `Seq2SeqTrainer.train()` call, what
a user runs (the loop `colt5-hf train` runs too): a fresh model with random weights at its library's initialisation,
float32 weights under Trainer's bf16 autocast (`bf16=True`, what `from_pretrained` + `bf16=True` gives; `--bf16-weights`
casts the weights to bf16 instead), AdamW (`adamw_torch_fused` on CUDA, `adamw_torch` on the CPU), learning rate 1e-4,
gradient clipping at 1.0 (Trainer's default), batch 1, gradient accumulation 4 (`--accumulation`), dropout 0, no
logging, no checkpoints, no evaluation. Data: random token ids (2 .. vocab - 1), exactly n input tokens (attention mask
all ones) and `--target-length` (512) labels per example. Depth: `--layers` encoder and as many decoder layers (24: the
Large preset's depth, stated in every record). Models:

  colt5-hf/default   CoLT5ForConditionalGeneration, Large shape, `encoder_compile="auto"` (the config's default): on
                     CUDA, inputs of 2048 tokens or more run the encoder blocks, and the decoder blocks with them,
                     under torch.compile (default mode, static shapes, inputs and targets padded inside the model to
                     length buckets); eager otherwise
  colt5-hf/fast      the same with `encoder_compile="cuda_graphs"`: mode "reduce-overhead" (CUDA graphs)
  colt5-hf/eager     the same with `encoder_compile="off"`: never compiled (not in the default list)
  longt5-local       transformers' LongT5ForConditionalGeneration, Large shape (d 1024, 16 heads, d_ff 2816,
                     gated-gelu), local attention, radius 127
  longt5-tglobal     the same with transient-global attention (global block size 16)

Every colt5-hf row takes the attention implementation the model picks by itself unless `--attn-implementation` names
one (the record says which); torch._dynamo's settings stay at their defaults. The models run in the order listed,
each input length in turn (all models at the first length first), CUDA-graph rows after the others: their memory
pool lives until torch._dynamo.reset(), which follows every colt5-hf row.

Per-step wall times come from a TrainerCallback (on_step_begin to on_step_end, both after torch.cuda.synchronize();
one step = one optimizer step = `--accumulation` forward+backward passes, the clipping and the optimizer's step; the
batches' loading happens before on_step_begin and is not counted), so the first step (compilation included for
compiled rows) and the steady steps come out of one train() call: `--warmup-steps` (1) untimed steps, then `--steps`
(3) timed ones. Reported: `step_s` the median steady step; `tokens_per_s` = (n + target length) * batch *
accumulation / step_s, `input_tokens_per_s` the same with n alone; `speedup_vs_longt5_local` (tokens/s over
longt5-local's at the same n, when both ran); `first_step_s`; `peak_gib` / `reserved_gib`
torch.cuda.max_memory_allocated / max_memory_reserved over the row (the peak statistics reset before its model is
built: weights, gradients, AdamW's state and activations included); `graphs_compiled` by Dynamo during the run and
during the timed steps (`graphs_compiled_timed`, 0 expected).
`train_loss` (Trainer's) is a check that the run trained on finite numbers; LongT5's is the sum of its micro-batches'
mean losses, not their mean: its forward takes **kwargs, so Trainer leaves the division by the accumulation to a loss
that ignores `num_items_in_batch`.

The first step of a compiled row depends on inductor's on-disk cache (a fresh machine's is empty; a later process, or a
row whose graphs an earlier row compiled, finds kernels there): the environment record says whether the cache held
anything when the run began (`inductor_cache_warm`).

Failures (out of memory: LongT5 at 65536 tokens, transient-global above 16384) are recorded and the run goes on.
After `--budget-s` seconds (540) the rows left are recorded as skipped, and a row running then stops after its
current step, so that a 10-minute call comes back with results. Writes train_step.json to $OUT (or benchmarks/out)
after every row and prints a table at the end; `--from-json` prints the table of earlier runs again. `--tiny` runs
the tiny preset (2 + 2 layers; LongT5 of the same sizes) at 256 input and 16 target tokens,
for checking the script on the CPU.

    python benchmarks/train_step.py [--sizes 4096 16384 65536] [--models ...] [--layers 24] [--steps 3]
                                    [--gradient-checkpointing] [--bf16-weights] [--budget-s 540]
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
from torch._dynamo.utils import counters

from common import LARGE, colt5_large_config, environment, error_text, free_memory, out_dir


MODELS = ["longt5-local", "longt5-tglobal", "colt5-hf/default", "colt5-hf/fast"]
OTHER_MODELS = ["colt5-hf/eager"]
ENCODER_COMPILE = {"colt5-hf/default": "auto", "colt5-hf/fast": "cuda_graphs", "colt5-hf/eager": "off"}


def tiny_config(**overrides):
    from colt5_hf import CoLT5Config

    return CoLT5Config.from_preset("tiny", dropout_rate=0.0, **overrides)


def build(name, args, device):
    """The model of row `name`, float32 (bf16 with --bf16-weights) on `device`, in training mode."""
    torch.manual_seed(0)
    layers = args.layers
    if name.startswith("colt5-hf"):
        from colt5_hf import CoLT5ForConditionalGeneration

        shape = dict(num_layers=layers, num_decoder_layers=layers, encoder_compile=ENCODER_COMPILE[name])
        if args.tiny:
            config = tiny_config(**shape)
        else:
            config = colt5_large_config(**shape)
        with torch.device(device):
            model = CoLT5ForConditionalGeneration(config)
        if args.attn_implementation:
            model.config._attn_implementation = args.attn_implementation
    elif name.startswith("longt5"):
        from transformers import LongT5Config, LongT5ForConditionalGeneration

        if args.tiny:
            tiny = tiny_config()
            shape = {key: getattr(tiny, key) for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads")}
            radius = tiny.local_radius
        else:
            shape, radius = LARGE, 127
        attention = "local" if name == "longt5-local" else "transient-global"
        config = LongT5Config(**shape, num_layers=layers, num_decoder_layers=layers, encoder_attention_type=attention,
                              local_radius=radius, global_block_size=16, feed_forward_proj="gated-gelu",
                              dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        with torch.device(device):
            model = LongT5ForConditionalGeneration(config)
    else:
        raise ValueError(name)
    if args.bf16_weights:
        model = model.to(torch.bfloat16)
    return model.train()


class RandomTokens(torch.utils.data.Dataset):
    """`count` examples of `length` random input ids (attention mask all ones) and `target_length` random labels;
    ids from 2 up, clear of the pad (0) and end-of-sequence (1) ids. Each example is drawn from its own seed, so the
    dataset holds nothing."""

    def __init__(self, count, length, target_length, vocab_size, seed=0):
        self.count, self.length, self.target_length = count, length, target_length
        self.vocab_size, self.seed = vocab_size, seed

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return {
            "input_ids": torch.randint(2, self.vocab_size, (self.length,), generator=generator),
            "attention_mask": torch.ones(self.length, dtype=torch.long),
            "labels": torch.randint(2, self.vocab_size, (self.target_length,), generator=generator),
        }


def unique_graphs():
    return counters["stats"]["unique_graphs"]


def make_step_timer(cuda, deadline, profile_step=None):
    """A TrainerCallback that records the wall time of every optimizer step (synchronized on CUDA) and the graphs
    Dynamo compiled during it; past `deadline` (time.time()) it stops training after the current step. Step
    `profile_step` (0-based) runs under torch.profiler, kept as `.profile`."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.step_s, self.graphs, self.stopped_by_budget = [], [], False
            self.profile = None

        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            if len(self.step_s) == profile_step:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if cuda:
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self.profile = torch.profiler.profile(activities=activities)
                self.profile.__enter__()
            self.graphs_before = unique_graphs()
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.step_s.append(time.perf_counter() - self.started)
            if self.profile is not None and len(self.step_s) == profile_step + 1:
                self.profile.__exit__(None, None, None)
            self.graphs.append(unique_graphs() - self.graphs_before)
            if time.time() > deadline and not control.should_training_stop:
                control.should_training_stop = True
                self.stopped_by_budget = state.global_step < state.max_steps
            return control

    return StepTimer()


def step_profile(profile, step_s, name, n):
    """What one profiled optimizer step spent: kernels launched, the time the GPU ran any kernel (the union of their
    intervals: a step whose GPU is idle most of its wall time is bound by the host's launches), and the host's time in
    the forwards of the encoder and the decoder and in the optimizer (their record_function scopes). The 25 kernels and
    operators of most device time go to train_step_profile_<model>_<n>.txt."""
    events = profile.events()
    kernels = sorted((e.time_range.start, e.time_range.end) for e in events
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    busy_us, end = 0.0, float("-inf")
    for start, stop in kernels:
        busy_us += max(0.0, stop - max(start, end))
        end = max(end, stop)
    scopes = {}
    for event in events:
        for scope in ("encoder forward", "decoder forward", "Optimizer.step"):
            if event.name.startswith(scope) and event.device_type == torch.autograd.DeviceType.CPU:
                scopes[scope] = scopes.get(scope, 0.0) + event.cpu_time_total / 1e3
    table_text = profile.key_averages().table(sort_by="self_device_time_total", row_limit=25)
    (out_dir() / f"train_step_profile_{name.replace('/', '-')}_{n}.txt").write_text(table_text)
    return {"kernels": len(kernels), "gpu_busy_ms": busy_us / 1e3, "step_ms": step_s * 1e3,
            "gpu_busy_fraction": busy_us / 1e6 / step_s, **{f"{k} host ms": v for k, v in scopes.items()}}


def scope_forwards(model):
    """record_function scopes around the encoder's and the decoder's forward, for the profile."""
    def enter(scope):
        def hook(module, args, kwargs=None):
            module._profile_scope = torch.profiler.record_function(scope)
            module._profile_scope.__enter__()
        return hook

    def leave(module, args, output):
        module._profile_scope.__exit__(None, None, None)

    for part in (model.get_encoder(), model.get_decoder()):
        part.register_forward_pre_hook(enter("encoder forward" if part is model.get_encoder() else "decoder forward"))
        part.register_forward_hook(leave)


def train_row(name, n, args, device, deadline):
    """Builds the model, trains it `warmup_steps + steps` optimizer steps with Seq2SeqTrainer and returns the
    measurements; the model, the trainer and the optimizer are released before it returns or raises."""
    from transformers import PrinterCallback, ProgressCallback, Seq2SeqTrainer, Seq2SeqTrainingArguments

    cuda = device == "cuda"
    result = {}
    model = trainer = None
    try:
        started = time.perf_counter()
        model = build(name, args, device)
        if args.profile:
            scope_forwards(model)
        if cuda:
            torch.cuda.synchronize()
            result["weights_gib"] = torch.cuda.memory_allocated() / 2**30
        result["build_s"] = time.perf_counter() - started
        result["params"] = sum(p.numel() for p in model.parameters())
        result["weights"] = str(next(model.parameters()).dtype).removeprefix("torch.")
        if name.startswith("colt5-hf"):
            result["encoder_compile"] = model.config.encoder_compile
            result["attn_implementation"] = model.config._attn_implementation
        max_steps = args.warmup_steps + args.steps
        dataset = RandomTokens(max_steps * args.accumulation, n, args.target_length, model.config.vocab_size, seed=n)
        timer = make_step_timer(cuda, deadline, max_steps - 1 if args.profile else None)
        # newer Transformers call the option activation_checkpointing and warn at the old name
        fields = Seq2SeqTrainingArguments.__dataclass_fields__
        checkpointing_field = "activation_checkpointing" if "activation_checkpointing" in fields else \
            "gradient_checkpointing"
        with tempfile.TemporaryDirectory() as output_dir:
            training_args = Seq2SeqTrainingArguments(
                output_dir=output_dir,
                max_steps=max_steps,
                per_device_train_batch_size=1,
                gradient_accumulation_steps=args.accumulation,
                learning_rate=1e-4,
                optim="adamw_torch_fused" if cuda else "adamw_torch",
                bf16=True,
                use_cpu=not cuda,
                eval_strategy="no",
                save_strategy="no",
                logging_strategy="no",
                report_to="none",
                disable_tqdm=True,
                dataloader_num_workers=0,
                remove_unused_columns=False,
                seed=0,
                **{checkpointing_field: args.gradient_checkpointing},
            )
            trainer = Seq2SeqTrainer(model=model, args=training_args, train_dataset=dataset, callbacks=[timer])
            for printer in (PrinterCallback, ProgressCallback):  # the final metrics would be printed as a dict
                trainer.remove_callback(printer)
            counters.clear()
            started = time.perf_counter()
            output = trainer.train()
            if cuda:
                torch.cuda.synchronize()
            result["train_s"] = time.perf_counter() - started
        result["train_loss"] = output.training_loss
        result["step_times_s"] = timer.step_s
        result["first_step_s"] = timer.step_s[0]
        timed = timer.step_s[args.warmup_steps:]
        result["steps_timed"] = len(timed)
        if timed:
            step_s = statistics.median(timed)
            examples = args.accumulation  # batch 1
            result.update(step_s=step_s, tokens_per_s=(n + args.target_length) * examples / step_s,
                          input_tokens_per_s=n * examples / step_s)
        result["graphs_compiled"] = unique_graphs()
        result["graphs_compiled_timed"] = sum(timer.graphs[args.warmup_steps:])
        if counters["inductor"]["cudagraph_skips"]:
            result["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
        if timer.stopped_by_budget:
            result["note"] = f"stopped by the time budget after {len(timer.step_s)} of {max_steps} steps"
        if cuda:
            result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            result["reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        if timer.profile is not None and len(timer.step_s) == max_steps:
            result["profile"] = step_profile(timer.profile, timer.step_s[-1], name, n)
        return result
    except Exception as error:  # noqa: BLE001 - recorded, the benchmark goes on
        result["error"] = error_text(error)
        if cuda:  # how far it got before failing
            result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return result
    finally:
        if trainer is not None:
            trainer.accelerator.free_memory()  # drops the accelerator's references to the model and optimizer
            trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None
        del model, trainer


def speedups(records):
    """{(model, n): tokens/s over longt5-local's at the same n}, for the records that have both."""
    baseline = {r["n"]: r["tokens_per_s"] for r in records if r["model"] == "longt5-local" and "tokens_per_s" in r}
    return {(r["model"], r["n"]): r["tokens_per_s"] / baseline[r["n"]]
            for r in records if "tokens_per_s" in r and r["n"] in baseline}


def table(records):
    ratio = speedups(records)
    lines = [f"{'model':18s} {'n':>6s} {'layers':>6s} {'step s':>8s} {'tokens/s':>9s} {'in tok/s':>9s} "
             f"{'vs local':>8s} {'peak GiB':>8s} {'first s':>8s}  error"]
    for r in records:
        def number(key, form):
            return format(r[key], form) if r.get(key) is not None else "-"

        speedup = f"{ratio[(r['model'], r['n'])]:.2f}x" if (r["model"], r["n"]) in ratio else "-"
        problem = r.get("error") or r.get("skipped") or r.get("note") or ""
        lines.append(f"{r['model']:18s} {r['n']:6d} {r.get('layers', 0):6d} {number('step_s', '.3f'):>8s} "
                     f"{number('tokens_per_s', '.0f'):>9s} {number('input_tokens_per_s', '.0f'):>9s} {speedup:>8s} "
                     f"{number('peak_gib', '.2f'):>8s} {number('first_step_s', '.1f'):>8s}  {problem}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", help="input lengths (default 4096 16384 65536; --tiny: 256)")
    parser.add_argument("--target-length", type=int, help="labels per example (default 512; --tiny: 16)")
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS + OTHER_MODELS, metavar="MODEL",
                        help=f"default: {' '.join(MODELS)}; also: {' '.join(OTHER_MODELS)}")
    parser.add_argument("--layers", type=int, help="encoder layers, and as many decoder layers (default 24; --tiny: 2)")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    parser.add_argument("--warmup-steps", type=int, default=1, help="optimizer steps before the timed ones")
    parser.add_argument("--accumulation", type=int, default=4, help="gradient accumulation steps (batch 1 each)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--bf16-weights", action="store_true", help="cast the weights to bf16 (default float32)")
    parser.add_argument("--attn-implementation", choices=["eager", "sdpa", "flex_attention"],
                        help="colt5-hf rows' attention implementation (default: the model's own choice)")
    parser.add_argument("--budget-s", type=float, default=540, help="skip the rows left after this many seconds")
    parser.add_argument("--profile", action="store_true",
                        help="profile each row's last step (kernels, GPU busy time, host time per part)")
    parser.add_argument("--tiny", action="store_true", help="the tiny preset, for checking the script on the CPU")
    parser.add_argument("--name", default="train_step")
    parser.add_argument("--from-json", nargs="+", help="only print the table of earlier runs' JSON")
    args = parser.parse_args()
    # Trainer wraps the model in nn.DataParallel over every visible GPU (no autocast, a larger batch): one GPU unless
    # the caller picks them. CUDA reads this when it initialises, which nothing has made it do yet.
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
    if args.from_json:
        print(table([r for path in args.from_json for r in json.loads(open(path).read())["records"]]))
        return
    if args.warmup_steps < 1 or args.steps < 1:
        parser.error("--warmup-steps and --steps must be at least 1 (the first step is timed apart)")
    args.sizes = args.sizes or ([256] if args.tiny else [4096, 16384, 65536])
    args.target_length = args.target_length or (16 if args.tiny else 512)
    args.layers = args.layers or (tiny_config().num_layers if args.tiny else 24)
    started = time.time()
    deadline = started + args.budget_s
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    from transformers.utils import logging as transformers_logging

    inductor_cache = cache_dir()
    inductor_cache_warm = any(os.scandir(inductor_cache))

    transformers_logging.set_verbosity_error()
    info = dict(environment(), preset="tiny" if args.tiny else "large", target_length=args.target_length,
                layers=args.layers, batch=1, accumulation=args.accumulation, warmup_steps=args.warmup_steps,
                steps=args.steps, gradient_checkpointing=args.gradient_checkpointing,
                precision="bf16 autocast (Trainer bf16=True)", budget_s=args.budget_s,
                inductor_cache=inductor_cache, inductor_cache_warm=inductor_cache_warm)
    print(json.dumps(info), flush=True)
    out = out_dir()
    records = []
    for n in args.sizes:
        for name in args.models:
            record = {"model": name, "n": n, "target_length": args.target_length, "layers": args.layers,
                      "batch": 1, "accumulation": args.accumulation,
                      "gradient_checkpointing": args.gradient_checkpointing, "device": info["device"]}
            if time.time() > deadline:
                record["skipped"] = f"time budget ({args.budget_s:.0f} s) spent"
            else:
                row_started = time.time()
                free_memory()
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                record.update(train_row(name, n, args, device, deadline))
                if name.startswith("colt5-hf"):
                    torch._dynamo.reset()  # drops the compiled code, its CUDA graphs and what they hold
                free_memory()
                record["row_s"] = time.time() - row_started
                if device == "cuda":  # what the row left allocated (0 expected: a leak would shrink later rows)
                    record["left_allocated_gib"] = torch.cuda.memory_allocated() / 2**30
            records.append(record)
            for (model, length), ratio in speedups(records).items():  # the baseline may come after a row
                next(r for r in records if (r["model"], r["n"]) == (model, length))["speedup_vs_longt5_local"] = ratio
            print(json.dumps(record), flush=True)
            (out / f"{args.name}.json").write_text(json.dumps({"environment": info, "records": records}, indent=1))
    print(table(records))


if __name__ == "__main__":
    main()
