"""The routers' top-k selection (routing.top_k_positions) in one Triton launch, without a sort.

One program per row of at most 16k tokens, held in registers: the scores become uint32 keys in the same order; a
threshold with exactly k keys at or above it is found bit by bit from the top (one count over the row per bit, stopping
at the first candidate that counts exactly k; where more than k keys tie at the k-th, all 32 bits give that key and its
earliest ties are taken); the positions taken are written in increasing position by a prefix sum, followed by the other
positions. The row is held as lines of 16 tokens, so that the prefix sum is a scan along each line plus a scan of the
line sums.
"""

import torch

from .kernel_layout import OP_NAMESPACE, RESIDENT_ROW, row_layout, tl, triton


SELECT_COLUMNS = 16  # the selection kernel holds a row as (BLOCK / 16, 16) keys


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
    k = tl.load(k_ptr + row).to(tl.int32)

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
    """scores (rows, n) float32, mask (rows, n) bool, k (rows,) int64 -> (rows, k_max) int64 positions: see
    `routing.top_k_positions`. One program per row, n <= RESIDENT_ROW."""
    scores, mask, k = scores.contiguous(), mask.contiguous(), k.contiguous()
    rows, n = scores.shape
    out = torch.empty(rows, k_max, dtype=torch.long, device=scores.device)
    block, _, num_warps = row_layout(n)
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
    # int64 counts, narrowed in the kernel: an int32 copy would be a fourth form of the counts (beside int64, float32
    # and bool) that Inductor fuses into the reduction counting each sample's real tokens, and Triton 3.6 fails to
    # compile that reduction (PassManager::run failed)
    k_rows = k.expand(scores.shape[:-1]).reshape(-1).long().contiguous()
    return select_top_k_rows(scores_rows, mask_rows, k_rows, k_max).view(*scores.shape[:-1], k_max)
