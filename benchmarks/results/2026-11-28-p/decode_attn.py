"""A decoding step's cross-attention alone (16 query heads sharing one key/value head, 16384 keys, bf16): GPU time per
call from a CUDA graph of 20 calls of the compiled function, the eager path's two matmuls against chunked_attention
with several chunk lengths. Runs on call 3's tree only: it sets modeling_colt5.KEY_CHUNK, the first version's chunk
length, which the merged version (a298c4a) replaced by key_chunks."""
import os

import torch

from colt5_hf import modeling_colt5 as m

out = open(os.path.join(os.environ.get("OUT", "/tmp"), "decode_attn.txt"), "w")


def say(text):
    print(text, flush=True)
    out.write(text + "\n")
    out.flush()


def gpu_us(fn, calls=20, reps=10):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(1000 * start.elapsed_time(end) / calls)
    return sorted(times)[reps // 2]


for b, keys in ((8, 16384), (1, 16384), (8, 16000), (8, 65536)):
    q = torch.randn(b, 1, 16, 64, device="cuda", dtype=torch.bfloat16)
    key = torch.randn(b, 1, keys, 64, device="cuda", dtype=torch.bfloat16)
    value = torch.randn(b, 1, keys, 64, device="cuda", dtype=torch.bfloat16)
    bias = torch.zeros(b, 1, 1, keys, device="cuda", dtype=torch.bfloat16)
    exact = torch.softmax(q.double() @ key.double().transpose(-1, -2), -1) @ value.double()
    row = []
    for name, chunk in (("two matmuls", None), ("chunk 256", 256), ("chunk 512", 512), ("chunk 1024", 1024),
                        ("chunk 2048", 2048)):
        torch._dynamo.reset()
        if chunk:
            m.KEY_CHUNK = chunk
        implementation = "eager" if chunk is None else "sdpa"
        compiled = torch.compile(lambda: m.attend(q, key, value, bias, 0.0, implementation)[0], fullgraph=True)
        with torch.no_grad():
            us = gpu_us(compiled)
            error = (compiled().double() - exact).abs().max().item()
        row.append(f"{name} {us:.1f} us (err {error:.1e})")
    say(f"b {b}, keys {keys}: " + "; ".join(row))
