"""Where a static-cache decoding step's wall time goes (batch 8, 16k): per-step host timeline, cProfile of one
generate(), and the cross-attention's probs @ values product as one bmm against split over key chunks."""
import cProfile
import io
import os
import pstats
import sys
import time

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

sys.path.insert(0, "benchmarks")
import generate as G  # noqa: E402
from common import cuda_time  # noqa: E402

out = open(os.path.join(os.environ.get("OUT", "/tmp"), "gen_host.txt"), "w")


def say(text):
    print(text, flush=True)
    out.write(text + "\n")
    out.flush()


# the cross-attention's decoding products alone, CUDA graphs (reduce-overhead), batch 8, 16 query heads, 1 kv head
b, k, d = 8, 16384, 64
q = torch.randn(b, 1, 16, d, device="cuda", dtype=torch.bfloat16)
key = torch.randn(b, 1, k, d, device="cuda", dtype=torch.bfloat16)
value = torch.randn(b, 1, k, d, device="cuda", dtype=torch.bfloat16)
bias = torch.zeros(b, 1, 1, k, device="cuda", dtype=torch.bfloat16)


def whole(q, key, value, bias):
    scores = torch.matmul(q, key.transpose(-1, -2)).float() + bias.float()
    probs = scores.softmax(-1).to(value.dtype)
    return torch.matmul(probs, value)


def split(q, key, value, bias, chunks=16):
    scores = torch.matmul(q, key.transpose(-1, -2)).float() + bias.float()
    probs = scores.softmax(-1).to(value.dtype)  # (b, 1, 16, k)
    p = probs.unflatten(-1, (chunks, -1)).transpose(-3, -2)  # (b, 1, chunks, 16, k/chunks)
    v = value.unflatten(-2, (chunks, -1))  # (b, 1, chunks, k/chunks, d)
    return torch.matmul(p, v).float().sum(-3).to(value.dtype)


for name, fn in (("whole", whole), ("split16", split), ("split8", lambda *a: split(*a, chunks=8)),
                 ("split32", lambda *a: split(*a, chunks=32))):
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)

    def step():
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(q, key, value, bias)

    with torch.no_grad():
        ms = cuda_time(step, warmup=3, min_reps=50, max_reps=50)
        err = (step().float() - whole(q, key, value, bias).float()).abs().max().item()
    say(f"cross-attention decode ({name}): {1000 * ms:.1f} us, max diff vs eager whole {err:.2e}")

torch._dynamo.config.cache_size_limit = 64
torch._dynamo.config.automatic_dynamic_shapes = False
model = G.build("colt5-hf/flex_attention/static").eval()
batch, length, new = 8, 16384, 128
input_ids = torch.randint(2, 32128, (batch, length), device="cuda")
attention_mask = torch.ones_like(input_ids)
options = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, num_beams=1, cache_implementation="static")


class Stamps(StoppingCriteria):
    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generate(**extra):
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, **{**options, **extra})


with torch.no_grad():
    started = time.perf_counter()
    generate()
    torch.cuda.synchronize()
    say(f"warm-up {time.perf_counter() - started:.1f} s")
    for _ in range(2):
        torch.cuda.synchronize()
        started = time.perf_counter()
        generate()
        torch.cuda.synchronize()
        say(f"generate batch 8: {time.perf_counter() - started:.3f} s")
    stamps = Stamps()
    torch.cuda.synchronize()
    started = time.perf_counter()
    generate(stopping_criteria=StoppingCriteriaList([stamps]))
    torch.cuda.synchronize()
    steps = [1000 * (b - a) for a, b in zip(stamps.times, stamps.times[1:])]
    say(f"with stamps: {time.perf_counter() - started:.3f} s; first stamp at {stamps.times[0] - started:.3f} s; "
        f"step ms median {sorted(steps)[len(steps) // 2]:.2f} min {min(steps):.2f} max {max(steps):.2f}")
    # the GPU time of one decoding step alone: replay the captured graphs only (no host work between)
    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    profiler.enable()
    generate()
    torch.cuda.synchronize()
    profiler.disable()
    for key in ("tottime", "cumulative"):
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats(key).print_stats(60)
        say(stream.getvalue())
say(G.profile_decoding(model, generate, "colt5-hf static, batch 8"))
