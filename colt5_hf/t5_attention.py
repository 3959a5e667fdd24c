"""T5 attention as functions, shared by the model and the layer API: unscaled softmax(q k^T + bias) v with the bias
holding T5's relative position bias and `mask_value` at masked keys, its implementations (eager, SDPA, chunked keys)
registered in Transformers' attention interface, the relative position buckets and the bias tables read from them.
"""

import math

import torch
import torch.nn.functional as F
from transformers.modeling_utils import AttentionInterface


try:  # Triton kernel for the bucketed bias's gradient
    from .bucket_sums_kernel import bucket_sums
except ImportError:
    bucket_sums = None


def mask_value(dtype):
    # half the dtype's minimum: added to a score it stays finite, so fully masked rows never turn into NaN
    return torch.finfo(dtype).min / 2


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


def bucket_bias(bucket, weight):
    """(...) integer buckets, (buckets, h) weight -> (h, ...): `weight.t()[:, bucket]` with a fast backward (see
    BucketBias)."""
    return BucketBias.apply(bucket, weight)


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's bucketing of `key_position - query_position`: exact buckets for small distances, logarithmic ones up to
    `max_distance`, one bucket beyond; bidirectional buckets split the range between the two directions. Integer
    arithmetic in the input's dtype (the heavy attention passes int32: 2-4% faster than int64 alone in
    benchmarks/parts.py, no measurable change in the whole layer)."""
    dtype = relative_position.dtype
    if bidirectional:
        num_buckets //= 2
        bucket = (relative_position > 0).to(dtype) * num_buckets
        distance = relative_position.abs()
    else:
        bucket = torch.zeros_like(relative_position)
        distance = (-relative_position).clamp(min=0)
    exact = num_buckets // 2
    log_ratio = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (num_buckets - exact)).to(dtype)).clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < exact, distance, far)


def offset_buckets(num_buckets: int, max_distance: int, device=None):
    """(2 max_distance + 1,) int32: the bidirectional bucket of each offset key - query = -max_distance..max_distance,
    at offset + max_distance. Every offset beyond takes the bucket at its end (T5's buckets stop at max_distance), so
    this table, indexed by the offset clamped to +-max_distance, is the bucket of any offset."""
    offsets = torch.arange(-max_distance, max_distance + 1, device=device, dtype=torch.int32)
    return relative_position_bucket(offsets, True, num_buckets, max_distance)


SDPA_MIN_QUERIES = 64
CHUNKED_MIN_KEYS = 1024  # from this many keys on, few queries take chunked_attention (measured at 16k and 64k keys)


def attention_probabilities(query, key, bias):
    """softmax(q k^T + bias) over the keys, unscaled (T5), computed in float32 at least (a float64 bias must stay
    finite), in the query's dtype. query (b, ..., q, d); key (b, ..., k, d); bias broadcastable to (b, ..., q, k),
    holding the relative position bias and `mask_value` at masked keys. Returns (b, ..., q, k)."""
    precision = torch.promote_types(query.dtype, torch.float32)
    scores = torch.matmul(query, key.transpose(-1, -2)).to(precision) + bias.to(precision)
    return scores.softmax(-1).to(query.dtype)


def eager_attention_forward(module, query, key, value, bias, dropout: float = 0.0, **kwargs):
    """T5 attention, unscaled: softmax(q k^T + bias) v. Shapes as `attention_probabilities`'s, value (b, ..., k, d).
    Returns the output (b, ..., q, d) and the attention probabilities (b, ..., q, k) it is computed from (before
    dropout)."""
    probs = attention_probabilities(query, key, bias)
    return torch.matmul(F.dropout(probs, p=dropout), value), probs


def sdpa_attention_forward(module, query, key, value, bias, dropout: float = 0.0, **kwargs):
    """`eager_attention_forward`'s output through fused kernels, without the probabilities. Fewer than
    `SDPA_MIN_QUERIES` queries (a decoding step) stay off SDPA: its kernels give each (batch, head) one thread block
    per 64-128 queries, so one SM would read all of a 16k-token cross-attention cache, and on Hopper its cuDNN backend
    builds a new plan for every new key length (measured on an H200: 236 us per cross-attention call, over 100 ms per
    step of a growing cache). They take `chunked_attention` from `CHUNKED_MIN_KEYS` keys on (without dropout, where
    `key_chunks` finds chunks), else the eager path's two matmuls.
    """
    if query.shape[-2] < SDPA_MIN_QUERIES:
        chunks = key_chunks(key.shape[-2]) if key.shape[-2] >= CHUNKED_MIN_KEYS and not dropout else 1
        if chunks > 1:
            return chunked_attention(query, key, value, bias, chunks), None
        return eager_attention_forward(module, query, key, value, bias, dropout)[0], None
    shape, k_len = query.shape, key.shape[-2]
    q, k, v = (t.reshape(shape[0], -1, *t.shape[-2:]) for t in (query, key, value))
    bias = bias.expand(*shape[:-1], k_len).reshape(shape[0], -1, shape[-2], k_len).to(query.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=1.0)
    return out.reshape(shape), None


def fused_attention(implementation, queries: int) -> bool:
    """Whether an attention call of `queries` queries under `implementation` runs fused kernels, which write no
    probabilities (see sdpa_attention_forward)."""
    return implementation != "eager" and queries >= SDPA_MIN_QUERIES


ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention")

# Transformers' attention functions, with CoLT5's own under the implementations it supports: they take a bias that
# holds the relative position bias and the mask, and queries with any dims between batch and length (the light
# attention's blocks, the cross-attention's query heads folded per key/value head). "flex_attention" runs the light
# attention's band and, on CUDA without dropout, the heavy attention (its bias computed inside the kernel) through flex
# attention (CoLT5LocalAttention, CoLT5HeavyAttention), and every other dense attention through SDPA.
ALL_ATTENTION_FUNCTIONS = AttentionInterface()
ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa_attention_forward
ALL_ATTENTION_FUNCTIONS["flex_attention"] = sdpa_attention_forward


def key_chunks(keys: int) -> int:
    """How many equal chunks `chunked_attention` splits `keys` keys into: the divisor of `keys` nearest sqrt(keys / 16),
    within a factor of two of it and at least 2 (32 chunks of 512 keys at 16k, 64 of 1024 at 64k: the fastest of
    256-2048 keys a chunk for a decoding step's cross-attention on an H200); 1 where `keys` has no such divisor."""
    target = max(2, round(math.sqrt(keys / 16)))
    divisors = [c for c in range(max(2, target // 2), 2 * target + 1) if keys % c == 0]
    return min(divisors, key=lambda c: abs(c - target), default=1)


def chunked_attention(query, key, value, bias, chunks: int):
    """`eager_attention_forward`'s softmax(q k^T + bias) v (no dropout) over `chunks` equal chunks of the keys
    (flash-decoding): per chunk the row maximum, the sum of exponentials and their product with the values, then the
    chunks combined exactly. A decoding step's few queries against a long cross-attention cache then run as (batch x
    heads x chunks) small matmuls, where one product per (batch, head) over every key keeps most of the GPU's SMs
    idle. Shapes as `eager_attention_forward`'s.
    """
    precision = torch.promote_types(query.dtype, torch.float32)

    def split(t):  # (b, ..., k, d) -> (b, ..., c, k / c, d)
        return t.unflatten(-2, (chunks, -1))

    bias = bias.expand(*bias.shape[:-1], key.shape[-2]).unflatten(-1, (chunks, -1)).transpose(-3, -2)
    scores = torch.matmul(query.unsqueeze(-3), split(key).transpose(-1, -2)).to(precision)  # (b, ..., c, q, k / c)
    scores = scores + bias.to(precision)
    maximum = scores.amax(-1, keepdim=True)  # (b, ..., c, q, 1)
    weights = torch.exp(scores - maximum)
    out = torch.matmul(weights.to(value.dtype), split(value))  # (b, ..., c, q, d)
    share = torch.exp(maximum - maximum.amax(-3, keepdim=True))  # each chunk's scale against the row's maximum
    return ((out.to(precision) * share).sum(-3) / (weights.sum(-1, keepdim=True) * share).sum(-3)).to(value.dtype)


def check_implementation(implementation):
    if implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"CoLT5 supports attn_implementation 'eager', 'sdpa' and 'flex_attention', got {implementation!r}"
        )
    return implementation


def check_mask(attention_mask, shape, name, device):
    """(b, n) 0/1 mask -> bool on `device`; a missing mask means every position is real (made on the device: a host
    tensor inside a compiled graph would rule out CUDA graphs)."""
    if attention_mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(
            f"`{name}` has shape {tuple(attention_mask.shape)} but the inputs it masks have (batch, length) "
            f"{tuple(shape)}: pass a (batch, length) mask of 1 for real tokens and 0 for padding"
        )
    return attention_mask.bool().to(device)


def bias_table_rows(config):
    """The rows of the encoder's relative position bias table that the branches read, as one index (made once, a
    buffer: built per call, its dozen small eager kernels held back the first block by 0.7 ms on an H100): every
    bucket (the heavy attention's table), then the bucket of each offset -radius..radius (the light attention's)."""
    offsets = torch.arange(-config.local_radius, config.local_radius + 1)
    buckets = relative_position_bucket(
        offsets, True, config.relative_attention_num_buckets, config.relative_attention_max_distance
    )
    return torch.cat([torch.arange(config.relative_attention_num_buckets), buckets])


def branch_bias_tables(config, relative_attention_bias, bias_rows):
    """The encoder's relative position bias split between the branches: (light heads, 2 * radius + 1), the light
    attention's bias at offsets -radius..radius, and (buckets, heavy heads), the heavy attention's bucket table.
    `bias_rows` is `bias_table_rows(config)`."""
    # a module call rather than indexing `.weight`, so that accelerate's offload hooks load the table
    rows = relative_attention_bias(bias_rows)  # (buckets + 2 * radius + 1, light + heavy heads)
    num_buckets, light = config.relative_attention_num_buckets, config.num_light_heads
    return rows[num_buckets:, :light].t(), rows[:num_buckets, light:]
