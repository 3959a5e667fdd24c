"""Sub-layers of the CoLT5 encoder and decoder against dense computations written here in plain torch, with explicit
masks. transformers' T5Attention._relative_position_bucket is the oracle for the relative position buckets and
colt5_attention.coor_descent for the routers' soft scores."""

import math

import pytest
import torch
import torch.nn.functional as F
from colt5_attention.coor_descent import coor_descent as reference_coor_descent
from transformers.models.t5.modeling_t5 import T5Attention

from colt5_hf import CoLT5Config, CoLT5EncoderModel
from colt5_hf.modeling_colt5 import (
    CoLT5CrossAttention,
    CoLT5EncoderBlock,
    CoLT5HeavyAttention,
    CoLT5LocalAttention,
    CoLT5RoutedFeedForward,
)
from colt5_hf.routing import CoLT5Router, RoutedSum, scatter_tokens
from colt5_hf.t5_attention import attention_probabilities, relative_position_bucket


ATOL, RTOL = 2e-5, 1e-4


def layer_config(implementation="eager", **overrides):
    # few buckets and a short max distance, so that the logarithmic buckets are exercised at these lengths
    values = dict(vocab_size=50, d_model=32, d_kv=8, d_ff=32, num_layers=2, num_heads=4, num_light_heads=2,
                  num_heavy_heads=3, light_d_ff=24, heavy_d_ff=48, local_radius=3, relative_attention_num_buckets=8,
                  relative_attention_max_distance=12, attention_q_fraction=0.25, attention_kv_fraction=0.5,
                  feed_forward_fraction=0.25, min_routed_tokens=2, router_iterations=30, dropout_rate=0.0)
    values.update(overrides)
    config = CoLT5Config(**values)
    config._attn_implementation = implementation  # what a model sets; the modules read it at every call
    return config


def randomize(module, seed, std=0.2):
    torch.manual_seed(seed)
    for parameter in module.parameters():
        torch.nn.init.normal_(parameter, std=std)
    return module.eval()


def masks_for(n):
    """(3, n) bool: a full sample, a right-padded one and a left-padded one (or a one-token one when n is small)."""
    mask = torch.ones(3, n, dtype=torch.bool)
    mask[1, max(1, n - 2) :] = False
    if n >= 3:
        mask[2, : n // 3] = False
    else:
        mask[2, 1:] = False
    return mask


def t5_bucket(relative_position, config, bidirectional=True):
    return T5Attention._relative_position_bucket(
        relative_position,
        bidirectional=bidirectional,
        num_buckets=config.relative_attention_num_buckets,
        max_distance=config.relative_attention_max_distance,
    )


def dense_attention(query, key, value, bias, keep):
    """softmax(q k^T + bias) v, unscaled (T5), keys outside `keep` excluded. (b, h, q, d), (b, h, k, d), bias and keep
    broadcastable to (b, h, q, k). Rows without any kept key come out as NaN: compare real queries only."""
    scores = query @ key.transpose(-1, -2) + bias
    probs = scores.masked_fill(~keep, float("-inf")).softmax(-1)
    return probs @ value, probs


def split_heads(x, heads):  # (b, n, h * d) -> (b, h, n, d)
    return x.view(*x.shape[:2], heads, -1).transpose(1, 2)


def merge_heads(x):  # (b, h, n, d) -> (b, n, h * d)
    return x.transpose(1, 2).flatten(2)


def rms_norm(x, weight, eps):
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def gated_ff(x, ff):
    return F.gelu(x @ ff.wi_0.weight.T, approximate="tanh") * (x @ ff.wi_1.weight.T) @ ff.wo.weight.T


def routed_count(config, fraction, length):
    return min(length, max(config.min_routed_tokens, math.ceil(round(fraction * length, 9))))


def top_tokens(config, router, hidden_states, mask, fraction, route=0):
    """Independent routing of one sample: the top-k real tokens by raw score, in increasing position, and their
    weights (1.0 under straight-through, else the reference coordinate descent's soft score with k_fetch = 9/8 k)."""
    real = mask.nonzero()[:, 0]
    raw = hidden_states[real] @ router.weight[route].detach()
    k = routed_count(config, fraction, len(real))
    order = raw.argsort(descending=True)[:k].sort().values
    if config.router_straight_through:
        return real[order], torch.ones(k)
    k_fetch = torch.tensor([[min(k * config.router_fetch_ratio, len(real))]])
    soft = reference_coor_descent(raw[None], n_iters=config.router_iterations, k=k_fetch, eps=config.router_epsilon)
    return real[order], soft[0, order]


# ---------------------------------------------------------------------------------------------------- light branch


def dense_local_attention(module, hidden_states, mask, bias_table, radius):
    n = hidden_states.shape[1]
    query, key, value = (
        split_heads(hidden_states @ linear.weight.T, module.num_heads) for linear in (module.q, module.k, module.v)
    )
    position = torch.arange(n)
    offset = position[None, :] - position[:, None]  # (n, n): key - query
    in_band = offset.abs() <= radius
    bias = bias_table[:, (offset + radius).clamp(0, 2 * radius)]  # (h, n, n)
    keep = in_band[None, None] & mask[:, None, None, :]
    out, probs = dense_attention(query, key, value, bias, keep)
    return merge_heads(out) @ module.o.weight.T, probs


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("radius, n", [(3, 2), (3, 5), (3, 11), (6, 4), (6, 15), (2, 8), (1, 7)])
def test_local_attention_equals_dense_band_attention(radius, n, implementation):
    config = layer_config(implementation, local_radius=radius)
    module = randomize(CoLT5LocalAttention(config), seed=n)
    generator = torch.Generator().manual_seed(radius * 100 + n)
    hidden_states = torch.randn(3, n, config.d_model, generator=generator)
    mask = masks_for(n)
    bias_table = torch.randn(config.num_light_heads, 2 * radius + 1, generator=generator)
    with torch.no_grad():
        out = module(hidden_states, mask, bias_table)
        expected, expected_probs = dense_local_attention(module, hidden_states, mask, bias_table, radius)
        # the probabilities by blocks, placed over the sequence by the module's layout (the weights it returns)
        query, key, _, bias = module.blocks(hidden_states, mask, bias_table)
        weights = module.weights_layout(n, mask.device).spread(attention_probabilities(query, key, bias))
    assert out.shape == hidden_states.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out[mask], expected[mask], atol=ATOL, rtol=RTOL)
    assert weights.shape == (3, config.num_light_heads, n, n)
    rows = mask[:, None, :].expand(-1, config.num_light_heads, -1)
    torch.testing.assert_close(weights[rows], expected_probs[rows], atol=ATOL, rtol=RTOL)
    # padding takes no attention mass from real queries and junk in it changes nothing
    junk = hidden_states.masked_fill(~mask[..., None], 1e3)
    with torch.no_grad():
        out_junk = module(junk, mask, bias_table)
    torch.testing.assert_close(out_junk[mask], out[mask], atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------------------------------- heavy branch


def dense_heavy_attention(config, module, hidden_states, mask, q_router, kv_router, bias_weight):
    """Full attention among the routed tokens of each sample, relative bias from original positions; 0 elsewhere."""
    b, n, d = hidden_states.shape
    heads = module.num_heads
    expected = torch.zeros(b, n, d)
    expected_probs = torch.zeros(b, heads, n, n)
    for i in range(b):
        q_position, q_weight = top_tokens(config, q_router, hidden_states[i], mask[i], config.attention_q_fraction)
        kv_position, kv_weight = top_tokens(config, kv_router, hidden_states[i], mask[i], config.attention_kv_fraction)
        x_q = hidden_states[i, q_position][None]
        x_kv = (hidden_states[i, kv_position] * kv_weight[:, None])[None]
        query = split_heads(x_q @ module.q.weight.T, heads)
        key, value = (split_heads(x_kv @ linear.weight.T, heads) for linear in (module.k, module.v))
        bucket = t5_bucket(kv_position[None, :] - q_position[:, None], config)  # (m, m_kv)
        bias = bias_weight[bucket].permute(2, 0, 1)[None]  # (1, h, m, m_kv)
        out, probs = dense_attention(query, key, value, bias, torch.ones(1, dtype=torch.bool))
        expected[i, q_position] = (merge_heads(out) @ module.o.weight.T)[0] * q_weight[:, None]
        expected_probs[i][:, q_position[:, None], kv_position[None, :]] = probs[0]
    return expected, expected_probs


@pytest.mark.parametrize("straight_through", [True, False])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_heavy_attention_equals_dense_attention_among_routed_tokens(implementation, straight_through):
    config = layer_config(implementation, router_straight_through=straight_through)
    n = 21
    module = randomize(CoLT5HeavyAttention(config), seed=1)
    q_router = randomize(CoLT5Router(config, config.attention_q_fraction), seed=2, std=1.0)
    kv_router = randomize(CoLT5Router(config, config.attention_kv_fraction), seed=3, std=1.0)
    generator = torch.Generator().manual_seed(4)
    hidden_states = torch.randn(3, n, config.d_model, generator=generator)
    mask = masks_for(n)
    mask[1, 12:] = False  # a short sample: fewer routed tokens, invalid slots in the batch
    bias_weight = torch.randn(config.relative_attention_num_buckets, config.num_heavy_heads, generator=generator)
    with torch.no_grad():
        q_routing, kv_routing = q_router(hidden_states, mask), kv_router(hidden_states, mask)
        assert not q_routing.valid.all() and not kv_routing.valid.all()
        routed_out = module(hidden_states, q_routing, kv_routing, bias_weight)
        out = scatter_tokens(routed_out, q_routing.indices[:, 0], n)  # (b, m, d) rows at the routed queries' positions
        # the routed probabilities, placed over the sequence by the module's layout (the weights it returns)
        query, key, _ = module.heads(hidden_states, q_routing, kv_routing)
        probs = attention_probabilities(query, key, module.position_bias(q_routing, kv_routing, bias_weight))
        weights = module.weights_layout(q_routing, kv_routing, n).spread(probs)
        expected, expected_probs = dense_heavy_attention(
            config, module, hidden_states, mask, q_router, kv_router, bias_weight
        )
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    routed = torch.zeros(3, n, dtype=torch.bool)
    for i in range(3):
        routed[i, q_routing.indices[i, 0][q_routing.valid[i, 0]]] = True
    assert (out[~routed] == 0).all()  # unrouted queries get exactly 0 from the heavy branch
    assert (out[routed].abs().sum(-1) > 0).all()
    torch.testing.assert_close(weights, expected_probs, atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------------------------- routed feed-forward


@pytest.mark.parametrize("straight_through", [True, False])
def test_routed_feed_forward_equals_light_plus_heavy_on_top_k(straight_through):
    config = layer_config(router_straight_through=straight_through)
    module = randomize(CoLT5RoutedFeedForward(config), seed=5)
    torch.nn.init.normal_(module.router.weight, std=1.0)
    n = 19
    hidden_states = torch.randn(3, n, config.d_model, generator=torch.Generator().manual_seed(6))
    mask = masks_for(n)
    with torch.no_grad():
        out = module(hidden_states, mask).add_to(torch.zeros_like(hidden_states))
        expected = gated_ff(hidden_states, module.light_feed_forward)
        for i in range(3):
            position, weight = top_tokens(config, module.router, hidden_states[i], mask[i],
                                          config.feed_forward_fraction)
            expected[i, position] += gated_ff(hidden_states[i, position], module.heavy_feed_forward) * weight[:, None]
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    # the heavy branch really ran on some tokens only: elsewhere the output is the light FF alone
    light = gated_ff(hidden_states, module.light_feed_forward)
    touched = (out - light).abs().sum(-1) > 1e-6
    assert touched.any() and not touched[mask].all() and not touched[~mask].any()


def test_routed_sum_adds_the_routed_rows_in_place_with_one_dropout_mask():
    generator = torch.Generator().manual_seed(11)
    hidden_states, dense = torch.randn(2, 9, 6, generator=generator), torch.randn(2, 9, 6, generator=generator)
    indices = torch.tensor([[7, 2, 4], [0, 8, 1]])
    routed = torch.randn(2, 3, 6, generator=generator)
    routed[1, 2] = 0  # an invalid slot: a zero row at a position of its own
    total = RoutedSum(dense, routed, indices).add_to(hidden_states)
    expected = hidden_states + dense
    for i in range(2):
        for j in range(3):
            expected[i, indices[i, j]] += routed[i, j]
    torch.testing.assert_close(total, expected, atol=1e-6, rtol=1e-6)
    # in bf16 the roundings of hidden_states + (dense + scattered rows), the form that compiles to the same roundings
    low = [t.to(torch.bfloat16) for t in (hidden_states * 100, dense, routed)]
    expected = low[0] + (low[1] + scatter_tokens(low[2], indices, 9))
    assert torch.equal(RoutedSum(*low[1:], indices).add_to(low[0]), expected)
    # dropout acts on the sum: where the routed rows cancel the dense part, nothing may survive any mask
    cancelled = dense.clone()
    for i in range(2):
        cancelled[i, indices[i]] = -routed[i]
    torch.manual_seed(12)
    dropped = RoutedSum(cancelled, routed, indices).add_to(hidden_states, dropout=0.5)
    rows = torch.zeros(2, 9, dtype=torch.bool)
    rows[torch.arange(2)[:, None], indices] = True
    torch.testing.assert_close(dropped[rows], hidden_states[rows], atol=1e-6, rtol=0)  # (h - 2r) + 2r, rounded
    others = dropped[~rows] - hidden_states[~rows]  # 0 or twice the dense part, about half each
    kept = others != 0
    torch.testing.assert_close(others[kept], 2 * cancelled[~rows][kept])
    assert 0.3 < kept.float().mean() < 0.7


# ------------------------------------------------------------------------ dense limit: every token routed, full radius


def dense_encoder_block(config, block, hidden_states, mask, bias_weight):
    """One T5.1.1-style block: all light + heavy heads attend everywhere with the shared relative bias table; the
    feed-forward is FF_light + FF_heavy on every token."""
    n = hidden_states.shape[1]
    attention = block.attention
    light, heavy = attention.light_attention, attention.heavy_attention
    heads = config.num_light_heads + config.num_heavy_heads
    x = rms_norm(hidden_states, block.attention_layer_norm.weight, config.layer_norm_epsilon)
    query, key, value = (
        split_heads(x @ torch.cat([getattr(light, name).weight, getattr(heavy, name).weight]).T, heads)
        for name in ("q", "k", "v")
    )
    position = torch.arange(n)
    bias = bias_weight[t5_bucket(position[None, :] - position[:, None], config)].permute(2, 0, 1)  # (h, n, n)
    out, probs = dense_attention(query, key, value, bias, mask[:, None, None, :])
    hidden_states = hidden_states + merge_heads(out) @ torch.cat([light.o.weight, heavy.o.weight], dim=1).T
    x = rms_norm(hidden_states, block.feed_forward_layer_norm.weight, config.layer_norm_epsilon)
    feed_forward = block.feed_forward
    hidden_states = hidden_states + gated_ff(x, feed_forward.light_feed_forward) + gated_ff(
        x, feed_forward.heavy_feed_forward
    )
    return hidden_states, probs


def dense_config(n, **overrides):
    return layer_config(local_radius=n - 1 + 2, attention_q_fraction=1.0, attention_kv_fraction=1.0,
                        feed_forward_fraction=1.0, min_routed_tokens=1, **overrides)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_encoder_block_with_everything_routed_is_dense(implementation):
    n = 13
    config = dense_config(n, implementation=implementation)
    block = randomize(CoLT5EncoderBlock(config), seed=7)
    for norm in (block.attention_layer_norm, block.feed_forward_layer_norm):
        torch.nn.init.normal_(norm.weight, mean=1.0, std=0.2)
    generator = torch.Generator().manual_seed(8)
    hidden_states = torch.randn(3, n, config.d_model, generator=generator)
    mask = masks_for(n)
    heads = config.num_light_heads + config.num_heavy_heads
    bias_weight = torch.randn(config.relative_attention_num_buckets, heads, generator=generator)
    radius = config.local_radius
    light_bias_table = bias_weight[
        t5_bucket(torch.arange(-radius, radius + 1), config), : config.num_light_heads
    ].T  # (light heads, 2 * radius + 1), as the encoder builds it
    with torch.no_grad():
        expected, expected_probs = dense_encoder_block(config, block, hidden_states, mask, bias_weight)
        # with the weights, the call takes the eager computation whatever the implementation
        for output_attentions in (False, True):
            out, weights = block(hidden_states, mask, light_bias_table, bias_weight[:, config.num_light_heads :],
                                 output_attentions)
            torch.testing.assert_close(out[mask], expected[mask], atol=ATOL, rtol=RTOL)
    assert weights.shape == (3, heads, n, n)
    rows = mask[:, None, :].expand(-1, heads, -1)
    torch.testing.assert_close(weights[rows], expected_probs[rows], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_encoder_with_everything_routed_is_dense(implementation):
    n = 12
    config = dense_config(n, num_layers=2, implementation=implementation)
    torch.manual_seed(9)
    model = CoLT5EncoderModel(config).eval()
    encoder = model.encoder
    input_ids = torch.randint(2, config.vocab_size, (3, n), generator=torch.Generator().manual_seed(10))
    mask = masks_for(n)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
        hidden_states = encoder.embed_tokens.weight[input_ids]
        for block in encoder.block:
            hidden_states, _ = dense_encoder_block(config, block, hidden_states, mask,
                                                   encoder.relative_attention_bias.weight)
        expected = rms_norm(hidden_states, encoder.final_layer_norm.weight, config.layer_norm_epsilon)
    torch.testing.assert_close(out[mask], expected[mask], atol=ATOL, rtol=RTOL)


# -------------------------------------------------------------------------------------- multi-route cross-attention


def dense_cross_attention(config, module, hidden_states, encoder_hidden_states, encoder_mask):
    """Route r's query heads attend only to route r's encoder tokens, whose K/V come from the router-weighted hidden
    states through route r's slice of the K/V projections. Computed one sample at a time. Returns the output and the
    attention probabilities over the encoder's positions, (b, h, t, n), 0 at the tokens a head's route did not take."""
    b, t, _ = hidden_states.shape
    routes, kv_heads, heads = module.num_routes, config.num_cross_attention_kv_heads, config.num_heads
    heads_per_route = heads // routes
    all_query = split_heads(hidden_states @ module.q.weight.T, heads)  # (b, h, t, d_kv)
    out = torch.zeros(b, heads, t, config.d_kv)
    probs = torch.zeros(b, heads, t, encoder_hidden_states.shape[1])
    for i in range(b):
        for r in range(routes):
            if module.kv_router is None:
                position = encoder_mask[i].nonzero()[:, 0]
                weight = torch.ones(len(position))
            else:
                position, weight = top_tokens(config, module.kv_router, encoder_hidden_states[i], encoder_mask[i],
                                              config.cross_attention_fraction, route=r)
            x = encoder_hidden_states[i, position] * weight[:, None]  # (k, d)
            rows = slice(r * kv_heads * config.d_kv, (r + 1) * kv_heads * config.d_kv)
            key = split_heads((x @ module.k.weight[rows].T)[None], kv_heads)[0]  # (kv_heads, k, d_kv)
            value = split_heads((x @ module.v.weight[rows].T)[None], kv_heads)[0]
            for j in range(heads_per_route):
                head = r * heads_per_route + j
                kv_head = j // (heads_per_route // kv_heads)
                p = (all_query[i, head] @ key[kv_head].T).softmax(-1)  # (t, k)
                out[i, head] = p @ value[kv_head]
                probs[i, head, :, position] = p
    return merge_heads(out) @ module.o.weight.T, probs


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize(
    "routes, kv_heads, fraction, straight_through",
    [(2, 1, 0.5, False), (2, 2, 0.4, True), (4, 1, 0.3, False), (2, 1, 1.0, True)],
)
def test_cross_attention_routes_equal_dense_per_route(routes, kv_heads, fraction, straight_through, implementation):
    config = layer_config(implementation, num_cross_attention_routes=routes, num_cross_attention_kv_heads=kv_heads,
                          cross_attention_fraction=fraction, router_straight_through=straight_through)
    module = randomize(CoLT5CrossAttention(config, layer_idx=0), seed=11)
    if module.kv_router is not None:
        torch.nn.init.normal_(module.kv_router.weight, std=1.0)
    generator = torch.Generator().manual_seed(12)
    b, t, n = 3, 5, 17
    hidden_states = torch.randn(b, t, config.d_model, generator=generator)
    encoder_hidden_states = torch.randn(b, n, config.d_model, generator=generator)
    encoder_mask = masks_for(n)
    with torch.no_grad():
        out, no_weights = module(hidden_states, encoder_hidden_states, encoder_mask, None)
        # the weights come from the eager computation, whatever the implementation
        out_with_weights, weights = module(hidden_states, encoder_hidden_states, encoder_mask, None,
                                           output_attentions=True)
        expected, expected_probs = dense_cross_attention(config, module, hidden_states, encoder_hidden_states,
                                                         encoder_mask)
    assert no_weights is None
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out_with_weights, expected, atol=ATOL, rtol=RTOL)
    assert weights.shape == (b, config.num_heads, t, n)
    torch.testing.assert_close(weights, expected_probs, atol=ATOL, rtol=RTOL)

    # samples never mix: each sample alone (unpadded) gives its row of the batch, and changing one sample's encoder
    # states, padding included, leaves the others untouched
    with torch.no_grad():
        for i in range(b):
            length_mask = encoder_mask[i]
            alone, _ = module(hidden_states[i : i + 1], encoder_hidden_states[i : i + 1, length_mask],
                              length_mask[length_mask][None], None)
            torch.testing.assert_close(alone[0], out[i], atol=ATOL, rtol=RTOL)
        changed = encoder_hidden_states.clone()
        changed[1] = torch.randn(n, config.d_model, generator=generator)
        out_changed, _ = module(hidden_states, changed, encoder_mask, None)
    assert torch.equal(out_changed[0], out[0]) and torch.equal(out_changed[2], out[2])
    assert not torch.allclose(out_changed[1], out[1])


# --------------------------------------------------------------------------------------- relative position buckets


@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 12), (16, 20), (64, 1000)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_bucket_matches_t5(bidirectional, num_buckets, max_distance):
    relative_position = torch.arange(-3000, 3001)[None, :] + torch.tensor([0, 7])[:, None]
    ours = relative_position_bucket(relative_position, bidirectional, num_buckets, max_distance)
    oracle = T5Attention._relative_position_bucket(relative_position, bidirectional, num_buckets, max_distance)
    assert torch.equal(ours, oracle)
    assert ours.min() >= 0 and ours.max() == num_buckets - 1
