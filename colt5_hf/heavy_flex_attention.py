"""The heavy attention as one flex attention call over the routed tokens, its relative position bias computed inside
the kernel: the score modification reads each pair's bias from a row per head over the offsets key position - query
position = -reach..reach in the sequence (T5's buckets with reach = max_distance: every offset beyond shares the
bucket at its end), and hides the key slots past each sample's valid ones. Nothing of shape (b, h, m, m_kv) is written,
forward or backward; a block mask skips the key blocks past each sample's valid slots. Inside a compiled region flex
attention and its block mask are traced in place.

What the score modification reads is what inductor (torch 2.11) lowered into the heavy attention's flex kernels in
this model before, compiled for inference too: the routed positions as the routers give them, a per-sample count of
valid key slots (a reduction), and bias rows made by a matmul (see `heavy_flex_attention`). Tensors computed
pointwise in the graph, such as the routers' validity masks, inductor inlines into the kernel, where it could not lower
them in no-grad graphs (`convert FlexibleLayout to FixedLayout first`). The model calls it only outside compiled
graphs (`CoLT5HeavyAttention`): inlined into its compiled encoder layer, the kernel erred beyond bf16 rounding.
"""

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention


BLOCK = 128  # flex attention's query and key blocks: the routed queries and keys are padded to a multiple of it
# Queries sharing one copy of the bias rows when the rows' gradient comes from flex attention's backward, which adds
# every pair's share atomically: most pairs of the heavy attention lie beyond +-reach and add to the same two entries
# of a head, so each group of queries gets entries of its own (as flex_local_attention.BIAS_GROUP).
BIAS_GROUP = 16


def valid_key_block_mask(kv_count, q_length: int, kv_length: int):
    """Flex attention block mask over q_length x kv_length (multiples of BLOCK) in which every query block of sample i
    visits the key blocks holding its first kv_count[i] key slots (none where kv_count[i] is 0). kv_count: (b,)."""
    b = kv_count.shape[0]
    q_blocks, kv_blocks = q_length // BLOCK, kv_length // BLOCK
    kv_num_blocks = ((kv_count + BLOCK - 1) // BLOCK).int()[:, None, None].expand(b, 1, q_blocks)
    kv_indices = torch.arange(kv_blocks, device=kv_count.device, dtype=torch.int32).expand(b, 1, q_blocks, kv_blocks)
    return BlockMask.from_kv_blocks(kv_num_blocks.contiguous(), kv_indices.contiguous(), BLOCK_SIZE=BLOCK,
                                    seq_lengths=(q_length, kv_length))


def heavy_flex_call(query, key, value, score_mod, block_mask, kernel_options):
    return flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=1.0,
                          kernel_options=kernel_options)


@functools.cache
def compiled_heavy_flex_call():
    """`heavy_flex_call` compiled: Dynamo keeps its graphs, and counts recompilations against its limit (8), per
    function. Compiled apart from flex_local_attention's flex attention, the heavy attention's shapes and grad modes do
    not take that function's places: past the limit flex attention would run its eager form, which writes the dense
    scores."""
    return torch.compile(heavy_flex_call)


def heavy_flex_attention(query, key, value, q_positions, kv_positions, kv_count, bias_table, offset_bucket,
                         kernel_options=None):
    """softmax(q k^T + bias) v over the routed tokens, unscaled (T5), as one flex attention call, where the bias of
    query slot i and key slot j of a sample is bias_table[bucket(kv_positions[j] - q_positions[i])] for its first
    kv_count key slots, -inf at the others.

    query (b, h, m, d); key, value (b, h, m_kv, d); q_positions (b, m), kv_positions (b, m_kv): the routed tokens'
    integer positions in the sequence; kv_count (b,): how many key slots of each sample are valid (a router's valid
    slots come first); bias_table (buckets, h), whose gradient (where it takes one) flex attention's backward
    computes; offset_bucket (2 reach + 1,) integer, the bucket of each offset -reach..reach
    (`t5_attention.offset_buckets`), every offset beyond taking the bucket at its end. Queries with no valid key get
    0. Returns (b, h, m, d). `kernel_options` go to flex attention (default: inductor's choice).
    """
    b, h, m, _ = query.shape
    m_kv = key.shape[-2]
    q_length, kv_length = -(-m // BLOCK) * BLOCK, -(-m_kv // BLOCK) * BLOCK
    if q_length != m:
        query = F.pad(query, (0, 0, 0, q_length - m))
    if kv_length != m_kv:
        key, value = (F.pad(t, (0, 0, 0, kv_length - m_kv)) for t in (key, value))
    # (h, 2 reach + 1): each offset's bias, in float32 at least (the scores' precision), made by a matmul with the
    # offsets' one-hot buckets (exact: one product with 1 per entry): under torch.compile its output is a buffer of its
    # own, where a lookup would be inlined into the attention kernel, bucket arithmetic per score, beyond the shared
    # memory of every kernel configuration at d_kv 64 (torch 2.11)
    dtype = torch.promote_types(bias_table.dtype, torch.float32)
    # (2 reach + 1, buckets); compared, not F.one_hot, whose check of the buckets' range waits for the GPU
    one_hot = (offset_bucket[:, None] == torch.arange(bias_table.shape[0], device=offset_bucket.device)).to(dtype)
    rows = bias_table.to(dtype).t() @ one_hot.t()
    groups = q_length // BIAS_GROUP if rows.requires_grad else 1
    rows = rows[:, None, :].expand(h, groups, -1).contiguous()  # (h, groups, 2 reach + 1)

    # The tensors the score modification reads are not padded (padding, computed in the graph, would be inlined into
    # the kernel): the padded query slots read the last real one, and key slots past the count are hidden. Sizes are
    # read off the tensors, not closed over as Python ints, which a separately compiled flex attention would bake in.
    def relative_bias(score, batch, head, q_index, kv_index):
        q_last, kv_last = q_positions.shape[-1] - 1, kv_positions.shape[-1] - 1
        offset = kv_positions[batch, kv_index.clamp(max=kv_last)] - q_positions[batch, q_index.clamp(max=q_last)]
        reach = rows.shape[-1] // 2
        group = (q_index // BIAS_GROUP).clamp(max=rows.shape[1] - 1)
        bias = rows[head, group, offset.clamp(-reach, reach) + reach]
        return torch.where(kv_index < kv_count[batch], score + bias, float("-inf"))

    # inside an outer torch.compile flex attention is traced into its graph (a separately compiled one would break it)
    compiled = query.is_cuda and not torch.compiler.is_compiling()
    attention = compiled_heavy_flex_call() if compiled else heavy_flex_call
    block_mask = valid_key_block_mask(kv_count, q_length, kv_length)
    out = attention(query, key, value, relative_bias, block_mask, kernel_options or {})
    return out[:, :, :m]
