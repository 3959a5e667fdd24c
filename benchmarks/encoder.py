"""Encoder stacks at long inputs: milliseconds per layer (forward; forward+backward) and peak memory.

One process, one GPU, bf16 weights and activations, batch 1, a stack of `--layers` (6) encoder layers of the Large
shape (d 1024, 16 heads, d_ff 2816) timed whole and divided by the layer count; random weights and random inputs
(inputs_embeds ~ N(0, 1), upstream gradient ~ N(0, 1)); dropout off. Models:

  colt5-hf/default-<impl>  the model as a user gets it: `encoder_compile="auto"` (the default), the blocks compiled by
                           the model itself for the input's length bucket (impl sdpa, the default attention, or
                           flex_attention)
  colt5-hf/fast-<impl>     the same with `encoder_compile="cuda_graphs"`: CUDA graphs, through the model's own path
  colt5-hf/<impl>          this package's CoLT5EncoderModel encoder, attn_implementation eager, sdpa, flex_attention,
                           uncompiled (`encoder_compile="off"`; routing by the fused Triton coordinate descent on CUDA)
  colt5-hf/flex+eager-cd   flex_attention with the eager coordinate-descent loop (the fused kernels switched off)
  colt5-hf/<kind>-flex_attention+sort   flex_attention with the routers' top-k selection by the stable sort (the
                           Triton selection kernel switched off)
  colt5-hf/<kind>-flex_attention+separate-selection   the attention's q and kv routers each selecting on its own
                           (two top-k and two soft top-k launches instead of one each)
  colt5-hf/<kind>-flex_attention+one-hot-gradient   the heavy attention's bias gradient by one matrix product with a
                           one-hot matrix in memory (the `bucket_sums` kernel switched off)
  colt5-hf/<kind>-flex_attention+dense-scatter   the routed branches' rows scattered into (b, n, d) zeros and summed,
                           instead of added into the residual in place (`RoutedSum.add_to` replaced)
  colt5-hf/<kind>-flex_attention+inductor-local-tiles   the light attention's flex attention with inductor's
                           default tiles instead of `flex_local_attention.LOCAL_KERNEL_OPTIONS`
  colt5-hf/<kind>-flex_attention+sdpa-bias-gradient   the heavy attention's bias gradient from SDPA (its memory-
                           efficient kernel writes a (b, h, m, m_kv) gradient, summed per bucket by `bucket_sums`)
                           instead of `heavy_bias_gradient_kernel.HeavyBiasGradient` (SDPA without a bias gradient, the table's gradient
                           recomputed tile by tile)
  colt5-hf/compiled-<impl> every block compiled, block.compile(fullgraph=True, dynamic=False): one compiled graph that
                           all layers run (impl flex_attention or sdpa); a new n compiles again (static shapes)
  colt5-hf/cudagraphs-<impl>  the same under mode="reduce-overhead": CUDA graphs for the forward and for the
                              forward+backward (the record counts the graphs that fell back to no CUDA graphs)
  colt5-hf/autotuned-<impl>   the same under mode="max-autotune": CUDA graphs, and inductor choosing each matmul
                              between cuBLAS and its Triton templates (which can take the elementwise work that
                              follows into their epilogue) by timing them; compiles for minutes (H100, torch 2.11:
                              forward slower than reduce-overhead, forward+backward failed while autotuning)
  colt5-hf/cudagraphs-stack-<impl>  the whole stack compiled as one graph, torch.compile(encoder, fullgraph=True,
                              dynamic=False, mode="reduce-overhead"): one CUDA graph for the forward and one for the
                              backward instead of one per block (no host time and no input copies between the
                              blocks; compiles the 6 blocks, not one)
  longt5-local, longt5-tglobal   transformers' LongT5 encoder (local / transient-global attention, radius 127)
  t5                       transformers' T5 encoder (full attention), 2 layers, n <= 16384
  reference                colt5-attention 0.2.2 ConditionalRoutedTransformerBlock x layers (light heads 4, heavy
                           heads 12, window 256, FF multipliers 1.375 / 11, 50 iterations); float32 weights and
                           residual stream under bf16 autocast: with bf16 weights its heavy attention multiplies
                           float32 probabilities with bf16 values and raises

Memory: peak allocated during one forward+backward (weights and their gradients included: `peak_gib`) and the part
above what was allocated before it (`extra_gib`). Compiled rows: compilation happens in the warm-up; the wall time of
the first call (compilation included) is reported as `fwd_compile_s` and `fwdbwd_compile_s`. Writes encoder.json and
encoder.png to $OUT (or benchmarks/out).

    python benchmarks/encoder.py [--sizes 4096 16384 32768 65536] [--models ...] [--layers 6]
"""

import argparse
import functools
import json
import time

import torch
from torch._dynamo.utils import counters

from common import LARGE, colt5_large_config, cuda_time, environment, error_text, free_memory, out_dir


# The default rows, CUDA graphs last (their memory pool outlives the stack); the whole list runs in about 7 minutes on
# an H200, most of it compiling (each compiled row compiles a forward and a forward+backward graph per n).
# colt5-hf/eager and colt5-hf/flex+eager-cd (the eager reference paths) run when named in --models.
MODELS = ["colt5-hf/flex_attention", "colt5-hf/compiled-flex_attention", "longt5-local", "colt5-hf/compiled-sdpa",
          "reference", "longt5-tglobal", "colt5-hf/sdpa", "t5", "colt5-hf/cudagraphs-flex_attention"]
OTHER_MODELS = ["colt5-hf/default-sdpa", "colt5-hf/default-flex_attention", "colt5-hf/fast-sdpa",
                "colt5-hf/fast-flex_attention", "colt5-hf/eager", "colt5-hf/flex+eager-cd", "colt5-hf/cudagraphs-sdpa",
                "colt5-hf/cudagraphs-flex_attention+sort", "colt5-hf/compiled-flex_attention+sort",
                "colt5-hf/cudagraphs-flex_attention+separate-selection",
                "colt5-hf/cudagraphs-flex_attention+one-hot-gradient",
                "colt5-hf/cudagraphs-flex_attention+dense-scatter",
                "colt5-hf/cudagraphs-flex_attention+inductor-local-tiles",
                "colt5-hf/cudagraphs-flex_attention+sdpa-bias-gradient", "colt5-hf/autotuned-flex_attention",
                "colt5-hf/autotuned-sdpa", "colt5-hf/cudagraphs-stack-flex_attention"]
T5_MAX_LENGTH = 16384
T5_LAYERS = 2


class Stack:
    """A callable x (1, n, d) -> (1, n, d) with its parameters; `context` is entered around its measurements,
    `compiled` says that its first calls compile, `cuda_graphs` that they record CUDA graphs."""

    def __init__(self, name, module, run, layers, context=None, compiled=False, cuda_graphs=False):
        self.name, self.module, self.run, self.layers, self.context = name, module, run, layers, context
        self.compiled, self.cuda_graphs = compiled, cuda_graphs


def build(name, layers):
    dtype, device = torch.bfloat16, "cuda"
    if name.startswith("colt5-hf"):
        from colt5_hf import CoLT5EncoderModel, routing

        implementation = name.split("/")[1]
        context, mode, encoder_compile = None, None, "off"
        if implementation.startswith(("default-", "fast-")):
            setting, implementation = implementation.split("-", 1)
            encoder_compile = {"default": "auto", "fast": "cuda_graphs"}[setting]
        if implementation.startswith(("compiled-", "cudagraphs-", "autotuned-")):
            kind, implementation = implementation.split("-", 1)
            whole_stack = implementation.startswith("stack-")
            implementation = implementation.removeprefix("stack-")
            mode = {"compiled": "default", "cudagraphs": "reduce-overhead", "autotuned": "max-autotune"}[kind]
        from colt5_hf import flex_local_attention, modeling_colt5, t5_attention

        select_routes = routing.select_routes  # the original, for `separately` to call while it replaces it

        def separately(routers, scores, mask, num_tokens=None):
            return [select_routes([router], [router_scores], mask, [tokens])[0]
                    for router, router_scores, tokens in zip(routers, scores, num_tokens or [None] * len(routers))]

        def dense_scatter(self, hidden_states, dropout=0.0):  # the routed rows scattered into zeros first, then summed
            n = self.dense.shape[1]
            total = self.dense + routing.scatter_tokens(self.routed, self.indices, n)
            return hidden_states + torch.nn.functional.dropout(total, dropout)

        switched_off = {"flex+eager-cd": (routing, "fused_coordinate_descent", None),
                        "flex_attention+sort": (routing, "fused_top_k_positions", None),
                        "flex_attention+separate-selection": (routing, "select_routes", separately),
                        "flex_attention+one-hot-gradient": (t5_attention, "bucket_sums", None),
                        "flex_attention+dense-scatter": (routing.RoutedSum, "add_to", dense_scatter),
                        "flex_attention+inductor-local-tiles": (
                            modeling_colt5, "flex_local_attention",
                            functools.partial(flex_local_attention.flex_local_attention, kernel_options={})),
                        "flex_attention+sdpa-bias-gradient": (modeling_colt5, "HeavyBiasGradient", None),
                        }.get(implementation)
        if switched_off:
            implementation = "flex_attention"
            module, attribute, replacement = switched_off

            class SwitchedOff:
                def __enter__(self):
                    self.saved = getattr(module, attribute)
                    setattr(module, attribute, replacement)

                def __exit__(self, *exc):
                    setattr(module, attribute, self.saved)

            context = SwitchedOff
        config = colt5_large_config(num_layers=layers, encoder_compile=encoder_compile)
        with torch.device(device):
            model = CoLT5EncoderModel(config).to(dtype)
        model.config._attn_implementation = implementation
        encoder = model.encoder
        if mode is None:
            return Stack(name, encoder, lambda x, n: encoder(inputs_embeds=x).last_hidden_state, layers, context,
                         compiled=encoder_compile != "off", cuda_graphs=encoder_compile == "cuda_graphs")
        if whole_stack:
            compiled = torch.compile(encoder, fullgraph=True, dynamic=False, mode=mode)
        else:
            compiled = encoder
            for block in encoder.block:  # the same compiled code for every block (Dynamo's cache is per code object)
                block.compile(fullgraph=True, dynamic=False, mode=mode)

        cuda_graphs = mode in ("reduce-overhead", "max-autotune")

        def run(x, n):
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()  # a new step: earlier outputs may be overwritten
            return compiled(inputs_embeds=x).last_hidden_state

        return Stack(name, encoder, run, layers, context, compiled=True, cuda_graphs=cuda_graphs)
    if name.startswith("longt5"):
        from transformers import LongT5Config, LongT5EncoderModel

        attention = "local" if name == "longt5-local" else "transient-global"
        config = LongT5Config(**LARGE, num_layers=layers, encoder_attention_type=attention, local_radius=127,
                              global_block_size=16, feed_forward_proj="gated-gelu", dropout_rate=0.0)
        with torch.device(device):
            model = LongT5EncoderModel(config).to(dtype)
        return Stack(name, model, lambda x, n: model(inputs_embeds=x).last_hidden_state, layers)
    if name == "t5":
        from transformers import T5Config, T5EncoderModel

        config = T5Config(**LARGE, num_layers=T5_LAYERS, feed_forward_proj="gated-gelu", dropout_rate=0.0)
        with torch.device(device):
            model = T5EncoderModel(config).to(dtype)
        return Stack(name, model, lambda x, n: model(inputs_embeds=x).last_hidden_state, T5_LAYERS)
    if name == "reference":
        from colt5_attention.transformer_block import ConditionalRoutedTransformerBlock

        with torch.device(device):
            blocks = torch.nn.ModuleList(
                ConditionalRoutedTransformerBlock(
                    LARGE["d_model"], num_heavy_attn_tokens_q=1, num_heavy_attn_tokens_kv=1, num_heavy_ff_tokens=1,
                    light_dim_head=64, light_heads=4, light_window_size=256, heavy_dim_head=64, heavy_heads=12,
                    light_ff_mult=1408 / 1024, heavy_ff_mult=11264 / 1024, router_kwargs=dict(n_iters=50),
                )
                for _ in range(layers)
            )

        def run(x, n):
            x = x.float()  # its routed outputs come out in float32 and are written into a tensor like x
            with torch.autocast("cuda", dtype=dtype):
                for block in blocks:
                    x = block(x, num_heavy_attn_tokens_q=n // 16, num_heavy_attn_tokens_kv=n // 8,
                              num_heavy_ff_tokens=n // 16)
            return x

        return Stack(name, blocks, run, layers)
    raise ValueError(name)


def measure(stack, n, budget_s):
    """{fwd_ms, fwdbwd_ms, peak_gib, extra_gib} per layer for one length, or an error for the part that failed."""
    d = LARGE["d_model"]
    generator = torch.Generator(device="cuda").manual_seed(n)
    x = torch.randn(1, n, d, device="cuda", generator=generator).to(torch.bfloat16)
    result = {}
    params = list(stack.module.parameters())
    warmup = 1 if stack.compiled else 2  # a compiled stack's first call, timed apart, is a warm-up too

    def drop_grads():
        for p in params:
            p.grad = None
        x.grad = None

    def first_call(step):  # compiles (compiled rows): timed apart from the measurement, which follows it
        started = time.time()
        step()
        torch.cuda.synchronize()
        return time.time() - started

    try:
        stack.module.eval()
        with torch.no_grad():
            if stack.compiled:
                result["fwd_compile_s"] = first_call(lambda: stack.run(x, n))
            result["fwd_ms"] = cuda_time(lambda: stack.run(x, n), warmup=warmup, budget_s=budget_s) / stack.layers
        if stack.cuda_graphs:  # graphs that ran without CUDA graphs (0 expected), counted since the stack was built
            result["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
    except Exception as error:  # noqa: BLE001 - recorded, the benchmark goes on
        result["fwd_error"] = error_text(error)
    free_memory()
    if "fwd_error" in result and result["fwd_error"] == "out of memory":
        result["fwdbwd_error"] = "out of memory (forward already)"
        return result
    try:
        stack.module.train()
        x.requires_grad_(True)
        upstream = torch.randn(1, n, d, device="cuda", generator=generator).to(torch.bfloat16)

        def step():
            stack.run(x, n).backward(upstream)

        if stack.compiled:
            result["fwdbwd_compile_s"] = first_call(step)
            drop_grads()
        result["fwdbwd_ms"] = cuda_time(step, warmup=warmup, budget_s=budget_s, between=drop_grads) / stack.layers
        drop_grads()
        if stack.cuda_graphs:  # no peak: the graphs' memory pool was allocated before any reset of the peak
            result["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
            return result
        free_memory()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        result["peak_gib"] = peak / 2**30
        result["extra_gib"] = (peak - before) / 2**30
    except Exception as error:  # noqa: BLE001
        result["fwdbwd_error"] = error_text(error)
    finally:
        x.requires_grad_(False)
        drop_grads()
        free_memory()
    return result


def plot(records, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for key, axis, title in (("fwd_ms", axes[0], "forward"), ("fwdbwd_ms", axes[1], "forward + backward")):
        for model in dict.fromkeys(r["model"] for r in records):
            points = sorted((r["n"], r[key]) for r in records if r["model"] == model and key in r)
            if points:
                axis.plot(*zip(*points), marker="o", label=model)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("input length n (tokens)")
        axis.set_ylabel("ms per layer")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=8)
    device = records[0].get("device") or torch.cuda.get_device_name()
    figure.suptitle(f"Encoder layer time, Large shape, bf16, batch 1 ({device})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def table(records):
    lines = [f"{'model':34s} {'n':>6s} {'fwd ms/layer':>13s} {'fwd+bwd ms/layer':>17s} {'peak GiB':>9s} "
             f"{'extra GiB':>9s} {'compile s':>11s}"]
    for r in records:
        fwd = f"{r['fwd_ms']:.2f}" if "fwd_ms" in r else r.get("fwd_error", "-")[:13]
        bwd = f"{r['fwdbwd_ms']:.2f}" if "fwdbwd_ms" in r else r.get("fwdbwd_error", "-")[:17]
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "-"
        extra = f"{r['extra_gib']:.2f}" if "extra_gib" in r else "-"
        compile_s = "/".join(f"{r[key]:.0f}" for key in ("fwd_compile_s", "fwdbwd_compile_s") if key in r) or "-"
        lines.append(f"{r['model']:34s} {r['n']:6d} {fwd:>13s} {bwd:>17s} {peak:>9s} {extra:>9s} {compile_s:>11s}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 32768, 65536])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS + OTHER_MODELS, metavar="MODEL",
                        help=f"default: {' '.join(MODELS)}; also: {' '.join(OTHER_MODELS)}")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timed repeats per measurement")
    parser.add_argument("--name", default="encoder")
    parser.add_argument("--from-json", nargs="+", help="only redraw the table and plot from earlier runs' JSON")
    args = parser.parse_args()
    out = out_dir()
    if args.from_json:
        records = [r for path in args.from_json for r in json.loads(open(path).read())["records"]]
        plot([r for r in records if r["n"]], out / f"{args.name}.png")
        print(table(records))
        return
    torch._dynamo.config.cache_size_limit = 64
    info = environment()
    print(json.dumps(info), flush=True)
    records = []
    for name in args.models:
        started = time.time()
        counters.clear()
        try:
            stack = build(name, args.layers)
        except Exception as error:  # noqa: BLE001
            print(f"{name}: cannot build: {error_text(error)}", flush=True)
            records.append({"model": name, "n": 0, "fwd_error": error_text(error)})
            continue
        for n in args.sizes:
            if name == "t5" and n > T5_MAX_LENGTH:
                continue
            context = stack.context() if stack.context else None
            if context:
                context.__enter__()
            try:
                result = measure(stack, n, args.budget)
            finally:
                if context:
                    context.__exit__(None, None, None)
            record = {"model": name, "n": n, "layers": stack.layers, "device": info["device"], **result}
            records.append(record)
            print(json.dumps(record), flush=True)
            (out / f"{args.name}.json").write_text(json.dumps({"environment": info, "records": records}, indent=1))
        if stack.compiled:
            torch._dynamo.reset()  # drops the compiled code and what it holds
        del stack
        free_memory()
        print(f"{name}: {time.time() - started:.0f} s", flush=True)
    plot([r for r in records if r["n"]], out / f"{args.name}.png")
    print(table(records))


if __name__ == "__main__":
    main()
