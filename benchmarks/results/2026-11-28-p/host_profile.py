"""Host (CPU) time of one encoder forward under CUDA graphs: perf_counter per block, then cProfile of 20 calls."""
import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
from common import colt5_large_config  # noqa: E402

from colt5_hf import CoLT5EncoderModel  # noqa: E402

out = open(os.path.join(os.environ.get("OUT", "/tmp"), "host_profile.txt"), "w")


def say(text):
    print(text, flush=True)
    out.write(text + "\n")
    out.flush()


config = colt5_large_config(num_layers=6)
with torch.device("cuda"):
    model = CoLT5EncoderModel(config).to(torch.bfloat16)
model.config._attn_implementation = "flex_attention"
model.eval()
encoder = model.encoder
for block in encoder.block:
    block.compile(fullgraph=True, dynamic=False, mode="reduce-overhead")
x = torch.randn(1, 16384, 1024, device="cuda").to(torch.bfloat16)


def call():
    torch.compiler.cudagraph_mark_step_begin()
    return encoder(inputs_embeds=x).last_hidden_state


with torch.no_grad():
    for _ in range(4):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        torch.cuda.synchronize()
        started = time.perf_counter()
        call()
        times.append(1e6 * (time.perf_counter() - started))
    times.sort()
    say(f"host time of one encoder(...) call (GPU idle at its start): median {times[5]:.0f} us, min {times[0]:.0f}")
    profiler = cProfile.Profile()
    for _ in range(20):
        torch.cuda.synchronize()
        profiler.enable()
        call()
        profiler.disable()
    torch.cuda.synchronize()
    for key in ("tottime", "cumulative"):
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats(key).print_stats(35)
        say(stream.getvalue())

# Training: the host time of one forward+backward step under CUDA graphs, then cProfile of 10 steps.
model.train()
for module in model.modules():
    if isinstance(module, torch.nn.Dropout):
        module.p = 0.0
xg = x.detach().requires_grad_()
grad = torch.randn_like(x)


def train_step():
    torch.compiler.cudagraph_mark_step_begin()
    xg.grad = None
    model.zero_grad(set_to_none=True)
    encoder(inputs_embeds=xg).last_hidden_state.backward(grad)


for _ in range(4):
    train_step()
torch.cuda.synchronize()
times = []
for _ in range(10):
    torch.cuda.synchronize()
    started = time.perf_counter()
    train_step()
    middle = time.perf_counter()
    torch.cuda.synchronize()
    times.append((1e6 * (middle - started), 1e6 * (time.perf_counter() - started)))
times.sort()
say(f"training step: host time {times[5][0]:.0f} us, wall {times[5][1]:.0f} us (median of 10)")
profiler = cProfile.Profile()
for _ in range(10):
    torch.cuda.synchronize()
    profiler.enable()
    train_step()
    profiler.disable()
torch.cuda.synchronize()
for key in ("tottime", "cumulative"):
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats(key).print_stats(40)
    say(stream.getvalue())
