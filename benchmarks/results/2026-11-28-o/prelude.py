"""Where the CUDA-graph forward's time outside the kernels goes: CPU time of the encoder's prelude and of each compiled
block call (GPU idle at the start, as in benchmarks/common.cuda_time), and the stack's wall with/without the prelude."""
import statistics
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
from common import colt5_large_config, cuda_time  # noqa: E402

from colt5_hf import CoLT5EncoderModel, modeling_colt5  # noqa: E402

config = colt5_large_config(num_layers=6)
with torch.device("cuda"):
    model = CoLT5EncoderModel(config).to(torch.bfloat16)
model.config._attn_implementation = "flex_attention"
model.eval()
encoder = model.encoder
for block in encoder.block:
    block.compile(fullgraph=True, dynamic=False, mode="reduce-overhead")
x = torch.randn(1, 16384, 1024, device="cuda").to(torch.bfloat16)
mask = modeling_colt5.check_mask(None, (1, 16384), "attention_mask", x.device)
tables = modeling_colt5.branch_bias_tables(config, encoder.relative_attention_bias, x.device)


def whole():
    torch.compiler.cudagraph_mark_step_begin()
    return encoder(inputs_embeds=x).last_hidden_state


def blocks_only():
    torch.compiler.cudagraph_mark_step_begin()
    h = x
    for block in encoder.block:
        h, _ = block(h, mask, *tables, "flex_attention", False)
    return encoder.final_layer_norm(h)


def event_ms(step):  # the benchmarks' timing, 20 repeats, no warm-up (the loop below warms up)
    return cuda_time(step, warmup=0, min_reps=20, max_reps=20)


with torch.no_grad():
    for _ in range(4):
        whole()
        blocks_only()
    torch.cuda.synchronize()
    for label, step in [("whole", whole), ("blocks only", blocks_only)] * 3:
        print(f"{label:12} {event_ms(step) / 6:.3f} ms/layer (events, synced per call)", flush=True)
    # CPU breakdown (GPU idle at the start of each)
    parts = {}
    for _ in range(10):
        torch.cuda.synchronize()
        t = [time.perf_counter()]
        torch.compiler.cudagraph_mark_step_begin()
        m = modeling_colt5.check_mask(None, (1, 16384), "attention_mask", x.device)
        tb = modeling_colt5.branch_bias_tables(config, encoder.relative_attention_bias, x.device)
        t.append(time.perf_counter())
        h = encoder.dropout(x)
        for block in encoder.block:
            h, _ = block(h, m, *tb, "flex_attention", False)
            t.append(time.perf_counter())
        h = encoder.final_layer_norm(h)
        t.append(time.perf_counter())
        torch.cuda.synchronize()
        t.append(time.perf_counter())
        for i, name in enumerate(["prelude"] + [f"block {j}" for j in range(6)] + ["final norm", "wait for GPU"]):
            parts.setdefault(name, []).append(1e6 * (t[i + 1] - t[i]))
    for name, values in parts.items():
        print(f"CPU {name:12} {statistics.median(values):8.1f} us", flush=True)
    if len(sys.argv) > 1:  # the whole encoder as one graph
        encoder.compile(fullgraph=False, dynamic=False, mode="reduce-overhead")
        started = time.time()
        for _ in range(3):
            whole()
        torch.cuda.synchronize()
        print(f"whole encoder compiled as one: {time.time() - started:.0f} s to compile", flush=True)
        for _ in range(2):
            print(f"one graph    {event_ms(whole) / 6:.3f} ms/layer", flush=True)
