"""The light attention's band |i - j| <= radius as one flex attention call: a block mask listing the key blocks
within reach and a score modification adding the relative position bias. Inside a compiled region flex attention and
its block mask are traced in place.
"""

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention


BLOCK = 128  # flex attention's query and key blocks: the input is padded to a multiple of it
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


def flex_local_attention(query, key, value, key_mask, bias_table, radius: int, kernel_options=None):
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
    length = -(-n // BLOCK) * BLOCK
    if length != n:
        query, key, value = (torch.nn.functional.pad(t, (0, 0, 0, length - n)) for t in (query, key, value))
    reach = -(-radius // BLOCK)
    half = (reach + 1) * BLOCK - 1  # the largest |key - query| within the visited blocks
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
        attention, block_mask = flex_attention, band_block_mask.__wrapped__(length, reach, query.device, BLOCK)
    else:
        attention = compiled_flex_attention() if query.is_cuda else flex_attention
        block_mask = band_block_mask(length, reach, query.device, BLOCK)
    out = attention(query, key, value, score_mod=relative_bias, block_mask=block_mask, scale=1.0,
                    kernel_options=kernel_options)
    return out[:, :, :n]
