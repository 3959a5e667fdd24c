"""PyTorch CoLT5: LongT5 with conditional computation (Ainslie et al. 2023, arXiv 2303.09752).

Encoder layers: X + A_light(X) + s_q * A_heavy(X_q, s_kv * X_kv), then X + FF_light(X) + s * FF_heavy(X_routed).
Decoder layers: T5.1.1 causal self-attention, multi-route (multi-query by default) cross-attention, gated FF.
"""

import contextlib
import copy
import functools
import json
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.dynamic_module_utils import custom_object_save
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPastAndCrossAttentions,
    Seq2SeqLMOutput,
    Seq2SeqModelOutput,
)
from transformers.utils import can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_colt5 import CoLT5Config
from .fast_path import (
    CompileReport,
    before_compiled_blocks,
    compiled_layer,
    encoder_compile_mode,
    length_bucket,
    pad_to_bucket,
    target_bucket,
)
from .routing import CoLT5Router, RoutedSum, draws_at_random, gather_route_heads, gather_tokens, route_together
from .t5_attention import (
    ALL_ATTENTION_FUNCTIONS,
    attention_probabilities,
    bias_table_rows,
    branch_bias_tables,
    bucket_bias,
    check_implementation,
    check_mask,
    eager_attention_forward,
    fused_attention,
    mask_value,
    offset_buckets,
    relative_position_bucket,
)


try:  # CUDA fast paths: flex attention for the light attention and for the heavy attention
    from .flex_local_attention import flex_local_attention
    from .heavy_flex_attention import heavy_flex_attention
except ImportError:
    flex_local_attention = heavy_flex_attention = None

try:  # Triton kernel for the gradient of the heavy attention's bias table
    from .heavy_bias_gradient_kernel import HeavyBiasGradient
except ImportError:
    HeavyBiasGradient = None


logger = logging.get_logger(__name__)

# Devices where the heavy attention under attn_implementation="flex_attention" takes heavy_flex_attention: flex
# attention's fused kernels. Elsewhere its eager form would write the (b, h, m, m_kv) scores it exists to avoid (and on
# the CPU it refuses a backward), so the heavy attention runs as under SDPA.
HEAVY_FLEX_DEVICES = ("cuda",)

# Transformers 5.24 renamed the cache argument and output field `past_key_values` to `cache`; support both.
CACHE_FIELD = "cache" if "cache" in Seq2SeqLMOutput.__dataclass_fields__ else "past_key_values"


def takes_cache_argument(forward):
    """The cache argument of a seq2seq forward is `cache`. Where Transformers has renamed it (5.24), the old name
    `past_key_values` is taken with the FutureWarning of the built-in models (their own decorator); before, it is the
    name `generate` passes, taken as `cache` silently."""
    if CACHE_FIELD == "cache":
        return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)

    @functools.wraps(forward)
    def forward_taking_past_key_values(*args, past_key_values=None, **kwargs):
        if past_key_values is not None and kwargs.get("cache") is None:
            kwargs["cache"] = past_key_values
        return forward(*args, **kwargs)

    return forward_taking_past_key_values


def clamp_fp16(hidden_states):
    """T5's guard for fp16 training: keep activations inside the representable range."""
    if hidden_states.dtype == torch.float16:
        limit = torch.finfo(torch.float16).max - 1000
        hidden_states = hidden_states.clamp(-limit, limit)
    return hidden_states


def warn_weights_from_eager(config):
    """Attention weights come from the eager computation: asked for under another implementation, the call runs it."""
    if config._attn_implementation not in (None, "eager"):
        logger.warning_once(
            f"CoLT5: attn_implementation={config._attn_implementation!r} computes no attention weights, so "
            "output_attentions=True runs the eager attention for the call; load the model with "
            "attn_implementation='eager' to make that the default."
        )


class WeightsLayout(NamedTuple):
    """Where the entries of attention probabilities held in a compact layout, (b, h, ..., queries, keys), lie among
    the attention weights over the sequence, (b, h, query_length, key_length): at (rows, columns) where `kept`.
    Entries not kept (a block's padding, the invalid slots of a route) have no place there. rows, columns and kept
    broadcast to the probabilities' shape; the kept positions of each (b, h) are distinct."""

    rows: torch.Tensor
    columns: torch.Tensor
    kept: torch.Tensor
    query_length: int
    key_length: int

    def flat_positions(self, probs):  # (b, h, entries): positions in the flattened (query_length * key_length)
        positions = torch.where(self.kept, self.rows * self.key_length + self.columns, 0)
        return positions.expand_as(probs).flatten(2)

    def spread(self, probs):
        """(b, h, ..., q, k) probabilities -> (b, h, query_length, key_length) weights, 0 where no entry lies."""
        b, h = probs.shape[:2]
        entries = torch.where(self.kept, probs, 0).flatten(2)
        weights = probs.new_zeros(b, h, self.query_length * self.key_length)
        weights = weights.scatter_add(-1, self.flat_positions(probs), entries)  # the entries not kept add 0 at 0
        return weights.view(b, h, self.query_length, self.key_length)

    def collect(self, weights, probs):
        """The probabilities read back from `weights` where kept (the same values), from `probs` elsewhere: an output
        computed from them is computed from the weights."""
        taken = weights.flatten(2).gather(-1, self.flat_positions(probs)).view_as(probs)
        return torch.where(self.kept, taken, probs)


class CoLT5LayerNorm(nn.Module):
    """T5's RMS norm: no mean subtraction, no bias, variance in float32."""

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        variance = hidden_states.float().pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


class CoLT5GatedFeedForward(nn.Module):
    """T5.1.1 gated-GELU feed-forward: wo(act(wi_0 x) * wi_1 x)."""

    def __init__(self, config: CoLT5Config, d_ff: int):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, config.d_model, bias=False)
        self.act = ACT2FN[config.dense_act_fn]
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, hidden_states):
        hidden_states = self.dropout(self.act(self.wi_0(hidden_states)) * self.wi_1(hidden_states))
        return self.wo(hidden_states.to(self.wo.weight.dtype))


class CoLT5RoutedFeedForward(nn.Module):
    """FF_light(X) on every token + s * FF_heavy(X) on the routed ones (zero elsewhere), as a `RoutedSum`. The router
    takes `num_tokens` (default `config.feed_forward_fraction`; see CoLT5Router), which a call may override."""

    def __init__(self, config: CoLT5Config, num_tokens=None):
        super().__init__()
        self.light_feed_forward = CoLT5GatedFeedForward(config, config.light_d_ff)
        self.heavy_feed_forward = CoLT5GatedFeedForward(config, config.heavy_d_ff)
        self.router = CoLT5Router(config, config.feed_forward_fraction if num_tokens is None else num_tokens)

    def forward(self, hidden_states, mask, num_tokens=None):
        # hidden_states: (b, n, d) normalised; mask: (b, n) bool
        routing = self.router(hidden_states, mask, num_tokens)
        indices, weights = routing.indices[:, 0], routing.weights[:, 0]  # (b, m)
        routed = gather_tokens(hidden_states, indices)  # (b, m, d)
        heavy = self.heavy_feed_forward(routed) * weights[..., None].to(hidden_states.dtype)  # (b, m, d)
        return RoutedSum(self.light_feed_forward(hidden_states), heavy, indices)


class CoLT5LocalAttention(nn.Module):
    """Light branch: every token attends to the tokens within `local_radius` of it, with T5 relative position bias.

    The sequence is cut into blocks of radius + 1 tokens; each block's queries attend to its own and its two
    neighbouring blocks (3 * block keys), masked to the band |i - j| <= radius and to real keys.
    """

    def __init__(self, config: CoLT5Config):
        super().__init__()
        self.config = config
        self.num_heads = config.num_light_heads
        inner = self.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)

    def forward(self, hidden_states, mask, bias_table):
        # hidden_states: (b, n, d) normalised; mask: (b, n) bool; bias_table: (h, 2 * radius + 1) for offsets -r..r
        b, n, _ = hidden_states.shape
        dropout = self.config.dropout_rate if self.training else 0.0
        use_flex = (
            self.config._attn_implementation == "flex_attention" and flex_local_attention is not None
            and hidden_states.is_cuda
        )
        if use_flex and not dropout:  # flex attention has no dropout and no CPU backward
            def heads(t):  # (b, n, h * d) -> (b, h, n, d)
                return t.view(b, n, self.num_heads, -1).transpose(1, 2)

            out = flex_local_attention(
                heads(self.q(hidden_states)), heads(self.k(hidden_states)), heads(self.v(hidden_states)), mask,
                bias_table, self.config.local_radius,
            )
            return self.o(out.transpose(1, 2).reshape(b, n, -1))

        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, _ = attention(self, *self.blocks(hidden_states, mask, bias_table), dropout=dropout)
        return self.output(out, n)

    def blocks(self, hidden_states, mask, bias_table):
        """The attention's inputs by blocks: query (b, h, nb, block, d); key and value (b, h, nb, 3 * block, d), each
        block's previous, own and next block; bias (b, h, nb, block, 3 * block), masked to the band and to real keys."""
        b, n, _ = hidden_states.shape
        block = self.config.local_radius + 1
        num_blocks = -(-n // block)
        pad = num_blocks * block - n

        def blocks(t):  # (b, n, h * d) -> (b, h, nb, block, d)
            t = F.pad(t, (0, 0, 0, pad)).view(b, num_blocks, block, self.num_heads, -1)
            return t.permute(0, 3, 1, 2, 4)

        def with_neighbours(t):  # (b, ..., nb, block, x) -> (b, ..., nb, 3 * block, x): previous, own, next block
            t = F.pad(t, (0, 0, 0, 0, 1, 1))
            return torch.cat([t[..., :-2, :, :], t[..., 1:-1, :, :], t[..., 2:, :, :]], dim=-2)

        query = blocks(self.q(hidden_states))
        key = with_neighbours(blocks(self.k(hidden_states)))
        value = with_neighbours(blocks(self.v(hidden_states)))
        key_mask = with_neighbours(F.pad(mask, (0, pad)).view(b, num_blocks, block, 1))[..., 0]  # (b, nb, 3 * block)

        offset = torch.arange(3 * block, device=mask.device) - block - torch.arange(block, device=mask.device)[:, None]
        in_band = offset.abs() <= self.config.local_radius  # (block, 3 * block)
        bias = bias_table[:, (offset + self.config.local_radius).clamp(0, 2 * self.config.local_radius)]
        keep = in_band & key_mask[:, None, :, None, :]  # (b, 1, nb, block, 3 * block)
        bias = bias[None, :, None].to(query.dtype).masked_fill(~keep, mask_value(query.dtype))
        return query, key, value, bias

    def output(self, out, n):
        """(b, h, nb, block, d) attention output by blocks -> (b, n, d_model)."""
        b, _, num_blocks, block, _ = out.shape
        return self.o(out.permute(0, 2, 3, 1, 4).reshape(b, num_blocks * block, -1)[:, :n])

    def weights_layout(self, n, device):
        """Where the probabilities by blocks, (b, h, nb, block, 3 * block), lie among the weights over the sequence,
        (b, h, n, n): block i's row r at row block * i + r, its key slot c at column block * (i - 1) + c. Positions
        outside the sequence (the last block's padding, the neighbours of the first and the last block) are not
        kept."""
        block = self.config.local_radius + 1
        num_blocks = -(-n // block)
        rows = torch.arange(num_blocks * block, device=device).view(num_blocks, block, 1)
        columns = torch.arange(num_blocks, device=device)[:, None] * block + torch.arange(3 * block, device=device)
        columns = (columns - block)[:, None, :]  # (nb, 1, 3 * block)
        return WeightsLayout(rows, columns, (rows < n) & (columns >= 0) & (columns < n), n, n)


class CoLT5HeavyAttention(nn.Module):
    """Heavy branch: full attention of the routed queries over the routed keys/values, with relative position bias
    from the tokens' original positions. K and V are projections of s_kv * X; the output is scaled by s_q. Under
    attn_implementation="flex_attention" on CUDA (without dropout) the bias is computed inside the attention kernel
    (`heavy_flex_attention`); elsewhere it is built as a (b, h, m, m_kv) tensor (`position_bias`)."""

    def __init__(self, config: CoLT5Config):
        super().__init__()
        self.config = config
        self.num_heads = config.num_heavy_heads
        inner = self.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)

    def forward(self, hidden_states, q_routing, kv_routing, bias_weight):
        # hidden_states: (b, n, d) normalised; routings: one route each; bias_weight: (buckets, h)
        query, key, value = self.heads(hidden_states, q_routing, kv_routing)
        weight = bias_weight.to(hidden_states.dtype)
        dropout = self.config.dropout_rate if self.training else 0.0
        use_flex = (
            self.config._attn_implementation == "flex_attention" and heavy_flex_attention is not None
            and query.device.type in HEAVY_FLEX_DEVICES and not dropout  # flex attention has no dropout
            # inlined into a caller's compiled graph, inductor's lowering of this score modification (bf16, head dim
            # 64) errs several times more than eager's rounding, so a compiled caller builds the bias instead
            and not torch.compiler.is_compiling()
        )
        # the bias table's gradient from its own kernel, the attention run without one (see HeavyBiasGradient)
        bias_gradient_kernel = HeavyBiasGradient is not None and HeavyBiasGradient.supports(
            query, weight, dropout, use_flex or fused_attention(self.config._attn_implementation, query.shape[-2]))
        attention_weight = weight.detach() if bias_gradient_kernel else weight
        q_positions, kv_positions, kv_valid = q_routing.indices[:, 0], kv_routing.indices[:, 0], kv_routing.valid[:, 0]
        if bias_gradient_kernel or use_flex:
            offset_bucket = offset_buckets(  # offsets beyond +-reach share the bucket at its end
                self.config.relative_attention_num_buckets, self.config.relative_attention_max_distance, query.device
            )

        if use_flex:  # the bias computed inside the kernel: nothing of shape (b, h, m, m_kv) is written
            out = heavy_flex_attention(  # each sample's valid key slots come first
                query, key, value, q_positions, kv_positions, kv_valid.sum(-1), attention_weight, offset_bucket
            )
        else:
            bias = self.position_bias(q_routing, kv_routing, attention_weight)
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
            out, _ = attention(self, query, key, value, bias, dropout=dropout)
        if bias_gradient_kernel:
            out = HeavyBiasGradient.apply(
                out, query, key, value, q_positions, kv_positions, kv_valid, weight, offset_bucket
            )
        return self.output(out, q_routing)  # (b, m, d), row j for position q_routing.indices[:, 0, j]

    def heads(self, hidden_states, q_routing, kv_routing):
        """query (b, h, m, d) of the routed queries; key and value (b, h, m_kv, d) of the routed keys/values, scaled by
        their router weights."""
        b = hidden_states.shape[0]
        routed_q = gather_tokens(hidden_states, q_routing.indices[:, 0])
        routed_kv = gather_tokens(hidden_states, kv_routing.indices[:, 0])
        routed_kv = routed_kv * kv_routing.weights[:, 0, :, None].to(hidden_states.dtype)

        def heads(t):  # (b, m, h * d) -> (b, h, m, d)
            return t.view(b, t.shape[1], self.num_heads, -1).transpose(1, 2)

        return heads(self.q(routed_q)), heads(self.k(routed_kv)), heads(self.v(routed_kv))

    def position_bias(self, q_routing, kv_routing, weight):
        """(b, h, m, m_kv): the relative position bias of the routed tokens' original positions, read from `weight`
        (buckets, h), and `mask_value` at invalid keys."""
        q_index, kv_index = q_routing.indices[:, 0], kv_routing.indices[:, 0]  # (b, m), (b, m_kv)
        num_buckets = self.config.relative_attention_num_buckets
        bucket = relative_position_bucket(
            kv_index.int()[:, None, :] - q_index.int()[:, :, None],  # positions fit int32
            bidirectional=True,
            num_buckets=num_buckets,
            max_distance=self.config.relative_attention_max_distance,
        )  # (b, m, m_kv) int32
        bucket = bucket.masked_fill(~kv_routing.valid[:, 0, None, :], num_buckets)  # invalid keys: the table's last row
        mask_row = weight.new_full((1, self.num_heads), mask_value(weight.dtype))
        table = torch.cat([weight, mask_row])  # (buckets + 1, h)
        return bucket_bias(bucket, table).transpose(0, 1)  # (h, b, m, m_kv) gathered -> (b, h, m, m_kv)

    def output(self, out, q_routing):
        """(b, h, m, d) attention output -> (b, m, d_model), scaled by the query router's weights."""
        b, _, m, _ = out.shape
        out = self.o(out.transpose(1, 2).reshape(b, m, self.num_heads * self.config.d_kv))
        return out * q_routing.weights[:, 0, :, None].to(out.dtype)

    def weights_layout(self, q_routing, kv_routing, n):
        """Where the routed probabilities, (b, h, m, m_kv), lie among the weights over the sequence, (b, h, n, n): at
        the rows of the routed queries and the columns of the routed keys. Invalid slots are not kept."""
        q_index, kv_index = q_routing.indices[:, 0, None, :, None], kv_routing.indices[:, 0, None, None, :]
        kept = q_routing.valid[:, 0, None, :, None] & kv_routing.valid[:, 0, None, None, :]
        return WeightsLayout(q_index, kv_index, kept, n, n)


class CoLT5RoutedSelfAttention(nn.Module):
    """A_light(X) + s_q * A_heavy(X_q, s_kv * X_kv): local attention for every token plus full attention among the
    tokens picked by two routers, as a `RoutedSum`. The routers take `num_tokens`, a pair (queries, keys/values)
    (default `config.attention_q_fraction` and `config.attention_kv_fraction`; see CoLT5Router), which a call may
    override."""

    def __init__(self, config: CoLT5Config, num_tokens=None):
        super().__init__()
        self.config = config
        self.light_attention = CoLT5LocalAttention(config)
        self.heavy_attention = CoLT5HeavyAttention(config)
        if num_tokens is None:
            num_tokens = (config.attention_q_fraction, config.attention_kv_fraction)
        self.q_router = CoLT5Router(config, num_tokens[0])
        self.kv_router = CoLT5Router(config, num_tokens[1])

    def forward(self, hidden_states, mask, light_bias_table, heavy_bias_weight, output_attentions=False,
                num_tokens=None):
        # hidden_states: (b, n, d) normalised; mask: (b, n) bool; the bias tables of `branch_bias_tables`;
        # num_tokens: None, or this call's (queries, keys/values) counts, either None for the router's own
        if output_attentions:
            return self.forward_with_weights(hidden_states, mask, light_bias_table, heavy_bias_weight, num_tokens)
        light = self.light_attention(hidden_states, mask, light_bias_table)
        q_routing, kv_routing = route_together([self.q_router, self.kv_router], hidden_states, mask, num_tokens)
        heavy = self.heavy_attention(hidden_states, q_routing, kv_routing, heavy_bias_weight)
        return RoutedSum(light, heavy, q_routing.indices[:, 0]), None

    def forward_with_weights(self, hidden_states, mask, light_bias_table, heavy_bias_weight, num_tokens=None):
        """`forward` computed eagerly, with the attention weights over the sequence, (b, light + heavy heads, n, n):
        the light heads' band, and the heavy heads' weights at the rows of the routed queries and the columns of the
        routed keys, 0 elsewhere. Both branches' outputs are computed from these weights (read back from them), so
        that they take the gradient of the outputs as the weights of built-in eager attention do."""
        light, heavy = self.light_attention, self.heavy_attention
        n = hidden_states.shape[1]
        dropout = self.config.dropout_rate if self.training else 0.0
        light_query, light_key, light_value, light_bias = light.blocks(hidden_states, mask, light_bias_table)
        light_probs = attention_probabilities(light_query, light_key, light_bias)  # (b, h, nb, block, 3 * block)
        q_routing, kv_routing = route_together([self.q_router, self.kv_router], hidden_states, mask, num_tokens)
        heavy_query, heavy_key, heavy_value = heavy.heads(hidden_states, q_routing, kv_routing)
        heavy_bias = heavy.position_bias(q_routing, kv_routing, heavy_bias_weight.to(hidden_states.dtype))
        heavy_probs = attention_probabilities(heavy_query, heavy_key, heavy_bias)  # (b, h, m, m_kv)

        light_layout = light.weights_layout(n, hidden_states.device)
        heavy_layout = heavy.weights_layout(q_routing, kv_routing, n)
        weights = torch.cat([light_layout.spread(light_probs), heavy_layout.spread(heavy_probs)], dim=1)
        light_weights, heavy_weights = weights.split([light.num_heads, heavy.num_heads], dim=1)
        light_probs = light_layout.collect(light_weights, light_probs)
        heavy_probs = heavy_layout.collect(heavy_weights, heavy_probs)
        light_out = light.output(torch.matmul(F.dropout(light_probs, p=dropout), light_value), n)
        heavy_out = heavy.output(torch.matmul(F.dropout(heavy_probs, p=dropout), heavy_value), q_routing)
        return RoutedSum(light_out, heavy_out, q_routing.indices[:, 0]), weights


class CoLT5EncoderBlock(GradientCheckpointingLayer):
    def __init__(self, config: CoLT5Config):
        super().__init__()
        self.attention_layer_norm = CoLT5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.attention = CoLT5RoutedSelfAttention(config)
        self.feed_forward_layer_norm = CoLT5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.feed_forward = CoLT5RoutedFeedForward(config)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, hidden_states, mask, light_bias_table, heavy_bias_weight, output_attentions=False,
                compile_mode=None):
        # compile_mode: None (eager) or the torch.compile mode the layer runs under (`fast_path.encoder_compile_mode`)
        if compile_mode is not None:
            layer = compiled_layer(CoLT5EncoderBlock.layer, compile_mode)
            return layer(self, hidden_states, mask, light_bias_table, heavy_bias_weight)
        return self.layer(hidden_states, mask, light_bias_table, heavy_bias_weight, output_attentions)

    def layer(self, hidden_states, mask, light_bias_table, heavy_bias_weight, output_attentions=False):
        attention, weights = self.attention(
            self.attention_layer_norm(hidden_states),
            mask,
            light_bias_table,
            heavy_bias_weight,
            output_attentions,
        )
        dropout = self.dropout.p if self.training else 0.0
        hidden_states = clamp_fp16(attention.add_to(hidden_states, dropout))
        feed_forward = self.feed_forward(self.feed_forward_layer_norm(hidden_states), mask)
        hidden_states = clamp_fp16(feed_forward.add_to(hidden_states, dropout))
        return hidden_states, weights


class CoLT5SelfAttention(nn.Module):
    """Decoder causal self-attention (T5), with its keys/values in the self-attention cache."""

    def __init__(self, config: CoLT5Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        inner = config.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)

    def forward(self, hidden_states, bias, cache, output_attentions=False):
        # hidden_states: (b, t, d); bias: (b or 1, h, t, keys), keys: past + t, or a static cache's length
        b, t, _ = hidden_states.shape

        def heads(x):
            return x.view(b, t, self.config.num_heads, -1).transpose(1, 2)

        query, key, value = heads(self.q(hidden_states)), heads(self.k(hidden_states)), heads(self.v(hidden_states))
        if cache is not None:
            key, value = cache.self_attention_cache.update(key, value, self.layer_idx)
        dropout = self.config.dropout_rate if self.training else 0.0
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        if output_attentions:  # only the eager computation has the weights
            attention = eager_attention_forward
        out, weights = attention(self, query, key, value, bias, dropout=dropout)  # weights: (b, h, t, keys) or None
        return self.o(out.transpose(1, 2).reshape(b, t, -1)), weights


class CoLT5CrossAttention(nn.Module):
    """Multi-route cross-attention. The decoder's query heads are split evenly among R routes; route r attends to its
    own subset of encoder tokens (picked by the r-th routing vector of `kv_router`, or all tokens when
    `cross_attention_fraction` is 1) through `num_cross_attention_kv_heads` key/value heads (1: multi-query).
    Routed keys/values are computed once per encoder output and kept in the cross-attention cache."""

    def __init__(self, config: CoLT5Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_routes = config.num_cross_attention_routes
        self.num_kv_heads = config.num_cross_attention_routes * config.num_cross_attention_kv_heads
        self.q = nn.Linear(config.d_model, config.num_heads * config.d_kv, bias=False)
        self.k = nn.Linear(config.d_model, self.num_kv_heads * config.d_kv, bias=False)
        self.v = nn.Linear(config.d_model, self.num_kv_heads * config.d_kv, bias=False)
        self.o = nn.Linear(config.num_heads * config.d_kv, config.d_model, bias=False)
        self.kv_router = (
            CoLT5Router(config, config.cross_attention_fraction, self.num_routes)
            if config.cross_attention_fraction < 1
            else None
        )

    def route(self, encoder_hidden_states, encoder_mask):
        """The encoder tokens of each route (a `RouterOutput`, (b, routes, k)); None without a router (every token)."""
        return None if self.kv_router is None else self.kv_router(encoder_hidden_states, encoder_mask)

    def key_values(self, encoder_hidden_states, routing):
        """Keys and values, (b, routes * kv_heads, k, d_kv) each: per route, its own heads at the routed encoder
        tokens of `routing` (valid slots first), scaled by the router weights; without a router, every encoder
        position."""
        b, n, _ = encoder_hidden_states.shape
        # projecting every position once, then gathering, equals projecting the router-scaled tokens (no bias) and
        # goes through the modules, so PEFT adapters and accelerate offload hooks apply
        key, value = self.k(encoder_hidden_states), self.v(encoder_hidden_states)  # (b, n, kv_heads * d_kv)
        if routing is None:
            return (t.view(b, n, self.num_kv_heads, -1).transpose(1, 2) for t in (key, value))
        # (b, n, r * kv_heads * d_kv) -> (b, r * kv_heads, k, d_kv)
        return (gather_route_heads(t, routing, self.config.d_kv).flatten(1, 2) for t in (key, value))

    def key_mask(self, encoder_mask, key_length):
        """(b, key_length) bool: which key slots hold (routed) encoder tokens, the same for every route. Derived from
        the encoder mask alone (each route's valid slots come first), so generation need not cache it."""
        if self.kv_router is None:
            return encoder_mask
        count = self.config.routed_count(self.config.cross_attention_fraction, encoder_mask.sum(-1))
        return torch.arange(key_length, device=encoder_mask.device) < count[:, None]

    def key_length(self, encoder_length: int) -> int:
        """Key slots computed from `encoder_length` encoder positions: the routed count of the full length."""
        if self.kv_router is None:
            return encoder_length
        return self.config.routed_count(self.config.cross_attention_fraction, encoder_length)

    def key_bias(self, encoder_mask, dtype):
        """(b, 1, 1, k): 0 at the key slots holding encoder tokens, `mask_value` at the others."""
        keep = self.key_mask(encoder_mask, self.key_length(encoder_mask.shape[-1]))[:, None, None, :]
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, mask_value(dtype))

    def weights_layout(self, routing, length, encoder_length):
        """Where the probabilities of the routed key slots, (b, heads, length, k), lie among the weights over the
        encoder's positions, (b, heads, length, encoder_length): a head's slot j at the position of its route's j-th
        token. Invalid slots are not kept."""
        heads_per_route = self.config.num_heads // self.num_routes  # a route's query heads are consecutive
        positions, valid = (
            t.repeat_interleave(heads_per_route, dim=1)[:, :, None, :] for t in (routing.indices, routing.valid)
        )  # (b, heads, 1, k)
        rows = torch.arange(length, device=positions.device)[:, None]
        return WeightsLayout(rows, positions, valid, length, encoder_length)

    def query_heads(self, hidden_states):
        """(b, t, d_model) -> queries (b, kv_heads, group * t, d_kv): the query heads sharing a key/value head are
        consecutive, and are folded into the query length instead of copying keys and values to every head (the bias
        does not depend on the query)."""
        b, t, _ = hidden_states.shape
        query = self.q(hidden_states).view(b, t, self.config.num_heads, -1).transpose(1, 2)  # (b, h, t, d_kv)
        return query.reshape(b, self.num_kv_heads, -1, self.config.d_kv)

    def output(self, out, t):
        """(b, kv_heads, group * t, d_kv) attention output of `query_heads` -> (b, t, d_model)."""
        b = out.shape[0]
        return self.o(out.reshape(b, self.config.num_heads, t, -1).transpose(1, 2).reshape(b, t, -1))

    def forward(self, hidden_states, encoder_hidden_states, encoder_mask, cache, key_bias=None,
                output_attentions=False):
        # hidden_states: (b, t, d); encoder_hidden_states: (b, n, d); encoder_mask: (b, n) bool; key_bias: this
        # module's `key_bias`, built once by the decoder for every layer (built here when not given)
        t = hidden_states.shape[1]
        query = self.query_heads(hidden_states)  # (b, kv_heads, group * t, d_kv)
        routing = None
        if cache is not None and cache.is_updated.get(self.layer_idx):
            layer = cache.cross_attention_cache.layers[self.layer_idx]
            key, value = layer.keys, layer.values
        else:
            routing = self.route(encoder_hidden_states, encoder_mask)
            key, value = self.key_values(encoder_hidden_states, routing)
            if cache is not None:
                key, value = cache.cross_attention_cache.update(key, value, self.layer_idx)
                cache.is_updated[self.layer_idx] = True
        # a static cache holds a slot per encoder position; only the first k were written
        k = self.key_length(encoder_mask.shape[-1])
        key, value = key[:, :, :k], value[:, :, :k]  # (b, kv_heads, k, d_kv)
        if key_bias is None or key_bias.dtype != query.dtype:  # under autocast the queries' dtype is autocast's
            key_bias = self.key_bias(encoder_mask, query.dtype)
        dropout = self.config.dropout_rate if self.training else 0.0
        weights = None
        if output_attentions:
            out, weights = self.attention_with_weights(
                query, key, value, key_bias, dropout, routing, encoder_hidden_states, encoder_mask
            )
        else:
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
            out, _ = attention(self, query, key, value, key_bias, dropout=dropout)
        return self.output(out, t), weights

    def attention_with_weights(self, query, key, value, key_bias, dropout, routing, encoder_hidden_states,
                               encoder_mask):
        """The eager attention of folded queries (b, kv_heads, group * t, d_kv) over the key slots, with its weights
        over the encoder's positions, (b, heads, t, n), from which the output is computed (read back from them).
        `routing`: the routes of this call, None where the keys come from the cache."""
        b, kv_heads, folded, _ = query.shape
        heads, t = self.config.num_heads, folded * kv_heads // self.config.num_heads
        probs = attention_probabilities(query, key, key_bias).view(b, heads, t, key.shape[-2])
        if self.kv_router is None:
            weights = probs
        else:
            if routing is None:  # a cached step: the routes' tokens are chosen again, the same outside training
                if self.training and draws_at_random(self.config):
                    raise ValueError(
                        "output_attentions=True with cached cross-attention keys needs the routes' positions, which "
                        "routers with training noise (`router_noise`, sinkhorn's own) or `router_exploration` draw "
                        "at random in training: call model.eval() or decode without a cache"
                    )
                routing = self.route(encoder_hidden_states, encoder_mask)
            layout = self.weights_layout(routing, t, encoder_mask.shape[-1])
            weights = layout.spread(probs)
            probs = layout.collect(weights, probs)
        out = torch.matmul(F.dropout(probs.view(b, kv_heads, folded, -1), p=dropout), value)
        return out, weights


class CoLT5DecoderBlock(GradientCheckpointingLayer):
    def __init__(self, config: CoLT5Config, layer_idx: int):
        super().__init__()
        self.self_attention_layer_norm = CoLT5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.self_attention = CoLT5SelfAttention(config, layer_idx)
        self.cross_attention_layer_norm = CoLT5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.cross_attention = CoLT5CrossAttention(config, layer_idx)
        self.feed_forward_layer_norm = CoLT5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.feed_forward = CoLT5GatedFeedForward(config, config.d_ff)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, hidden_states, self_attention_bias, encoder_hidden_states, encoder_mask, cache=None,
                cross_attention_bias=None, output_attentions=False, compile_mode=None):
        # compile_mode: None (eager) or the torch.compile mode the layer runs under, in a call without a cache
        if compile_mode is not None:
            layer = compiled_layer(CoLT5DecoderBlock.layer, compile_mode)
            return layer(self, hidden_states, self_attention_bias, encoder_hidden_states, encoder_mask, None,
                         cross_attention_bias)
        return self.layer(hidden_states, self_attention_bias, encoder_hidden_states, encoder_mask, cache,
                          cross_attention_bias, output_attentions)

    def layer(self, hidden_states, self_attention_bias, encoder_hidden_states, encoder_mask, cache=None,
              cross_attention_bias=None, output_attentions=False):
        attention, self_weights = self.self_attention(
            self.self_attention_layer_norm(hidden_states), self_attention_bias, cache, output_attentions
        )
        hidden_states = clamp_fp16(hidden_states + self.dropout(attention))
        attention, cross_weights = self.cross_attention(
            self.cross_attention_layer_norm(hidden_states), encoder_hidden_states, encoder_mask, cache,
            cross_attention_bias, output_attentions,
        )
        hidden_states = clamp_fp16(hidden_states + self.dropout(attention))
        feed_forward = self.feed_forward(self.feed_forward_layer_norm(hidden_states))
        hidden_states = clamp_fp16(hidden_states + self.dropout(feed_forward))
        return hidden_states, self_weights, cross_weights


def input_embeddings(embedding, input_ids, inputs_embeds, name="input_ids"):
    embeds_name = name.replace("input_ids", "inputs_embeds")
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError(f"Pass exactly one of `{name}` and `{embeds_name}`")
    given, shape = (name, "(batch, length)") if inputs_embeds is None else (embeds_name, "(batch, length, d_model)")
    tensor = input_ids if inputs_embeds is None else inputs_embeds
    if tensor.ndim != shape.count(",") + 1 or tensor.shape[0] == 0:
        raise ValueError(f"`{given}` has shape {tuple(tensor.shape)}: pass {shape}, with at least one sequence (a "
                         "single sequence x as x[None])")
    return embedding(input_ids) if inputs_embeds is None else inputs_embeds


class CoLT5Encoder(nn.Module):
    """The token embedding (shared with the decoder) and the stack of encoder blocks. One relative position bias
    table serves every layer (as in T5): its first `num_light_heads` columns bias the light attention, the others
    the heavy attention."""

    main_input_name = "input_ids"

    def __init__(self, config: CoLT5Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.relative_attention_bias = nn.Embedding(
            config.relative_attention_num_buckets, config.num_light_heads + config.num_heavy_heads
        )
        self.bias_rows = nn.Buffer(bias_table_rows(config), persistent=False)
        self.block = nn.ModuleList([CoLT5EncoderBlock(config) for _ in range(config.num_layers)])
        self.final_layer_norm = CoLT5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.compile_report = CompileReport("encoder")

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_attentions=None,
                output_hidden_states=None, **kwargs):
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        inputs_embeds = input_embeddings(self.embed_tokens, input_ids, inputs_embeds)
        b, n, _ = inputs_embeds.shape
        if n == 0:
            raise ValueError("CoLT5 got an empty input: the encoder needs at least one token per sequence")
        if config.max_input_length is not None and n > config.max_input_length:
            raise ValueError(
                f"CoLT5 got an input of {n} tokens (padded length), more than the model's `max_input_length` "
                f"({config.max_input_length})"
            )
        if output_attentions:
            warn_weights_from_eager(config)
        mask = check_mask(attention_mask, (b, n), "attention_mask", inputs_embeds.device)
        light_bias_table, heavy_bias_weight = branch_bias_tables(config, self.relative_attention_bias, self.bias_rows)

        hidden_states = self.dropout(inputs_embeds)
        checkpointing = self.training and any(block.gradient_checkpointing for block in self.block)
        compile_mode = encoder_compile_mode(config, hidden_states, output_attentions, checkpointing)
        if compile_mode is not None:  # padded to its length bucket: one compilation serves every length in it
            hidden_states, mask = pad_to_bucket(hidden_states), pad_to_bucket(mask, value=False)
            before_compiled_blocks(compile_mode, self.block, begins_step=True)

        # Collected here rather than by Transformers' output recorders (`_can_record_outputs`, hooks on the layers'
        # outputs): the routed attention's weights over the sequence come from its own eager path, which the layer
        # must be asked for before it runs, and a compiled layer returns its length bucket's padded rows, which under
        # CUDA graphs the next replay overwrites. The decoder collects its own the same way.
        all_hidden_states, all_attentions = (), ()
        with self.compile_report.blocks(compile_mode, hidden_states, self.training):
            for block in self.block:
                if output_hidden_states:
                    # compiled: a copy of the real tokens' rows (a CUDA graph's output is overwritten by its next
                    # replay)
                    all_hidden_states += (hidden_states if compile_mode is None else hidden_states[:, :n].clone(),)
                hidden_states, weights = block(
                    hidden_states, mask, light_bias_table, heavy_bias_weight, output_attentions,
                    compile_mode=compile_mode,
                )
                if output_attentions:
                    all_attentions += (weights,)
        hidden_states = self.dropout(self.final_layer_norm(hidden_states[:, :n]))
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return BaseModelOutput(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states if output_hidden_states else None,
            attentions=all_attentions if output_attentions else None,
        )


class CoLT5Decoder(nn.Module):
    def __init__(self, config: CoLT5Config):
        super().__init__()
        self.config = config
        self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)
        self.block = nn.ModuleList([CoLT5DecoderBlock(config, i) for i in range(config.num_decoder_layers)])
        self.final_layer_norm = CoLT5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.compile_report = CompileReport("decoder")

    def self_attention_bias(self, past_length, length, key_length, attention_mask, dtype, device):
        """(b or 1, h, length, key_length): relative position bias, causal mask and decoder padding mask.

        `past_length` is an int, or with a static cache a 0-dim tensor (read without a host sync, so that a decoding
        step compiles into one graph). A dynamic cache returns `past_length + length` keys; a static cache all its
        `key_length` slots, of which those not yet written lie in the future of every query and are masked as such.
        """
        query_position = torch.arange(length, device=device)[:, None] + past_length
        relative = torch.arange(key_length, device=device)[None, :] - query_position  # (t, keys): key - query
        bucket = relative_position_bucket(
            relative, False, self.config.relative_attention_num_buckets, self.config.relative_attention_max_distance
        )
        bias = self.relative_attention_bias(bucket).permute(2, 0, 1)[None].to(dtype)  # (1, h, t, keys)
        keep = (relative <= 0)[None, None]
        if attention_mask is not None:
            if attention_mask.ndim != 2:
                raise ValueError(
                    f"`decoder_attention_mask` has shape {tuple(attention_mask.shape)}: pass a (batch, length) mask of "
                    "1 for real tokens and 0 for padding (the decoder builds its causal mask itself)"
                )
            # generate grows the mask by one position per step (past + t); a static cache's full length is accepted too
            covered = attention_mask.shape[-1]
            if isinstance(past_length, int):
                fits = covered in (past_length + length, key_length)
            else:  # a static cache's length is a tensor: reading it would sync the host
                fits = length <= covered <= key_length
            if not fits:
                cached = past_length if isinstance(past_length, int) else "the cached"
                raise ValueError(
                    f"`decoder_attention_mask` covers {covered} positions: pass one for {cached} + {length} new "
                    f"positions, or for all {key_length} slots of the cache"
                )
            # positions past the mask are the unwritten slots of a static cache, in every query's future
            mask = F.pad(attention_mask.bool(), (0, key_length - covered), value=True)
            keep = keep & mask.to(device)[:, None, None, :]
        return bias.masked_fill(~keep, mask_value(dtype))

    def forward(self, inputs_embeds, attention_mask, encoder_hidden_states, encoder_attention_mask, cache=None,
                output_attentions=False, output_hidden_states=False, compile_mode=None):
        # compile_mode: None (eager) or the torch.compile mode of the layers, for a call without a cache in a step that
        # the encoder's compiled call began (`encode_decode`)
        b, t, _ = inputs_embeds.shape
        if t == 0:
            raise ValueError("CoLT5 got empty decoder inputs: the decoder needs at least one token per sequence")
        if output_attentions:
            warn_weights_from_eager(self.config)
        encoder_mask = check_mask(
            encoder_attention_mask, encoder_hidden_states.shape[:2], "attention_mask", inputs_embeds.device
        )
        past_length, key_length = 0, t
        if cache is not None:
            # a tensor for a static cache; read before any layer writes the cache, which moves it forward in place
            past_length = cache.self_attention_cache.get_seq_length()
            max_length = cache.self_attention_cache.get_max_length(0)
            key_length = max_length if max_length >= 0 else past_length + t
        bias = self.self_attention_bias(
            past_length, t, key_length, attention_mask, inputs_embeds.dtype, inputs_embeds.device
        )
        hidden_states = self.dropout(inputs_embeds)
        if compile_mode is not None:
            # the target padded at the end to its target bucket (causal: the padding lies in every real position's
            # future; the bias masks its rows and columns), the encoder's output to its length bucket (masked keys,
            # and the cross-attention's routers count the real tokens): one compilation serves every pair of lengths
            # in the buckets
            length = target_bucket(t)
            bias = F.pad(bias, (0, length - t, 0, length - t), value=mask_value(bias.dtype))
            hidden_states = pad_to_bucket(hidden_states, bucket=target_bucket)
            encoder_hidden_states = pad_to_bucket(encoder_hidden_states)
            encoder_mask = pad_to_bucket(encoder_mask, value=False)
            before_compiled_blocks(compile_mode, self.block, begins_step=False)
        cross_attention_bias = self.block[0].cross_attention.key_bias(encoder_mask, inputs_embeds.dtype)  # all layers

        all_hidden_states, all_self_attentions, all_cross_attentions = (), (), ()
        with self.compile_report.blocks(compile_mode, hidden_states, self.training, encoder_hidden_states):
            for block in self.block:
                if output_hidden_states:
                    # compiled: a copy of the real positions' rows (a CUDA graph's output is overwritten by its next
                    # replay)
                    all_hidden_states += (hidden_states if compile_mode is None else hidden_states[:, :t].clone(),)
                hidden_states, self_weights, cross_weights = block(
                    hidden_states, bias, encoder_hidden_states, encoder_mask, cache=cache,
                    cross_attention_bias=cross_attention_bias, output_attentions=output_attentions,
                    compile_mode=compile_mode,
                )
                all_self_attentions += (self_weights,)
                all_cross_attentions += (cross_weights,)
        hidden_states = self.dropout(self.final_layer_norm(hidden_states[:, :t]))
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states if output_hidden_states else None,
            attentions=all_self_attentions if output_attentions else None,
            cross_attentions=all_cross_attentions if output_attentions else None,
            **{CACHE_FIELD: cache},
        )


class CoLT5PreTrainedModel(PreTrainedModel):
    config_class = CoLT5Config
    config: CoLT5Config
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CoLT5EncoderBlock", "CoLT5DecoderBlock"]
    # T5's: loaded in float16, the feed-forward output projections stay float32 (`CoLT5GatedFeedForward` casts their
    # input), where T5.1.1's activations would overflow
    _keep_in_fp32_modules = ["wo"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = True

    def get_correct_attn_implementation(self, requested_attention, is_init_check=False):
        # Transformers accepts any registered implementation; CoLT5's attention functions serve three
        return check_implementation(super().get_correct_attn_implementation(requested_attention, is_init_check))

    def _initialize_weights(self, module, is_custom_code: bool = False):
        # For custom code, Transformers skips every module without parameters of its own (attention, feed-forward,
        # encoder, decoder, the LM model), so `_init_weights` would never reach the layers it initialises from their
        # parent. Ours writes only through `transformers.initialization`, which leaves loaded tensors alone: run it
        # on every module.
        super()._initialize_weights(module)

    def _init_weights(self, module):
        """T5.1.1's initialisation, extended to the CoLT5 branches and routers; the untied LM head as in T5X (fan-in)."""
        factor = self.config.initializer_factor
        d_model, d_kv = self.config.d_model, self.config.d_kv
        if isinstance(module, CoLT5LayerNorm):
            init.constant_(module.weight, factor)
        elif isinstance(module, CoLT5ForConditionalGeneration) and not self.config.tie_word_embeddings:
            # T5X's fan-in scaling: the decoder's RMS-normalised outputs give logits of about unit scale, so training
            # from scratch starts at a loss of about ln(vocab_size). Transformers' T5 draws std 1.0, logits of scale
            # sqrt(d_model) (a loss of 25 for the tiny preset), which slows early training. Checkpoints and conversion
            # load the head, so they are unaffected.
            init.normal_(module.lm_head.weight, mean=0.0, std=factor * d_model**-0.5)
        elif isinstance(module, CoLT5GatedFeedForward):
            init.normal_(module.wi_0.weight, mean=0.0, std=factor * d_model**-0.5)
            init.normal_(module.wi_1.weight, mean=0.0, std=factor * d_model**-0.5)
            init.normal_(module.wo.weight, mean=0.0, std=factor * module.wo.in_features**-0.5)
        elif isinstance(module, (CoLT5LocalAttention, CoLT5HeavyAttention, CoLT5SelfAttention, CoLT5CrossAttention)):
            heavy = self.config.heavy_output_init if isinstance(module, CoLT5HeavyAttention) else 1.0
            init.normal_(module.q.weight, mean=0.0, std=factor * (d_model * d_kv) ** -0.5)
            init.normal_(module.k.weight, mean=0.0, std=factor * d_model**-0.5)
            init.normal_(module.v.weight, mean=0.0, std=factor * d_model**-0.5)
            init.normal_(module.o.weight, mean=0.0, std=heavy * factor * module.o.in_features**-0.5)
        elif isinstance(module, CoLT5RoutedFeedForward) and self.config.heavy_output_init != 1.0:
            # after its feed-forwards (children first): scaled in place, drawing no random numbers of its own
            output = module.heavy_feed_forward.wo.weight
            if not getattr(output, "_is_hf_initialized", False):
                output.mul_(self.config.heavy_output_init)
        elif isinstance(module, (CoLT5Encoder, CoLT5Decoder)):
            init.normal_(module.relative_attention_bias.weight, mean=0.0, std=factor * d_model**-0.5)
            if isinstance(module, CoLT5Encoder):
                init.normal_(module.embed_tokens.weight, mean=0.0, std=factor)
                init.copy_(module.bias_rows, bias_table_rows(self.config))
        elif isinstance(module, CoLT5Router):
            init.normal_(module.weight, mean=0.0, std=factor * d_model**-0.5)

    def save_pretrained(self, save_directory, is_main_process: bool = True, **kwargs):
        """Also writes a Hub custom-code folder. The classes are registered for auto classes (end of this file), so
        Transformers copies configuration_colt5.py, modeling_colt5.py and the modules they import next to the weights
        and writes `auto_map`, but maps only AutoConfig and the saved class: map every auto class the weights load
        into. FSDP2 swaps in a subclass defined in torch, whose module Transformers would copy as the model's code and
        name in `auto_map`: code and names come from the CoLT5 class. `colt5_hf.save_for_hub` adds a model card."""
        self.config.validate()  # a config made invalid after construction: refused before any file is written
        model_class = next(cls for cls in type(self).__mro__ if cls.__module__ == __name__)
        if model_class.is_remote_code():
            module = __name__.rsplit(".", 1)[-1]
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            if issubclass(model_class, CoLT5EncoderModel):  # no decoder weights
                auto_map.pop("AutoModelForSeq2SeqLM", None)
            else:
                auto_map["AutoModel"] = f"{module}.CoLT5Model"
                auto_map["AutoModelForSeq2SeqLM"] = f"{module}.CoLT5ForConditionalGeneration"
            auto_map[model_class._auto_class] = f"{module}.{model_class.__name__}"
            self.config.auto_map = auto_map
            if type(self) is not model_class:
                type(self)._auto_class = None  # the wrapper class: Transformers copies no code for it
                if is_main_process:
                    os.makedirs(save_directory, exist_ok=True)
                    custom_object_save(model_class, save_directory)
        return super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained` with three guards:

        - weights are read from safetensors files only, never through pickle: `pytorch_model.bin`, GGUF and
          `use_safetensors=False` are refused;
        - a truncated or corrupt safetensors file or shard index is an OSError naming the checkpoint;
        - a checkpoint that holds some weights of a part (encoder, decoder, LM head) but lacks others is an OSError,
          where Transformers would warn and initialise the missing ones at random. A part absent altogether (the LM
          head of a CoLT5Model checkpoint) is initialised as usual.
        """
        source = str(pretrained_model_name_or_path)
        if kwargs.pop("use_safetensors", None) is False or kwargs.get("gguf_file") or (
            os.path.isfile(source) and not source.endswith(".safetensors")
        ):
            raise ValueError("CoLT5 reads weights from safetensors files only, never through pickle or GGUF")
        return_loading_info = kwargs.pop("output_loading_info", False)
        try:
            model, loading_info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, use_safetensors=True, output_loading_info=True, **kwargs
            )
        except (SafetensorError, json.JSONDecodeError) as error:
            raise OSError(f"The safetensors weights of {source} are truncated or corrupt: {error}") from error
        missing = loading_info["missing_keys"]
        loaded_parts = {key.split(".")[0] for key in model.state_dict() if key not in missing}
        incomplete = sorted(key for key in missing if key.split(".")[0] in loaded_parts)
        if incomplete:
            raise OSError(
                f"The checkpoint {source} lacks {len(incomplete)} weights of parts it otherwise holds: "
                f"{', '.join(incomplete[:5])}{', ...' if len(incomplete) > 5 else ''}"
            )
        return (model, loading_info) if return_loading_info else model

    def _shift_right(self, input_ids):
        start, pad = self.config.decoder_start_token_id, self.config.pad_token_id
        if start is None or pad is None:
            raise ValueError("CoLT5Config needs `decoder_start_token_id` and `pad_token_id` to shift labels right")
        shifted = input_ids.new_full(input_ids.shape, start)
        shifted[..., 1:] = input_ids[..., :-1]
        return shifted.masked_fill(shifted == -100, pad)

    def get_input_embeddings(self):
        return self.encoder.embed_tokens  # the encoder owns the token embedding; the decoder shares it

    def set_input_embeddings(self, embeddings):
        self.encoder.embed_tokens = embeddings

    @contextlib.contextmanager
    def record_routing(self):
        """Record which tokens every router picks during the forward passes inside the block:

            with model.record_routing() as routing:
                model(**inputs)
            routing["encoder.block.0.attention.q_router"][0].indices  # (batch, routes, k) token positions

        Yields a dict from router name to the list of `RouterOutput`s of its calls (one per forward of the encoder;
        cross-attention routers run once per encoder output). Use `.valid` to drop the empty slots of short samples.
        """
        routing = {}
        routers = [(name, module) for name, module in self.named_modules() if isinstance(module, CoLT5Router)]
        for name, router in routers:
            router.recorded = routing.setdefault(name, [])
        try:
            yield routing
        finally:
            for name, router in routers:
                router.recorded = None
                if not routing[name]:
                    del routing[name]  # a router that did not run (the decoder's, when only the encoder ran)


class CoLT5EncoderModel(CoLT5PreTrainedModel):
    """The CoLT5 encoder alone: token ids to contextual hidden states. As T5EncoderModel, its config says so
    (`is_encoder_decoder=False`, `use_cache=False`): a copy of the given one, which may be an encoder-decoder's."""

    def __init__(self, config: CoLT5Config):
        config = copy.deepcopy(config)
        config.is_encoder_decoder = False
        config.use_cache = False
        super().__init__(config)
        self.encoder = CoLT5Encoder(config)
        self.post_init()

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_attentions=None,
                output_hidden_states=None, **kwargs):
        return self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )


def check_encoder_decoder(model_class, config):
    if not config.is_encoder_decoder:
        raise ValueError(
            f"{model_class.__name__} is an encoder-decoder, but its config has is_encoder_decoder=False (a "
            "CoLT5EncoderModel's config): load it with CoLT5EncoderModel, or pass is_encoder_decoder=True and "
            "use_cache=True to add a decoder to the encoder"
        )


class CoLT5Model(CoLT5PreTrainedModel):
    """The bare CoLT5 encoder-decoder, returning the decoder's last hidden states."""

    def __init__(self, config: CoLT5Config):
        check_encoder_decoder(type(self), config)
        super().__init__(config)
        self.encoder = CoLT5Encoder(config)
        self.decoder = CoLT5Decoder(config)
        self.post_init()

    @can_return_tuple
    @takes_cache_argument
    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                encoder_outputs=None, cache=None, inputs_embeds=None, decoder_inputs_embeds=None, use_cache=None,
                output_attentions=None, output_hidden_states=None, **kwargs):
        return encode_decode(
            self,
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            cache=cache,
            inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )


def encode_decode(model, *, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, encoder_outputs,
                  cache, inputs_embeds, decoder_inputs_embeds, use_cache, output_attentions, output_hidden_states):
    """Encoder (unless `encoder_outputs` are given), then decoder: the body of CoLT5Model and
    CoLT5ForConditionalGeneration. Without `use_cache`, a forward in training mode decodes without a cache (one would
    be filled only to be dropped), other forwards with one unless `config.use_cache` is False. A forward that runs the
    encoder compiled and decodes without a cache runs the decoder compiled too (`fast_path`)."""
    config = model.config
    output_attentions = config.output_attentions if output_attentions is None else output_attentions
    output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
    encoder_runs = encoder_outputs is None
    if encoder_runs:
        encoder_outputs = model.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
    elif not isinstance(encoder_outputs, BaseModelOutput):
        encoder_outputs = BaseModelOutput(*encoder_outputs)
    use_cache = config.use_cache and not model.training if use_cache is None else use_cache
    if model.training and any(block.gradient_checkpointing for block in model.decoder.block):
        use_cache = False  # the backward replay of a checkpointed block would write the cache a second time
    if not use_cache:
        cache = None
    elif cache is None:
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    decoder_compile_mode = None
    if encoder_runs and cache is None:
        # the encoder's rules, read off its output; the decoder's CUDA graphs join the step that the encoder's began.
        # Checkpointing in either stack keeps the decoder off CUDA graphs: it never records graphs in a step that the
        # encoder's compiled call did not begin.
        checkpointing = model.training and any(
            block.gradient_checkpointing for block in (*model.encoder.block, *model.decoder.block)
        )
        decoder_compile_mode = encoder_compile_mode(
            config, encoder_outputs.last_hidden_state, output_attentions, checkpointing
        )
    decoder_outputs = model.decoder(
        inputs_embeds=input_embeddings(
            model.encoder.embed_tokens, decoder_input_ids, decoder_inputs_embeds, "decoder_input_ids"
        ),
        attention_mask=decoder_attention_mask,
        encoder_hidden_states=encoder_outputs.last_hidden_state,
        encoder_attention_mask=attention_mask,
        cache=cache,
        output_attentions=output_attentions,
        output_hidden_states=output_hidden_states,
        compile_mode=decoder_compile_mode,
    )
    return Seq2SeqModelOutput(
        last_hidden_state=decoder_outputs.last_hidden_state,
        decoder_hidden_states=decoder_outputs.hidden_states,
        decoder_attentions=decoder_outputs.attentions,
        cross_attentions=decoder_outputs.cross_attentions,
        encoder_last_hidden_state=encoder_outputs.last_hidden_state,
        encoder_hidden_states=encoder_outputs.hidden_states,
        encoder_attentions=encoder_outputs.attentions,
        **{CACHE_FIELD: cache},
    )


class CoLT5ForConditionalGeneration(CoLT5PreTrainedModel, GenerationMixin):
    """CoLT5 with a language-modelling head: seq2seq training (`labels`) and `generate`."""

    _tied_weights_keys = {"lm_head.weight": "encoder.embed_tokens.weight"}
    # a decoding step (encoder outputs given, static cache) compiles into one graph: generate(...,
    # cache_implementation="static") compiles it on CUDA
    _can_compile_fullgraph = True

    def __init__(self, config: CoLT5Config):
        check_encoder_decoder(type(self), config)
        super().__init__(config)
        self.encoder = CoLT5Encoder(config)
        self.decoder = CoLT5Decoder(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, embeddings):
        self.lm_head = embeddings

    def prepare_decoder_input_ids_from_labels(self, labels):
        return self._shift_right(labels)

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """`GenerationMixin.generate`, on the fast path where the encoder compiles (`config.encoder_compile`, CUDA, long
        inputs): the input is padded to its length bucket (the mask hides the padding: the same tokens come out), so
        that the encoder and the decoding step compile once per bucket, and greedy or sampled decoding takes the
        static cache, whose step Transformers compiles into CUDA graphs. A cache or `cache_implementation` of the
        caller's, beam search, or `encoder_compile="off"` leave generate as it is."""
        decoder_mask, decoder_input_ids = kwargs.get("decoder_attention_mask"), kwargs.get("decoder_input_ids")
        start = 1 if decoder_input_ids is None else decoder_input_ids.shape[-1]
        if decoder_mask is not None and decoder_mask.shape[-1] != start:  # a static cache's step would not notice
            raise ValueError(
                f"`decoder_attention_mask` covers {decoder_mask.shape[-1]} positions but generation starts from "
                f"{start} decoder token(s) (`decoder_input_ids`): pass a mask as long as `decoder_input_ids`, or none"
            )
        input_ids = kwargs.get("input_ids", inputs)
        if (
            input_ids is None
            or input_ids.ndim != 2  # the forward names the mistake
            or kwargs.get("encoder_outputs") is not None
            or encoder_compile_mode(self.config, input_ids, False, False) is None
        ):
            return super().generate(inputs, generation_config, **kwargs)
        n = input_ids.shape[-1]
        pad = length_bucket(n) - n
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs["attention_mask"] = F.pad(attention_mask, (0, pad), value=0)
        kwargs["input_ids"] = F.pad(input_ids, (0, pad), value=self.config.pad_token_id or 0)
        chosen = generation_config or self.generation_config
        if (
            not any(kwargs.get(name) is not None for name in ("cache", "past_key_values", "cache_implementation"))
            and chosen.cache_implementation is None
            and (kwargs.get("num_beams") or chosen.num_beams or 1) == 1  # None: not set, Transformers' default 1
        ):
            kwargs["cache_implementation"] = "static"
        return super().generate(None, generation_config, **kwargs)

    def create_masks_for_generate(self, attention_mask=None, **kwargs):
        """`generate`'s hook for the decoder mask with a static cache (Transformers would build a 4D causal mask). The
        decoder builds its causal mask from the cache's length itself: keep the (batch, length) padding mask, padded
        to the cache's slots so that its shape stays the same at every step and a compiled step does not recompile."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if attention_mask is None or cache is None or cache.get_max_length(0) < 0:
            return attention_mask
        return F.pad(attention_mask, (0, cache.get_max_length(0) - attention_mask.shape[-1]), value=1)

    @can_return_tuple
    @takes_cache_argument
    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                encoder_outputs=None, cache=None, inputs_embeds=None, decoder_inputs_embeds=None, labels=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, num_items_in_batch=None,
                **kwargs):
        r"""
        labels (`(batch, target_length)`, -100 where no loss): the loss is the token-level cross-entropy summed and
        divided by `num_items_in_batch` when Trainer passes it (gradient accumulation), else averaged over the
        labelled tokens. A forward with labels decodes without a cache unless `use_cache=True`.
        """
        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = self._shift_right(labels)
        if labels is not None and use_cache is None:
            use_cache = False  # a loss forward (training, evaluation) decodes nothing after it
        outputs = encode_decode(
            self,
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            cache=cache,
            inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        sequence_output = outputs.last_hidden_state
        if self.config.tie_word_embeddings:
            sequence_output = sequence_output * self.config.d_model**-0.5
        logits = self.lm_head(sequence_output)

        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            loss = F.cross_entropy(
                logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
            )
            count = (labels != -100).sum() if num_items_in_batch is None else num_items_in_batch
            loss = loss / torch.as_tensor(count, device=loss.device).clamp(min=1)

        return Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            decoder_hidden_states=outputs.decoder_hidden_states,
            decoder_attentions=outputs.decoder_attentions,
            cross_attentions=outputs.cross_attentions,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states,
            encoder_attentions=outputs.encoder_attentions,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )


# Hub custom code: save_pretrained copies the code next to the weights (see CoLT5PreTrainedModel.save_pretrained)
CoLT5Model.register_for_auto_class("AutoModel")
CoLT5EncoderModel.register_for_auto_class("AutoModel")
CoLT5ForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")


__all__ = [
    "CoLT5PreTrainedModel",
    "CoLT5Model",
    "CoLT5ForConditionalGeneration",
    "CoLT5EncoderModel",
]
