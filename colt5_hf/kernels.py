"""Fast paths for CUDA GPUs: coordinate descent fused into Triton kernels, the routers' top-k selection in one Triton
launch (no sort), local attention through flex attention, and the heavy attention's bucketed bias gathered heads first
with its gradient summed per bucket in one Triton launch, or, in training without dropout, recomputed from the
attention's inputs.

routing.py and modeling_colt5.py import these names inside guarded blocks; where Triton or flex attention is missing the
name is None and the eager reference path runs. Everything here traces into one torch.compile graph: the Triton kernels
are custom ops (colt5::coordinate_descent and its backward, colt5::select_top_k, colt5::bucket_sums,
colt5::heavy_bias_gradient; see OP_NAMESPACE) with fake and autograd registrations, and inside a compiled region flex
attention and its block mask are traced in place.

Coordinate descent (routing.coordinate_descent) in log2 units: with x = s * log2(e) / epsilon and alpha = a * log2(e)
/ epsilon, one iteration is the scalar recurrence

    L_j = log2 sum_i exp2(min(x_i, -alpha_j)),   alpha_{j+1} = log2(k) - L_j,   alpha_0 = 0,

and the output is lambda_i = exp2(min(x_i + alpha_T, 0)). The forward kernel runs all T iterations in one launch, one
program per row (the row stays in registers up to 16k tokens, longer rows stream through L2), and records alpha_j,
L_j and q_j = d alpha_{j+1} / d alpha_j = sum over saturated tokens of exp2(-alpha_j - L_j). Once an iteration
returns alpha unchanged (an exact fixed point in float32) every later one would too, so the kernel stops there.
The backward pass is the exact gradient of the unrolled iterations: with adjoints w_j = dLoss/d alpha_{j+1},

    dLoss/dx_i = ln2 * g_i * lambda_i * [x_i + alpha_T <= 0] - sum_j w_j * exp2(x_i - L_j) * [x_i < -alpha_j],

where w_{T-1} = ln2 * sum_i g_i * lambda_i * [x_i + alpha_T <= 0] and w_{j-1} = w_j * q_j. One program per row
computes the w_j (a scalar recurrence), then one program per chunk of every row accumulates the sum.

Top-k selection (routing.top_k_positions), one program per row of at most 16k tokens, held in registers: the scores
become uint32 keys in the same order; a threshold with exactly k keys at or above it is found bit by bit from the top
(one count over the row per bit, stopping at the first candidate that counts exactly k; where more than k keys tie at
the k-th, all 32 bits give that key and its earliest ties are taken); the positions taken are written in increasing
position by a prefix sum, followed by the other positions. The row is held as lines of 16 tokens, so that the prefix
sum is a scan along each line plus a scan of the line sums.

Bias gradient (BucketBias backward, `bucket_sums`): the gradient of a (heads, positions) bias gathered from a
(buckets, heads) table is, per bucket, the sum over its positions; each program sums 4096 positions by one-hot
products built in registers on the tensor cores and adds its (heads, buckets) partial sums atomically.

The heavy attention's bias table gradient without a (b, h, m, m_kv) gradient (HeavyBiasGradient,
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

import functools
import re

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:
    flex_attention = None


# The custom ops' namespace. A Hub custom-code copy of this file is imported under another module name, possibly next to
# colt5_hf itself: it registers its ops under its own namespace rather than failing on names already taken.
OP_NAMESPACE = "colt5" if __name__ == "colt5_hf.kernels" else "colt5_" + re.sub(r"\W", "_", __name__)
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
RESIDENT_ROW = 16384  # longest row the forward kernel keeps in registers
GRAD_CHUNK = 1024  # tokens per program in the backward kernel


if triton is not None:
    _LN2 = tl.constexpr(LN2)

    @triton.jit
    def _scaled_scores(scores_ptr, mask_ptr, offsets, n, scale, also_masked):
        # x = s * scale at kept tokens, -inf elsewhere; `also_masked` keeps every token (rows with none kept)
        inside = offsets < n
        keep = (tl.load(mask_ptr + offsets, mask=inside, other=0) != 0) | also_masked
        s = tl.load(scores_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        return tl.where(keep & inside, s * scale, float("-inf"))

    @triton.jit
    def _coordinate_descent_forward(
        scores_ptr, mask_ptr, k_ptr, soft_ptr, alpha_ptr, lse_ptr, q_ptr, steps_ptr, final_alpha_ptr, row_scale_ptr,
        n, scale,
        ITERATIONS: tl.constexpr, EARLY_EXIT: tl.constexpr, BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        scores_ptr += row * n
        mask_ptr += row * n
        soft_ptr += row * n
        history = row * ITERATIONS
        offsets = tl.arange(0, BLOCK)

        # pass 1: how many tokens the row keeps, and the largest scaled score
        kept = 0
        kept_max = float("-inf")
        any_max = float("-inf")
        for c in range(NUM_CHUNKS):
            index = c * BLOCK + offsets
            inside = index < n
            keep = (tl.load(mask_ptr + index, mask=inside, other=0) != 0) & inside
            x = tl.load(scores_ptr + index, mask=inside, other=0.0).to(tl.float32) * scale
            kept += tl.sum(keep.to(tl.int32), axis=0)
            kept_max = tl.maximum(kept_max, tl.max(tl.where(keep, x, float("-inf")), axis=0))
            any_max = tl.maximum(any_max, tl.max(tl.where(inside, x, float("-inf")), axis=0))
        empty = kept == 0  # the reference computes such a row on all its tokens, then returns zeros
        row_max = tl.where(empty, any_max, kept_max)
        log2_k = tl.log2(tl.maximum(tl.load(k_ptr + row).to(tl.float32), 1.0))
        if NUM_CHUNKS == 1:
            x_row = _scaled_scores(scores_ptr, mask_ptr, offsets, n, scale, empty)

        alpha = log2_k * 0.0
        step = 0
        steps = ITERATIONS
        while step < ITERATIONS:
            threshold = -alpha
            top = tl.minimum(row_max, threshold)  # the largest min(x, threshold)
            if NUM_CHUNKS == 1:
                total = tl.sum(tl.exp2(tl.minimum(x_row, threshold) - top), axis=0)
                saturated = tl.sum((x_row >= threshold).to(tl.float32), axis=0)
            else:
                total = 0.0
                saturated = 0.0
                for c in range(NUM_CHUNKS):
                    x = _scaled_scores(scores_ptr, mask_ptr, c * BLOCK + offsets, n, scale, empty)
                    total += tl.sum(tl.exp2(tl.minimum(x, threshold) - top), axis=0)
                    saturated += tl.sum((x >= threshold).to(tl.float32), axis=0)
            lse = top + tl.log2(total)
            tl.store(alpha_ptr + history + step, alpha)
            tl.store(lse_ptr + history + step, lse)
            tl.store(q_ptr + history + step, saturated * tl.exp2(threshold - lse))
            new_alpha = log2_k - lse
            step += 1
            if EARLY_EXIT:
                if new_alpha == alpha:  # exact fixed point: every later iteration repeats this one
                    steps = step
                    step = ITERATIONS
            alpha = new_alpha
        tl.store(steps_ptr + row, steps)
        tl.store(final_alpha_ptr + row, alpha)
        tl.store(row_scale_ptr + row, tl.where(empty, 0.0, _LN2))

        for c in range(NUM_CHUNKS):
            index = c * BLOCK + offsets
            if NUM_CHUNKS == 1:
                x = x_row
            else:
                x = _scaled_scores(scores_ptr, mask_ptr, index, n, scale, empty)
            soft = tl.exp2(tl.minimum(x + alpha, 0.0))
            tl.store(soft_ptr + index, tl.where(empty, 0.0, soft), mask=index < n)

    @triton.jit
    def _coordinate_descent_adjoints(
        grad_ptr, soft_ptr, scores_ptr, mask_ptr, q_ptr, steps_ptr, final_alpha_ptr, row_scale_ptr, weight_ptr,
        n, scale,
        ITERATIONS: tl.constexpr, BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr,
    ):
        # one program per row: w_j = dLoss / d alpha_{j+1}; the repeats after an early exit add up in w_{steps - 1}
        row = tl.program_id(0).to(tl.int64)
        history = row * ITERATIONS
        offsets = tl.arange(0, BLOCK)
        alpha = tl.load(final_alpha_ptr + row)
        adjoint = 0.0
        for c in range(NUM_CHUNKS):
            index = c * BLOCK + offsets
            inside = index < n
            x = _scaled_scores(scores_ptr + row * n, mask_ptr + row * n, index, n, scale, False)
            g = tl.load(grad_ptr + row * n + index, mask=inside, other=0.0).to(tl.float32)
            soft = tl.load(soft_ptr + row * n + index, mask=inside, other=0.0)
            adjoint += tl.sum(tl.where(x + alpha <= 0.0, g * soft, 0.0), axis=0)
        adjoint *= tl.load(row_scale_ptr + row)
        steps = tl.load(steps_ptr + row)
        tail = 0.0
        for j in range(ITERATIONS - 1, -1, -1):
            tl.store(weight_ptr + history + j, adjoint, mask=j < steps - 1)
            tail += tl.where(j >= steps - 1, adjoint, 0.0)
            adjoint *= tl.load(q_ptr + history + tl.minimum(j, steps - 1))
        tl.store(weight_ptr + history + steps - 1, tail)

    @triton.jit
    def _coordinate_descent_backward(
        grad_ptr, soft_ptr, scores_ptr, mask_ptr, alpha_ptr, lse_ptr, weight_ptr, steps_ptr, final_alpha_ptr,
        row_scale_ptr, grad_scores_ptr,
        n, scale,
        ITERATIONS: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        index = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = index < n
        history = row * ITERATIONS
        x = _scaled_scores(scores_ptr + row * n, mask_ptr + row * n, index, n, scale, False)
        g = tl.load(grad_ptr + row * n + index, mask=inside, other=0.0).to(tl.float32)
        soft = tl.load(soft_ptr + row * n + index, mask=inside, other=0.0)
        alpha = tl.load(final_alpha_ptr + row)
        grad = tl.where(x + alpha <= 0.0, g * soft, 0.0) * tl.load(row_scale_ptr + row)
        steps = tl.load(steps_ptr + row)
        j = 0
        while j < steps:
            threshold = -tl.load(alpha_ptr + history + j)
            lse = tl.load(lse_ptr + history + j)
            weight = tl.load(weight_ptr + history + j)
            grad -= tl.where(x < threshold, weight * tl.exp2(x - lse), 0.0)
            j += 1
        tl.store(grad_scores_ptr + row * n + index, grad * scale, mask=inside)

    def _forward_layout(n):
        """(BLOCK, NUM_CHUNKS, num_warps) of the forward and adjoint kernels for rows of n tokens."""
        if n <= RESIDENT_ROW:
            block = max(triton.next_power_of_2(n), 128)
            return block, 1, min(16, max(4, block // 1024))
        return 4096, triton.cdiv(n, 4096), 16

    # The kernels as two custom ops (forward; backward), so that torch.compile keeps each one as a single opaque call
    # with no graph break and CUDA graphs can capture it: no host synchronisation, outputs allocated on the device.
    @torch.library.custom_op(f"{OP_NAMESPACE}::coordinate_descent", mutates_args=(), device_types="cuda")
    def coordinate_descent_rows(
        scores: torch.Tensor, mask: torch.Tensor, k: torch.Tensor, iterations: int, scale: float, early_exit: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """scores (rows, n) float32, mask (rows, n) bool, k (rows,) float32 -> the soft top-k (rows, n) and what the
        backward reads: history (3, rows, iterations) holding alpha_j, L_j and q_j (zero after an early exit), steps
        (rows,) int32, final_alpha and row_scale (rows,)."""
        scores, mask, k = scores.contiguous(), mask.contiguous(), k.contiguous()
        rows, n = scores.shape
        soft = torch.empty_like(scores)
        history = scores.new_zeros(3, rows, iterations)  # zeros: no output holds uninitialised memory
        alpha, lse, q = history.unbind(0)
        steps = torch.empty(rows, dtype=torch.int32, device=scores.device)
        final_alpha, row_scale = scores.new_empty(rows), scores.new_empty(rows)
        block, num_chunks, num_warps = _forward_layout(n)
        with torch.cuda.device(scores.device):  # Triton launches on the current device
            _coordinate_descent_forward[(rows,)](
                scores, mask, k, soft, alpha, lse, q, steps, final_alpha, row_scale, n, scale,
                ITERATIONS=iterations, EARLY_EXIT=early_exit, BLOCK=block, NUM_CHUNKS=num_chunks, num_warps=num_warps,
            )
        return soft, history, steps, final_alpha, row_scale

    @coordinate_descent_rows.register_fake
    def _(scores, mask, k, iterations, scale, early_exit):
        rows, n = scores.shape
        history, steps = scores.new_empty(3, rows, iterations), scores.new_empty(rows, dtype=torch.int32)
        return scores.new_empty(rows, n), history, steps, scores.new_empty(rows), scores.new_empty(rows)

    @torch.library.custom_op(f"{OP_NAMESPACE}::coordinate_descent_backward", mutates_args=(), device_types="cuda")
    def coordinate_descent_rows_backward(
        grad_soft: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, soft: torch.Tensor, history: torch.Tensor,
        steps: torch.Tensor, final_alpha: torch.Tensor, row_scale: torch.Tensor, scale: float,
    ) -> torch.Tensor:
        """The gradient (rows, n) float32 of the scores, from the soft top-k's gradient and the forward's records."""
        grad_soft, scores, mask, soft, history = (t.contiguous() for t in (grad_soft, scores, mask, soft, history))
        grad_soft = grad_soft.float()
        rows, n = scores.shape
        alpha, lse, q = history.unbind(0)
        iterations = alpha.shape[1]
        weights = torch.empty_like(alpha)
        grad_scores = torch.empty_like(scores)
        block, num_chunks, num_warps = _forward_layout(n)
        with torch.cuda.device(scores.device):
            _coordinate_descent_adjoints[(rows,)](
                grad_soft, soft, scores, mask, q, steps, final_alpha, row_scale, weights, n, scale,
                ITERATIONS=iterations, BLOCK=block, NUM_CHUNKS=num_chunks, num_warps=num_warps,
            )
            _coordinate_descent_backward[(rows, triton.cdiv(n, GRAD_CHUNK))](
                grad_soft, soft, scores, mask, alpha, lse, weights, steps, final_alpha, row_scale, grad_scores, n,
                scale, ITERATIONS=iterations, BLOCK=GRAD_CHUNK, num_warps=4,
            )
        return grad_scores

    @coordinate_descent_rows_backward.register_fake
    def _(grad_soft, scores, mask, soft, history, steps, final_alpha, row_scale, scale):
        return scores.new_empty(scores.shape)

    def _save_for_backward(ctx, inputs, output):
        scores, mask, _k, _iterations, scale, _early_exit = inputs
        soft, *records = output
        ctx.mark_non_differentiable(*records)
        ctx.save_for_backward(scores, mask, soft, *records)
        ctx.scale = scale

    def _coordinate_descent_backward_formula(ctx, grad_soft, *_):
        grad_scores = coordinate_descent_rows_backward(grad_soft, *ctx.saved_tensors, ctx.scale)
        return grad_scores, None, None, None, None, None

    coordinate_descent_rows.register_autograd(_coordinate_descent_backward_formula, setup_context=_save_for_backward)

    def fused_coordinate_descent(scores, mask, k, *, iterations: int, epsilon: float, early_exit: bool = True):
        """`routing.coordinate_descent` in three Triton launches (one forward, two backward), same arguments and
        result. `early_exit` stops at an exact float32 fixed point, which changes nothing in the result."""
        n = scores.shape[-1]
        scores_rows = scores.reshape(-1, n).float().contiguous()  # (rows, n)
        mask_rows = mask.expand(scores.shape).reshape(-1, n).contiguous()
        k_rows = k.expand(*scores.shape[:-1], 1).reshape(-1).float().contiguous()  # (rows,)
        scale = LOG2E / float(epsilon)
        soft, *_ = coordinate_descent_rows(scores_rows, mask_rows, k_rows, iterations, scale, early_exit)
        return soft.view(scores.shape)

    @triton.jit
    def _order_keys(scores_ptr, mask_ptr, index, n):
        # uint32 keys ordered like the float32 scores (sign bit set for positives, every bit flipped for negatives; -0
        # made +0, its equal); 0, below every score, at masked tokens and past the row
        inside = index < n
        keep = (tl.load(mask_ptr + index, mask=inside, other=0) != 0) & inside
        s = tl.load(scores_ptr + index, mask=inside, other=0.0).to(tl.float32)
        bits = tl.where(s == 0.0, 0.0, s).to(tl.uint32, bitcast=True)
        key = tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)
        return tl.where(keep, key, 0)

    SELECT_COLUMNS = 16  # the selection kernel holds a row as (BLOCK / 16, 16) keys

    @triton.jit
    def _inclusive_ranks(x):
        # (lines, columns) int32 -> its inclusive prefix sums in row-major order: a scan along each line plus the sum of
        # the lines before it (two short scans; one scan over the flat row took three times as long)
        line = tl.sum(x, axis=1)
        return tl.cumsum(x, axis=1) + (tl.cumsum(line, axis=0) - line)[:, None]

    @triton.jit
    def _select_top_k(scores_ptr, mask_ptr, k_ptr, out_ptr, n, k_max, BLOCK: tl.constexpr, COLUMNS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        index = tl.arange(0, BLOCK // COLUMNS)[:, None] * COLUMNS + tl.arange(0, COLUMNS)[None, :]  # (lines, columns)
        inside = index < n
        key = _order_keys(scores_ptr + row * n, mask_ptr + row * n, index, n)  # the row, held in registers
        k = tl.load(k_ptr + row)

        # a threshold t with exactly k keys >= t, bit by bit from the top: the largest t with at least k keys >= t,
        # unless a candidate on the way already counts exactly k (with distinct scores after about 20 of the 32 bits)
        threshold = tl.full((), 0, tl.uint32)
        count = tl.sum(inside.to(tl.int32))  # keys >= 0: all of them
        bit = tl.full((), 1 << 31, tl.uint32)
        while (bit != 0) & (count != k):
            candidate = threshold | bit
            candidate_count = tl.sum((key >= candidate).to(tl.int32))
            threshold = tl.where(candidate_count >= k, candidate, threshold)
            count = tl.where(candidate_count >= k, candidate_count, count)
            bit = bit >> 1

        # every key >= the threshold is taken; where more than k tie with the k-th (the threshold is then that key),
        # as many of the ties as k leaves, earliest first
        taken = (key >= threshold) & inside
        if count != k:
            quota = k - tl.sum((key > threshold).to(tl.int32))
            tie = ((key == threshold) & inside).to(tl.int32)
            taken = (key > threshold) | ((tie != 0) & (_inclusive_ranks(tie) <= quota))
        taken = taken.to(tl.int32)
        # slots: the taken positions in order, then the others in order; only the first k_max slots are stored
        taken_rank = _inclusive_ranks(taken)
        slot = tl.where(taken != 0, taken_rank - 1, k + index - taken_rank)
        tl.store(out_ptr + row * k_max + slot, index.to(tl.int64), mask=inside & (slot < k_max))

    @torch.library.custom_op(f"{OP_NAMESPACE}::select_top_k", mutates_args=(), device_types="cuda")
    def select_top_k_rows(scores: torch.Tensor, mask: torch.Tensor, k: torch.Tensor, k_max: int) -> torch.Tensor:
        """scores (rows, n) float32, mask (rows, n) bool, k (rows,) int32 -> (rows, k_max) int64 positions: see
        `routing.top_k_positions`. One program per row, n <= RESIDENT_ROW."""
        scores, mask, k = scores.contiguous(), mask.contiguous(), k.contiguous()
        rows, n = scores.shape
        out = torch.empty(rows, k_max, dtype=torch.long, device=scores.device)
        block, _, num_warps = _forward_layout(n)
        with torch.cuda.device(scores.device):  # at 16k tokens 8 warps beat 16 (measured on an H100)
            _select_top_k[(rows,)](scores, mask, k, out, n, k_max, BLOCK=block, COLUMNS=SELECT_COLUMNS,
                                   num_warps=min(num_warps, 8))
        return out

    @select_top_k_rows.register_fake
    def _(scores, mask, k, k_max):
        return scores.new_empty(scores.shape[0], k_max, dtype=torch.long)

    def fused_top_k_positions(scores, mask, k, k_max: int):
        """`routing.top_k_positions` in one Triton launch, same arguments and result, for rows of at most RESIDENT_ROW
        tokens. (Longer rows would have to stream through L2 in each of the 34 passes; that lost to the sort: 0.19 ms
        against 0.05-0.08 ms at 32k tokens on an H100.)"""
        n = scores.shape[-1]
        if n > RESIDENT_ROW:
            raise ValueError(f"the top-k kernel takes rows of at most {RESIDENT_ROW} tokens, got {n}")
        scores_rows = scores.reshape(-1, n).float().contiguous()
        mask_rows = mask.expand(scores.shape).reshape(-1, n).contiguous()
        k_rows = k.expand(scores.shape[:-1]).reshape(-1).to(torch.int32).contiguous()
        return select_top_k_rows(scores_rows, mask_rows, k_rows, k_max).view(*scores.shape[:-1], k_max)

    @triton.jit
    def _bucket_sums(grad_ptr, bucket_ptr, out_ptr, positions, heads, TILE: tl.constexpr, TILES: tl.constexpr,
                     HEADS: tl.constexpr, BUCKETS: tl.constexpr):
        # out (HEADS, BUCKETS) float32 += this program's TILES * TILE positions of grad (heads, positions), summed per
        # bucket: a (heads, tile) x (tile, buckets) one-hot product per tile, in registers, then one atomic add per sum
        head = tl.arange(0, HEADS).to(tl.int64)
        column = tl.arange(0, BUCKETS)
        first = tl.program_id(0).to(tl.int64) * TILE * TILES
        total = tl.zeros((HEADS, BUCKETS), dtype=tl.float32)
        for tile in range(TILES):
            position = first + tile * TILE + tl.arange(0, TILE)
            inside = position < positions
            bucket = tl.load(bucket_ptr + position, mask=inside, other=-1)
            grad = tl.load(grad_ptr + head[:, None] * positions + position[None, :],
                           mask=(head[:, None] < heads) & inside[None, :], other=0.0)
            one_hot = (bucket[:, None] == column[None, :]).to(grad.dtype)
            total = tl.dot(grad, one_hot, total, input_precision="ieee")
        tl.atomic_add(out_ptr + head[:, None] * BUCKETS + column[None, :], total, mask=head[:, None] < heads)

    BUCKET_TILE, BUCKET_TILES = 128, 32  # positions per one-hot product; products per program (4096 positions)

    @torch.library.custom_op(f"{OP_NAMESPACE}::bucket_sums", mutates_args=(), device_types="cuda")
    def bucket_sums(grad: torch.Tensor, bucket: torch.Tensor, num_buckets: int) -> torch.Tensor:
        """grad (h, positions) float, bucket (positions,) integer in [0, num_buckets) -> (num_buckets, h) float32:
        each head's gradient summed over the positions of each bucket. One launch, no one-hot matrix in memory."""
        grad, bucket = grad.contiguous(), bucket.contiguous()
        heads, positions = grad.shape
        padded_heads = max(16, triton.next_power_of_2(heads))  # tl.dot takes dimensions of 16 or more
        padded_buckets = max(16, triton.next_power_of_2(num_buckets))
        out = torch.zeros(padded_heads, padded_buckets, dtype=torch.float32, device=grad.device)
        with torch.cuda.device(grad.device):
            _bucket_sums[(triton.cdiv(positions, BUCKET_TILE * BUCKET_TILES),)](
                grad, bucket, out, positions, heads, TILE=BUCKET_TILE, TILES=BUCKET_TILES, HEADS=padded_heads,
                BUCKETS=padded_buckets,
            )
        return out[:heads, :num_buckets].t().contiguous()

    @bucket_sums.register_fake
    def _(grad, bucket, num_buckets):
        return grad.new_empty(num_buckets, grad.shape[0], dtype=torch.float32)

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

    # tiles of the bias gradient kernels: 64 queries x 32 keys, 8 key tiles per split of _heavy_far_sums (at 16k
    # tokens the 2048 routed keys in 8 splits), 4 warps, 1 stage, at most 128 registers a thread (the fastest launch
    # tried on an H100; offline sm_90a compiles: 111 registers, none spilled, 4 programs per SM; float32 keeps its
    # registers, 128 would spill 1.8 KB). _heavy_near_sums: 32 queries a program, 2 warps, its registers as they come
    # (255, none spilled): 0.120 ms for both launches against 0.142 with 64 queries and 4 warps (on an H100); its query
    # tile need not be the far sums'.
    HEAVY_QUERY_TILE, HEAVY_KEY_TILE, HEAVY_KEY_TILES = 64, 32, 8
    HEAVY_FAR_OPTIONS = dict(num_warps=4, num_stages=1, maxnreg=128)
    HEAVY_NEAR_QUERY_TILE, HEAVY_NEAR_WARPS = 32, 2

    def launch_heavy_bias_gradient(query, key, value, out, grad_out, q_positions, kv_positions, kv_valid,
                                   offset_bucket, table, query_tile=HEAVY_QUERY_TILE, key_tile=HEAVY_KEY_TILE,
                                   key_tiles=HEAVY_KEY_TILES, near_query_tile=HEAVY_NEAR_QUERY_TILE,
                                   near_warps=HEAVY_NEAR_WARPS, **options):
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
        far_options = {name: value for name, value in (HEAVY_FAR_OPTIONS | options).items()
                       if not (name == "maxnreg" and query.element_size() > 2)}  # float32 keeps its registers
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

else:
    fused_coordinate_descent = fused_top_k_positions = bucket_sums = heavy_bias_gradient_table = None


class BucketBias(torch.autograd.Function):
    """`weight.t()[:, bucket]`: every head's bias at every position, heads first, whose backward sums the gradient per
    bucket by one-hot products (on CUDA in the `bucket_sums` kernel, tile by tile in registers; elsewhere one matrix
    product with a one-hot matrix), instead of the sort-based scatter of an indexing backward, which is slow for
    millions of positions falling into a few dozen buckets (the heavy attention's relative position bias). Heads
    first, the gather writes the (h, ...) bias contiguously: as a (..., h) embedding lookup permuted to heads first,
    the heavy attention's bias build took 2.4x as long (0.069 against 0.029 ms at 16k tokens on an H100)."""

    @staticmethod
    def forward(ctx, bucket, weight):
        ctx.save_for_backward(bucket)
        ctx.num_buckets = weight.shape[0]
        return weight.t()[:, bucket]

    @staticmethod
    def backward(ctx, grad):
        (bucket,) = ctx.saved_tensors
        grad = grad.reshape(grad.shape[0], -1)  # (h, positions)
        if grad.is_cuda and bucket_sums is not None:
            return None, bucket_sums(grad, bucket.reshape(-1), ctx.num_buckets).to(grad.dtype)
        one_hot = bucket.reshape(-1, 1) == torch.arange(ctx.num_buckets, device=bucket.device)  # (positions, buckets)
        return None, (grad @ one_hot.to(grad.dtype)).t()


class HeavyBiasGradient(torch.autograd.Function):
    """The identity on the heavy attention's output (b, h, m, d), whose backward also returns the gradient of the bias
    table `weight` (buckets, h) that the attention added (detached there): the attention itself then runs without a
    bias gradient (on CUDA, SDPA's cuDNN kernels for q, k and v), and `heavy_bias_gradient_table` recomputes the
    probabilities tile by tile for the table's gradient, never writing a (b, h, m, m_kv) gradient."""

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


def bucket_bias(bucket, weight):
    """(...) integer buckets, (buckets, h) weight -> (h, ...): `weight.t()[:, bucket]` with a fast backward (see
    BucketBias)."""
    return BucketBias.apply(bucket, weight)


if flex_attention is not None:
    BIAS_GROUP = 16  # queries sharing one copy of the bias row, whose gradient the backward adds up atomically
    # The kernels' tiles for head dims up to 64 (larger ones keep inductor's choice: these were measured at 64 only,
    # and in float32 at 128 the forward's buffers would outgrow shared memory). Forward: 128 queries x 64 keys, 4 warps
    # (inductor's default for bf16 at head dim 64 on sm90, 128 x 128, took 0.188 ms for the Large light attention at
    # 16k on an H100, these 0.082); backward: 64 x 64 tiles, 4 warps (forward+backward 0.265 ms against 0.282 with
    # inductor's 64 x 128, 8 warps), measured with benchmarks/parts.py --only local.
    LOCAL_KERNEL_OPTIONS = dict(
        fwd_BLOCK_M=128, fwd_BLOCK_N=64, fwd_num_warps=4, fwd_num_stages=3,
        bwd_BLOCK_M1=64, bwd_BLOCK_N1=64, bwd_BLOCK_M2=64, bwd_BLOCK_N2=64, bwd_num_warps=4, bwd_num_stages=3,
    )

    @functools.lru_cache(maxsize=16)
    def band_block_mask(length: int, reach: int, device: torch.device, block: int):
        """Flex attention block mask in which query block i visits key blocks i - reach .. i + reach (the band; what
        lies outside it is masked by the bias), over `length` (a multiple of `block`) tokens."""
        num_blocks = length // block
        kv_block = torch.arange(num_blocks, device=device)[:, None] + torch.arange(-reach, reach + 1, device=device)
        inside = (kv_block >= 0) & (kv_block < num_blocks)
        kv_indices = torch.where(inside, kv_block, num_blocks).sort(-1).values.clamp(max=num_blocks - 1)
        # flex attention wants one column per key block; columns past a row's count are ignored
        kv_indices = torch.nn.functional.pad(kv_indices, (0, max(0, num_blocks - kv_indices.shape[1])))[:, :num_blocks]
        return BlockMask.from_kv_blocks(
            inside.sum(-1).int()[None, None], kv_indices.int()[None, None], BLOCK_SIZE=block,
            seq_lengths=(length, length),
        )

    @functools.cache
    def compiled_flex_attention():
        return torch.compile(flex_attention)

    def flex_local_attention(query, key, value, key_mask, bias_table, radius: int, block: int = 128,
                             kernel_options=None):
        """softmax(q k^T + bias) v over the band |i - j| <= radius, unscaled (T5), as one flex attention call.

        query, key, value: (b, h, n, d); key_mask: (b, n) bool, False at keys no query may see; bias_table: (h, 2 *
        radius + 1), the bias of offsets key - query = -radius .. radius. The block mask lists the key blocks within
        reach; the score modification adds the bias, -inf outside the band and at masked keys. Queries with no
        visible key get 0. Returns (b, h, n, d). `kernel_options` go to flex attention (default: LOCAL_KERNEL_OPTIONS
        up to head dim 64; `{}` for inductor's own tiles).
        """
        if kernel_options is None:
            kernel_options = LOCAL_KERNEL_OPTIONS if query.shape[-1] <= 64 else {}
        b, h, n, _ = query.shape
        length = -(-n // block) * block
        if length != n:
            query, key, value = (torch.nn.functional.pad(t, (0, 0, 0, length - n)) for t in (query, key, value))
        reach = -(-radius // block)
        half = (reach + 1) * block - 1  # the largest |key - query| within the visited blocks
        offsets = torch.arange(-half, half + 1, device=bias_table.device)
        table = torch.where(  # (h, 2 * half + 1): offsets -half..half, -inf outside the band
            offsets.abs() <= radius, bias_table[:, (offsets + radius).clamp(0, 2 * radius)].float(), float("-inf")
        )
        # one copy of the table per group of queries: the backward's atomic adds into the bias gradient then collide
        # only within a group, not across the whole sequence
        rows = table[:, None, :].expand(h, length // BIAS_GROUP, -1).contiguous()

        # The tensors the score modification reads are built without padding or concatenation: inductor inlines their
        # computation into the flex attention kernel, where it cannot lower masked loads (torch 2.11). Sizes are read
        # off the tensors, not closed over as Python ints, which a separately compiled flex attention would bake in.
        def relative_bias(score, batch, head, q_index, kv_index):
            edge = rows.shape[-1] // 2  # `half`; pairs outside the blocks clamp to the -inf ends
            bias = rows[head, q_index // BIAS_GROUP, (kv_index - q_index).clamp(-edge, edge) + edge]
            last = key_mask.shape[-1] - 1  # keys past it pad the input to whole blocks
            visible = key_mask[batch, kv_index.clamp(max=last)] & (kv_index <= last)
            return torch.where(visible, score + bias, float("-inf"))

        if torch.compiler.is_compiling():
            # inside an outer torch.compile: flex attention and the block mask are traced into its graph (a cached mask
            # or a separately compiled flex attention would break it); the mask is a few small kernels per call
            attention, block_mask = flex_attention, band_block_mask.__wrapped__(length, reach, query.device, block)
        else:
            attention = compiled_flex_attention() if query.is_cuda else flex_attention
            block_mask = band_block_mask(length, reach, query.device, block)
        out = attention(query, key, value, score_mod=relative_bias, block_mask=block_mask, scale=1.0,
                        kernel_options=kernel_options)
        return out[:, :, :n]

else:
    flex_local_attention = None
