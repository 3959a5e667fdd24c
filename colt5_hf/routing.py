"""Routers of CoLT5: soft top-k by coordinate descent, hard top-k with straight-through scores, gather/scatter."""

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


try:  # CUDA fast paths: all iterations in one Triton launch; the top-k selection in one launch
    from .coordinate_descent_kernel import fused_coordinate_descent
    from .top_k_kernel import RESIDENT_ROW, fused_top_k_positions
except ImportError:
    fused_coordinate_descent = fused_top_k_positions = None


def coordinate_descent(scores, mask, k, *, iterations: int, epsilon: float):
    """Soft top-k of each row of `scores` (Wright 2015; CoLT5 section 3.3).

    Finds lambda in [0, 1]^n with sum(lambda) = k maximising `scores . lambda + epsilon * entropy(lambda)`, by
    coordinate descent on the dual variables `a` (one per row) and `b` (one per token):
        a = epsilon * log(k) - epsilon * logsumexp((s + b) / epsilon),   b = -relu(s + a),
    and returns lambda = exp((s + a + b) / epsilon) = exp(min(s + a, 0) / epsilon).

    scores: (..., n) float; mask: (..., n) bool, False for tokens that take no part; k: (..., 1) target sums (at most
    the number of unmasked tokens). Runs in float32 whatever the input dtype or autocast state. Masked tokens and rows
    with no unmasked token get 0. Gradients flow through the unrolled iterations. On CUDA with Triton the fused
    kernels of `coordinate_descent_kernel.py` compute the same function.
    """
    if scores.is_cuda and fused_coordinate_descent is not None:
        return fused_coordinate_descent(scores, mask, k, iterations=iterations, epsilon=epsilon)
    with torch.autocast(device_type=scores.device.type, enabled=False):
        s = scores.float()
        empty_row = ~mask.any(-1, keepdim=True)
        mask = mask | empty_row  # computed on, then zeroed: keeps every row's logsumexp finite
        s = s.masked_fill(~mask, float("-inf"))
        log_k = k.float().clamp(min=1).log()
        b = -s.clamp(min=0)
        for _ in range(iterations):
            a = epsilon * (log_k - ((s + b) / epsilon).logsumexp(-1, keepdim=True))
            b = -(s + a).clamp(min=0)
        soft = ((s + a).clamp(max=0) / epsilon).exp()
        return soft.masked_fill(empty_row, 0.0)


def sinkhorn_top_k(scores, mask, k, *, iterations: int):
    """Soft top-k of each row of `scores` by entropy-regularised optimal transport (the Sinkhorn operator of
    Gumbel-Sinkhorn, Mena et al. 2018, on the top-k transport problem of Xie et al. 2020).

    Every unmasked token holds one unit of mass and ships it to two bins, "selected" (capacity k) and "not selected"
    (capacity length - k), with log-potential s_i towards the first and 0 towards the second. Sinkhorn alternately
    normalises the 2 x n matrix over the bins (each token ships exactly its unit) and over the tokens (each bin
    receives its capacity), in log space, from potentials that put the threshold at the k-th best score (a warm start:
    the fixed point is the same, and large score ranges, i.e. low temperatures, converge in far fewer iterations).
    After a last normalisation over the bins, token i's share of the selected bin is
    sigmoid(s_i + u_selected - u_not_selected): in [0, 1], a non-decreasing function of s_i, summing to k over the row
    once converged.

    (colt5-attention's k x n matrix, one row per routed slot, has k identical rows up to noise: the slots are
    interchangeable, so they are one bin of capacity k here, and no slot can pick a token that another slot picked.)

    Same arguments and float32 policy as `coordinate_descent`: masked tokens hold no mass and get 0, and so do rows
    with no unmasked token.
    """
    with torch.autocast(device_type=scores.device.type, enabled=False):
        s = scores.float()
        empty_row = ~mask.any(-1, keepdim=True)
        mask = mask | empty_row  # computed on, then zeroed
        k = k.float().expand(*s.shape[:-1], 1)
        length = mask.sum(-1, keepdim=True).float()
        log_capacity = torch.stack([k.log(), (length - k).clamp(min=0).log()], dim=-2)  # (..., 2, 1); log 0 = -inf
        log_mass = torch.zeros_like(s).masked_fill(~mask, float("-inf"))[..., None, :]  # (..., 1, n)
        potential = torch.stack([s, torch.zeros_like(s)], dim=-2)  # (..., 2, n)
        ranked = s.masked_fill(~mask, float("-inf")).sort(dim=-1, descending=True).values
        threshold = ranked.gather(-1, (k.ceil().long() - 1).clamp(min=0)).detach()  # (..., 1): the k-th best score
        bins = torch.stack([-threshold, torch.zeros_like(threshold)], dim=-2)  # (..., 2, 1)
        for _ in range(iterations):
            tokens = log_mass - (potential + bins).logsumexp(-2, keepdim=True)
            bins = log_capacity - (potential + tokens).logsumexp(-1, keepdim=True)
        soft = (s + bins[..., 0, :] - bins[..., 1, :]).sigmoid()
        return soft.masked_fill(~mask | empty_row, 0.0)


def cumulative_softmax(scores, mask):
    """Differentiable top-k by cumulative softmax: with a row's unmasked tokens ranked by score (exact ties by position,
    the earlier token ranking higher), token i weighs exp(s_i) / (sum of exp(s_j) over itself and every unmasked token
    ranked below it). Computed in log space (log-cumulative-sum-exp), float32; masked tokens get 0.
    """
    with torch.autocast(device_type=scores.device.type, enabled=False):
        s = scores.float()
        order = s.masked_fill(~mask, float("-inf")).sort(dim=-1, descending=True, stable=True).indices
        ranked_mask = mask.gather(-1, order)
        # masked tokens rank last; a finite floor (not -inf) keeps the backward pass of logcumsumexp finite
        ranked = s.gather(-1, order).masked_fill(~ranked_mask, torch.finfo(torch.float32).min)
        below = ranked.flip(-1).logcumsumexp(-1).flip(-1)  # log of the sum over each token and the ones below it
        weights = (ranked - below).exp().masked_fill(~ranked_mask, 0.0)
        return torch.zeros_like(s).scatter(-1, order, weights)


def top_k_positions(scores, mask, k, k_max: int):
    """The positions of each row's `k` best unmasked scores (exact ties: the earlier position first) in increasing
    order, followed by the row's other positions in increasing order, cut to the first `k_max` slots.

    scores: (..., n) float, finite; mask: (..., n) bool; k: (...) integer counts, at most the row's unmasked tokens;
    k_max <= n. Returns (..., k_max) int64, distinct within a row. On CUDA with Triton, rows of at most 16k tokens
    take the kernel of `top_k_kernel.py`: the same function in one launch, without sorting.
    """
    if scores.is_cuda and fused_top_k_positions is not None and scores.shape[-1] <= RESIDENT_ROW:
        return fused_top_k_positions(scores, mask, k, k_max)
    n = scores.shape[-1]
    order = scores.float().masked_fill(~mask, float("-inf")).sort(dim=-1, descending=True, stable=True).indices
    positions = torch.arange(n, device=scores.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)  # 0 for the best score
    not_taken = (rank >= k[..., None]).to(torch.uint8)
    # a stable sort puts the taken positions first, each group in increasing order
    return not_taken.sort(dim=-1, stable=True).indices[..., :k_max]


def exploring_positions(scores, mask, k, k_max: int, share: float):
    """`top_k_positions` with round(share * k) of each row's k positions drawn uniformly at random, without
    replacement, from the unmasked positions outside the row's top (k - drawn) by score. Same arguments and layout."""
    drawn = (k.float() * share).round().long()
    best = top_k_positions(scores, mask, k - drawn, k_max)
    by_score = torch.arange(k_max, device=scores.device) < (k - drawn)[..., None]
    picked = torch.zeros_like(mask).scatter(-1, best, by_score)  # best's positions are distinct within a row
    key = torch.rand_like(scores, dtype=torch.float32).masked_fill(picked, 2.0)  # picked first, then a random order
    return top_k_positions(key, mask, k, k_max)


class RouterType(NamedTuple):
    """A router type: its soft top-k, `weights(scores, mask, k, config)` with float32 scores (..., n), mask (..., n)
    bool and target sums k (..., 1) -> the routed tokens' weights (..., n) in [0, 1], 0 at masked tokens; `sampled`:
    in training, logistic noise perturbs the scores first, so that a route draws its tokens at random."""

    weights: Callable
    sampled: bool = False


# The router types by `config.router_type`: a new type is one soft top-k and one entry here.
ROUTER_TYPES = {
    "coor_descent": RouterType(lambda scores, mask, k, config: coordinate_descent(
        scores, mask, k, iterations=config.router_iterations, epsilon=config.router_epsilon)),
    "cum_softmax": RouterType(lambda scores, mask, k, config: cumulative_softmax(
        scores / config.router_temperature, mask)),
    "sinkhorn": RouterType(lambda scores, mask, k, config: sinkhorn_top_k(
        scores / config.router_temperature, mask, k, iterations=config.router_iterations), sampled=True),
}


def training_noise(config) -> float:
    """Scale of the logistic noise that perturbs the router scores in training: `config.router_noise`, or where that is
    None, 1 for a router type that samples its routes (sinkhorn) and 0 for the others."""
    if config.router_noise is not None:
        return float(config.router_noise)
    return 1.0 if ROUTER_TYPES[config.router_type].sampled else 0.0


def draws_at_random(config) -> bool:
    """Whether the routers draw some of their routes at random in training (`router_noise`, sinkhorn's own noise or
    `router_exploration`)."""
    return bool(training_noise(config) or config.router_exploration)


def logistic_noise(like):
    """Standard logistic noise shaped like `like`: the difference of two independent standard Gumbel variables."""
    uniform = torch.rand_like(like).clamp(min=torch.finfo(like.dtype).tiny)
    return uniform.log() - (-uniform).log1p()


class OneSidedGradient(torch.autograd.Function):
    """Identity forward; backward passes the negative part of the gradient, the part of the loss's gradient that asks
    for more of a routed token (d loss / d weight < 0: its heavy output helped), and `leak` times the positive part.
    `router_one_sided_gradient`, `router_one_sided_leak`."""

    @staticmethod
    def forward(ctx, weights, leak: float):
        ctx.leak = leak
        return weights.view_as(weights)

    @staticmethod
    def backward(ctx, grad):
        return torch.where(grad > 0, ctx.leak * grad, grad), None


class RouterOutput(NamedTuple):
    """What a router picked. Slot j of a route is a routed token only where `valid`: each sample's valid slots come
    first, in increasing position (see `top_k_positions`).

    indices: (batch, routes, k) positions of the routed tokens in the sequence, distinct within a route;
    weights: (batch, routes, k) float32 multipliers for the routed tokens (1.0 in the forward pass under
        straight-through, the soft top-k score otherwise; exactly 1.0 where a route takes every real token of its
        sample; 0 in invalid slots);
    valid: (batch, routes, k) bool.
    """

    indices: torch.Tensor
    weights: torch.Tensor
    valid: torch.Tensor


class CoLT5Router(nn.Module):
    """Scores each token with a learned vector per route (`weight`, routes x d_model) and keeps, for every sample, its
    best `num_tokens` real tokens. `num_tokens` is a fraction (float in (0, 1]) of each sample's real length, counted by
    `config.routed_count`, or a count (int >= 1); a sample with fewer real tokens keeps them all. A forward call may
    override it. Routers that read the same hidden states can select together (`select_routes`).

    The routed tokens' weights come from the soft top-k of `config.router_type`, on float32 scores:
        coor_descent: `coordinate_descent` for k_fetch = router_fetch_ratio * k tokens (epsilon `router_epsilon`);
        sinkhorn: `sinkhorn_top_k` of the scores / `router_temperature`, for k_fetch tokens; in training, logistic noise
            (the difference of the Gumbel noises of a token's two transport entries) perturbs the scores first, so a
            route samples its tokens; in eval it is deterministic (`config.router_noise` scales that noise, and adds
            it to the other types);
        cum_softmax: `cumulative_softmax` of the scores / `router_temperature`.
    Every type selects the top k by score (perturbed score for sinkhorn in training), ties broken by position. For
    coordinate descent and Sinkhorn the soft score is a non-decreasing function of the score, so this is their hard
    top-k with ties (the saturation of many soft scores at 1.0 makes them common) broken by the score; cumulative
    softmax is defined on the ranking by score. A route that takes every real token of a sample routes nothing:
    those weights are exactly 1.
    """

    def __init__(self, config, num_tokens: float | int, num_routes: int = 1):
        super().__init__()
        self.config = config
        self.num_tokens = self.check_num_tokens(num_tokens)
        self.weight = nn.Parameter(torch.empty(num_routes, config.d_model))
        self.recorded = None  # a list while `CoLT5PreTrainedModel.record_routing` records this router's outputs

    @staticmethod
    def check_num_tokens(num_tokens):
        if isinstance(num_tokens, float) and 0 < num_tokens <= 1:
            return num_tokens
        if isinstance(num_tokens, int) and not isinstance(num_tokens, bool) and num_tokens >= 1:
            return num_tokens
        raise ValueError(
            f"number of routed tokens: pass a fraction of each sample's real length (a float in (0, 1]) or a count (an "
            f"int >= 1), got {num_tokens!r}"
        )

    def routed_count(self, num_tokens, length):
        """Tokens routed from a sample of `length` real tokens (an int or an integer tensor)."""
        if isinstance(num_tokens, float):
            return self.config.routed_count(num_tokens, length)
        return min(num_tokens, length) if isinstance(length, int) else length.clamp(max=num_tokens)

    def forward(self, hidden_states, mask, num_tokens=None, *, select: bool = True) -> RouterOutput:
        """hidden_states: (b, n, d) normalised hidden states; mask: (b, n) bool. With `select=False`, only the routes'
        float32 scores (b, routes, n): `select_routes` then selects for several routers at once (scored through their
        module calls, which accelerate's offloading hooks need to load the weights)."""
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            # a product and a sum, not a matmul: matmul kernels round a row's dot product differently depending on its
            # place in the batch, so equal hidden states (a repeated token in the first layer) could score unequally,
            # and a padded sample would break their tie differently than the sample alone
            hidden_states = hidden_states.float()
            scores = torch.stack([(hidden_states * route).sum(-1) for route in self.weight.float()], dim=1)
        return select_routes([self], [scores], mask, [num_tokens])[0] if select else scores


def select_routes(routers, scores, mask, num_tokens=None) -> list[RouterOutput]:
    """Each router's `RouterOutput` from its scores (a list of (b, routes, n), the routers' `select=False` outputs)
    and the mask (b, n), as its own forward would return it, computed together: every route of every router is one
    row of a single top-k selection and a single soft top-k (one launch each on CUDA instead of one per router).
    `num_tokens`: a list with each router's override or None. The routers must share one config."""
    config, n = routers[0].config, mask.shape[1]
    if any(router.config is not config for router in routers):
        raise ValueError("routers selected together must share one config")
    num_tokens = [
        router.num_tokens if tokens is None else router.check_num_tokens(tokens)
        for router, tokens in zip(routers, num_tokens or [None] * len(routers), strict=True)
    ]
    lengths = mask.sum(-1)  # (b,)
    k_maxes = [router.routed_count(tokens, n) for router, tokens in zip(routers, num_tokens)]
    k = torch.cat([  # (b, R): each route's count for each sample, <= its router's k_max
        router.routed_count(tokens, lengths)[:, None].expand(-1, len(router.weight))
        for router, tokens in zip(routers, num_tokens)
    ], dim=1)
    scores = torch.cat(scores, dim=1)  # (b, R, n)
    router_type = ROUTER_TYPES[config.router_type]
    noise = training_noise(config)
    if noise and routers[0].training:
        # a route then also tries tokens it would not pick: the only way a token outside the routed set gets a gradient
        # of its own (the soft top-k couples it to the routed tokens only through their common threshold)
        scores = scores + noise * logistic_noise(scores)
    route_mask = mask[:, None, :].expand_as(scores)
    # exact ties (a repeated token scores alike in the first layer) go to the earlier position, where topk's choice
    # among ties would depend on the batch's shape
    if config.router_exploration and routers[0].training:
        indices = exploring_positions(scores, route_mask, k, max(k_maxes), config.router_exploration)
    else:
        indices = top_k_positions(scores, route_mask, k, max(k_maxes))  # (b, R, k_max)
    valid = torch.arange(indices.shape[-1], device=scores.device) < k[..., None]  # (b, R, k_max)

    k_fetch = torch.minimum(k * config.router_fetch_ratio, lengths[:, None])[..., None].float()  # (b, R, 1)
    weights = router_type.weights(scores, route_mask, k_fetch, config).gather(-1, indices)
    if config.router_straight_through:
        weights = 1.0 + (weights - weights.detach())  # forward value exactly 1, gradient of the soft score
    if config.router_one_sided_gradient and weights.requires_grad:
        weights = OneSidedGradient.apply(weights, config.router_one_sided_leak)
    every_token = (k == lengths[:, None])[..., None]  # (b, R, 1)
    weights = weights.masked_fill(every_token, 1.0).masked_fill(~valid, 0.0)

    outputs, first = [], 0
    for router, k_max in zip(routers, k_maxes):
        rows = slice(first, first + len(router.weight))
        first = rows.stop
        output = RouterOutput(indices[:, rows, :k_max], weights[:, rows, :k_max], valid[:, rows, :k_max])
        if router.recorded is not None:
            router.recorded.append(RouterOutput(*(t.detach() for t in output)))
        outputs.append(output)
    return outputs


def route_together(routers, hidden_states, mask, num_tokens=None) -> list[RouterOutput]:
    """Routers that read the same hidden states (b, n, d): each scores them through its module call, then
    `select_routes` selects for all of them at once."""
    scores = [router(hidden_states, mask, select=False) for router in routers]
    return select_routes(routers, scores, mask, num_tokens)


def gather_tokens(hidden_states, indices):
    """(b, n, d) gathered at (b, ..., k) -> (b, ..., k, d)."""
    b, n, d = hidden_states.shape
    flat = indices.reshape(b, -1, 1).expand(-1, -1, d)
    return hidden_states.gather(1, flat).reshape(*indices.shape, d)


def gather_route_heads(projected, routing: RouterOutput, d_kv: int):
    """Keys or values of several routes from one projection of every position: (b, n, r * heads * d_kv) -> (b, r,
    heads, k, d_kv), each route's own heads at its routed tokens (valid slots first), scaled by the router weights."""
    b, n, _ = projected.shape
    routes = routing.indices.shape[1]
    t = projected.view(b, n, routes, -1).transpose(1, 2)  # (b, r, n, heads * d_kv)
    t = t.gather(2, routing.indices[..., None].expand(-1, -1, -1, t.shape[-1]))  # (b, r, k, heads * d_kv)
    t = t * routing.weights[..., None].to(t.dtype)
    return t.unflatten(-1, (-1, d_kv)).transpose(2, 3)


def scatter_tokens(routed, indices, length: int):
    """Inverse of `gather_tokens` for one route: (b, k, d) at (b, k) into zeros of (b, length, d). Indices within a
    row are distinct, so this is a plain scatter; invalid slots must carry zeros."""
    b, k, d = routed.shape
    out = routed.new_zeros(b, length, d)
    return out.scatter_add(1, indices[..., None].expand(-1, -1, d), routed)


class RoutedSum(NamedTuple):
    """A routed sublayer's output, dense + routed rows added at their positions, kept apart so that the residual add
    takes the routed rows in place (`add_to`) instead of scattering them into zeros of (b, n, d) first.

    dense: (b, n, d) for every token; routed: (b, k, d), row j belonging to position indices[:, j]; indices: (b, k),
    distinct within a sample; invalid slots carry zero rows.
    """

    dense: torch.Tensor
    routed: torch.Tensor
    indices: torch.Tensor

    def add_to(self, hidden_states, dropout: float = 0.0):
        """hidden_states + dropout(dense + routed rows at their positions), with one dropout mask for both parts, as
        on their sum. The routed positions' rows are summed apart, in the order of `hidden_states + (dense +
        scattered)`, and written over the dense sum: the same roundings eagerly and compiled (an atomic add of the
        routed rows into the rounded dense sum rounds differently, enough to swap a near-tied token in the next
        layer's router in bf16)."""
        dense, routed = self.dense, self.routed
        if dropout:
            keep = F.dropout(torch.ones_like(dense), dropout)  # 0 or 1 / (1 - p) per element
            dense, routed = dense * keep, routed * gather_tokens(keep, self.indices)
        total = hidden_states + dense  # promoted as a sum would be (a float32 residual stream under autocast)
        rows = gather_tokens(hidden_states, self.indices) + (gather_tokens(dense, self.indices) + routed)  # (b, k, d)
        return total.scatter(1, self.indices[..., None].expand_as(routed), rows.to(total.dtype))
