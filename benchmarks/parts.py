"""Candidate fast paths timed part by part, before any of them goes into the model: one GPU, bf16, batch 1, the
Large heavy shape at n = 16384 (1024 routed queries x 2048 routed keys x 12 heads x 64).

- a router's top-k selection: the stable sort (main's routers), topk (timing only: another tie rule), and the Triton kernel
  behind `routing.top_k_positions`; under CUDA graph replay (launches excluded) and eagerly;
- the heavy attention's relative-position bias with SDPA, compiled, forward and forward+backward:
    head          bucket arithmetic per (query, key) pair in int64, one-hot product for the gradient (the baseline)
    int32         the same arithmetic in int32
    offset-table  one bucket per offset (an int8 table of 2n - 1 entries) gathered per pair, one-hot gradient
    index-add     one bias row per offset gathered per pair; gradient by atomic adds into the offset table
    runs          offset-table forward; gradient by prefix sums over each query's keys: with the keys in increasing
                  position, each bucket is one run of keys, summed as a difference of two prefix sums
  and through flex attention instead of SDPA, no (b, h, m, m_kv) bias tensor at all:
    flex          the score modification adds a bias-per-offset table (h, 2n - 1) entry, -inf at invalid key slots
                  (a per-sample count, passed in); the table's gradient by flex attention's atomic adds
    flex-count    the same with the count computed inside the graph from a key mask (inductor in torch 2.11 could
                  not lower a score modification reading per-sample counts in no-grad graphs)
  and the model's path in training without dropout:
    kernel        SDPA with the bias detached (no (b, h, m, m_kv) bias gradient), the bias weights' gradient from
                  `heavy_bias_gradient_kernel.HeavyBiasGradient` (the probabilities recomputed tile by tile, summed per bucket)
    kernel cudnn, kernel efficient   the same with SDPA held to its cuDNN or its memory-efficient kernels
- the bias-gradient kernels alone (`heavy_bias_gradient_kernel.launch_heavy_bias_gradient`: the far sums with the row statistics, then the
  near pairs) in launch variants (query/key tiles, keys per split, warps, stages, register limit; the near sums' query
  tile and warps), beside SDPA's forward+backward with and without a bias gradient (the old path also sums that
  gradient per bucket, `bucket_sums`, not in this row).

- the light attention's band (4 heads x 64, radius 127) through flex attention, compiled, forward and
  forward+backward, to see what its score modification costs:
    model         flex_local_attention as the model calls it inside a compiled block (the block mask built in
                  the graph; per 16 queries a copy of the bias table, so that the backward's atomic adds collide only
                  within a group; the key mask read in the score modification; its forward tiles)
    model default the same with inductor's default tiles
    model bwd T   the model with other tiles of the backward kernels
    one-table     one copy of the bias table, the block mask built once outside, the model's tiles
    no-mask       one table and no key mask (every key real): what reading the mask costs
    no-bias       the band alone (-inf outside it): what the bias costs

`--check` compares every bias variant's output and gradients with `head` at a small size (runs on the CPU too), the
local variants with `model` (no-bias with a zero bias table), and the selection kernel with the sort-based reference.
`--only` picks sections. Prints tables; writes parts.json to $OUT (or benchmarks/out).

    python benchmarks/parts.py [--n 16384] [--check] [--only selection bias bias-kernel local]
"""

import argparse
import contextlib
import functools
import json

import torch
import torch.nn.functional as F

from common import environment, out_dir


NUM_BUCKETS, MAX_DISTANCE = 32, 128


def graph_ms(fn, iters=50):
    """Milliseconds per replay of `fn` captured in a CUDA graph (no launch cost)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return events_ms(graph.replay, iters)


def events_ms(fn, iters=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


class IndexAddLookup(torch.autograd.Function):
    """F.embedding whose gradient is index_add_ (atomic adds on CUDA)."""

    @staticmethod
    def forward(ctx, index, table):
        ctx.save_for_backward(index)
        ctx.rows = table.shape[0]
        return F.embedding(index, table)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        out = grad.new_zeros(ctx.rows, grad.shape[-1], dtype=torch.float32)
        return None, out.index_add_(0, index.reshape(-1), grad.reshape(-1, grad.shape[-1]).float())


class RunBias(torch.autograd.Function):
    """weight[bucket_table[kv - q + n - 1]] as (b, m, m_kv, h); the gradient of `weight` sums each query's run of keys
    per bucket as a difference of prefix sums. `kv_sorted`: the key positions, increasing along each row."""

    @staticmethod
    def forward(ctx, q_index, kv_index, kv_sorted, bucket_table, first, last, weight):
        n = (bucket_table.shape[0] + 1) // 2
        bucket = bucket_table[kv_index[:, None, :] - q_index[:, :, None] + (n - 1)].long()
        ctx.save_for_backward(q_index, kv_sorted, first, last)
        return F.embedding(bucket, weight)

    @staticmethod
    def backward(ctx, grad):
        q_index, kv_sorted, first, last = ctx.saved_tensors
        b, m = q_index.shape
        g = grad.permute(0, 3, 1, 2).float()  # (b, h, m, m_kv)
        prefix = F.pad(g.cumsum(-1), (1, 0))  # (b, h, m, m_kv + 1)
        start = torch.searchsorted(kv_sorted, (q_index[:, :, None] + first).reshape(b, -1)).view(b, m, -1)
        end = torch.searchsorted(kv_sorted, (q_index[:, :, None] + last).reshape(b, -1), right=True).view(b, m, -1)
        end = torch.maximum(end, start)  # unused buckets: empty runs
        h = g.shape[1]
        sums = prefix.gather(-1, end[:, None].expand(b, h, m, -1)) - prefix.gather(-1, start[:, None].expand(b, h, m, -1))
        return None, None, None, None, None, None, sums.sum((0, 2)).t()


def heavy_variants(n, q_index, kv_index):
    """name -> (prepare, attend): `prepare(weight)` builds the variant's tables from the (buckets, h) bias weights,
    eagerly, as the encoder would once per forward outside the compiled blocks (a table built inside the graph would be
    inlined into its consumer, recomputing the bucket arithmetic per pair); `attend(q, k, v, *tables)` is the part
    that gets compiled. Every variant computes softmax(q k^T + bias) v over the routed pairs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    from colt5_hf.heavy_bias_gradient_kernel import HeavyBiasGradient
    from colt5_hf.t5_attention import bucket_bias as heads_first_bias
    from colt5_hf.t5_attention import relative_position_bucket

    def bucket_bias(bucket, weight):  # (b, m, m_kv, h) like the other variants' lookups (the model gathers heads first)
        return heads_first_bias(bucket, weight).permute(1, 2, 3, 0)

    offset = kv_index[:, None, :] - q_index[:, :, None] + (n - 1)  # (b, m, m_kv) into tables over offsets
    kv_mask = torch.ones_like(kv_index, dtype=torch.bool)
    kv_count = kv_mask.sum(-1)

    def sdpa(q, k, v, bias):  # bias (b, m, m_kv, h)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.permute(0, 3, 1, 2).to(q.dtype), scale=1.0)

    def bucket(relative):  # in the input's integer dtype
        return relative_position_bucket(relative, True, NUM_BUCKETS, MAX_DISTANCE)

    def bucket_table(weight):  # (2n - 1,) int8: the bucket of each offset
        return bucket(torch.arange(1 - n, n, device=weight.device, dtype=torch.int32)).to(torch.int8)

    def head(q, k, v, weight):
        return sdpa(q, k, v, bucket_bias(bucket(kv_index[:, None, :] - q_index[:, :, None]), weight))  # int64

    def int32(q, k, v, weight):
        return sdpa(q, k, v, bucket_bias(bucket(kv_index.int()[:, None, :] - q_index.int()[:, :, None]), weight))

    def offset_table(q, k, v, table, weight):
        return sdpa(q, k, v, bucket_bias(table[offset].int(), weight))

    def index_add(q, k, v, rows):
        return sdpa(q, k, v, IndexAddLookup.apply(offset, rows))

    def run_tables(weight):
        table, offsets = bucket_table(weight), torch.arange(1 - n, n, device=weight.device)
        first = torch.full((NUM_BUCKETS,), n, device=weight.device).scatter_reduce(0, table.long(), offsets, "amin")
        last = torch.full((NUM_BUCKETS,), -n, device=weight.device).scatter_reduce(0, table.long(), offsets, "amax")
        return table, first, last, weight

    def runs(q, k, v, table, first, last, weight):
        return sdpa(q, k, v, RunBias.apply(q_index, kv_index, kv_index.contiguous(), table, first, last, weight))

    def flex(q, k, v, table, count=None):  # table (h, 2n - 1)
        count = kv_count if count is None else count

        def relative_bias(score, batch, head, query, key):
            bias = table[head, kv_index[batch, key] - q_index[batch, query] + (n - 1)]
            return torch.where(key < count[batch], score + bias, float("-inf"))

        return flex_attention(q, k, v, score_mod=relative_bias, scale=1.0)

    def flex_count(q, k, v, table):
        return flex(q, k, v, table, count=kv_mask.sum(-1))

    def bias_by_head(weight):
        return (F.embedding(bucket_table(weight).long(), weight).t(),)

    def kernel(q, k, v, offset_bucket, weight, backends=None):  # the model in training without dropout
        relative = kv_index.int()[:, None, :] - q_index.int()[:, :, None]
        bias = bucket_bias(bucket(relative), weight.detach())
        with contextlib.nullcontext() if backends is None else sdpa_kernel(backends):
            out = sdpa(q, k, v, bias)
        return HeavyBiasGradient.apply(out, q, k, v, q_index, kv_index, kv_mask, weight.to(q.dtype), offset_bucket)

    same = lambda weight: (weight,)  # noqa: E731
    variants = {
        "head": (same, head),
        "int32": (same, int32),
        "offset-table": (lambda weight: (bucket_table(weight), weight), offset_table),
        "index-add": (lambda weight: (F.embedding(bucket_table(weight).long(), weight),), index_add),
        "runs": (run_tables, runs),
        "flex": (bias_by_head, flex),
        "flex-count": (bias_by_head, flex_count),
    }
    if q_index.is_cuda:  # a CUDA custom op
        reach = torch.arange(-MAX_DISTANCE, MAX_DISTANCE + 1, device=q_index.device, dtype=torch.int32)
        offset_bucket = lambda weight: (bucket(reach), weight)  # noqa: E731 - offsets beyond share the end buckets
        variants["kernel"] = (offset_bucket, kernel)
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            variants[f"kernel {backend.name.split('_')[0].lower()}"] = (
                offset_bucket, functools.partial(kernel, backends=[backend]))
    return variants


LOCAL_RADIUS, LOCAL_BLOCK = 127, 128


def local_variants(n, device):
    """name -> attend(q, k, v, key_mask, bias_table): softmax(q k^T + bias) v over the band |i - j| <= LOCAL_RADIUS,
    unscaled, q, k, v (1, h, n, d) with n a multiple of LOCAL_BLOCK, key_mask (1, n), bias_table (h, 2 radius + 1)."""
    from torch.nn.attention.flex_attention import flex_attention

    from colt5_hf.flex_local_attention import LOCAL_KERNEL_OPTIONS, band_block_mask, flex_local_attention

    radius, reach = LOCAL_RADIUS, -(-LOCAL_RADIUS // LOCAL_BLOCK)
    half = (reach + 1) * LOCAL_BLOCK - 1
    block_mask = band_block_mask(n, reach, torch.device(device), LOCAL_BLOCK)
    offsets = torch.arange(-half, half + 1, device=device)
    inside_band = offsets.abs() <= radius

    def one_table(q, k, v, key_mask, bias_table, masked=True):
        table = torch.where(inside_band, bias_table[:, (offsets + radius).clamp(0, 2 * radius)].float(), float("-inf"))

        def relative_bias(score, batch, head, query, key):
            score = score + table[head, (key - query).clamp(-half, half) + half]
            return torch.where(key_mask[batch, key], score, float("-inf")) if masked else score

        return flex_attention(q, k, v, score_mod=relative_bias, block_mask=block_mask, scale=1.0,
                              kernel_options=LOCAL_KERNEL_OPTIONS)

    def no_bias(q, k, v, key_mask, bias_table):
        def band(score, batch, head, query, key):
            return torch.where((key - query).abs() <= radius, score, float("-inf"))

        return flex_attention(q, k, v, score_mod=band, block_mask=block_mask, scale=1.0)

    def model(q, k, v, key_mask, bias_table, **options):
        return flex_local_attention(q, k, v, key_mask, bias_table, radius, kernel_options=options)

    return {
        "model": lambda q, k, v, key_mask, bias_table: flex_local_attention(q, k, v, key_mask, bias_table, radius),
        "model default": model,  # inductor's tiles
        # the backward kernels' tiles (BLOCK_M1 x BLOCK_N1, BLOCK_M2 x BLOCK_N2, warps, stages; inductor's default for
        # head dim 64 on sm90: 64 x 128, 128 x 64, 8 warps, 3 stages)
        **{
            f"model bwd {name}": functools.partial(model, **{**LOCAL_KERNEL_OPTIONS, **{
                f"bwd_{key}": value for key, value in zip(("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2", "num_warps",
                                                           "num_stages"), tiles)}})
            for name, tiles in {
                "64/128w8": (64, 128, 128, 64, 8, 3),
                "32/128w4": (32, 128, 128, 32, 4, 3),
                "64/128w4": (64, 128, 128, 64, 4, 3),
                "64/128w8s2": (64, 128, 128, 64, 8, 2),
                "128/128w8": (128, 128, 128, 128, 8, 2),
            }.items()
        },
        "one-table": one_table,
        "no-mask": lambda q, k, v, key_mask, bias_table: one_table(q, k, v, key_mask, bias_table, masked=False),
        "no-bias": no_bias,
    }


def local_inputs(n, device, dtype, heads=4, d=64, seed=0):
    generator = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(1, heads, n, d, device=device, generator=generator).to(dtype) for _ in range(3))
    bias_table = torch.randn(heads, 2 * LOCAL_RADIUS + 1, device=device, generator=generator)
    upstream = torch.randn(1, heads, n, d, device=device, generator=generator).to(dtype)
    return (q, k, v, torch.ones(1, n, dtype=torch.bool, device=device), bias_table), upstream


def relative_difference(a, b):
    return ((a - b).norm() / b.norm()).item()


def heavy_inputs(n, m, m_kv, heads, d, device, dtype, seed=0):
    generator = torch.Generator(device=device).manual_seed(seed)
    q_index = torch.randperm(n, device=device, generator=generator)[:m].sort().values[None]
    kv_index = torch.randperm(n, device=device, generator=generator)[:m_kv].sort().values[None]
    q, k, v = (torch.randn(1, heads, length, d, device=device, generator=generator).to(dtype)
               for length in (m, m_kv, m_kv))
    weight = torch.randn(NUM_BUCKETS, heads, device=device, generator=generator)
    upstream = torch.randn(1, heads, m, d, device=device, generator=generator).to(dtype)
    return q_index, kv_index, (q, k, v, weight), upstream


def check(device):
    from colt5_hf import routing

    n, m, m_kv, heads = 300, 40, 70, 3
    # head dim 16: the smallest the bias gradient kernel takes (tl.dot)
    q_index, kv_index, tensors, upstream = heavy_inputs(n, m, m_kv, heads, 16, device, torch.float32)
    results = {}
    for name, (prepare, attend) in heavy_variants(n, q_index, kv_index).items():
        if name.startswith("kernel "):  # one SDPA backend held: cuDNN takes no float32 (timed in bf16 only)
            continue
        # flex attention has no backward on the CPU for q, k, v: there only the bias weights' gradient is compared
        q_grad = device != "cpu" or not name.startswith("flex")
        leaves = [t.clone().requires_grad_(q_grad) for t in tensors[:3]] + [tensors[3].clone().requires_grad_()]
        out = attend(*leaves[:3], *prepare(leaves[3]))
        out.backward(upstream)
        results[name] = [out.detach()] + [t.grad for t in leaves]
    for name, values in results.items():
        pairs = [(a, b) for a, b in zip(values, results["head"]) if a is not None]
        error = max(relative_difference(a, b) for a, b in pairs)
        print(f"bias variant {name:13s} max relative difference from head {error:.1e}")
        assert error < 1e-5, name
    n = 4 * LOCAL_BLOCK
    (q, k, v, key_mask, bias_table), _ = local_inputs(n, device, torch.float32)
    variants = local_variants(n, device)
    with torch.no_grad():
        expected = variants["model"](q, k, v, key_mask, bias_table)
        for name in (name for name in variants if name.startswith(("model ", "one-table", "no-mask"))):
            error = relative_difference(variants[name](q, k, v, key_mask, bias_table), expected)
            print(f"local variant {name:18s} max relative difference from model {error:.1e}")
            assert error < 1e-5, name
        zero = torch.zeros_like(bias_table)
        expected = variants["model"](q, k, v, key_mask, zero)
        error = relative_difference(variants["no-bias"](q, k, v, key_mask, zero), expected)
        print(f"local variant no-bias   max relative difference from model (zero bias) {error:.1e}")
        assert error < 1e-5, "no-bias"
    if device == "cuda":
        from colt5_hf.top_k_kernel import fused_top_k_positions

        scores = (torch.randn(4, 16000, device=device) * 2).round() / 2
        mask, k = torch.rand(4, 16000, device=device) < 0.8, torch.tensor([1000, 2000, 0, 17], device=device)
        expected = routing.top_k_positions(scores.cpu(), mask.cpu(), k.cpu(), 2500)
        assert torch.equal(fused_top_k_positions(scores, mask, k, 2500).cpu(), expected)
        print("selection kernel equals the sort-based reference")


def time_selection(base, record):
    """The routers' top-k selection: sort, topk, the Triton kernel, rows of base, 2 base and 4 base tokens."""
    from colt5_hf.top_k_kernel import RESIDENT_ROW, fused_top_k_positions

    print(f"{'selection':16} {'n':>6} {'rows':>4} {'graph ms':>9} {'eager ms':>9}")
    for n in (base, 2 * base, 4 * base):
        for rows in (1, 3):
            k_max = n // 8
            scores = torch.randn(rows, n, device="cuda")
            mask = torch.ones(rows, n, dtype=torch.bool, device="cuda")
            k = torch.full((rows,), k_max, device="cuda")
            variants = {
                "stable sort": lambda: scores.masked_fill(~mask, float("-inf")).sort(
                    dim=-1, descending=True, stable=True).indices[..., :k_max],
                "topk": lambda: scores.masked_fill(~mask, float("-inf")).topk(k_max, sorted=False).indices,
            }
            if n <= RESIDENT_ROW:  # longer rows take the sort (a kernel streaming them through L2 lost to it)
                variants["triton select"] = lambda: fused_top_k_positions(scores, mask, k, k_max)
            for name, fn in variants.items():
                line = {"variant": name, "n": n, "rows": rows, "graph_ms": graph_ms(fn), "eager_ms": events_ms(fn)}
                record["selection"].append(line)
                print(f"{name:16} {n:>6} {rows:>4} {line['graph_ms']:>9.4f} {line['eager_ms']:>9.4f}")


def time_bias(n, record):
    """The heavy attention's bias variants."""
    q_index, kv_index, tensors, upstream = heavy_inputs(n, n // 16, n // 8, 12, 64, "cuda", torch.bfloat16)
    print(f"\n{'heavy attention':16} {'tables ms':>9} {'fwd ms':>8} {'graph':>8} {'fwd+bwd ms':>10} {'graph':>10} "
          f"{'grad diff':>9}  (compiled, n={n}; graph: CUDA-graph replay, no host time; tables: built once per forward "
          "for every layer, not in the other columns)")
    reference = None
    for name, (prepare, attend) in heavy_variants(n, q_index, kv_index).items():
        torch._dynamo.reset()
        compiled = torch.compile(attend, fullgraph=True)
        line = {"variant": name}
        try:
            # correctness at full size: the gradients of q, k, v and of the bias weights through the tables
            leaves = [t.clone().requires_grad_() for t in tensors]
            compiled(*leaves[:3], *prepare(leaves[3])).backward(upstream)
            grads = [leaf.grad.float() for leaf in leaves]
            reference = reference or grads
            line["grad_diff"] = max(relative_difference(a, b) for a, b in zip(grads, reference))
            # timing: the tables as ready inputs, the backward stopping at them
            q, k, v, weight = (t.clone().requires_grad_() for t in tensors)
            with torch.no_grad():
                line["tables_ms"] = events_ms(lambda: prepare(weight))
                tables = [t.requires_grad_(t.is_floating_point()) for t in prepare(weight)]
                line["fwd_ms"] = events_ms(lambda: compiled(q, k, v, *tables))
                line["fwd_graph_ms"] = graph_ms(lambda: compiled(q, k, v, *tables))
            targets = [q, k, v] + [t for t in tables if t.requires_grad]

            def step():
                for target in targets:
                    target.grad = None
                torch.autograd.backward(compiled(q, k, v, *tables), upstream, inputs=targets)

            line["fwdbwd_ms"] = events_ms(step)
            line["fwdbwd_graph_ms"] = graph_ms(step)
            print(f"{name:16} {line['tables_ms']:>9.4f} {line['fwd_ms']:>8.4f} {line['fwd_graph_ms']:>8.4f} "
                  f"{line['fwdbwd_ms']:>10.4f} {line['fwdbwd_graph_ms']:>10.4f} {line['grad_diff']:>9.1e}")
        except Exception as error:  # noqa: BLE001 - recorded, the others go on
            line["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            print(f"{name:16} failed: {line['error']}")
        record["bias"].append(line)


def time_bias_kernel(n, record):
    """The bias-gradient kernels alone (far sums with the row statistics, then the near pairs), launch variants under
    CUDA-graph replay, against what SDPA's forward+backward costs with and without a bias gradient."""
    from colt5_hf.heavy_bias_gradient_kernel import launch_heavy_bias_gradient
    from colt5_hf.t5_attention import relative_position_bucket

    q_index, kv_index, (q, k, v, weight), upstream = heavy_inputs(n, n // 16, n // 8, 12, 64, "cuda", torch.bfloat16)
    kv_valid = torch.ones_like(kv_index, dtype=torch.bool)
    reach = torch.arange(-MAX_DISTANCE, MAX_DISTANCE + 1, device="cuda", dtype=torch.int32)
    offset_bucket = relative_position_bucket(reach, True, NUM_BUCKETS, MAX_DISTANCE)
    table, out = weight.to(q.dtype), torch.randn_like(q)
    print(f"\n{'bias gradient kernels':42} {'graph ms':>9}  (n={n}, 1024 x 2048 x 12 heads x 64, bf16)")
    # (query tile, key tile, key tiles per split, warps, stages, maxnreg) of the far sums, (query tile, warps) of the
    # near sums; the model's is the third
    variants = [(64, 32, 8, 4, 1, 128, 64, 4), (64, 32, 8, 4, 1, 128, 32, 4), (64, 32, 8, 4, 1, 128, 32, 2),
                (64, 32, 8, 4, 1, 128, 16, 4), (64, 32, 8, 4, 1, 128, 16, 2), (64, 64, 4, 4, 1, 128, 16, 4),
                (64, 32, 8, 4, 2, 128, 16, 4), (64, 32, 4, 4, 1, 128, 16, 4)]
    for query_tile, key_tile, key_tiles, warps, stages, maxnreg, near_tile, near_warps in variants:
        name = (f"{query_tile}x{key_tile} keys {key_tile * key_tiles} w{warps} s{stages} r{maxnreg}, "
                f"near {near_tile} w{near_warps}")
        line = {"variant": name}
        try:
            line["graph_ms"] = graph_ms(lambda: launch_heavy_bias_gradient(
                q, k, v, out, upstream, q_index, kv_index, kv_valid, offset_bucket, table, query_tile, key_tile,
                key_tiles, near_tile, near_warps, num_warps=warps, num_stages=stages, maxnreg=maxnreg))
            print(f"{name:42} {line['graph_ms']:>9.4f}")
        except Exception as error:  # noqa: BLE001 - recorded (tiles that do not fit), the others go on
            line["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            print(f"{name:42} failed: {line['error']}")
        record["bias_kernel"].append(line)
    bias = torch.randn(1, 12, n // 16, n // 8, device="cuda", dtype=q.dtype)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    for name, bias_grad in (("sdpa, bias gradient", True), ("sdpa, bias detached", False)):
        leaves = [q, k, v] + ([bias.requires_grad_()] if bias_grad else [])

        def step():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias if bias_grad else bias.detach(), scale=1.0)
            torch.autograd.backward(out, upstream, inputs=leaves)

        line = {"variant": name, "graph_ms": graph_ms(step)}
        print(f"{name:42} {line['graph_ms']:>9.4f}")
        record["bias_kernel"].append(line)


def time_local(n, record):
    """The light attention's band through flex attention: what its score modification costs."""
    tensors, upstream = local_inputs(n, "cuda", torch.bfloat16)
    print(f"\n{'local attention':18} {'fwd ms':>8} {'graph':>8} {'fwd+bwd ms':>10} {'graph':>10}  (compiled, n={n}, "
          "4 heads x 64, radius 127; graph: CUDA-graph replay)")
    for name, attend in local_variants(n, "cuda").items():
        torch._dynamo.reset()
        compiled = torch.compile(attend, fullgraph=True)
        q, k, v, key_mask, bias_table = (t.clone().requires_grad_(t.is_floating_point()) for t in tensors)
        line = {"variant": name}
        targets = [q, k, v] + ([bias_table] if name != "no-bias" else [])

        def step():
            for target in targets:
                target.grad = None
            torch.autograd.backward(compiled(q, k, v, key_mask, bias_table), upstream, inputs=targets)

        try:
            with torch.no_grad():
                line["fwd_ms"] = events_ms(lambda: compiled(q, k, v, key_mask, bias_table))
                line["fwd_graph_ms"] = graph_ms(lambda: compiled(q, k, v, key_mask, bias_table))
            line["fwdbwd_ms"] = events_ms(step)
            line["fwdbwd_graph_ms"] = graph_ms(step)
            print(f"{name:18} {line['fwd_ms']:>8.4f} {line['fwd_graph_ms']:>8.4f} {line['fwdbwd_ms']:>10.4f} "
                  f"{line['fwdbwd_graph_ms']:>10.4f}")
        except Exception as error:  # noqa: BLE001 - recorded (tiles that do not fit), the others go on
            line["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            print(f"{name:18} failed: {line['error']}")
        record["local"].append(line)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--check", action="store_true", help="compare the variants at a small size, no timing")
    parser.add_argument("--only", nargs="+", choices=["selection", "bias", "bias-kernel", "local"],
                        default=["selection", "bias", "bias-kernel", "local"])
    args = parser.parse_args()
    if args.check:
        return check("cuda" if torch.cuda.is_available() else "cpu")
    record = {"environment": environment(), "selection": [], "bias": [], "bias_kernel": [], "local": []}
    print(record["environment"])
    sections = {"selection": time_selection, "bias": time_bias, "bias-kernel": time_bias_kernel, "local": time_local}
    for section in args.only:
        sections[section](args.n, record)
    (out_dir() / "parts.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
