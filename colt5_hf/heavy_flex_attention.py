"""The heavy attention as one flex attention call over the routed tokens, its relative position bias computed inside
the kernel: the score modification reads each pair's bias from a row per head over the offsets key position - query
position = -reach..reach in the sequence (T5's buckets with reach = max_distance: every offset beyond shares the
bucket at its end), and hides invalid keys. Nothing of shape (b, h, m, m_kv) is written, forward or backward; a block
mask skips the key blocks past each sample's last valid key. Inside a compiled region flex attention and its block
mask are traced in place.
"""

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention


BLOCK = 128  # flex attention's query and key blocks: the routed queries and keys are padded to a multiple of it
# Queries sharing one copy of the bias rows when the rows' gradient comes from flex attention's backward, which adds
# every pair's share atomically: most pairs of the heavy attention lie beyond +-reach and add to the same two entries
# of a head, so each group of queries gets entries of its own (as flex_local_attention.BIAS_GROUP).
BIAS_GROUP = 16


def valid_key_block_mask(kv_valid, q_length: int, kv_length: int):
    """Flex attention block mask over q_length x kv_length (multiples of BLOCK) in which every query block of a sample
    visits its key blocks from the first up to the one holding the sample's last valid key (none where it has none).
    kv_valid: (b, m_kv) bool, m_kv <= kv_length."""
    b, m_kv = kv_valid.shape
    slots = torch.arange(1, m_kv + 1, device=kv_valid.device)
    used = (kv_valid * slots).amax(-1)  # (b,): key slots up to and including the last valid one
    q_blocks, kv_blocks = q_length // BLOCK, kv_length // BLOCK
    kv_num_blocks = ((used + BLOCK - 1) // BLOCK).int()[:, None, None].expand(b, 1, q_blocks).contiguous()
    kv_indices = torch.arange(kv_blocks, device=kv_valid.device, dtype=torch.int32).expand(b, 1, q_blocks, kv_blocks)
    return BlockMask.from_kv_blocks(kv_num_blocks, kv_indices.contiguous(), BLOCK_SIZE=BLOCK,
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


def heavy_flex_attention(query, key, value, q_positions, kv_positions, kv_valid, bias_table, offset_bucket,
                         kernel_options=None):
    """softmax(q k^T + bias) v over the routed tokens, unscaled (T5), as one flex attention call, where the bias of
    query slot i and key slot j is bias_table[bucket(kv_positions[j] - q_positions[i])] and -inf at invalid keys.

    query (b, h, m, d); key, value (b, h, m_kv, d); q_positions (b, m), kv_positions (b, m_kv): the routed tokens'
    integer positions in the sequence; kv_valid (b, m_kv) bool; bias_table (buckets, h), whose gradient (where it
    takes one) flex attention's backward computes; offset_bucket (2 reach + 1,) integer, the bucket of each offset
    -reach..reach (`t5_attention.offset_buckets`), every offset beyond taking the bucket at its end. Queries with no
    valid key get 0. Returns (b, h, m, d). `kernel_options` go to flex attention (default: inductor's choice).
    """
    b, h, m, _ = query.shape
    m_kv = key.shape[-2]
    q_length, kv_length = -(-m // BLOCK) * BLOCK, -(-m_kv // BLOCK) * BLOCK
    if q_length != m:
        query = torch.nn.functional.pad(query, (0, 0, 0, q_length - m))
    if kv_length != m_kv:
        key, value = (torch.nn.functional.pad(t, (0, 0, 0, kv_length - m_kv)) for t in (key, value))
    # (h, 2 reach + 1): each offset's bias, in float32 at least, as the scores it is added to
    rows = bias_table.t()[:, offset_bucket.long()].to(torch.promote_types(bias_table.dtype, torch.float32))
    groups = q_length // BIAS_GROUP if rows.requires_grad else 1
    rows = rows[:, None, :].expand(h, groups, -1).contiguous()  # (h, groups, 2 reach + 1)
    q_positions, kv_positions = q_positions.int(), kv_positions.int()  # positions fit int32

    # The tensors the score modification reads are not padded: inductor inlines their computation into the flex
    # attention kernel, where it cannot lower masked loads (torch 2.11); the padded slots read the last real one, and
    # keys among them are hidden. Sizes are read off the tensors, not closed over as Python ints, which a separately
    # compiled flex attention would bake in.
    def relative_bias(score, batch, head, q_index, kv_index):
        q_last, kv_last = q_positions.shape[-1] - 1, kv_positions.shape[-1] - 1
        kv_slot = kv_index.clamp(max=kv_last)
        offset = kv_positions[batch, kv_slot] - q_positions[batch, q_index.clamp(max=q_last)]
        reach = rows.shape[-1] // 2
        group = (q_index // BIAS_GROUP).clamp(max=rows.shape[1] - 1)
        bias = rows[head, group, offset.clamp(-reach, reach) + reach]
        visible = kv_valid[batch, kv_slot] & (kv_index <= kv_last)
        return torch.where(visible, score + bias, float("-inf"))

    # inside an outer torch.compile flex attention is traced into its graph (a separately compiled one would break it)
    compiled = query.is_cuda and not torch.compiler.is_compiling()
    attention = compiled_heavy_flex_call() if compiled else heavy_flex_call
    block_mask = valid_key_block_mask(kv_valid, q_length, kv_length)
    out = attention(query, key, value, relative_bias, block_mask, kernel_options or {})
    return out[:, :, :m]
