"""Routers of CoLT5: soft top-k by coordinate descent, hard top-k with straight-through scores, gather/scatter."""

from typing import NamedTuple

import torch
from torch import nn


def coordinate_descent(scores, mask, k, *, iterations: int, epsilon: float):
    """Soft top-k of each row of `scores` (Wright 2015; CoLT5 section 3.3).

    Finds lambda in [0, 1]^n with sum(lambda) = k maximising `scores . lambda + epsilon * entropy(lambda)`, by
    coordinate descent on the dual variables `a` (one per row) and `b` (one per token):
        a = epsilon * log(k) - epsilon * logsumexp((s + b) / epsilon),   b = -relu(s + a),
    and returns lambda = exp((s + a + b) / epsilon) = exp(min(s + a, 0) / epsilon).

    scores: (..., n) float; mask: (..., n) bool, False for tokens that take no part; k: (..., 1) target sums (at most
    the number of unmasked tokens). Runs in float32 whatever the input dtype or autocast state. Masked tokens and rows
    with no unmasked token get 0. Gradients flow through the unrolled iterations.
    """
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


class RouterOutput(NamedTuple):
    """What a router picked. Slot j of a route is a routed token only where `valid`; slots are ordered by router
    score, so each sample's valid slots come first.

    indices: (batch, routes, k) positions of the routed tokens in the sequence;
    weights: (batch, routes, k) float32 multipliers for the routed tokens (1.0 in the forward pass under
        straight-through, the soft top-k score otherwise; 0 in invalid slots);
    valid: (batch, routes, k) bool.
    """

    indices: torch.Tensor
    weights: torch.Tensor
    valid: torch.Tensor


class CoLT5Router(nn.Module):
    """Scores each token with a learned vector per route (`weight`, routes x d_model) and keeps, for every sample, the
    top `config.routed_count(fraction, real length)` tokens; a sample no longer than that count keeps all its tokens.

    Coordinate descent runs with k_fetch = fetch_ratio * k. Its scores are a non-decreasing function of the raw router
    score (lambda = exp(min(s + a, 0) / epsilon)), so the hard top-k of lambda with ties broken by the raw score, which
    the saturation of many lambdas at 1.0 makes necessary, is exactly the top-k of the raw score: the routers select
    on the raw score and take lambda for the straight-through weights.
    """

    def __init__(self, config, fraction: float, num_routes: int = 1):
        super().__init__()
        self.config = config
        self.fraction = fraction
        self.weight = nn.Parameter(torch.empty(num_routes, config.d_model))

    def forward(self, hidden_states, mask) -> RouterOutput:
        # hidden_states: (b, n, d) normalised hidden states; mask: (b, n) bool
        config, n = self.config, hidden_states.shape[1]
        lengths = mask.sum(-1)  # (b,)
        k_max = config.routed_count(self.fraction, n)
        k = config.routed_count(self.fraction, lengths)  # (b,), per-sample count, <= k_max
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            # a product and a sum, not a matmul: matmul kernels round a row's dot product differently depending on its
            # place in the batch, so equal hidden states (a repeated token in the first layer) could score unequally,
            # and a padded sample would break their tie differently than the sample alone
            hidden_states = hidden_states.float()
            scores = torch.stack([(hidden_states * route).sum(-1) for route in self.weight.float()], dim=1)  # (b, r, n)
        route_mask = mask[:, None, :].expand_as(scores)
        ranked = scores.masked_fill(~route_mask, float("-inf"))
        # best first; the stable sort breaks exact ties (a repeated token scores alike in the first layer) by position,
        # where topk's choice among ties depends on the batch's shape
        indices = ranked.sort(dim=-1, descending=True, stable=True).indices[..., :k_max]  # (b, r, k_max)
        valid = torch.arange(k_max, device=scores.device) < k[:, None, None]  # (b, 1, k_max)
        valid = valid.expand_as(indices)

        k_fetch = torch.minimum(k * config.router_fetch_ratio, lengths)[:, None, None].float()
        soft = coordinate_descent(
            scores, route_mask, k_fetch, iterations=config.router_iterations, epsilon=config.router_epsilon
        )
        weights = soft.gather(-1, indices)
        if config.router_straight_through:
            weights = 1.0 + (weights - weights.detach())  # forward value exactly 1, gradient of the soft score
        weights = weights.masked_fill(~valid, 0.0)
        return RouterOutput(indices, weights, valid)


def gather_tokens(hidden_states, indices):
    """(b, n, d) gathered at (b, ..., k) -> (b, ..., k, d)."""
    b, n, d = hidden_states.shape
    flat = indices.reshape(b, -1, 1).expand(-1, -1, d)
    return hidden_states.gather(1, flat).reshape(*indices.shape, d)


def scatter_tokens(routed, indices, length: int):
    """Inverse of `gather_tokens` for one route: (b, k, d) at (b, k) into zeros of (b, length, d). Indices within a
    row are distinct, so this is a plain scatter; invalid slots must carry zeros."""
    b, k, d = routed.shape
    out = routed.new_zeros(b, length, d)
    return out.scatter_add(1, indices[..., None].expand(-1, -1, d), routed)
