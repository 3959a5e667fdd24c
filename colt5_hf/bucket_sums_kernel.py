"""The gradient of the bucketed bias (BucketBias backward) in one Triton launch: the gradient of a (heads, positions)
bias gathered from a (buckets, heads) table is, per bucket, the sum over its positions; each program sums 4096
positions by one-hot products built in registers on the tensor cores and adds its (heads, buckets) partial sums
atomically.
"""

import torch

from .kernel_layout import OP_NAMESPACE, tl, triton


BUCKET_TILE, BUCKET_TILES = 128, 32  # positions per one-hot product; products per program (4096 positions)


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
