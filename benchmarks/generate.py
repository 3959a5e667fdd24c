"""Generation at long inputs: 16384 input tokens, 128 new tokens (greedy, exactly 128: EOS suppressed), batch 1 and 8,
colt5-hf Large (24 + 24 layers) against transformers' LongT5-Large (transient-global). Random weights in bf16, random
input ids. Reports seconds per sample for the whole generate() call and for the encoder alone. Writes generate.json to
$OUT (or benchmarks/out).

Models: `colt5-hf/<attn_implementation>` decodes with the default dynamic cache (eager steps);
`colt5-hf/<attn_implementation>/static` is the fast path: encoder blocks compiled (`block.compile(fullgraph=True,
dynamic=False)`) and `cache_implementation="static"`, whose decoding step Transformers compiles on CUDA
(torch.compile, mode "reduce-overhead": CUDA graphs). Its warm-up is a generate() of the same shapes and length (the
static cache is sized by max_new_tokens), so compilation happens there and the timed call reuses the compiled step;
the record counts the graphs compiled during the timed call (0 expected). `colt5-hf/user` is what a user's call
gives: `model.generate(input_ids=..., attention_mask=..., max_new_tokens=..., min_new_tokens=...)` with no
`cache_implementation`, no compile of our own and the attention implementation the model picks, so it measures
whatever the model and generate() choose by default (the config's `encoder_compile`, the cache); its warm-up is its
first call, a generate() of the timed call's shapes (`first_call_s`, compilation included), and the record names the
cache that call used. `colt5-hf/command` is the command line: the model is saved (safetensors, its generation config
asking for exactly --new-tokens tokens) and `colt5-hf generate MODEL --file INPUTS --batch-size B --max-new-tokens N`
and `colt5-hf evaluate MODEL --file PAIRS ...` run in this process (`colt5_hf.cli.main`) on COMMAND_BATCHES batches of
random letters (ByT5 bytes: one token each, EOS included in --length; evaluate's targets are --new-tokens tokens
long); each command runs twice, and the record is the second run, its seconds per sample including the command's
loading of the model (`load_s`: one load timed alone); `first_call_s` is the first run's (compilation, after the rows
before it in this process). `longt5-local` and `longt5-tglobal` are Transformers' LongT5 with local or transient-global
attention, as Transformers gives them (dynamic cache, eager).

--profile writes generate_profile.txt to $OUT: torch.profiler tables (by device time and by CPU time) of 5 decoding
steps in the middle of a generate() call, per model and batch.

    python benchmarks/generate.py [--length 16384] [--new-tokens 128] [--batches 1 8] [--models ...] [--profile]
                                  [--no-cudnn-sdp]
"""

import argparse
import contextlib
import io
import json
import random
import string
import tempfile
import time
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from common import LARGE, colt5_large_config, environment, error_text, free_memory, out_dir


MODELS = ["colt5-hf/user", "colt5-hf/command", "colt5-hf/flex_attention/static", "colt5-hf/flex_attention",
          "longt5-local", "longt5-tglobal"]
LONGT5_ATTENTION = {"longt5-local": "local", "longt5-tglobal": "transient-global"}
COMMAND_BATCHES = 2  # batches per command run: the model's loading is spread over that many
PROFILE_STEPS = (8, 13)  # decoding steps [first, last) under the profiler


def build(name):
    if name.startswith("colt5-hf"):
        from colt5_hf import CoLT5ForConditionalGeneration

        user = name == "colt5-hf/user"  # the model's own choices; the other rows choose by hand, without its compiling
        config = colt5_large_config(num_layers=24, num_decoder_layers=24, encoder_compile="auto" if user else "off")
        with torch.device("cuda"):
            model = CoLT5ForConditionalGeneration(config).to(torch.bfloat16)
        if user:
            return model
        model.config._attn_implementation = name.split("/")[1]
        if name.endswith("/static"):  # compiled encoder blocks too, by hand
            for block in model.encoder.block:
                block.compile(fullgraph=True, dynamic=False)
        return model
    from transformers import LongT5Config, LongT5ForConditionalGeneration

    if name not in LONGT5_ATTENTION:
        raise SystemExit(f"unknown model {name!r}; the models are {', '.join(MODELS)}")
    config = LongT5Config(**LARGE, num_layers=24, num_decoder_layers=24, encoder_attention_type=LONGT5_ATTENTION[name],
                          local_radius=127, global_block_size=16, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                          decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    with torch.device("cuda"):
        return LongT5ForConditionalGeneration(config).to(torch.bfloat16)


class ProfileSteps(StoppingCriteria):
    """Never stops generation; runs the profiler over decoding steps PROFILE_STEPS (called once per step)."""

    def __init__(self, profiler):
        self.profiler, self.step, self.wall_s = profiler, 0, None

    def __call__(self, input_ids, scores, **kwargs):
        self.step += 1
        if self.step in PROFILE_STEPS:
            torch.cuda.synchronize()
            if self.step == PROFILE_STEPS[0]:
                self.profiler.start()
                self.wall_s = time.perf_counter()
            else:
                self.wall_s = time.perf_counter() - self.wall_s
                self.profiler.stop()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def profile_decoding(model, generate, title):
    """torch.profiler tables of decoding steps PROFILE_STEPS of one generate() call."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    hook = ProfileSteps(torch.profiler.profile(activities=activities))
    with torch.no_grad():
        generate(stopping_criteria=StoppingCriteriaList([hook]))
    steps = PROFILE_STEPS[1] - PROFILE_STEPS[0]
    events = hook.profiler.events()
    kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    averages = hook.profiler.key_averages()
    lines = [f"== {title}: {steps} decoding steps, {1000 * hook.wall_s / steps:.2f} ms wall per step (synchronized), "
             f"{kernels / steps:.0f} GPU kernels per step",
             averages.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60),
             averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)]
    return "\n".join(lines)


def cache_name(output):
    """The class of the decoder's self-attention cache in generate()'s output (the field is `cache`, or
    `past_key_values` in older Transformers)."""
    cache = output["cache"] if "cache" in output else output.get("past_key_values")
    cache = getattr(cache, "self_attention_cache", cache)
    return type(cache).__name__ if cache is not None else None


def command_records(args, info):
    """The `colt5-hf/command` rows (module doc): `colt5-hf generate` and `colt5-hf evaluate` on a saved colt5-hf
    Large, each batch size's command run twice in this process, the second timed."""
    from colt5_hf import CoLT5ForConditionalGeneration
    from colt5_hf.cli import main as command
    from colt5_hf.cli.common import load_saved_model

    folder = Path(tempfile.mkdtemp(prefix="colt5-command-"))
    with torch.device("cuda"):
        model = CoLT5ForConditionalGeneration(colt5_large_config(num_layers=24, num_decoder_layers=24,
                                                                 encoder_compile="auto")).to(torch.bfloat16)
    model.generation_config.min_new_tokens = args.new_tokens  # EOS suppressed, as in the other rows
    model.save_pretrained(folder)
    model = None
    free_memory()
    load_s, loaded = timed(lambda: load_saved_model(folder).to("cuda"))
    dtype, loaded = str(next(loaded.parameters()).dtype), None
    free_memory()
    letters = random.Random(0)

    def text(length):  # ByT5 bytes: one token a letter, and EOS
        return "".join(letters.choices(string.ascii_lowercase, k=length - 1))

    records = []
    for batch in args.batches:
        examples = COMMAND_BATCHES * batch
        files = {"generate": folder / f"inputs-{batch}.jsonl", "evaluate": folder / f"pairs-{batch}.jsonl"}
        rows = [{"source": text(args.length), "target": text(args.new_tokens)} for _ in range(examples)]
        for path in files.values():
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        for name, path in files.items():
            argv = [name, str(folder), "--file", str(path), "--batch-size", str(batch),
                    "--max-new-tokens", str(args.new_tokens)]
            record = {"model": "colt5-hf/command", "command": "colt5-hf " + " ".join(argv[:1] + argv[2:]),
                      "batch": batch, "length": args.length, "new_tokens": args.new_tokens, "examples": examples,
                      "device": info["device"], "dtype": dtype, "load_s": load_s}
            printed = io.StringIO()
            try:
                with contextlib.redirect_stdout(printed):
                    first_s, _ = timed(lambda: command(argv))
                    printed.seek(0)
                    printed.truncate()
                    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
                    total_s, _ = timed(lambda: command(argv))
                    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
                lines = printed.getvalue().splitlines()
                record.update(first_call_s=first_s, total_s=total_s, s_per_sample=total_s / examples,
                              graphs_compiled_in_timed_call=graphs, output_lines=len(lines))
                if name == "evaluate":
                    record["metrics"] = json.loads(lines[-1])
            except (Exception, SystemExit) as error:  # noqa: BLE001 - recorded, the benchmark goes on
                record["error"] = error_text(error) if isinstance(error, Exception) else f"exit {error.code}"
            free_memory()
            records.append(record)
    return records


def timed(function):
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = function()
    torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--profile", action="store_true", help="write generate_profile.txt (see the module doc)")
    parser.add_argument("--no-cudnn-sdp", action="store_true", help="keep SDPA off its cuDNN backend")
    args = parser.parse_args()
    if args.no_cudnn_sdp:
        torch.backends.cuda.enable_cudnn_sdp(False)
    # every batch size gets its own graph with static shapes (CUDA graphs), rather than a dynamic-shape recompilation;
    # the user row keeps Dynamo's defaults
    ours = dict(cache_size_limit=64, automatic_dynamic_shapes=False)
    defaults = {key: getattr(torch._dynamo.config, key) for key in ours}
    profiles = []
    info = dict(environment(), cudnn_sdp=torch.backends.cuda.cudnn_sdp_enabled())
    print(json.dumps(info), flush=True)
    records = []
    for name in args.models:
        if name == "colt5-hf/command":
            for record in command_records(args, info):
                records.append(record)
                print(json.dumps(record), flush=True)
                (out_dir() / "generate.json").write_text(json.dumps({"environment": info, "records": records},
                                                                   indent=1))
            continue
        model = build(name).eval()
        user = name == "colt5-hf/user"
        for key, value in (defaults if user else ours).items():
            setattr(torch._dynamo.config, key, value)
        for batch in args.batches:
            record = {"model": name, "batch": batch, "length": args.length, "new_tokens": args.new_tokens,
                      "device": info["device"]}
            if name.startswith("colt5-hf"):
                record.update(attn_implementation=model.config._attn_implementation,
                              encoder_compile=getattr(model.config, "encoder_compile", None))
            generator = torch.Generator(device="cuda").manual_seed(batch)
            input_ids = torch.randint(2, LARGE["vocab_size"], (batch, args.length), device="cuda", generator=generator)
            attention_mask = torch.ones_like(input_ids)
            options = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
            if not user:
                options.update(do_sample=False, num_beams=1)
            static = name.endswith("/static")
            if static:
                options["cache_implementation"] = "static"

            def generate(**extra):
                return model.generate(input_ids=input_ids, attention_mask=attention_mask, **{**options, **extra})

            try:
                with torch.no_grad():
                    # warm-up: the encoder's compilation; for the static cache the decoding step's compilation and
                    # CUDA graph capture, at the timed call's shapes (same batch, length and max_new_tokens). The
                    # user row's is its first call, whose outputs name the cache that generate() chose.
                    if user:
                        warm_s, first = timed(lambda: generate(return_dict_in_generate=True))
                        record.update(first_call_s=warm_s, cache=cache_name(first))
                        del first
                    else:
                        warm_s, _ = timed(lambda: generate() if static else generate(max_new_tokens=4,
                                                                                     min_new_tokens=4))
                    encoder_s, _ = timed(lambda: model.get_encoder()(input_ids=input_ids,
                                                                     attention_mask=attention_mask))
                    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
                    total_s, output = timed(generate)
                    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
                record.update(generated=output.shape[1] - 1, total_s=total_s, s_per_sample=total_s / batch,
                              encoder_s=encoder_s, decode_s_per_token=(total_s - encoder_s) / args.new_tokens,
                              warm_up_s=warm_s, graphs_compiled_in_timed_call=graphs,
                              compiled_decoding=hasattr(model, "_compiled_call"))
                if args.profile:
                    profiles.append(profile_decoding(model, generate, f"{name}, batch {batch}"))
                    (out_dir() / "generate_profile.txt").write_text("\n\n".join(profiles) + "\n")
            except Exception as error:  # noqa: BLE001 - recorded, the benchmark goes on
                record["error"] = error_text(error)
            free_memory()
            records.append(record)
            print(json.dumps(record), flush=True)
            (out_dir() / "generate.json").write_text(json.dumps({"environment": info, "records": records}, indent=1))
        model = None  # frees its memory (the generate closure reads the same variable)
        free_memory()
    print(f"{'model':32s} {'batch':>5s} {'s/sample':>9s} {'total s':>8s} {'encoder s':>9s} {'decode ms/token':>15s} "
          f"{'warm-up s':>9s}  (colt5-hf/user: warm-up = its first call)")
    for r in records:
        if "error" in r:
            print(f"{r['model']:32s} {r['batch']:5d} {r['error']}")
        elif "command" in r:
            print(f"{' '.join(r['command'].split()[:2]):32s} {r['batch']:5d} {r['s_per_sample']:9.3f} {r['total_s']:8.2f} "
                  f"{'':9s} {'':15s} {r['first_call_s']:9.1f}  ({r['examples']} examples, load {r['load_s']:.1f} s)")
        else:
            print(f"{r['model']:32s} {r['batch']:5d} {r['s_per_sample']:9.3f} {r['total_s']:8.2f} "
                  f"{r['encoder_s']:9.3f} {1000 * r['decode_s_per_token']:15.2f} {r['warm_up_s']:9.1f}")


if __name__ == "__main__":
    main()
