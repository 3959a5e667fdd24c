"""Fast paths for CUDA GPUs: coordinate descent fused into Triton kernels, local attention through flex attention,
and a quick gradient for the heavy attention's bucketed bias.

routing.py and modeling_colt5.py import these names inside guarded blocks; where Triton or flex attention is missing
the name is None and the eager reference path runs.

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
"""

import functools

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

    class FusedCoordinateDescent(torch.autograd.Function):
        @staticmethod
        def forward(ctx, scores, mask, k, iterations, epsilon, early_exit):
            n = scores.shape[-1]
            scores_rows = scores.reshape(-1, n).float().contiguous()
            mask_rows = mask.expand(scores.shape).reshape(-1, n).contiguous()
            k_rows = k.expand(*scores.shape[:-1], 1).reshape(-1).float().contiguous()
            rows = scores_rows.shape[0]
            soft = torch.empty_like(scores_rows)
            alpha, lse, q = (scores_rows.new_empty(rows, iterations) for _ in range(3))
            steps = torch.empty(rows, dtype=torch.int32, device=scores.device)
            final_alpha, row_scale = scores_rows.new_empty(rows), scores_rows.new_empty(rows)
            scale = LOG2E / epsilon
            block, num_chunks, num_warps = _forward_layout(n)
            _coordinate_descent_forward[(rows,)](
                scores_rows, mask_rows, k_rows, soft, alpha, lse, q, steps, final_alpha, row_scale, n, scale,
                ITERATIONS=iterations, EARLY_EXIT=early_exit, BLOCK=block, NUM_CHUNKS=num_chunks, num_warps=num_warps,
            )
            ctx.save_for_backward(scores_rows, mask_rows, soft, alpha, lse, q, steps, final_alpha, row_scale)
            ctx.scale, ctx.iterations, ctx.shape = scale, iterations, scores.shape
            return soft.view(scores.shape)

        @staticmethod
        def backward(ctx, grad_soft):
            scores_rows, mask_rows, soft, alpha, lse, q, steps, final_alpha, row_scale = ctx.saved_tensors
            rows, n = scores_rows.shape
            grad_rows = grad_soft.reshape(rows, n).contiguous()
            weights = torch.empty_like(alpha)
            block, num_chunks, num_warps = _forward_layout(n)
            _coordinate_descent_adjoints[(rows,)](
                grad_rows, soft, scores_rows, mask_rows, q, steps, final_alpha, row_scale, weights, n, ctx.scale,
                ITERATIONS=ctx.iterations, BLOCK=block, NUM_CHUNKS=num_chunks, num_warps=num_warps,
            )
            grad_scores = torch.empty_like(scores_rows)
            _coordinate_descent_backward[(rows, triton.cdiv(n, GRAD_CHUNK))](
                grad_rows, soft, scores_rows, mask_rows, alpha, lse, weights, steps, final_alpha, row_scale,
                grad_scores, n, ctx.scale, ITERATIONS=ctx.iterations, BLOCK=GRAD_CHUNK, num_warps=4,
            )
            return grad_scores.view(ctx.shape), None, None, None, None, None

    def fused_coordinate_descent(scores, mask, k, *, iterations: int, epsilon: float, early_exit: bool = True):
        """`routing.coordinate_descent` in three Triton launches (one forward, two backward), same arguments and
        result. `early_exit` stops at an exact float32 fixed point, which changes nothing in the result."""
        return FusedCoordinateDescent.apply(scores, mask, k, iterations, float(epsilon), early_exit)

else:
    fused_coordinate_descent = None


class BucketBias(torch.autograd.Function):
    """`weight[bucket]` (an embedding lookup) whose backward sums the gradient per bucket with one matrix product of
    a one-hot matrix, instead of embedding's sort-based scatter, which is slow for millions of positions falling into
    a few dozen buckets (the heavy attention's relative position bias)."""

    @staticmethod
    def forward(ctx, bucket, weight):
        ctx.save_for_backward(bucket)
        ctx.num_buckets = weight.shape[0]
        return torch.nn.functional.embedding(bucket, weight)

    @staticmethod
    def backward(ctx, grad):
        (bucket,) = ctx.saved_tensors
        one_hot = bucket.reshape(-1, 1) == torch.arange(ctx.num_buckets, device=bucket.device)  # (positions, buckets)
        return None, one_hot.to(grad.dtype).t() @ grad.reshape(-1, grad.shape[-1])


def bucket_bias(bucket, weight):
    """(...) long buckets, (buckets, h) weight -> (..., h): F.embedding with a fast backward (see BucketBias)."""
    return BucketBias.apply(bucket, weight)


if flex_attention is not None:
    BIAS_GROUP = 16  # queries sharing one copy of the bias row, whose gradient the backward adds up atomically

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

    def flex_local_attention(query, key, value, key_mask, bias_table, radius: int, block: int = 128):
        """softmax(q k^T + bias) v over the band |i - j| <= radius, unscaled (T5), as one flex attention call.

        query, key, value: (b, h, n, d); key_mask: (b, n) bool, False at keys no query may see; bias_table: (h, 2 *
        radius + 1), the bias of offsets key - query = -radius .. radius. The block mask lists the key blocks within
        reach; the score modification adds the bias, -inf outside the band and at masked keys. Queries with no
        visible key get 0. Returns (b, h, n, d).
        """
        b, h, n, _ = query.shape
        length = -(-n // block) * block
        if length != n:
            query, key, value = (torch.nn.functional.pad(t, (0, 0, 0, length - n)) for t in (query, key, value))
            key_mask = torch.nn.functional.pad(key_mask, (0, length - n))
        reach = -(-radius // block)
        half = (reach + 1) * block - 1  # the largest |key - query| within the visited blocks
        outside = bias_table.new_full((h, half - radius), float("-inf"))
        table = torch.cat([outside, bias_table, outside], dim=1).float()  # (h, 2 * half + 1): offsets -half..half
        # one copy of the table per group of queries: the backward's atomic adds into the bias gradient then collide
        # only within a group, not across the whole sequence
        rows = table[:, None, :].expand(h, length // BIAS_GROUP, -1).contiguous()

        def relative_bias(score, batch, head, q_index, kv_index):
            edge = rows.shape[-1] // 2  # `half`, read off the tensor; pairs outside the blocks clamp to the -inf ends
            bias = rows[head, q_index // BIAS_GROUP, (kv_index - q_index).clamp(-edge, edge) + edge]
            return torch.where(key_mask[batch, kv_index], score + bias, float("-inf"))

        attention = compiled_flex_attention() if query.is_cuda else flex_attention
        out = attention(
            query, key, value, score_mod=relative_bias, block_mask=band_block_mask(length, reach, query.device, block),
            scale=1.0,
        )
        return out[:, :, :n]

else:
    flex_local_attention = None
