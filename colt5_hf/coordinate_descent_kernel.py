"""Coordinate descent (routing.coordinate_descent) fused into Triton kernels, in log2 units: with x = s * log2(e) /
epsilon and alpha = a * log2(e) / epsilon, one iteration is the scalar recurrence

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

import torch

from .kernel_layout import LN2, LOG2E, OP_NAMESPACE, row_layout, tl, triton


GRAD_CHUNK = 1024  # tokens per program in the backward kernel
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
    block, num_chunks, num_warps = row_layout(n)
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
    block, num_chunks, num_warps = row_layout(n)
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
