"""colt5_hf.colt5_attention_api (colt5-attention 0.2.2's layer API) and the three router types.

Oracles: colt5-attention 0.2.2 where it is correct (coordinate descent, its coor_descent and cum_softmax routers, the
routed feed-forward and the one-route routed self-attention); independent dense computations written here, one sample
and one route at a time, where it is broken (cross-attention, several routes with batch > 1) or where our design
differs (relative position bias, per-sample k); the definitions of the soft top-ks for our own routers.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from colt5_attention import (
    ConditionalRoutedAttention as ReferenceAttention,
    ConditionalRoutedCrossAttention as ReferenceCrossAttention,
    ConditionalRoutedFeedForward as ReferenceFeedForward,
    CoordinateDescentRouter,
    DifferentiableTopKRouter,
    SinkhornRouter,
)
from colt5_attention.coor_descent import coor_descent as reference_coor_descent
from transformers.models.t5.modeling_t5 import T5Attention

from colt5_hf import (
    CoLT5Config,
    CoLT5ForConditionalGeneration,
    CoLT5Router,
    ConditionalRoutedAttention,
    ConditionalRoutedCrossAttention,
    ConditionalRoutedFeedForward,
    ConditionalRoutedTransformerBlock,
    coordinate_descent,
    cumulative_softmax,
    sinkhorn_top_k,
)
from colt5_hf.routing import ROUTER_TYPES as REGISTERED_ROUTER_TYPES


ATOL, RTOL = 2e-5, 1e-4
ROUTER_TYPES = list(REGISTERED_ROUTER_TYPES)  # a new router type takes the invariant tests without editing them


# ------------------------------------------------------------------------------------------------------------ helpers


def unit_rms(x, zero_mean=False):
    """Tokens of RMS 1 (and mean 0): there, 0.2.2's norms (x / |x| * sqrt(d); LayerNorm in local-attention) and ours
    (x / sqrt(mean(x^2) + eps) * weight, weight set by `identity_norm`) are the identity up to known constants."""
    if zero_mean:
        x = x - x.mean(-1, keepdim=True)
    return x * x.pow(2).mean(-1, keepdim=True).rsqrt()


def identity_norm(norm):
    with torch.no_grad():
        norm.weight.fill_(math.sqrt(1 + norm.variance_epsilon))


def rms_norm(x, norm):
    return norm.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)


def padding_mask(lengths, n):
    return torch.arange(n) < torch.tensor(lengths)[:, None]


def expected_count(num_tokens, length):
    """Routed tokens of a sample of `length` real tokens: an int is a count, a float a fraction (rounded up, >= 1)."""
    if isinstance(num_tokens, float):
        return min(length, max(1, math.ceil(round(num_tokens * length, 9))))
    return min(num_tokens, length)


def top_tokens(router_vector, hidden_states, mask, num_tokens, config):
    """Independent routing of one sample and route with coordinate descent: the top-k real tokens by raw score (best
    first) and their weights: 1 under straight-through or when k is the whole sample, else 0.2.2's coordinate-descent
    score with k_fetch = 9/8 k over the sample's real tokens alone."""
    real = mask.nonzero()[:, 0]
    raw = hidden_states[real] @ router_vector.detach()
    k = expected_count(num_tokens, len(real))
    order = raw.argsort(descending=True, stable=True)[:k]
    if config.router_straight_through or k == len(real):
        return real[order], torch.ones(k)
    k_fetch = torch.tensor([[min(k * config.router_fetch_ratio, len(real))]])
    soft = reference_coor_descent(raw[None], n_iters=config.router_iterations, k=k_fetch, eps=config.router_epsilon)
    return real[order], soft[0, order]


def dense_attention(query, key, value, bias=0.0, keep=None):
    """softmax(q k^T + bias) v over (..., q, d) x (..., k, d), keys outside `keep` excluded; unscaled (T5)."""
    scores = query @ key.transpose(-1, -2) + bias
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores.softmax(-1) @ value


def t5_bucket(relative_position, config):
    return T5Attention._relative_position_bucket(
        relative_position, bidirectional=True, num_buckets=config.relative_attention_num_buckets,
        max_distance=config.relative_attention_max_distance,
    )


def selected_sets(indices, valid):
    """(b, r, k) indices -> [[set per route] per sample]."""
    return [[set(i[v].tolist()) for i, v in zip(row, row_valid)] for row, row_valid in zip(indices, valid)]


# ----------------------------------------------------------------------------------- parity with colt5-attention 0.2.2


@pytest.mark.parametrize("epsilon, iterations", [(1.0, 50), (0.2, 30)])
def test_coordinate_descent_matches_reference_with_masks_and_per_row_k(epsilon, iterations):
    generator = torch.Generator().manual_seed(11)
    scores = torch.randn(5, 40, generator=generator) * 2
    lengths = torch.tensor([40, 33, 18, 6, 2])
    mask = torch.rand(5, 40, generator=generator).argsort(-1).argsort(-1) < lengths[:, None]  # real tokens anywhere
    k = torch.tensor([[4.5], [9.0], [3.375], [6.0], [1.0]])  # per-row k, fractional like 9/8 k, equal to a length
    ours_input, reference_input = scores.clone().requires_grad_(), scores.clone().requires_grad_()
    ours = coordinate_descent(ours_input, mask, k, iterations=iterations, epsilon=epsilon)
    reference = reference_coor_descent(reference_input, n_iters=iterations, k=k, eps=epsilon, mask=mask)
    torch.testing.assert_close(ours, reference, atol=5e-5, rtol=1e-4)
    upstream = torch.randn(scores.shape, generator=generator)
    (ours * upstream).sum().backward()
    (reference * upstream).sum().backward()
    torch.testing.assert_close(ours_input.grad, reference_input.grad, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("routes", [1, 3])
def test_coor_descent_router_matches_reference_router(routes):
    """0.2.2's CoordinateDescentRouter (soft scores, no straight-through) on unpadded samples: the same tokens and the
    same soft weights. Scores are kept small so that no soft score saturates at 1.0, where 0.2.2 picks among ties by
    index and ours by score. With padding 0.2.2's k_fetch is 9/8 k of the padded length, ours of each sample's real
    length: a padded sample of ours equals that sample alone in 0.2.2."""
    dim, n, k = 16, 36, 6
    torch.manual_seed(0)
    reference = CoordinateDescentRouter(dim, straight_through=False, n_iters=40, num_routing_tokens=routes)
    with torch.no_grad():
        reference.routing_token.mul_(0.15)
    config = CoLT5Config(d_model=dim, router_straight_through=False, router_one_sided_gradient=False,
                         router_iterations=40)
    ours = CoLT5Router(config, k, routes)
    with torch.no_grad():
        ours.weight.copy_(reference.routing_token)
    x = torch.randn(3, n, dim, generator=torch.Generator().manual_seed(1))

    reference_weights, reference_indices = reference(x, num_tokens=k)
    reference_weights = reference_weights.view(3, routes, k)
    reference_indices = reference_indices.view(3, routes, k)
    out = ours(x, torch.ones(3, n, dtype=torch.bool))
    assert selected_sets(out.indices, out.valid) == selected_sets(reference_indices, torch.ones_like(out.valid))
    dense = torch.zeros(3, routes, n)
    torch.testing.assert_close(dense.scatter(-1, out.indices, out.weights),
                               dense.scatter(-1, reference_indices, reference_weights), atol=1e-5, rtol=1e-5)
    upstream = torch.randn(3, routes, k)
    (dense.scatter(-1, out.indices, out.weights) * dense.scatter(-1, out.indices, upstream)).sum().backward()
    (dense.scatter(-1, reference_indices, reference_weights)
     * dense.scatter(-1, out.indices, upstream)).sum().backward()
    torch.testing.assert_close(ours.weight.grad, reference.routing_token.grad, atol=1e-5, rtol=1e-4)

    # padded: per-sample k_fetch, so each padded sample equals 0.2.2 run on that sample alone
    lengths = [36, 20, 9]
    padded = ours(x, padding_mask(lengths, n))
    for i, length in enumerate(lengths):
        alone_weights, alone_indices = reference(x[i : i + 1, :length], num_tokens=k)
        alone = torch.zeros(routes, n).scatter(-1, alone_indices.view(routes, k), alone_weights.view(routes, k))
        mine = torch.zeros(routes, n).scatter(-1, padded.indices[i], padded.weights[i])
        torch.testing.assert_close(mine, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("routes", [1, 3])
def test_cum_softmax_router_matches_reference_router(routes):
    """0.2.2's DifferentiableTopKRouter (no straight-through), with padding: the same tokens, weights and gradients.
    (0.2.2 divides by the cumulative sum clamped at 1e-6 after subtracting the row maximum; ours works in log space.
    They agree wherever the clamp is inactive, as here.)"""
    dim, n, k, temperature = 16, 30, 7, 0.7
    torch.manual_seed(2)
    reference = DifferentiableTopKRouter(dim, straight_through=False, temperature=temperature,
                                         num_routing_tokens=routes)
    config = CoLT5Config(d_model=dim, router_type="cum_softmax", router_temperature=temperature,
                         router_straight_through=False, router_one_sided_gradient=False)
    ours = CoLT5Router(config, k, routes)
    with torch.no_grad():
        reference.routing_token.mul_(0.5)
        ours.weight.copy_(reference.routing_token)
    x = torch.randn(3, n, dim, generator=torch.Generator().manual_seed(3))
    mask = padding_mask([30, 19, 11], n)

    reference_weights, reference_indices = reference(x, num_tokens=k, mask=mask)
    reference_weights = reference_weights.view(3, routes, k)
    reference_indices = reference_indices.view(3, routes, k)
    out = ours(x, mask)
    assert out.valid.all()
    dense = torch.zeros(3, routes, n)
    ours_dense = dense.scatter(-1, out.indices, out.weights)
    reference_dense = dense.scatter(-1, reference_indices, reference_weights)
    torch.testing.assert_close(ours_dense, reference_dense, atol=1e-6, rtol=1e-5)
    upstream = torch.randn(3, routes, n)
    (ours_dense * upstream).sum().backward()
    (reference_dense * upstream).sum().backward()
    torch.testing.assert_close(ours.weight.grad, reference.routing_token.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("router_type", ["coor_descent", "cum_softmax"])
@pytest.mark.parametrize("straight_through", [True, False])
def test_routed_feed_forward_matches_reference(router_type, straight_through):
    """Same function as 0.2.2's ConditionalRoutedFeedForward for the same weights and routing.

    Where the designs differ, the test maps them: 0.2.2 routes the raw input and normalises inside each branch (its
    RMSNorm, x / |x| * sqrt(d) * gamma); ours normalises once (T5 RMS norm) and routes the normalised input. On tokens
    of RMS 1 both norms are the identity (ours with its weight at sqrt(1 + eps)). 0.2.2's branches are GELU MLPs with
    biases, ours gated-GELU without: the test puts 0.2.2's MLPs (after their norm) in place of our two branches. What
    is compared is then the routing (same tokens, same soft weights), the weighting of the heavy branch, the scatter
    and the sum of the branches, forward and gradients of the router and branch weights. Padding is used where both
    define the same soft weights (straight-through, or cum_softmax); for coordinate descent 0.2.2's k_fetch counts
    the padded length, ours each sample's real length.
    """
    dim, n, k = 32, 24, 5
    torch.manual_seed(4)
    kwargs = dict(num_heavy_tokens=k, light_ff_mult=0.5, heavy_ff_mult=2, router_straight_through=straight_through,
                  router_type=router_type)
    reference = ReferenceFeedForward(dim, **kwargs)
    ours = ConditionalRoutedFeedForward(dim, **kwargs)
    ours.light_feed_forward = copy.deepcopy(reference.light_ff[1:])  # Linear, GELU, Linear, without the norm
    ours.heavy_feed_forward = copy.deepcopy(reference.heavy_ff[1:])
    identity_norm(ours.norm)
    with torch.no_grad():
        reference.router.routing_token.mul_(0.2)  # small scores: no coordinate-descent score saturates at 1.0
        ours.router.weight.copy_(reference.router.routing_token)
    x = unit_rms(torch.randn(3, n, dim, generator=torch.Generator().manual_seed(5)))
    padded = straight_through or router_type == "cum_softmax"
    mask = padding_mask([24, 17, 9] if padded else [24, 24, 24], n)

    _, reference_indices = reference.router(x, num_tokens=k, mask=mask)
    routing = ours.router(ours.norm(x), mask)
    assert selected_sets(routing.indices, routing.valid) == selected_sets(reference_indices[:, None],
                                                                          routing.valid), "needs the same routing"
    reference_out, ours_out = reference(x, mask=mask), ours(x, mask)
    torch.testing.assert_close(ours_out, reference_out, atol=ATOL, rtol=RTOL)
    upstream = torch.randn(ours_out.shape)
    (reference_out * upstream).sum().backward()
    (ours_out * upstream).sum().backward()
    torch.testing.assert_close(ours.router.weight.grad, reference.router.routing_token.grad, atol=1e-4, rtol=1e-3)
    for name in ("1.weight", "1.bias", "3.weight", "3.bias"):  # Sequential slices keep their names
        torch.testing.assert_close(ours.heavy_feed_forward.get_parameter(name).grad,
                                   reference.heavy_ff[1:].get_parameter(name).grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours.light_feed_forward.get_parameter(name).grad,
                                   reference.light_ff[1:].get_parameter(name).grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_routed_attention_matches_reference_one_route(implementation):
    """Same function as 0.2.2's ConditionalRoutedAttention (straight-through routers, padding) for the same weights.

    Mapped design differences: 0.2.2 scales scores by 1/sqrt(d_head), ours does not (T5): folded into our query
    weights. Its light branch (local-attention's LocalMHA, window light_window_size // 2 each side, exact window) has
    its own LayerNorm, its heavy branch an RMSNorm, its routers the raw input; ours one RMS norm for all: on zero-mean
    tokens of RMS 1 these are the identity but for LayerNorm's 1/sqrt(1 + 1e-5), folded into our light q, k, v. It has
    no position information; ours a T5 relative position bias: zeroed here. It multiplies only the values by the
    key/value router weights, ours the routed tokens before the key and value projections (the paper's s_kv * X): the
    same forward under straight-through. Its 2-heads-of-(k, v) interleaved `to_kv` rows are split into our k and v.
    Scores are kept small so that no coordinate-descent score saturates at 1.0 (0.2.2 picks among ties by index).
    """
    dim, n = 32, 40
    sizes = dict(light_dim_head=8, light_heads=2, light_window_size=12, heavy_dim_head=16, heavy_heads=3)
    torch.manual_seed(6)
    reference = ReferenceAttention(dim, num_heavy_tokens_q=6, num_heavy_tokens_kv=10, **sizes)
    ours = ConditionalRoutedAttention(dim, num_heavy_tokens_q=6, num_heavy_tokens_kv=10,
                                      attn_implementation=implementation, **sizes)
    identity_norm(ours.norm)
    layer_norm = 1 / math.sqrt(1 + reference.light_attn.norm.eps)
    with torch.no_grad():
        q, k, v = reference.light_attn.to_qkv.weight.chunk(3)
        ours.light_attention.q.weight.copy_(q * layer_norm * sizes["light_dim_head"] ** -0.5)
        ours.light_attention.k.weight.copy_(k * layer_norm)
        ours.light_attention.v.weight.copy_(v * layer_norm)
        ours.light_attention.o.weight.copy_(reference.light_attn.to_out.weight)
        heavy = reference.heavy_attn
        ours.heavy_attention.q.weight.copy_(heavy.to_q.weight * sizes["heavy_dim_head"] ** -0.5)
        kv = heavy.to_kv.weight.view(sizes["heavy_heads"], 2, sizes["heavy_dim_head"], dim)  # (h, k|v, d_head, dim)
        ours.heavy_attention.k.weight.copy_(kv[:, 0].reshape(-1, dim))
        ours.heavy_attention.v.weight.copy_(kv[:, 1].reshape(-1, dim))
        ours.heavy_attention.o.weight.copy_(heavy.to_out.weight)
        ours.relative_attention_bias.weight.zero_()
        for name in ("q_router", "kv_router"):
            getattr(reference, name).routing_token.mul_(0.15)
            getattr(ours, name).weight.copy_(getattr(reference, name).routing_token)
    x = unit_rms(torch.randn(3, n, dim, generator=torch.Generator().manual_seed(7)), zero_mean=True)
    mask = padding_mask([40, 29, 13], n)

    for name, count in (("q_router", 6), ("kv_router", 10)):
        _, reference_indices = getattr(reference, name)(x, num_tokens=count, mask=mask)
        routing = getattr(ours, name)(ours.norm(x), mask)
        assert selected_sets(routing.indices, routing.valid) == selected_sets(reference_indices[:, None],
                                                                              routing.valid), "needs the same routing"
    with torch.no_grad():
        reference_out = reference(x, mask=mask)
        ours_out = ours(x, mask=mask)
    torch.testing.assert_close(ours_out[mask], reference_out[mask], atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------- where 0.2.2 is broken: its failures, and ours vs dense


def test_reference_bugs_that_the_docs_name():
    """The bugs docs/colt5-attention.md lists for colt5-attention 0.2.2, checked on the installed 0.2.2."""
    dim = 16
    torch.manual_seed(8)
    generator = torch.Generator().manual_seed(9)
    kwargs = dict(num_tokens_q=4, num_tokens_kv=6, dim_head=4, heads=4)
    # 1. cross-attention gathers the routed keys/values from the queries `x`, not from `context`: a context longer
    #    than x fails as soon as a routed context position lies beyond x's length
    with pytest.raises(IndexError):
        ReferenceCrossAttention(dim, **kwargs)(torch.randn(2, 8, dim), torch.randn(2, 32, dim))
    # 2. with kv_routing_tokens = R > 1, its gather indexes the batch by route: batch == R mixes samples (sample 0's
    #    output depends on sample 1's input), other batch sizes fail
    reference = ReferenceCrossAttention(dim, **kwargs, kv_routing_tokens=2)
    x, context = torch.randn(2, 30, dim, generator=generator), torch.randn(2, 16, dim, generator=generator)
    changed = x.clone()
    changed[1] = torch.randn(30, dim, generator=generator)
    with torch.no_grad():
        assert not torch.allclose(reference(x, context)[0], reference(changed, context)[0])
    with pytest.raises(IndexError):
        reference(torch.randn(3, 30, dim), torch.randn(3, 16, dim))
    # 3. sinkhorn routing in cross-attention: NameError (`heavy_out`) when the queries are routed
    with pytest.raises(NameError, match="heavy_out"):
        ReferenceCrossAttention(dim, **kwargs, router_type="sinkhorn")(torch.randn(2, 8, dim), torch.randn(2, 7, dim))
    # 4. its sinkhorn router adds Gumbel noise in eval mode too, and the noise decides: the column normalisation of
    #    its k x n matrix cancels the per-token scores (log of scores clamped at 1e-20, so every negative score ties),
    #    so its picks overlap the top-k by score no more than chance (k / n)
    router = SinkhornRouter(dim).eval()
    x = torch.randn(1, 64, dim, generator=generator)
    picks = [set(router(x, num_tokens=8)[1][0].tolist()) for _ in range(40)]
    assert len({frozenset(p) for p in picks}) > 1  # not deterministic in eval
    top = set((x[0] @ router.routing_token[0].detach()).topk(8).indices.tolist())
    assert sum(len(p & top) for p in picks) / (8 * len(picks)) < 0.3  # chance: 8 / 64
    # 5. its light attention (local-attention, autopad) without a mask lets the zero keys padded to a multiple of the
    #    window take attention mass: the last real tokens' outputs change
    attention = ReferenceAttention(dim, num_heavy_tokens_q=2, num_heavy_tokens_kv=4, light_dim_head=4, light_heads=2,
                                   light_window_size=8, heavy_dim_head=4, heavy_heads=2)
    x = torch.randn(1, 13, dim, generator=generator)  # 13: not a multiple of the window (4)
    with torch.no_grad():
        no_mask = attention.light_attn(x)
        all_real = attention.light_attn(x, mask=torch.ones(1, 13, dtype=torch.bool))
    assert torch.allclose(no_mask[0, :8], all_real[0, :8]) and not torch.allclose(no_mask[0, -1], all_real[0, -1])


def dense_cross_attention(layer, x, context, mask, context_mask, num_tokens_q, num_tokens_kv):
    """One sample and one route at a time: the routed queries (top-k of the query router) of route r's heads attend
    to route r's routed context tokens through route r's rows of the key/value projections, applied to s_kv * context;
    outputs s_q * attention at routed queries, 0 elsewhere."""
    config = layer.config
    b, t, d = x.shape
    heads, routes, d_kv = config.num_heads, layer.num_routes, config.d_kv
    per_route = heads // routes
    hidden_states, context = rms_norm(x, layer.norm), rms_norm(context, layer.context_norm)
    out = torch.zeros(b, t, d)
    for i in range(b):
        q_position, q_weight = top_tokens(layer.q_router.weight[0], hidden_states[i], mask[i], num_tokens_q, config)
        query = (hidden_states[i, q_position] @ layer.q.weight.T).view(len(q_position), heads, d_kv)
        head_out = torch.zeros(len(q_position), heads, d_kv)
        for r in range(routes):
            kv_position, kv_weight = top_tokens(layer.kv_router.weight[r], context[i], context_mask[i], num_tokens_kv,
                                                config)
            source = context[i, kv_position] * kv_weight[:, None]
            for j in range(per_route):
                rows = slice((r * per_route + j) * d_kv, (r * per_route + j + 1) * d_kv)
                key, value = source @ layer.k.weight[rows].T, source @ layer.v.weight[rows].T
                head_out[:, r * per_route + j] = dense_attention(query[:, r * per_route + j], key, value)
        out[i, q_position] = (head_out.flatten(1) @ layer.o.weight.T) * q_weight[:, None]
    return out


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize(
    "routes, num_tokens_q, num_tokens_kv, straight_through",
    [(1, 5, 7, True), (2, 0.4, 6, False), (4, 9, 0.3, False), (2, 1.0, 1.0, False)],
)
def test_cross_attention_equals_dense_per_sample_and_route(routes, num_tokens_q, num_tokens_kv, straight_through,
                                                           implementation):
    """0.2.2's cross-attention is broken (above); ours against the dense computation, with padding on both sides,
    counts and fractions, several routes with batch 3; and samples never mix."""
    dim, b, t, n = 32, 3, 11, 19
    torch.manual_seed(10)
    layer = ConditionalRoutedCrossAttention(dim, num_tokens_q=num_tokens_q, num_tokens_kv=num_tokens_kv, dim_head=8,
                                            heads=4, kv_routing_tokens=routes, router_straight_through=straight_through,
                                            attn_implementation=implementation).eval()
    with torch.no_grad():
        for norm in (layer.norm, layer.context_norm):
            norm.weight.normal_(1.0, 0.2)
        for router in (layer.q_router, layer.kv_router):
            router.weight.normal_()
    generator = torch.Generator().manual_seed(11)
    x, context = torch.randn(b, t, dim, generator=generator), torch.randn(b, n, dim, generator=generator)
    mask, context_mask = padding_mask([11, 8, 3], t), padding_mask([19, 12, 5], n)
    context_mask[0, 4:7] = False  # a hole
    with torch.no_grad():
        out = layer(x, context, mask=mask, context_mask=context_mask)
        expected = dense_cross_attention(layer, x, context, mask, context_mask, num_tokens_q, num_tokens_kv)
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
        assert (out[~mask] == 0).all()
        # samples never mix: changing sample 1 (queries and context, padding included) leaves the others untouched
        changed_x, changed_context = x.clone(), context.clone()
        changed_x[1], changed_context[1] = torch.randn(t, dim, generator=generator), torch.randn(n, dim)
        changed = layer(changed_x, changed_context, mask=mask, context_mask=context_mask)
    assert torch.equal(changed[0], out[0]) and torch.equal(changed[2], out[2])
    assert not torch.allclose(changed[1], out[1])


def test_cross_attention_with_everything_routed_is_plain_cross_attention():
    """Counts at least the lengths: every real token of both sides, weights exactly 1 (0.2.2 skips its routers when
    the inputs are not longer than the counts): multi-head cross-attention, route r's heads on every context token."""
    dim, t, n = 16, 6, 9
    torch.manual_seed(12)
    layer = ConditionalRoutedCrossAttention(dim, num_tokens_q=64, num_tokens_kv=64, dim_head=4, heads=4,
                                            kv_routing_tokens=2, router_straight_through=False)
    x, context = torch.randn(2, t, dim), torch.randn(2, n, dim)
    context_mask = padding_mask([9, 5], n)
    with torch.no_grad():
        out = layer(x, context, context_mask=context_mask)
        query = (rms_norm(x, layer.norm) @ layer.q.weight.T).view(2, t, 4, 4).transpose(1, 2)
        source = rms_norm(context, layer.context_norm)
        key, value = ((source @ w.T).view(2, n, 4, 4).transpose(1, 2) for w in (layer.k.weight, layer.v.weight))
        heads = dense_attention(query, key, value, keep=context_mask[:, None, None, :])
        expected = heads.transpose(1, 2).flatten(2) @ layer.o.weight.T
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------------------------- the layers: dense computations


def dense_routed_attention(layer, x, mask, num_q, num_kv):
    """Per sample: light heads attend within `radius` with the bias table's first columns; the heavy heads, among the
    independently routed tokens, with its other columns, biased by original positions; s_q, s_kv as in the paper."""
    config = layer.config
    light, heavy = layer.light_attention, layer.heavy_attention
    b, n, d = x.shape
    hidden_states = rms_norm(x, layer.norm)
    bias_weight = layer.relative_attention_bias.weight
    light_heads = config.num_light_heads
    position = torch.arange(n)
    relative = position[None, :] - position[:, None]  # key - query
    out = torch.zeros(b, n, d)
    for i in range(b):
        def heads(t, module):
            return t.view(t.shape[0], module.num_heads, -1).transpose(0, 1)

        h = hidden_states[i]
        keep = (relative.abs() <= config.local_radius) & mask[i][None, :]
        bias = bias_weight[t5_bucket(relative, config), :light_heads].permute(2, 0, 1)
        light_out = dense_attention(heads(h @ light.q.weight.T, light), heads(h @ light.k.weight.T, light),
                                    heads(h @ light.v.weight.T, light), bias, keep)
        out[i] = light_out.transpose(0, 1).flatten(1) @ light.o.weight.T

        q_position, q_weight = top_tokens(layer.q_router.weight[0], h, mask[i], num_q, config)
        kv_position, kv_weight = top_tokens(layer.kv_router.weight[0], h, mask[i], num_kv, config)
        routed = h[kv_position] * kv_weight[:, None]
        bias = bias_weight[t5_bucket(kv_position[None, :] - q_position[:, None], config), light_heads:]
        heavy_out = dense_attention(heads(h[q_position] @ heavy.q.weight.T, heavy),
                                    heads(routed @ heavy.k.weight.T, heavy), heads(routed @ heavy.v.weight.T, heavy),
                                    bias.permute(2, 0, 1))
        out[i, q_position] += (heavy_out.transpose(0, 1).flatten(1) @ heavy.o.weight.T) * q_weight[:, None]
    return out


@pytest.mark.parametrize("straight_through", [True, False])
@pytest.mark.parametrize("num_q, num_kv", [(4, 9), (0.2, 0.5)])
def test_routed_attention_equals_dense_with_relative_bias(num_q, num_kv, straight_through):
    dim, n = 32, 26
    torch.manual_seed(13)
    layer = ConditionalRoutedAttention(dim, num_heavy_tokens_q=num_q, num_heavy_tokens_kv=num_kv, light_dim_head=8,
                                       light_heads=2, light_window_size=7, heavy_dim_head=4, heavy_heads=3,
                                       router_straight_through=straight_through, attn_implementation="eager")
    assert layer.light_attention.config.local_radius == 3
    with torch.no_grad():
        layer.norm.weight.normal_(1.0, 0.2)
        layer.relative_attention_bias.weight.normal_()
        for router in (layer.q_router, layer.kv_router):
            router.weight.normal_()
    x = torch.randn(3, n, dim, generator=torch.Generator().manual_seed(14))
    mask = padding_mask([26, 17, 6], n)
    mask[0, 10:13] = False
    with torch.no_grad():
        out = layer(x, mask=mask)
        expected = dense_routed_attention(layer, x, mask, num_q, num_kv)
    torch.testing.assert_close(out[mask], expected[mask], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("straight_through", [True, False])
def test_routed_feed_forward_equals_light_plus_heavy_on_routed_tokens(straight_through):
    dim, n = 16, 21
    torch.manual_seed(15)
    layer = ConditionalRoutedFeedForward(dim, num_heavy_tokens=0.3, router_straight_through=straight_through)
    with torch.no_grad():
        layer.router.weight.normal_()
    x = torch.randn(3, n, dim, generator=torch.Generator().manual_seed(16))
    mask = padding_mask([21, 10, 1], n)

    def gated(h, ff):
        return (F.gelu(h @ ff.wi_0.weight.T, approximate="tanh") * (h @ ff.wi_1.weight.T)) @ ff.wo.weight.T

    with torch.no_grad():
        out = layer(x, mask)
        h = rms_norm(x, layer.norm)
        expected = gated(h, layer.light_feed_forward)
        for i in range(3):
            position, weight = top_tokens(layer.router.weight[0], h[i], mask[i], 0.3, layer.config)
            expected[i, position] += gated(h[i, position], layer.heavy_feed_forward) * weight[:, None]
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)


def test_block_is_attention_then_feed_forward_with_residuals():
    torch.manual_seed(17)
    block = ConditionalRoutedTransformerBlock(16, num_heavy_attn_tokens_q=3, num_heavy_attn_tokens_kv=0.5,
                                              num_heavy_ff_tokens=4, light_dim_head=4, light_heads=2,
                                              light_window_size=4, heavy_dim_head=4, heavy_heads=2)
    x, mask = torch.randn(2, 12, 16), padding_mask([12, 7], 12)
    with torch.no_grad():
        after_attention = x + block.conditional_attn(x, mask=mask, num_heavy_tokens_kv=2)
        expected = after_attention + block.conditional_ff(after_attention, mask=mask)
        torch.testing.assert_close(block(x, mask, num_heavy_attn_tokens_kv=2), expected)
        assert not torch.allclose(block(x, mask), expected)  # the override mattered


def test_counts_fractions_and_per_call_overrides():
    """An int is a count per sample (all real tokens of a shorter sample), a float a fraction of each sample's real
    length, rounded up; a forward argument overrides the constructor's for that call."""
    torch.manual_seed(18)
    layer = ConditionalRoutedFeedForward(16, num_heavy_tokens=5)
    recorded = []
    layer.router.register_forward_hook(lambda module, args, output: recorded.append(output.valid[:, 0].sum(-1)))
    x, lengths = torch.randn(3, 20, 16), [20, 9, 3]
    mask = padding_mask(lengths, 20)
    for num_tokens in (None, 2, 0.25, 1.0, 100):
        layer(x, mask, num_heavy_tokens=num_tokens)
        count = 5 if num_tokens is None else num_tokens
        assert recorded[-1].tolist() == [expected_count(count, length) for length in lengths], num_tokens
    for bad in (0, -3, 0.0, 1.5, True, "4"):
        with pytest.raises(ValueError, match="fraction of each sample's real length"):
            layer(x, mask, num_heavy_tokens=bad)


def test_constructor_errors_and_router_kwargs():
    layer = ConditionalRoutedFeedForward(16, num_heavy_tokens=2, router_type="sinkhorn",
                                         router_kwargs=dict(n_iters=8, temperature=0.7, fetch_k_ratio=1.5))
    config = layer.router.config
    assert (config.router_type, config.router_iterations, config.router_temperature,
            config.router_fetch_ratio) == ("sinkhorn", 8, 0.7, 1.5)
    layer = ConditionalRoutedAttention(16, num_heavy_tokens_q=2, num_heavy_tokens_kv=4, router_kwargs=dict(eps=0.5))
    assert layer.q_router.config.router_epsilon == layer.kv_router.config.router_epsilon == 0.5
    with pytest.raises(ValueError, match="not options of the 'cum_softmax' router"):
        ConditionalRoutedFeedForward(16, num_heavy_tokens=2, router_type="cum_softmax", router_kwargs=dict(n_iters=3))
    with pytest.raises(ValueError, match="`router_type` must be one of"):
        ConditionalRoutedFeedForward(16, num_heavy_tokens=2, router_type="top_k")
    with pytest.raises(ValueError, match="`router_temperature` must be a positive number"):
        ConditionalRoutedFeedForward(16, num_heavy_tokens=2, router_type="sinkhorn", router_kwargs=dict(temperature=0))
    with pytest.raises(ValueError, match="divisible by `kv_routing_tokens`"):
        ConditionalRoutedCrossAttention(16, num_tokens_q=2, num_tokens_kv=2, heads=6, kv_routing_tokens=4)
    with pytest.raises(ValueError, match="light_window_size"):
        ConditionalRoutedAttention(16, num_heavy_tokens_q=2, num_heavy_tokens_kv=2, light_window_size=1)
    with pytest.raises(ValueError, match="fraction of each sample's real length"):
        ConditionalRoutedFeedForward(16, num_heavy_tokens=2.0)
    with pytest.raises(ValueError, match="attn_implementation"):
        ConditionalRoutedAttention(16, num_heavy_tokens_q=2, num_heavy_tokens_kv=2, attn_implementation="flash")


# ------------------------------------------------------------------------------------------------ the router types


def make_router(router_type, num_tokens, routes=1, straight_through=False, seed=0, **overrides):
    config = CoLT5Config(d_model=16, router_type=router_type, router_straight_through=straight_through,
                         router_iterations=60, router_temperature=0.8, **overrides)
    torch.manual_seed(seed)
    router = CoLT5Router(config, num_tokens, routes)
    torch.nn.init.normal_(router.weight)
    return router.eval()


@pytest.mark.parametrize("router_type", ROUTER_TYPES)
@pytest.mark.parametrize("routes, num_tokens", [(1, 6), (3, 0.3)])
def test_router_types_route_the_top_k_real_tokens_of_each_sample(router_type, routes, num_tokens):
    router = make_router(router_type, num_tokens, routes)
    lengths, n = [30, 17, 5, 0], 30
    generator = torch.Generator().manual_seed(1)
    hidden_states = torch.randn(4, n, 16, generator=generator, requires_grad=True)
    mask = padding_mask(lengths, n)
    mask[1, 3:6] = False  # a hole
    mask[1, 17:20] = True
    out = router(hidden_states, mask)
    raw = torch.einsum("bnd,rd->brn", hidden_states, router.weight).detach()
    for i in range(4):
        real = mask[i].nonzero()[:, 0]
        k = expected_count(num_tokens, len(real))
        for r in range(routes):
            valid = out.valid[i, r]
            assert valid.sum() == k and valid[:k].all()  # valid slots first
            best = real[raw[i, r, real].argsort(descending=True)[:k]]
            assert torch.equal(out.indices[i, r][valid], best.sort().values)  # in increasing position
            assert len(set(out.indices[i, r].tolist())) == out.indices.shape[-1]  # distinct
            weights = out.weights[i, r]
            assert (weights[~valid] == 0).all() and (weights[valid] > 0).all() and (weights[valid] <= 1).all()
    assert (out.weights[:2][out.valid[:2]] < 1).any()  # soft weights, not all saturated
    (out.weights * torch.randn(out.weights.shape, generator=generator)).sum().backward()
    assert torch.isfinite(router.weight.grad).all() and router.weight.grad.abs().sum() > 0
    assert torch.isfinite(hidden_states.grad).all() and (hidden_states.grad[~mask] == 0).all()

    with torch.no_grad():  # per-sample k and mask-aware: junk in the padding changes nothing, each sample alone is a row
        junk = hidden_states.detach().masked_fill(~mask[..., None], 1e4)
        again = router(junk, mask)
        assert torch.equal(again.indices[again.valid], out.indices[out.valid])
        torch.testing.assert_close(again.weights, out.weights.detach(), atol=1e-6, rtol=1e-5)
        for i in range(3):
            alone = router(hidden_states[i : i + 1].detach(), mask[i : i + 1])
            k = int(out.valid[i, 0].sum())
            assert torch.equal(alone.indices[0, :, :k], out.indices[i, :, :k])
            torch.testing.assert_close(alone.weights[0, :, :k], out.weights[i, :, :k].detach(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("router_type", ROUTER_TYPES)
def test_straight_through_is_one_forward_with_the_soft_gradient(router_type):
    hidden_states, mask = torch.randn(3, 24, 16), padding_mask([24, 15, 7], 24)
    upstream = torch.randn(3, 2, 5)
    grads = []
    for straight_through in (True, False):
        router = make_router(router_type, 5, routes=2, straight_through=straight_through, seed=2)
        out = router(hidden_states, mask)
        if straight_through:
            assert (out.weights[out.valid] == 1).all()
        (out.weights * upstream).sum().backward()
        grads.append(router.weight.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("router_type", ROUTER_TYPES)
def test_a_route_over_every_real_token_routes_nothing(router_type):
    """k equal to a sample's length: every real token, weight exactly 1 (the dense limit is exact), no gradient."""
    hidden_states, mask = torch.randn(2, 12, 16), padding_mask([12, 5], 12)
    for num_tokens in (1.0, 12, 40):
        router = make_router(router_type, num_tokens, routes=2)
        out = router(hidden_states, mask)
        assert out.valid.sum(-1).tolist() == [[12, 12], [5, 5]]
        assert (out.weights[out.valid] == 1).all()
        out.weights.sum().backward()
        assert router.weight.grad is None or (router.weight.grad == 0).all()


def test_cumulative_softmax_matches_its_definition():
    generator = torch.Generator().manual_seed(3)
    scores = torch.randn(4, 15, generator=generator) * 3
    scores[0, 7] = scores[0, 2]  # an exact tie: the earlier token ranks higher
    mask = torch.rand(4, 15, generator=generator) < 0.7
    mask[3] = False
    soft = cumulative_softmax(scores, mask)
    for i in range(4):
        real = mask[i].nonzero()[:, 0].tolist()
        ranked = sorted(real, key=lambda j: (-scores[i, j].item(), j))  # best first, ties by position
        for place, j in enumerate(ranked):
            below = torch.tensor([scores[i, m].item() for m in ranked[place:]], dtype=torch.float64)
            expected = math.exp(scores[i, j].item()) / below.exp().sum().item()
            assert soft[i, j].item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
        assert (soft[i][~mask[i]] == 0).all()
    assert soft[0, 2] < soft[0, 7] or not (mask[0, 2] and mask[0, 7])


def test_sinkhorn_top_k_solves_the_transport_problem():
    """The fixed point: sigmoid(s_i + t) over a row's real tokens with the threshold t that makes them sum to k, found
    here by bisection. Rows with k equal to their length are all 1, rows without real tokens 0; gradients finite."""
    generator = torch.Generator().manual_seed(4)
    scores = (torch.randn(5, 32, generator=generator) * 2).requires_grad_()
    lengths = torch.tensor([32, 20, 9, 4, 0])
    mask = torch.rand(5, 32, generator=generator).argsort(-1).argsort(-1) < lengths[:, None]
    k = torch.tensor([[4.5], [7.0], [2.25], [4.0], [0.0]])
    soft = sinkhorn_top_k(scores, mask, k, iterations=200)
    for i in range(4):
        s = scores[i, mask[i]].detach().double()
        low, high = -50.0, 50.0
        for _ in range(200):
            middle = (low + high) / 2
            low, high = (middle, high) if (s + middle).sigmoid().sum() < k[i, 0] else (low, middle)
        expected = torch.zeros(32, dtype=torch.float64)
        expected[mask[i]] = (s + low).sigmoid()
        if k[i, 0] == lengths[i]:
            expected[mask[i]] = 1.0
        torch.testing.assert_close(soft[i].double(), expected, atol=1e-4, rtol=1e-4)
    assert (soft[4] == 0).all() and (soft[~mask] == 0).all()
    (soft * torch.randn(soft.shape, generator=generator)).sum().backward()
    assert torch.isfinite(scores.grad).all() and (scores.grad[~mask] == 0).all()
    # lower temperatures (scores scaled up) approach the hard top-k
    row, real = scores[:1].detach(), torch.ones(1, 32, dtype=torch.bool)
    hard = torch.zeros(1, 32).scatter(1, row.topk(4).indices, 1.0)
    distances = [(sinkhorn_top_k(row * scale, real, torch.tensor([[4.0]]), iterations=200) - hard).abs().sum()
                 for scale in (1, 4, 16, 64)]
    assert all(a > b for a, b in zip(distances, distances[1:])) and distances[-1] < 0.05


def test_sinkhorn_router_is_deterministic_in_eval_and_samples_in_training():
    router = make_router("sinkhorn", 6, routes=2, seed=5)
    hidden_states, mask = torch.randn(3, 40, 16), padding_mask([40, 25, 9], 40)
    first, second = router(hidden_states, mask), router(hidden_states, mask)
    assert torch.equal(first.indices, second.indices) and torch.equal(first.weights, second.weights)
    router.train()
    torch.manual_seed(0)
    seeded = router(hidden_states, mask)
    torch.manual_seed(0)
    assert torch.equal(router(hidden_states, mask).indices, seeded.indices)  # the noise comes from torch's RNG
    overlaps = []
    for seed in range(20):
        torch.manual_seed(seed)
        sample = router(hidden_states, mask)
        assert torch.equal(sample.valid, first.valid)
        assert mask.gather(1, sample.indices.flatten(1))[sample.valid.flatten(1)].all()  # real tokens only
        overlaps.append(sum(len(a & b) for a, b in zip(sum(selected_sets(sample.indices, sample.valid), []),
                                                        sum(selected_sets(first.indices, first.valid), []))))
    total = int(first.valid.sum())
    assert min(overlaps) < total  # the noise changes the picks ...
    assert sum(overlaps) / (20 * total) > 0.5  # ... around the top-k by score


# -------------------------------------------------------------------------------------------- inside the full model


def model_config(router_type, **overrides):
    values = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=1, num_heads=4,
                  num_light_heads=2, num_heavy_heads=2, local_radius=5, attention_q_fraction=0.25,
                  attention_kv_fraction=0.5, feed_forward_fraction=0.25, num_cross_attention_routes=2,
                  cross_attention_fraction=0.5, router_type=router_type, router_straight_through=False,
                  router_iterations=20, router_temperature=0.7, dropout_rate=0.0)
    return CoLT5Config(**{**values, **overrides})


def model_batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, 96, (3, 30), generator=generator)
    labels = torch.randint(2, 96, (3, 6), generator=generator)
    return input_ids, padding_mask([30, 21, 8], 30).long(), labels


@pytest.mark.parametrize("router_type", ROUTER_TYPES)
def test_router_types_train_and_generate_in_the_full_model(router_type):
    torch.manual_seed(20)
    model = CoLT5ForConditionalGeneration(model_config(router_type))
    input_ids, attention_mask, labels = model_batch()
    model.train()
    loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    routers = {name: p.grad for name, p in model.named_parameters() if "router" in name}
    assert len(routers) == 2 * 3 + 1  # per encoder layer: FF, attention q, attention kv; the cross-attention router
    for name, grad in routers.items():
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    model.eval()
    with torch.no_grad():
        first = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits
        assert torch.equal(model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits, first)
        generated = [model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6,
                                    do_sample=False, use_cache=use_cache, output_scores=True,
                                    return_dict_in_generate=True) for use_cache in (True, False)]
    assert torch.equal(generated[0].sequences, generated[1].sequences)
    for cached, uncached in zip(generated[0].scores, generated[1].scores, strict=True):
        torch.testing.assert_close(cached, uncached, atol=1e-4, rtol=1e-4)


def test_sinkhorn_noise_is_replayed_by_gradient_checkpointing():
    """The training noise comes from torch's RNG, whose state checkpointing restores for the recomputation: the same
    loss and gradients with and without checkpointing."""
    input_ids, attention_mask, labels = model_batch(1)
    results = []
    for checkpointing in (False, True, False):
        torch.manual_seed(21)
        model = CoLT5ForConditionalGeneration(model_config("sinkhorn")).train()
        if checkpointing:
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        torch.manual_seed(22 if len(results) < 2 else 23)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (plain_loss, plain_grads), (checkpointed_loss, checkpointed_grads), (other_loss, _) = results
    torch.testing.assert_close(checkpointed_loss, plain_loss)
    for plain, checkpointed in zip(plain_grads, checkpointed_grads, strict=True):
        torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(other_loss, plain_loss)  # other noise, other loss: the noise is really there
