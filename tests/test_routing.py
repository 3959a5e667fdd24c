"""Routers of CoLT5 (colt5_hf/routing.py): coordinate descent, CoLT5Router, gather/scatter.

The oracle for coordinate descent is the reference implementation, colt5_attention.coor_descent (0.2.2)."""

import math

import pytest
import torch
from colt5_attention.coor_descent import coor_descent as reference_coor_descent

from colt5_hf import CoLT5Config
from colt5_hf.routing import (
    CoLT5Router, coordinate_descent, gather_tokens, scatter_tokens, select_routes, top_k_positions
)


def random_rows(seed, batch=6, n=48, scale=2.0):
    """Random scores, a mask with real tokens at random places (one row fully masked), and a per-row k in
    [1, real length] that is fractional in some rows, like the routers' k_fetch = 9/8 * k."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, n, generator=generator) * scale
    lengths = torch.tensor([n, n - 7, 25, 9, 1, 0])[:batch]
    rank = torch.rand(batch, n, generator=generator).argsort(-1).argsort(-1)
    mask = rank < lengths[:, None]  # (batch, n): `lengths` real tokens at random positions
    k = torch.tensor([8.0, 5.625, 3.375, 9.0, 1.0, 1.0])[:batch, None]
    k = torch.minimum(k, lengths[:, None].float().clamp(min=1))
    return scores, mask, k


# ---------------------------------------------------------------------------------------------- coordinate descent


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_soft_scores_sum_to_k_and_respect_mask(seed):
    scores, mask, k = random_rows(seed)
    # rows whose k equals their length (every token saturates) converge slowest: 100 iterations bring them to 1e-4
    soft = coordinate_descent(scores, mask, k, iterations=100, epsilon=1.0)
    real_rows = mask.any(-1)
    assert soft.dtype == torch.float32 and torch.isfinite(soft).all()
    assert (soft >= 0).all() and (soft <= 1).all()
    torch.testing.assert_close(soft.sum(-1)[real_rows], k[real_rows, 0], atol=1e-3, rtol=1e-3)
    assert (soft[~mask] == 0).all()  # exactly zero, not merely small
    assert (soft[~real_rows] == 0).all()
    # every real token of a row whose k equals its length is fully selected
    full = (mask.sum(-1) == k[:, 0]) & real_rows
    assert full.sum() >= 2
    selected = soft[full][mask[full]]
    torch.testing.assert_close(selected, torch.ones_like(selected), atol=1e-3, rtol=0)


def test_fully_masked_row_gives_zeros_and_finite_gradients():
    scores = torch.randn(3, 10, requires_grad=True)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1] = False
    mask[2, 5:] = False
    soft = coordinate_descent(scores, mask, torch.full((3, 1), 2.0), iterations=20, epsilon=1.0)
    assert torch.isfinite(soft).all()
    assert (soft[1] == 0).all()
    (soft * torch.randn(3, 10)).sum().backward()
    assert torch.isfinite(scores.grad).all()
    assert (scores.grad[1] == 0).all() and (scores.grad[2, 5:] == 0).all()
    assert scores.grad[0].abs().sum() > 0


@pytest.mark.parametrize("epsilon, separation, iterations", [(1.0, 10.0, 50), (0.1, 1.5, 50), (0.05, 1.5, 20)])
def test_agrees_with_hard_top_k_when_well_separated(epsilon, separation, iterations):
    generator = torch.Generator().manual_seed(3)
    batch, n = 5, 40
    lengths = torch.tensor([40, 31, 17, 9, 3])
    mask = torch.rand(batch, n, generator=generator).argsort(-1).argsort(-1) < lengths[:, None]
    k = torch.tensor([5, 12, 1, 8, 3])[:, None]
    # the k chosen real tokens score around +separation, all others around -separation
    rank = torch.rand(batch, n, generator=generator).masked_fill(~mask, 2.0).argsort(-1).argsort(-1)
    hard = (rank < k) & mask
    scores = torch.where(hard, separation, -separation) + torch.rand(batch, n, generator=generator) - 0.5
    soft = coordinate_descent(scores, mask, k.float(), iterations=iterations, epsilon=epsilon)
    torch.testing.assert_close(soft, hard.float(), atol=1e-3, rtol=0)
    # and the hard top-k of the soft scores is the hard top-k of the logits
    assert torch.equal(soft > 0.5, hard)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_run_in_float32(dtype):
    scores, mask, k = random_rows(4)
    scores = scores.to(dtype)
    soft = coordinate_descent(scores, mask, k.to(dtype), iterations=30, epsilon=1.0)
    assert soft.dtype == torch.float32 and torch.isfinite(soft).all()
    # identical to running on the same values upcast by hand: nothing is computed in half precision
    expected = coordinate_descent(scores.float(), mask, k.to(dtype).float(), iterations=30, epsilon=1.0)
    assert torch.equal(soft, expected)
    # extreme half-precision scores stay finite, gradients too
    big = (torch.randn(2, 32) * (torch.finfo(torch.float16).max / 4)).to(dtype).requires_grad_()
    out = coordinate_descent(big, torch.ones(2, 32, dtype=torch.bool), torch.full((2, 1), 4.0), iterations=30,
                             epsilon=1.0)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out.sum().backward()
    assert big.grad.dtype == dtype and torch.isfinite(big.grad).all()


def test_bf16_autocast_keeps_float32():
    scores, mask, k = random_rows(5)
    scores.requires_grad_()
    expected = coordinate_descent(scores, mask, k, iterations=30, epsilon=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        soft = coordinate_descent(scores, mask, k, iterations=30, epsilon=1.0)
    assert soft.dtype == torch.float32 and torch.isfinite(soft).all()
    assert torch.equal(soft, expected)
    soft.sum().backward()
    assert torch.isfinite(scores.grad).all()


@pytest.mark.parametrize("epsilon, iterations", [(1.0, 20), (1.0, 50), (0.1, 50)])
@pytest.mark.parametrize("seed", [0, 1])
def test_parity_with_reference_coor_descent(seed, epsilon, iterations):
    scores, mask, k = random_rows(seed)
    real_rows = mask.any(-1)  # the reference gives no defined answer for a row without any real token
    scores, mask, k = scores[real_rows], mask[real_rows], k[real_rows]
    ours_input = scores.clone().requires_grad_()
    reference_input = scores.clone().requires_grad_()
    ours = coordinate_descent(ours_input, mask, k, iterations=iterations, epsilon=epsilon)
    # same semantics: `k` is the per-row target sum (a tensor), `eps` the entropy weight epsilon
    reference = reference_coor_descent(reference_input, n_iters=iterations, k=k, eps=epsilon, mask=mask)
    torch.testing.assert_close(ours, reference, atol=5e-5, rtol=1e-4)
    upstream = torch.randn(scores.shape, generator=torch.Generator().manual_seed(seed))
    (ours * upstream).sum().backward()
    (reference * upstream).sum().backward()
    torch.testing.assert_close(ours_input.grad, reference_input.grad, atol=1e-4, rtol=1e-3)


# ----------------------------------------------------------------------------------------------------- the router


def router_config(**overrides):
    values = dict(d_model=16, d_kv=4, d_ff=32, num_heads=4, num_layers=1, feed_forward_fraction=0.25,
                  min_routed_tokens=3, router_iterations=30, router_epsilon=1.0, dropout_rate=0.0)
    values.update(overrides)
    return CoLT5Config(**values)


def make_router(config, fraction=None, routes=1, seed=0):
    torch.manual_seed(seed)
    router = CoLT5Router(config, config.feed_forward_fraction if fraction is None else fraction, routes)
    torch.nn.init.normal_(router.weight)
    return router


def expected_count(config, fraction, length):
    """Independent statement of the routed count: ceil(fraction * length), at least min_routed_tokens, at most
    length."""
    return min(length, max(config.min_routed_tokens, math.ceil(round(fraction * length, 9))))


def padded_batch(lengths, n, d=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden_states = torch.randn(len(lengths), n, d, generator=generator)
    mask = torch.arange(n) < torch.tensor(lengths)[:, None]
    return hidden_states, mask


@pytest.mark.parametrize("routes", [1, 3])
def test_router_picks_top_k_raw_scores_of_real_tokens(routes):
    config = router_config()
    router = make_router(config, routes=routes)
    lengths = [40, 23, 12, 5, 2, 0]
    hidden_states, mask = padded_batch(lengths, 40)
    # padding in the middle of one sample: the router must follow the mask, not a length
    mask[1, 3:8] = False
    mask[1, 23:28] = True
    out = router(hidden_states, mask)
    raw = torch.einsum("bnd,rd->brn", hidden_states, router.weight.detach())
    k_max = expected_count(config, config.feed_forward_fraction, 40)
    assert out.indices.shape == out.weights.shape == out.valid.shape == (len(lengths), routes, k_max)
    assert out.weights.dtype == torch.float32
    for i in range(len(lengths)):
        real = mask[i].nonzero()[:, 0]
        k = expected_count(config, config.feed_forward_fraction, len(real))
        for r in range(routes):
            valid = out.valid[i, r]
            assert valid.sum() == k and valid[:k].all()  # valid slots come first
            chosen = out.indices[i, r][valid]
            expected = real[raw[i, r, real].argsort(descending=True)[:k]].sort().values  # increasing position
            assert torch.equal(chosen, expected)
            assert len(set(out.indices[i, r].tolist())) == k_max  # distinct slots: scatter stays a plain scatter
            assert (out.weights[i, r][~valid] == 0).all()
            assert (out.weights[i, r][valid] == 1.0).all()  # straight-through: exactly 1 in the forward pass


def test_router_straight_through_gradient_is_the_soft_score_gradient():
    lengths = [30, 17, 4]
    hidden_states, mask = padded_batch(lengths, 30, seed=1)
    upstream = torch.randn(3, 1, 8)
    grads = {}
    for straight_through in (True, False):
        config = router_config(router_straight_through=straight_through)
        router = make_router(config, seed=1)
        out = router(hidden_states, mask)
        assert out.indices.shape[-1] == 8
        (out.weights * upstream).sum().backward()
        grads[straight_through] = router.weight.grad
        assert torch.isfinite(router.weight.grad).all() and router.weight.grad.abs().sum() > 0
        if straight_through:
            assert (out.weights[out.valid] == 1.0).all()
        else:
            assert (out.weights[out.valid] < 1.0).any()
    torch.testing.assert_close(grads[True], grads[False], atol=1e-6, rtol=1e-5)


def test_router_soft_weights_match_reference_coordinate_descent():
    config = router_config(router_straight_through=False, router_iterations=40)
    router = make_router(config, seed=2)
    lengths = [36, 20, 7]
    hidden_states, mask = padded_batch(lengths, 36, seed=2)
    out = router(hidden_states, mask)
    raw = torch.einsum("bnd,rd->brn", hidden_states, router.weight.detach())
    for i, length in enumerate(lengths):
        k = expected_count(config, config.feed_forward_fraction, length)
        k_fetch = torch.tensor([[min(k * config.router_fetch_ratio, length)]])
        soft = reference_coor_descent(raw[i, :, :length], n_iters=40, k=k_fetch, eps=1.0)[0]
        valid = out.valid[i, 0]
        torch.testing.assert_close(out.weights[i, 0][valid], soft[out.indices[i, 0][valid]], atol=1e-5, rtol=1e-5)


def test_router_selection_is_top_k_of_soft_scores_with_ties_broken_by_raw_score():
    config = router_config(feed_forward_fraction=0.125, min_routed_tokens=1, router_iterations=50)
    router = make_router(config, seed=3)
    lengths = [64, 50, 31]
    hidden_states, mask = padded_batch(lengths, 64, seed=3)
    hidden_states = hidden_states * 8  # spread the scores: many soft scores saturate at exactly 1.0
    out = router(hidden_states, mask)
    raw = torch.einsum("bnd,rd->brn", hidden_states, router.weight.detach())[:, 0]  # (b, n)
    k = torch.tensor([expected_count(config, config.feed_forward_fraction, length) for length in lengths])
    k_fetch = torch.minimum(k * config.router_fetch_ratio, torch.tensor(lengths))[:, None].float()
    soft = coordinate_descent(raw, mask, k_fetch, iterations=50, epsilon=1.0)
    saturated = (soft == 1.0).sum(-1)
    assert (saturated >= 2).all() and (saturated > k).any(), "the test needs ties at 1.0 to mean anything"
    for i in range(len(lengths)):
        real = mask[i].nonzero()[:, 0]
        by_raw = real[raw[i, real].argsort(descending=True, stable=True)]
        order = by_raw[soft[i, by_raw].argsort(descending=True, stable=True)]  # soft first, raw breaks ties
        assert torch.equal(out.indices[i, 0][out.valid[i, 0]], order[: k[i]].sort().values)


def test_top_k_positions_takes_the_best_in_position_order_then_the_rest():
    scores = torch.tensor([[0.1, 0.9, -0.0, 0.5, 0.9, 0.0, 0.3], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
    mask = torch.tensor([[True] * 7, [True, True, True, False, False, True, True]])
    k = torch.tensor([3, 2])
    # row 0: 0.9, 0.9, 0.5; row 1: the best real ones (7.0, 6.0), then the others in order, masked ones included
    assert top_k_positions(scores, mask, k, 7).tolist() == [[1, 3, 4, 0, 2, 5, 6], [5, 6, 0, 1, 2, 3, 4]]
    assert top_k_positions(scores, mask, k, 4).tolist() == [[1, 3, 4, 0], [5, 6, 0, 1]]
    # the last one taken ties (-0.0 equals 0.0): the earlier position; k = 0 takes nothing
    assert top_k_positions(scores, mask, torch.tensor([6, 0]), 7).tolist() == [[0, 1, 2, 3, 4, 6, 5], list(range(7))]


def test_router_short_sequence_routes_every_token():
    config = router_config(min_routed_tokens=4)
    router = make_router(config)
    hidden_states, mask = padded_batch([3], 3)
    out = router(hidden_states, mask)
    assert out.valid.all() and sorted(out.indices[0, 0].tolist()) == [0, 1, 2]
    # a short sample inside a longer batch: its real tokens, all of them, and nothing else
    hidden_states, mask = padded_batch([30, 3, 1], 30)
    out = router(hidden_states, mask)
    assert sorted(out.indices[1, 0][out.valid[1, 0]].tolist()) == [0, 1, 2]
    assert out.indices[2, 0][out.valid[2, 0]].tolist() == [0]


@pytest.mark.parametrize("straight_through", [True, False])
def test_router_sample_padded_in_batch_equals_sample_alone(straight_through):
    config = router_config(router_straight_through=straight_through)
    router = make_router(config, routes=2, seed=4)
    hidden_states, mask = padded_batch([40, 19, 26], 40, seed=4)
    hidden_states[1, 19:] = torch.randn(21, 16) * 100  # junk in the padding must not matter
    batched = router(hidden_states, mask)
    for i, length in enumerate([40, 19, 26]):
        alone = router(hidden_states[i : i + 1, :length], mask[i : i + 1, :length])
        valid = batched.valid[i]
        assert torch.equal(valid.sum(-1), alone.valid[0].sum(-1))
        k = int(valid[0].sum())
        assert torch.equal(batched.indices[i][:, :k], alone.indices[0][:, :k])
        torch.testing.assert_close(batched.weights[i][:, :k], alone.weights[0][:, :k], atol=1e-6, rtol=1e-6)


def test_router_under_bf16_autocast_and_bf16_inputs():
    config = router_config()
    router = make_router(config)
    hidden_states, mask = padded_batch([32, 13], 32)
    expected = router(hidden_states, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = router(hidden_states, mask)
    assert out.weights.dtype == torch.float32
    assert torch.equal(out.indices, expected.indices) and torch.equal(out.weights, expected.weights)
    out = router(hidden_states.bfloat16(), mask)
    assert out.weights.dtype == torch.float32 and torch.isfinite(out.weights).all()
    assert torch.equal(out.valid, expected.valid)


@pytest.mark.parametrize("router_type", ["coor_descent", "sinkhorn", "cum_softmax"])
@pytest.mark.parametrize("straight_through", [True, False])
def test_routers_run_together_equal_each_router_alone(router_type, straight_through):
    config = router_config(router_type=router_type, router_straight_through=straight_through)
    routers = [make_router(config, 0.5, seed=5), make_router(config, 3, routes=2, seed=6), make_router(config, 0.125)]
    for router in routers:
        router.eval()  # sinkhorn samples in training
    hidden_states, mask = padded_batch([40, 19, 2], 40, seed=5)
    mask[0, 10:14] = False
    scores = [router(hidden_states, mask, select=False) for router in routers]
    together = select_routes(routers, scores, mask, [None, None, 12])  # the last one's count overridden
    assert [out.indices.shape[1:] for out in together] == [(1, 20), (2, 3), (1, 12)]
    upstream = [torch.randn(out.weights.shape) for out in together]
    grads = [torch.autograd.grad((out.weights * up).sum(), router.weight, retain_graph=True)[0]
             for router, out, up in zip(routers, together, upstream)]
    for i, router in enumerate(routers):
        alone = router(hidden_states, mask, 12 if i == 2 else None)
        assert together[i].indices.shape == alone.indices.shape
        assert torch.equal(together[i].indices, alone.indices) and torch.equal(together[i].valid, alone.valid)
        assert torch.equal(together[i].weights, alone.weights)
        grad, = torch.autograd.grad((alone.weights * upstream[i]).sum(), router.weight)
        assert torch.equal(grads[i], grad)
    with pytest.raises(ValueError, match="share one config"):
        select_routes([routers[0], make_router(router_config())], scores[:2], mask)


def test_router_noise_lets_a_route_try_tokens_outside_its_top_k_in_training_only():
    """router_noise (exploration): in training, logistic noise of that scale perturbs the scores before the top k, so
    tokens that the scores rank below the threshold are routed too, and their gradient reaches the router; eval
    picks the noise-free top k. Without it a token ranked out of the top k is never routed."""
    hidden_states, mask = padded_batch([64, 40], 64, seed=7)
    clean = make_router(router_config(feed_forward_fraction=0.125), seed=7)
    noisy = make_router(router_config(feed_forward_fraction=0.125, router_noise=2.0), seed=7)
    clean_routes = clean(hidden_states, mask)
    noisy.eval()
    assert torch.equal(noisy(hidden_states, mask).indices, clean_routes.indices)
    noisy.train(), clean.train()
    torch.manual_seed(0)
    tried, clean_tried = torch.zeros(2, 64, dtype=torch.bool), torch.zeros(2, 64, dtype=torch.bool)
    for _ in range(20):
        for router, seen in ((noisy, tried), (clean, clean_tried)):
            out = router(hidden_states, mask)
            for i in range(2):
                seen[i, out.indices[i, 0][out.valid[i, 0]]] = True
    assert torch.equal(clean_tried.sum(-1), clean_routes.valid[:, 0].sum(-1))  # always the same k tokens
    assert (tried.sum(-1) >= 3 * clean_tried.sum(-1)).all()  # k = 8 and 5 per call: 45 and 27 tokens tried
    assert not (tried & ~mask).any()  # never a padding token
    # a token far below the threshold gets gradient once noise routes it
    out = noisy(hidden_states, mask)
    weights = torch.zeros(2, 64).scatter(1, out.indices[:, 0], out.weights[:, 0])
    raw = torch.einsum("bnd,rd->bn", hidden_states, noisy.weight.detach())
    below = raw[0] < raw[0][clean_routes.indices[0, 0]].min()
    assert (weights[0][below] > 0).any()
    (-weights).sum().backward()  # a loss that asks for more of every routed token
    assert torch.isfinite(noisy.weight.grad).all() and noisy.weight.grad.abs().sum() > 0


def test_exploration_routes_the_top_tokens_and_draws_the_rest_at_random_in_training_only():
    """router_exploration: in training, round(share * k) of a route's k tokens are drawn uniformly from the real tokens
    outside its top (k - drawn) by score, which it always keeps; the layout is the top k's (valid slots first, in
    increasing position); eval routes the top k."""
    hidden_states, mask = padded_batch([64, 40], 64, seed=7)
    clean = make_router(router_config(feed_forward_fraction=0.25), seed=7)
    exploring = make_router(router_config(feed_forward_fraction=0.25, router_exploration=0.25), seed=7)
    top = clean(hidden_states, mask)  # k = 16 and 10 tokens
    exploring.eval()
    assert torch.equal(exploring(hidden_states, mask).indices, top.indices)
    exploring.train()
    raw = torch.einsum("bnd,rd->bn", hidden_states, exploring.weight.detach())
    torch.manual_seed(0)
    draws = torch.zeros(2, 64)
    for _ in range(400):
        out = exploring(hidden_states, mask)
        assert torch.equal(out.valid, top.valid)
        for i, (k, drawn) in enumerate(((16, 4), (10, 2))):  # round(0.25 * 10) = 2: half to even
            routed = out.indices[i, 0, :k]
            assert torch.equal(routed, routed.sort().values) and not (~mask[i, routed]).any()
            kept = raw[i].masked_fill(~mask[i], -math.inf).topk(k - drawn).indices
            assert torch.isin(kept, routed).all()
            draws[i, routed[~torch.isin(routed, kept)]] += 1
    for i, (length, k, drawn) in enumerate(((64, 16, 4), (40, 10, 2))):
        kept = raw[i].masked_fill(~mask[i], -math.inf).topk(k - drawn).indices
        others = mask[i].clone()
        others[kept] = False
        assert draws[i].sum() == 400 * drawn and not draws[i][~others].any()
        expected = 400 * drawn / (length - k + drawn)  # every other real token alike: 30.8 and 25.0 draws each
        assert (draws[i][others] - expected).abs().max() < 0.5 * expected
    # a drawn token far below the threshold carries the soft score's gradient to the router
    out = exploring(hidden_states, mask)
    weights = torch.zeros(2, 64).scatter(1, out.indices[:, 0], out.weights[:, 0])[0]
    drawn = torch.ones(64, dtype=torch.bool)
    drawn[top.indices[0, 0]] = False
    (-weights * drawn).sum().backward()
    assert exploring.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("leak", [0.0, 0.1])
@pytest.mark.parametrize("straight_through", [True, False])
def test_one_sided_gradient_keeps_only_the_asks_for_more(straight_through, leak):
    """router_one_sided_gradient: the same routes and weights; the router's gradient is the one the two-sided router
    gets when every routed token's d loss / d weight above 0 (its heavy output hurt) is scaled by
    router_one_sided_leak (0: dropped); a loss that every routed token hurts moves the router weight by the leak's
    share of the two-sided gradient (0: not at all)."""
    hidden_states, mask = padded_batch([48, 30, 9], 48, seed=8)
    two_sided = make_router(router_config(router_straight_through=straight_through, router_one_sided_gradient=False),
                            routes=2, seed=8)
    one_sided = make_router(router_config(router_straight_through=straight_through, router_one_sided_gradient=True,
                                          router_one_sided_leak=leak), routes=2, seed=8)
    expected, out = two_sided(hidden_states, mask), one_sided(hidden_states, mask)
    assert torch.equal(out.indices, expected.indices) and torch.equal(out.weights, expected.weights)
    upstream = torch.randn(out.weights.shape, generator=torch.Generator().manual_seed(8))
    assert (upstream[out.valid] > 0).any() and (upstream[out.valid] < 0).any()
    (out.weights * upstream).sum().backward()
    (expected.weights * (upstream.clamp(max=0) + leak * upstream.clamp(min=0))).sum().backward()
    assert one_sided.weight.grad.abs().sum() > 0
    torch.testing.assert_close(one_sided.weight.grad, two_sided.weight.grad, atol=1e-7, rtol=1e-6)
    one_sided.weight.grad = two_sided.weight.grad = None
    one_sided(hidden_states, mask).weights.sum().backward()  # more weight on any routed token raises the loss
    two_sided(hidden_states, mask).weights.sum().backward()
    assert two_sided.weight.grad.abs().sum() > 0
    torch.testing.assert_close(one_sided.weight.grad, leak * two_sided.weight.grad, atol=1e-7, rtol=1e-6)


def test_router_noise_none_is_the_router_types_own():
    from colt5_hf.routing import training_noise

    assert training_noise(router_config()) == 0.0  # coordinate descent: the paper's deterministic top k
    assert training_noise(router_config(router_type="sinkhorn")) == 1.0
    assert training_noise(router_config(router_type="sinkhorn", router_noise=0.0)) == 0.0
    assert training_noise(router_config(router_noise=0.5)) == 0.5


# ----------------------------------------------------------------------------------------------- gather / scatter


def test_gather_scatter_round_trip():
    generator = torch.Generator().manual_seed(0)
    b, n, d, k, routes = 3, 20, 5, 7, 2
    hidden_states = torch.randn(b, n, d, generator=generator)
    indices = torch.stack([torch.randperm(n, generator=generator)[: routes * k] for _ in range(b)]).view(b, routes, k)
    gathered = gather_tokens(hidden_states, indices)  # (b, routes, k, d)
    assert gathered.shape == (b, routes, k, d)
    for i in range(b):
        for r in range(routes):
            assert torch.equal(gathered[i, r], hidden_states[i, indices[i, r]])
    one_route = indices[:, 0]
    scattered = scatter_tokens(gather_tokens(hidden_states, one_route), one_route, n)  # (b, n, d)
    chosen = torch.zeros(b, n, dtype=torch.bool).scatter(1, one_route, True)
    assert torch.equal(scattered[chosen], hidden_states[chosen])
    assert (scattered[~chosen] == 0).all()
    assert torch.equal(gather_tokens(scattered, one_route), gather_tokens(hidden_states, one_route))
