"""Where a CoLT5-Large encoder layer spends its time: torch.profiler over a 6-layer stack (flex_attention, fused
routing) at one length, forward and forward+backward. Prints the CUDA kernels by total time, the number of kernel
launches per layer and the summed kernel time against the wall time (the gap is launch/CPU overhead), then every
kernel by name with its time per layer, then the GPU's idle time between kernels by the pair of kernels around each
gap. --compile profiles the compiled path of benchmarks/encoder.py (every block `block.compile(fullgraph=True,
dynamic=False)`), --compile reduce-overhead the same under CUDA graphs, --compile max-autotune-no-cudagraphs with
inductor's timed choice of matmul kernels (minutes of compiling). Writes profile.txt (profile-compiled.txt,
profile-reduce-overhead.txt) to $OUT (or benchmarks/out).

    python benchmarks/profile_encoder.py [--n 16384] [--implementation flex_attention] [--compile [reduce-overhead]]
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from common import colt5_large_config, environment, out_dir


def kernel_table(kernels, layers):
    """Every CUDA kernel by name: microseconds per layer, launches per layer, share of the kernel time."""
    totals, counts = {}, {}
    for event in kernels:
        totals[event.name] = totals.get(event.name, 0.0) + event.device_time
        counts[event.name] = counts.get(event.name, 0) + 1
    busy = sum(totals.values())
    lines = [f"{'us/layer':>9} {'calls':>5} {'share':>6}  kernel"]
    for name, total in sorted(totals.items(), key=lambda item: -item[1]):
        lines.append(f"{total / layers:9.1f} {counts[name] / layers:5.1f} {100 * total / busy:5.1f}%  {name[:150]}")
    return "\n".join(lines)


def gap_table(kernels, layers, rows=25):
    """The GPU's idle time between consecutive kernels (each gap from the latest end so far to the next start), in all
    and by the pair of kernels around it: under CUDA graphs it is what the launches cost beyond the kernels."""
    kernels = sorted(kernels, key=lambda event: event.time_range.start)
    totals, counts, end, idle = {}, {}, kernels[0].time_range.end, 0.0
    for before, after in zip(kernels, kernels[1:]):
        gap = max(after.time_range.start - end, 0.0)
        end = max(end, after.time_range.end)
        pair = (before.name[:60], after.name[:60])
        totals[pair], counts[pair] = totals.get(pair, 0.0) + gap, counts.get(pair, 0) + 1
        idle += gap
    lines = [f"idle between kernels: {idle / layers:.1f} us/layer over {len(kernels) / layers:.0f} launches/layer",
             f"{'us/layer':>9} {'gaps':>5}  before -> after"]
    for (before, after), total in sorted(totals.items(), key=lambda item: -item[1])[:rows]:
        lines.append(f"{total / layers:9.1f} {counts[before, after] / layers:5.1f}  {before} -> {after}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--implementation", default="flex_attention")
    parser.add_argument("--compile", nargs="?", const="default",
                        choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                        help="compile every block as benchmarks/encoder.py does, in this mode")
    args = parser.parse_args()
    from colt5_hf import CoLT5EncoderModel

    config = colt5_large_config(num_layers=args.layers)
    with torch.device("cuda"):
        model = CoLT5EncoderModel(config).to(torch.bfloat16)
    model.config._attn_implementation = args.implementation
    if args.compile:
        for block in model.encoder.block:
            block.compile(fullgraph=True, dynamic=False, mode=args.compile)
    x = torch.randn(1, args.n, config.d_model, device="cuda").to(torch.bfloat16)
    upstream = torch.randn_like(x)
    report = [str(environment()), f"n={args.n} layers={args.layers} implementation={args.implementation} "
              f"compiled={args.compile or 'no'}"]

    def forward():
        torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs: a new step may overwrite the last one's outputs
        with torch.no_grad():
            model.encoder(inputs_embeds=x)

    def forward_backward():
        torch.compiler.cudagraph_mark_step_begin()
        model.encoder(inputs_embeds=x.requires_grad_()).last_hidden_state.backward(upstream)
        model.zero_grad(set_to_none=True)
        x.grad = None  # under CUDA graphs the last step's gradient is overwritten: accumulating into it would fail

    model.train()
    for label, step in (("forward", forward), ("forward+backward", forward_backward)):
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
        wall = start.elapsed_time(end)
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time for e in kernels) / 1000
        report.append(
            f"\n== {label}: {wall / args.layers:.3f} ms/layer wall (CUDA events); kernels {len(kernels) / args.layers:.0f}"
            f" launches/layer, {busy / args.layers:.3f} ms/layer of kernel time ({100 * busy / wall:.0f}% busy)"
        )
        report.append(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
        report.append(kernel_table(kernels, args.layers))
        report.append(gap_table(kernels, args.layers))
    text = "\n".join(report)
    name = {None: "profile", "default": "profile-compiled"}.get(args.compile, f"profile-{args.compile}")
    (out_dir() / f"{name}.txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
