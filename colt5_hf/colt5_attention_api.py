"""colt5-attention's layer API (version 0.2.2) on the CoLT5 model's building blocks.

`ConditionalRoutedFeedForward`, `ConditionalRoutedAttention`, `ConditionalRoutedCrossAttention` and
`ConditionalRoutedTransformerBlock` take colt5-attention 0.2.2's constructor arguments and forward signatures. The
first three are the model's routed feed-forward, routed self-attention and cross-attention (`modeling_colt5.py`) with
a norm in front, initialised by the model's own rule: one implementation of routing for the layers and the model.

Numbers of routed tokens (`num_heavy_tokens`, `num_tokens_q`, ...): an int is a count per sample (0.2.2's meaning;
a sample with fewer real tokens routes all of them), a float in (0, 1] a fraction of each sample's real (unmasked)
length, rounded up. A route that takes every real token of a sample routes nothing: its weights are exactly 1.

Every layer normalises its input (T5 RMS norm) once, routes on the normalised states and returns the update
without the residual, which `ConditionalRoutedTransformerBlock` adds. Attention is T5's: unscaled scores, learned
relative position bias from the tokens' original positions. `router_kwargs` take 0.2.2's names: `n_iters`,
`fetch_k_ratio`, `eps` (coor_descent), `n_iters`, `fetch_k_ratio`, `temperature` (sinkhorn), `temperature`
(cum_softmax).
"""

from types import SimpleNamespace

import torch
from torch import nn
from transformers import initialization as init

from .configuration_colt5 import CoLT5Config
from .modeling_colt5 import (
    CoLT5CrossAttention,
    CoLT5LayerNorm,
    CoLT5LocalAttention,
    CoLT5PreTrainedModel,
    CoLT5RoutedFeedForward,
    CoLT5RoutedSelfAttention,
)
from .routing import ROUTER_TYPES, CoLT5Router, gather_tokens, scatter_tokens
from .t5_attention import (
    ALL_ATTENTION_FUNCTIONS,
    bias_table_rows,
    branch_bias_tables,
    check_implementation,
    check_mask,
    eager_attention_forward,
    mask_value,
)


ROUTER_KWARGS = {  # colt5-attention's router keyword -> CoLT5Config field, per router type it has
    "coor_descent": {"n_iters": "router_iterations", "fetch_k_ratio": "router_fetch_ratio", "eps": "router_epsilon"},
    "sinkhorn": {"n_iters": "router_iterations", "fetch_k_ratio": "router_fetch_ratio",
                 "temperature": "router_temperature"},
    "cum_softmax": {"temperature": "router_temperature"},
}


def layer_config(dim, router_type, router_kwargs, router_straight_through, attn_implementation="sdpa", **fields):
    """The CoLT5Config that the building blocks of one layer read: no dropout and the routers' two-sided gradient, as
    0.2.2's layers have."""
    if router_type not in ROUTER_TYPES:
        raise ValueError(f"`router_type` must be one of {tuple(ROUTER_TYPES)}, got {router_type!r}")
    names = ROUTER_KWARGS.get(router_type, {})
    unknown = sorted(set(router_kwargs or {}) - set(names))
    if unknown:
        raise ValueError(f"`router_kwargs` {unknown} are not options of the {router_type!r} router: it takes {sorted(names)}")
    router_fields = {names[key]: value for key, value in (router_kwargs or {}).items()}
    config = CoLT5Config(d_model=dim, router_type=router_type, router_straight_through=router_straight_through,
                         router_one_sided_gradient=False, dropout_rate=0.0, **router_fields, **fields)
    config._attn_implementation = check_implementation(attn_implementation)
    return config


def init_weights(layer):
    """T5.1.1's initialisation of every building block, by the model's own rule (CoLT5PreTrainedModel._init_weights),
    each block reading its own config."""
    for module in layer.modules():
        CoLT5PreTrainedModel._init_weights(SimpleNamespace(config=getattr(module, "config", layer.config)), module)


def input_mask(x, mask, name="mask"):
    """(b, n) bool on x's device; None: every position is real."""
    return check_mask(mask, x.shape[:2], name, x.device)


def summed(routed_sum):
    """A `RoutedSum` as one (b, n, d) tensor: the dense part plus the routed rows at their positions."""
    return routed_sum.dense + scatter_tokens(routed_sum.routed, routed_sum.indices, routed_sum.dense.shape[1])


class ConditionalRoutedFeedForward(CoLT5RoutedFeedForward):
    """FF_light(X) on every token + s * FF_heavy(X) on the routed tokens (zero elsewhere), X the normalised input.

    dim: model width. num_heavy_tokens: tokens routed to the heavy branch per sample (int count or float fraction).
    light_ff_mult / heavy_ff_mult: hidden widths of the two gated-GELU branches, in multiples of `dim`.
    router_type ("coor_descent", "cum_softmax", "sinkhorn"), router_kwargs, router_straight_through: the router.
    """

    def __init__(self, dim, *, num_heavy_tokens, light_ff_mult=0.5, heavy_ff_mult=4, router_straight_through=True,
                 router_type="coor_descent", router_kwargs=None):
        config = layer_config(dim, router_type, router_kwargs, router_straight_through,
                              light_d_ff=int(dim * light_ff_mult), heavy_d_ff=int(dim * heavy_ff_mult))
        super().__init__(config, num_heavy_tokens)
        self.config = config
        self.norm = CoLT5LayerNorm(dim, config.layer_norm_epsilon)
        init_weights(self)

    def forward(self, x, mask=None, num_heavy_tokens=None):
        # x: (b, n, dim); mask: (b, n), True/1 at real tokens
        return summed(super().forward(self.norm(x), input_mask(x, mask), num_heavy_tokens))


class ConditionalRoutedAttention(CoLT5RoutedSelfAttention):
    """A_light(X) + s_q * A_heavy(X_q, s_kv * X_kv), X the normalised input: local attention for every token plus full
    attention of the routed queries over the routed keys/values (zero for unrouted queries).

    dim: model width. num_heavy_tokens_q / num_heavy_tokens_kv: routed queries and keys/values per sample (int count
    or float fraction). light_dim_head, light_heads, light_window_size: the local attention; each token sees the
    `light_window_size // 2` tokens on either side of it (0.2.2's meaning). heavy_dim_head, heavy_heads: the routed
    attention. router_type, router_kwargs, router_straight_through: both routers. attn_implementation: "sdpa",
    "eager" or "flex_attention". The layer owns a relative position bias table (T5 buckets, columns for the light
    heads, then the heavy ones).
    """

    def __init__(self, dim, *, num_heavy_tokens_q, num_heavy_tokens_kv, light_dim_head=64, light_heads=8,
                 light_window_size=128, heavy_dim_head=64, heavy_heads=8, router_straight_through=True,
                 router_type="coor_descent", router_kwargs=None, attn_implementation="sdpa"):
        if not isinstance(light_window_size, int) or light_window_size < 2:
            raise ValueError(
                "`light_window_size` must be an int >= 2: each token sees light_window_size // 2 tokens on either side, "
                f"got {light_window_size!r}"
            )

        def config_with(d_kv):
            return layer_config(dim, router_type, router_kwargs, router_straight_through, attn_implementation,
                                d_kv=d_kv, num_heads=light_heads + heavy_heads, num_light_heads=light_heads,
                                num_heavy_heads=heavy_heads, local_radius=light_window_size // 2)

        config = config_with(heavy_dim_head)
        super().__init__(config, (num_heavy_tokens_q, num_heavy_tokens_kv))
        # 0.2.2 sizes the light heads apart from the heavy ones: the local attention reads a config of its own
        self.light_attention = CoLT5LocalAttention(config_with(light_dim_head))
        self.norm = CoLT5LayerNorm(dim, config.layer_norm_epsilon)
        self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, light_heads + heavy_heads)
        self.bias_rows = nn.Buffer(bias_table_rows(config), persistent=False)
        init_weights(self)
        init.normal_(self.relative_attention_bias.weight, mean=0.0, std=dim**-0.5)  # T5's, as the encoder's table

    def forward(self, x, *, num_heavy_tokens_q=None, num_heavy_tokens_kv=None, mask=None):
        # x: (b, n, dim); mask: (b, n), True/1 at real tokens
        light_bias_table, heavy_bias_weight = branch_bias_tables(self.config, self.relative_attention_bias,
                                                                 self.bias_rows)
        out, _ = super().forward(self.norm(x), input_mask(x, mask), light_bias_table, heavy_bias_weight,
                                 num_tokens=(num_heavy_tokens_q, num_heavy_tokens_kv))
        return summed(out)


class ConditionalRoutedCrossAttention(CoLT5CrossAttention):
    """Routed queries of `x` attend to routed tokens of `context`, through `kv_routing_tokens` routes: the query heads
    are split evenly among the routes and route r's heads attend only to the context tokens route r picked. Queries
    are routed within each sample and do not see each other, so use it non-causally (a decoder's queries must not be
    routed: pass `num_tokens_q=1.0`). Outputs s_q * attention at routed queries, zero elsewhere; keys and values are
    projections of s_kv * context. No position bias (T5 cross-attention).

    dim: width of x and context. num_tokens_q / num_tokens_kv: routed queries and context tokens per sample and route
    (int count or float fraction). dim_head, heads: the attention; heads % kv_routing_tokens == 0. router_type,
    router_kwargs, router_straight_through: both routers. attn_implementation: "sdpa", "eager" or "flex_attention".
    """

    def __init__(self, dim, *, num_tokens_q, num_tokens_kv, dim_head=64, heads=8, router_straight_through=True,
                 router_type="coor_descent", router_kwargs=None, kv_routing_tokens=1, attn_implementation="sdpa"):
        if not isinstance(kv_routing_tokens, int) or kv_routing_tokens < 1 or heads % kv_routing_tokens:
            raise ValueError(
                f"`heads` ({heads}) must be divisible by `kv_routing_tokens` ({kv_routing_tokens}): the query heads are "
                "split evenly among the key/value routes"
            )
        # the model's multi-route cross-attention with a key/value head per query head: route r's heads are the
        # rows r * h/R * d .. (r + 1) * h/R * d of the key and value projections
        config = layer_config(
            dim, router_type, router_kwargs, router_straight_through, attn_implementation, d_kv=dim_head,
            num_heads=heads, num_light_heads=heads, num_heavy_heads=heads,  # (the encoder's head counts: unused)
            num_cross_attention_routes=kv_routing_tokens, num_cross_attention_kv_heads=heads // kv_routing_tokens,
        )
        super().__init__(config, layer_idx=0)
        self.norm = CoLT5LayerNorm(dim, config.layer_norm_epsilon)
        self.context_norm = CoLT5LayerNorm(dim, config.layer_norm_epsilon)
        self.q_router = CoLT5Router(config, num_tokens_q)
        self.kv_router = CoLT5Router(config, num_tokens_kv, kv_routing_tokens)
        init_weights(self)

    def forward(self, x, context, *, num_tokens_q=None, num_tokens_kv=None, mask=None, context_mask=None):
        # x: (b, t, dim), mask: (b, t); context: (b, n, dim), context_mask: (b, n); masks True/1 at real tokens
        mask, context_mask = input_mask(x, mask), input_mask(context, context_mask, "context_mask")
        hidden_states, context = self.norm(x), self.context_norm(context)
        q_routing = self.q_router(hidden_states, mask, num_tokens_q)
        q_index = q_routing.indices[:, 0]  # (b, m)
        query = self.query_heads(gather_tokens(hidden_states, q_index))  # (b, h, m, d_kv)
        kv_routing = self.kv_router(context, context_mask, num_tokens_kv)  # (b, r, k) each
        key, value = self.key_values(context, kv_routing)  # (b, h, k, d_kv)
        keep = kv_routing.valid[:, :1, None, :]  # (b, 1, 1, k): every route has the same valid slots
        bias = torch.zeros(keep.shape, dtype=query.dtype, device=x.device).masked_fill(~keep, mask_value(query.dtype))
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, _ = attention(self, query, key, value, bias)
        out = self.output(out, q_index.shape[1]) * q_routing.weights[:, 0, :, None].to(x.dtype)
        return scatter_tokens(out, q_index, x.shape[1])


class ConditionalRoutedTransformerBlock(nn.Module):
    """x + ConditionalRoutedAttention(x), then + ConditionalRoutedFeedForward: one CoLT5 encoder layer. The arguments
    are those of the two layers (num_heavy_attn_tokens_q / _kv and num_heavy_ff_tokens: int counts or float
    fractions)."""

    def __init__(self, dim, *, num_heavy_attn_tokens_q, num_heavy_attn_tokens_kv, num_heavy_ff_tokens,
                 light_dim_head=64, light_heads=8, light_window_size=128, heavy_dim_head=64, heavy_heads=8,
                 light_ff_mult=0.5, heavy_ff_mult=4, router_straight_through=True, router_type="coor_descent",
                 router_kwargs=None, attn_implementation="sdpa"):
        super().__init__()
        router = dict(router_straight_through=router_straight_through, router_type=router_type,
                      router_kwargs=router_kwargs)
        self.conditional_attn = ConditionalRoutedAttention(
            dim, num_heavy_tokens_q=num_heavy_attn_tokens_q, num_heavy_tokens_kv=num_heavy_attn_tokens_kv,
            light_dim_head=light_dim_head, light_heads=light_heads, light_window_size=light_window_size,
            heavy_dim_head=heavy_dim_head, heavy_heads=heavy_heads, attn_implementation=attn_implementation, **router,
        )
        self.conditional_ff = ConditionalRoutedFeedForward(
            dim, num_heavy_tokens=num_heavy_ff_tokens, light_ff_mult=light_ff_mult, heavy_ff_mult=heavy_ff_mult,
            **router,
        )

    def forward(self, x, mask=None, num_heavy_attn_tokens_q=None, num_heavy_attn_tokens_kv=None,
                num_heavy_ff_tokens=None):
        x = x + self.conditional_attn(x, mask=mask, num_heavy_tokens_q=num_heavy_attn_tokens_q,
                                      num_heavy_tokens_kv=num_heavy_attn_tokens_kv)
        return x + self.conditional_ff(x, mask=mask, num_heavy_tokens=num_heavy_ff_tokens)


__all__ = [
    "ConditionalRoutedFeedForward",
    "ConditionalRoutedAttention",
    "ConditionalRoutedCrossAttention",
    "ConditionalRoutedTransformerBlock",
]
