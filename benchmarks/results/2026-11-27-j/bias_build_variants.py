"""Scratch: the heavy attention's bias build (forward, no grad), variants timed compiled under CUDA-graph replay."""
import torch, torch.nn.functional as F
from colt5_hf.modeling_colt5 import relative_position_bucket, mask_value

torch.manual_seed(0)
dev, dt = "cuda", torch.bfloat16
n, m, mk, h, B = 16384, 1024, 2048, 12, 32
q_index = torch.randperm(n, device=dev)[:m].sort().values[None]
kv_index = torch.randperm(n, device=dev)[:mk].sort().values[None]
valid = (torch.arange(mk, device=dev) < mk - 5)[None]
W = torch.randn(B, h, device=dev)

def bucket_of(q, kv):
    return relative_position_bucket(kv.int()[:, None, :] - q.int()[:, :, None], True, B, 128)

def v0(q, kv, valid, W):  # the model's
    bias = F.embedding(bucket_of(q, kv), W).permute(0, 3, 1, 2).to(dt)
    return bias.masked_fill(~valid[:, None, None, :], mask_value(dt))

def v1(q, kv, valid, W):  # sentinel bucket for invalid keys, h-major gather
    bucket = bucket_of(q, kv).masked_fill(~valid[:, None, :], B)
    table = torch.cat([W.to(dt), W.new_full((1, h), mask_value(dt)).to(dt)]).t()  # (h, B + 1)
    return table[:, bucket].transpose(0, 1)

def v2(q, kv, valid, W):  # bias per offset, gathered
    offsets = torch.arange(-n + 1, n, device=dev)
    table = torch.cat([F.embedding(relative_position_bucket(offsets, True, B, 128), W).t().to(dt),
                       torch.full((h, 1), mask_value(dt), device=dev, dtype=dt)], 1)  # (h, 2n)
    offset = (kv[:, None, :] - q[:, :, None] + n - 1).masked_fill(~valid[:, None, :], 2 * n - 1)
    return table[:, offset].transpose(0, 1)

def v3(q, kv, valid, W):  # v0 with the mask as a sentinel bucket
    bucket = bucket_of(q, kv).masked_fill(~valid[:, None, :], B)
    table = torch.cat([W, W.new_full((1, h), mask_value(dt))])
    return F.embedding(bucket, table).permute(0, 3, 1, 2).to(dt)

def time_graph(fn):
    f = torch.compile(fn, fullgraph=True)
    out = f(q_index, kv_index, valid, W)
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): f(q_index, kv_index, valid, W)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(10): f(q_index, kv_index, valid, W)
    g.replay(); torch.cuda.synchronize()
    a, b = torch.cuda.Event(True), torch.cuda.Event(True)
    a.record()
    for _ in range(20): g.replay()
    b.record(); torch.cuda.synchronize()
    return out, a.elapsed_time(b) / 200

ref, _ = time_graph(v0)
print(torch.cuda.get_device_name(), "ms per call (CUDA-graph replay), max |diff| vs v0")
for name, fn in [("v0 model", v0), ("v1 sentinel h-major", v1), ("v2 offset table", v2), ("v3 sentinel", v3)]:
    out, ms = time_graph(fn)
    print(f"{name:22s} {ms:.4f}  {(out.float() - ref.float()).abs().max().item():.3g}  {tuple(out.shape)} {out.stride()}")
