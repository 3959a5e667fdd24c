"""The heavy attention's bias table gradient without a (b, h, m, m_kv) gradient (HeavyBiasGradient,
`heavy_bias_gradient_table`): the attention runs with its bias detached, and the probabilities are recomputed tile by
tile as the flash-attention backward does. Buckets come from a table over offsets -reach..reach (T5: reach =
max_distance), every offset beyond sharing the bucket at its end, so most key tiles (at 16k tokens about 90%) lie
wholly in one far bucket. With dS = P (dP - rowsum(dO O)), dP = dO v^T, a row's sum of dS over such pairs needs no
normalised P: one launch over a grid of (sample * head, 64 queries, a split of 256 keys) keeps each row's running max
m and sum of exp(s - m) over its split (online softmax) and the far buckets' running sums of exp(s - m) (dP -
rowsum(dO O)) over the pairs at or beyond +-reach (whole tiles where the tile has one bucket, pair by pair in the few
others). A second launch, one program per query tile, combines the splits into the rows' log-sum-exp and far sums and
recomputes P and dS for the pairs nearer than reach (in the few key tiles that hold such pairs), summing them per row
and bucket in registers; each program adds its per-bucket sums once, atomically.
"""

import torch

from .kernel_layout import OP_NAMESPACE, tl, triton


@triton.jit
def _heavy_key_tile(kv_position_ptr, kv_valid_ptr, columns, m_kv, q_first, q_last, reach, far_low, far_high):
    # one tile of keys: their positions, which are valid, the tile's first and last position and its `side`: the
    # tile's one bucket where every offset from the rows' positions (q_first..q_last) lies at or beyond +-reach
    # (a far bucket), else -1
    inside = columns < m_kv
    kv_position = tl.load(kv_position_ptr + columns, mask=inside, other=0)
    valid = (tl.load(kv_valid_ptr + columns, mask=inside, other=0) != 0) & inside
    kv_first = tl.min(tl.where(inside, kv_position, 2147483647))
    kv_last = tl.max(tl.where(inside, kv_position, -2147483647))
    side = tl.where(kv_first - q_last >= reach, far_high, tl.where(kv_last - q_first <= -reach, far_low, -1))
    return kv_position, valid, kv_first, kv_last, side


@triton.jit
def _heavy_tile_scores(query, key_ptr, key_stride, columns, m_kv, kv_position, valid, side, q_position, reach,
                       far_low, far_high, head, heads, offset_bucket_ptr, table_ptr, mask_value, D: tl.constexpr,
                       PRECISION: tl.constexpr):
    # one tile of keys: scores q k^T + bias (BM, BN) float32 as the attention computed them (mask_value added at
    # invalid keys, -inf past the last key) and each pair's bucket: a one-bucket tile (side >= 0) adds one scalar
    # bias (`bucket` is then 0 throughout); the others read each pair's bucket from the table for pairs nearer
    # than `reach` (gathers)
    inside = columns < m_kv
    key = tl.load(key_ptr + columns[:, None] * key_stride + tl.arange(0, D)[None, :], mask=inside[:, None],
                  other=0.0)
    scores = tl.dot(query, tl.trans(key), input_precision=PRECISION)  # (BM, BN) float32
    if side >= 0:
        bucket = tl.zeros_like(scores).to(tl.int32)
        bias = tl.zeros_like(scores) + tl.load(table_ptr + side * heads + head).to(tl.float32)
    else:
        offset = kv_position[None, :] - q_position[:, None]  # (BM, BN) int32
        near = (offset > -reach) & (offset < reach)
        bucket = tl.load(offset_bucket_ptr + offset + reach, mask=near, other=0)
        bucket = tl.where(near, bucket, tl.where(offset > 0, far_high, far_low))
        bias = tl.load(table_ptr + bucket * heads + head).to(tl.float32)
    scores += tl.where(valid[None, :], bias, mask_value)
    return tl.where(inside[None, :], scores, float("-inf")), bucket


@triton.jit
def _heavy_grad_probs(grad, value_ptr, value_stride, columns, m_kv, D: tl.constexpr, PRECISION: tl.constexpr):
    # dP = dO v^T (BM, BN) float32 for one tile of keys
    value = tl.load(value_ptr + columns[:, None] * value_stride + tl.arange(0, D)[None, :],
                    mask=(columns < m_kv)[:, None], other=0.0)
    return tl.dot(grad, tl.trans(value), input_precision=PRECISION)


@triton.jit
def _heavy_rows(ptr, strides, batch, head, rows, row_inside, D: tl.constexpr):
    # rows (BM,) of one (sample, head) of a (b, h, rows, D) tensor with strides (batch, head, row) and a dense D
    offsets = batch.to(tl.int64) * strides[0] + head * strides[1] + rows[:, None] * strides[2]
    return tl.load(ptr + offsets + tl.arange(0, D)[None, :], mask=row_inside[:, None], other=0.0)


@triton.jit
def _heavy_query_block(q_ptr, out_ptr, grad_ptr, q_position_ptr, q_strides, out_strides, grad_strides, m, heads,
                       D: tl.constexpr, BM: tl.constexpr):
    # the program's rows: queries, output gradients, rowsum(dO O), positions and their first and last
    batch_head = tl.program_id(0)
    batch, head = batch_head // heads, batch_head % heads
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    row_inside = rows < m
    query = _heavy_rows(q_ptr, q_strides, batch, head, rows, row_inside, D)
    grad = _heavy_rows(grad_ptr, grad_strides, batch, head, rows, row_inside, D)
    out = _heavy_rows(out_ptr, out_strides, batch, head, rows, row_inside, D)
    delta = tl.sum(grad.to(tl.float32) * out.to(tl.float32), axis=1)  # (BM,)
    q_position = tl.load(q_position_ptr + batch * m + rows, mask=row_inside, other=0)
    q_first = tl.min(tl.where(row_inside, q_position, 2147483647))
    q_last = tl.max(tl.where(row_inside, q_position, -2147483647))
    return batch, head, rows, row_inside, query, grad, delta, q_position, q_first, q_last


@triton.jit
def _heavy_far_sums(
    q_ptr, k_ptr, v_ptr, out_ptr, grad_ptr, q_position_ptr, kv_position_ptr, kv_valid_ptr, offset_bucket_ptr,
    table_ptr, stats_ptr, tile_bounds_ptr,
    q_strides, k_strides, v_strides, out_strides, grad_strides,  # each (batch, head, row); the last dim is dense
    m, m_kv, reach, heads, mask_value,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, TILES: tl.constexpr, PRECISION: tl.constexpr,
):
    # program (sample * head, BM queries, key split of TILES tiles of BN keys), one pass over the split's keys:
    # each row's running max of the scores, the sum of exp(scores - max) and, over the far pairs (offsets at or
    # beyond +-reach: whole one-bucket tiles, pair by pair elsewhere), the sums of exp(scores - max) (dP -
    # rowsum(dO O)) with dP = dO v^T per far bucket, unnormalised dS, stored to stats (b * h, splits, 4, m). The
    # first query block of each sample's first head records every key tile's first and last position to
    # tile_bounds (b, key tiles, 2) for _heavy_near_sums.
    batch, head, rows, row_inside, query, grad, delta, q_position, q_first, q_last = _heavy_query_block(
        q_ptr, out_ptr, grad_ptr, q_position_ptr, q_strides, out_strides, grad_strides, m, heads, D, BM)
    split = tl.program_id(2)
    key_ptr = k_ptr + batch.to(tl.int64) * k_strides[0] + head * k_strides[1]
    value_ptr = v_ptr + batch.to(tl.int64) * v_strides[0] + head * v_strides[1]
    far_low, far_high = tl.load(offset_bucket_ptr), tl.load(offset_bucket_ptr + 2 * reach)
    row_max = tl.full((BM,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BM,), tl.float32)
    low_sum = tl.zeros((BM,), tl.float32)
    high_sum = tl.zeros((BM,), tl.float32)
    for tile in range(TILES):  # a split's first tile holds a key, so row_max is finite after it
        key_tile = split * TILES + tile
        columns = key_tile * BN + tl.arange(0, BN)
        kv_position, valid, kv_first, kv_last, side = _heavy_key_tile(
            kv_position_ptr + batch * m_kv, kv_valid_ptr + batch * m_kv, columns, m_kv, q_first, q_last, reach,
            far_low, far_high)
        if (tl.program_id(1) == 0) & (head == 0) & (key_tile * BN < m_kv):
            tl.store(tile_bounds_ptr + (batch * tl.cdiv(m_kv, BN) + key_tile) * 2, kv_first)
            tl.store(tile_bounds_ptr + (batch * tl.cdiv(m_kv, BN) + key_tile) * 2 + 1, kv_last)
        scores, _ = _heavy_tile_scores(
            query, key_ptr, k_strides[2], columns, m_kv, kv_position, valid, side, q_position, reach, far_low,
            far_high, head, heads, offset_bucket_ptr, table_ptr, mask_value, D, PRECISION,
        )
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        rescale = tl.exp(row_max - new_max)
        probs = tl.exp(scores - new_max[:, None])  # unnormalised
        row_sum = row_sum * rescale + tl.sum(probs, axis=1)
        low_sum *= rescale
        high_sum *= rescale
        row_max = new_max
        grad_probs = _heavy_grad_probs(grad, value_ptr, v_strides[2], columns, m_kv, D, PRECISION)
        grad_scores = tl.where(valid[None, :], probs * (grad_probs - delta[:, None]), 0.0)  # unnormalised dS
        if side >= 0:  # one bucket, a far one
            row_total = tl.sum(grad_scores, axis=1)
            low_sum += tl.where(side == far_low, row_total, 0.0)
            high_sum += tl.where(side == far_low, 0.0, row_total)
        else:  # its far pairs
            offset = kv_position[None, :] - q_position[:, None]
            low_sum += tl.sum(tl.where(offset <= -reach, grad_scores, 0.0), axis=1)
            high_sum += tl.sum(tl.where(offset >= reach, grad_scores, 0.0), axis=1)
    stats_ptr += (tl.program_id(0) * tl.num_programs(2) + split) * 4 * m + rows
    tl.store(stats_ptr, row_max, mask=row_inside)
    tl.store(stats_ptr + m, row_sum, mask=row_inside)
    tl.store(stats_ptr + 2 * m, low_sum, mask=row_inside)
    tl.store(stats_ptr + 3 * m, high_sum, mask=row_inside)


@triton.jit
def _heavy_near_sums(
    q_ptr, k_ptr, v_ptr, out_ptr, grad_ptr, q_position_ptr, kv_position_ptr, kv_valid_ptr, offset_bucket_ptr,
    table_ptr, stats_ptr, tile_bounds_ptr, grad_table_ptr,
    q_strides, k_strides, v_strides, out_strides, grad_strides, m, m_kv, reach, heads, splits, num_buckets,
    mask_value, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, KEY_TILES: tl.constexpr,
    BUCKETS: tl.constexpr, PRECISION: tl.constexpr,
):
    # program (sample * head, BM queries): the rows' log-sum-exp and far sums combined from every split's stats,
    # then, in the key tiles holding pairs nearer than reach (found from tile_bounds, visited from the first to
    # the last of them: a few when the positions are sorted), P, dP = dO v^T and dS = P (dP - rowsum(dO O)) of
    # those pairs summed per row and bucket in registers; the program adds its sums per bucket atomically at the
    # end (one add per pair took 136 us at 16k tokens on an H100: every program adds to the same few lines)
    batch, head, rows, row_inside, query, grad, delta, q_position, q_first, q_last = _heavy_query_block(
        q_ptr, out_ptr, grad_ptr, q_position_ptr, q_strides, out_strides, grad_strides, m, heads, D, BM)
    key_ptr = k_ptr + batch.to(tl.int64) * k_strides[0] + head * k_strides[1]
    value_ptr = v_ptr + batch.to(tl.int64) * v_strides[0] + head * v_strides[1]
    far_low, far_high = tl.load(offset_bucket_ptr), tl.load(offset_bucket_ptr + 2 * reach)

    stats_ptr += tl.program_id(0) * splits * 4 * m + rows
    row_max = tl.full((BM,), float("-inf"), tl.float32)
    for split in range(splits):
        row_max = tl.maximum(row_max, tl.load(stats_ptr + split * 4 * m, mask=row_inside, other=0.0))
    row_sum = tl.zeros((BM,), tl.float32)
    low_sum = tl.zeros((BM,), tl.float32)
    high_sum = tl.zeros((BM,), tl.float32)
    for split in range(splits):
        split_stats = stats_ptr + split * 4 * m
        rescale = tl.exp(tl.load(split_stats, mask=row_inside, other=0.0) - row_max)
        row_sum += tl.load(split_stats + m, mask=row_inside, other=1.0) * rescale
        low_sum += tl.load(split_stats + 2 * m, mask=row_inside, other=0.0) * rescale
        high_sum += tl.load(split_stats + 3 * m, mask=row_inside, other=0.0) * rescale
    low_sum /= row_sum
    high_sum /= row_sum
    log_sum = row_max + tl.log(row_sum)

    buckets = tl.arange(0, BUCKETS)  # num_buckets, padded to a power of 2
    bucket_sums = tl.zeros((BM, BUCKETS), tl.float32)
    key_tiles = tl.cdiv(m_kv, BN)
    tile = tl.arange(0, KEY_TILES)
    bounds_ptr = tile_bounds_ptr + (batch * key_tiles + tile) * 2
    kv_first = tl.load(bounds_ptr, mask=tile < key_tiles, other=2147483647)
    kv_last = tl.load(bounds_ptr + 1, mask=tile < key_tiles, other=-2147483647)
    near_tile = (kv_first - q_last < reach) & (kv_last - q_first > -reach) & (tile < key_tiles)
    first_near = tl.min(tl.where(near_tile, tile, KEY_TILES))
    last_near = tl.max(tl.where(near_tile, tile, -1))
    for key_tile in range(first_near, last_near + 1):
        columns = key_tile * BN + tl.arange(0, BN)
        kv_position, valid, _, _, side = _heavy_key_tile(
            kv_position_ptr + batch * m_kv, kv_valid_ptr + batch * m_kv, columns, m_kv, q_first, q_last, reach,
            far_low, far_high)
        if side < 0:
            scores, bucket = _heavy_tile_scores(
                query, key_ptr, k_strides[2], columns, m_kv, kv_position, valid, side, q_position, reach, far_low,
                far_high, head, heads, offset_bucket_ptr, table_ptr, mask_value, D, PRECISION,
            )
            grad_probs = _heavy_grad_probs(grad, value_ptr, v_strides[2], columns, m_kv, D, PRECISION)
            offset = kv_position[None, :] - q_position[:, None]
            near = row_inside[:, None] & valid[None, :] & (offset > -reach) & (offset < reach)
            grad_scores = tl.where(near, tl.exp(scores - log_sum[:, None]) * (grad_probs - delta[:, None]), 0.0)
            for index in tl.static_range(BUCKETS):  # each row's sum per bucket: no atomics per pair
                row_total = tl.sum(tl.where(bucket == index, grad_scores, 0.0), axis=1)
                bucket_sums = tl.where(buckets[None, :] == index, bucket_sums + row_total[:, None], bucket_sums)
    low_total, high_total = tl.sum(tl.where(row_inside, low_sum, 0.0)), tl.sum(tl.where(row_inside, high_sum, 0.0))
    totals = tl.sum(bucket_sums, axis=0) + tl.where(buckets == far_low, low_total, 0.0)
    totals += tl.where(buckets == far_high, high_total, 0.0)  # 0 if the same bucket
    tl.atomic_add(grad_table_ptr + buckets * heads + head, totals, mask=buckets < num_buckets)


# The launch's tiles, keyword arguments for benchmarks/parts.py: 64 queries x 32 keys, 8 key tiles per split of
# _heavy_far_sums (at 16k tokens the 2048 routed keys in 8 splits), 4 warps, 1 stage, at most 128 registers a thread
# (the fastest launch tried on an H100; offline sm_90a compiles: 111 registers, none spilled, 4 programs per SM; float32
# keeps its registers, 128 would spill 1.8 KB). _heavy_near_sums: 32 queries a program, 2 warps, its registers as they
# come (255, none spilled): 0.120 ms for both launches against 0.142 with 64 queries and 4 warps (on an H100); its
# query tile need not be the far sums'.
def launch_heavy_bias_gradient(query, key, value, out, grad_out, q_positions, kv_positions, kv_valid, offset_bucket,
                               table, query_tile=64, key_tile=32, key_tiles=8, near_query_tile=32, near_warps=2,
                               num_warps=4, num_stages=1, maxnreg=128):
    """heavy_bias_gradient_table's two launches, on any device Triton runs on (its interpreter included); the
    tiles, the far sums' launch options (num_warps, num_stages, maxnreg) and the near sums' query tile and warps are
    arguments for benchmarks/parts.py."""
    b, heads, m, d = query.shape
    m_kv, reach = key.shape[2], (offset_bucket.shape[0] - 1) // 2
    query, key, value, out, grad_out = (t if t.stride(-1) == 1 else t.contiguous()
                                        for t in (query, key, value, out, grad_out))
    q_positions, kv_positions, offset_bucket = (t.to(torch.int32).contiguous()  # int32 offsets in the kernels
                                                for t in (q_positions, kv_positions, offset_bucket))
    kv_valid, table = kv_valid.contiguous(), table.contiguous()
    grid = (b * heads, triton.cdiv(m, query_tile), triton.cdiv(m_kv, key_tile * key_tiles))
    stats = torch.empty(b * heads, grid[2], 4, m, dtype=torch.float32, device=query.device)
    tile_bounds = torch.empty(b, triton.cdiv(m_kv, key_tile), 2, dtype=torch.int32, device=query.device)
    grad_table = torch.zeros(table.shape, dtype=torch.float32, device=query.device)
    sizes = dict(D=d, BN=key_tile, PRECISION="ieee" if query.dtype == torch.float32 else "tf32")
    mask = torch.finfo(query.dtype).min / 2
    tensors = (query, key, value, out, grad_out, q_positions, kv_positions, kv_valid, offset_bucket, table, stats,
               tile_bounds)
    strides = [t.stride()[:3] for t in (query, key, value, out, grad_out)]
    far_options = dict(num_warps=num_warps, num_stages=num_stages)
    if query.element_size() <= 2:  # float32 keeps its registers
        far_options["maxnreg"] = maxnreg
    _heavy_far_sums[grid](*tensors, *strides, m, m_kv, reach, heads, mask, BM=query_tile, TILES=key_tiles, **sizes,
                          **far_options)
    _heavy_near_sums[(b * heads, triton.cdiv(m, near_query_tile))](
        *tensors, grad_table, *strides, m, m_kv, reach, heads, grid[2], table.shape[0], mask, BM=near_query_tile,
        KEY_TILES=triton.next_power_of_2(tile_bounds.shape[1]), BUCKETS=triton.next_power_of_2(table.shape[0]),
        **sizes, num_warps=near_warps, num_stages=1,
    )
    return grad_table


@torch.library.custom_op(f"{OP_NAMESPACE}::heavy_bias_gradient", mutates_args=(), device_types="cuda")
def heavy_bias_gradient_table(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor, grad_out: torch.Tensor,
    q_positions: torch.Tensor, kv_positions: torch.Tensor, kv_valid: torch.Tensor, offset_bucket: torch.Tensor,
    table: torch.Tensor,
) -> torch.Tensor:
    """The gradient (buckets, h) float32 of the bias table of softmax(q k^T + table[bucket(kv - q)]) v, mask_value
    at invalid keys, from the output's gradient. query, out, grad_out (b, h, m, d); key, value (b, h, m_kv, d);
    q_positions (b, m), kv_positions (b, m_kv) integer positions in [0, n); kv_valid (b, m_kv) bool;
    offset_bucket (2 reach + 1,) int32, the bucket of offset kv - q at kv - q + reach for offsets -reach..reach,
    every offset beyond taking the bucket at its end (T5 buckets with reach = max_distance); table (buckets, h),
    the bias values the attention added (in its dtype)."""
    with torch.cuda.device(query.device):
        return launch_heavy_bias_gradient(query, key, value, out, grad_out, q_positions, kv_positions, kv_valid,
                                          offset_bucket, table)


@heavy_bias_gradient_table.register_fake
def _(query, key, value, out, grad_out, q_positions, kv_positions, kv_valid, offset_bucket, table):
    return table.new_empty(table.shape, dtype=torch.float32)


class HeavyBiasGradient(torch.autograd.Function):
    """The identity on the heavy attention's output (b, h, m, d), whose backward also returns the gradient of the bias
    table `weight` (buckets, h) that the attention added (detached there): the attention itself then runs without a
    bias gradient (on CUDA, SDPA's cuDNN kernels for q, k and v), and `heavy_bias_gradient_table` recomputes the
    probabilities tile by tile for the table's gradient, never writing a (b, h, m, m_kv) gradient."""

    @staticmethod
    def supports(query, weight, dropout, fused_attention):
        """Whether the kernel gives the table's gradient here: query (b, h, m, d) on CUDA with a head dim it compiles
        for, a table that takes a gradient, no dropout (the kernel recomputes the probabilities without it), and an
        attention run by fused kernels (`fused_attention`; the eager path writes the probabilities anyway)."""
        return (query.is_cuda and query.shape[-1] in (16, 32, 64, 128) and dropout == 0.0 and weight.requires_grad
                and torch.is_grad_enabled() and fused_attention)

    @staticmethod
    def forward(ctx, out, query, key, value, q_positions, kv_positions, kv_valid, weight, offset_bucket):
        ctx.save_for_backward(out, query, key, value, q_positions, kv_positions, kv_valid, weight, offset_bucket)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        out, query, key, value, q_positions, kv_positions, kv_valid, weight, offset_bucket = ctx.saved_tensors
        grad_weight = heavy_bias_gradient_table(
            query, key, value, out, grad_out, q_positions, kv_positions, kv_valid, offset_bucket, weight
        )
        return grad_out, None, None, None, None, None, None, grad_weight.to(weight.dtype), None
