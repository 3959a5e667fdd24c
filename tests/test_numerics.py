"""Numerical edge cases on CPU: half precision on long inputs, router scores of extreme scale, gradients through the
straight-through routers, fully padded rows."""

import contextlib
import json
from pathlib import Path

import pytest
import torch

from colt5_hf import CoLT5Config, CoLT5ForConditionalGeneration, CoLT5Router
from colt5_hf.routing import ROUTER_TYPES


TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "colt5-tiny.json"
ROUTED_CROSS_ATTENTION = dict(num_cross_attention_routes=2, cross_attention_fraction=0.5)


def tiny_config(**overrides):
    values = json.loads(TINY_CONFIG.read_text())
    values.pop("model_type")
    return CoLT5Config(**{**values, **ROUTED_CROSS_ATTENTION, **overrides})


def build(seed=0, **overrides):
    torch.manual_seed(seed)
    return CoLT5ForConditionalGeneration(tiny_config(**overrides)).eval()


def batch(length, seed=0, vocab_size=384):
    """Three rows of `length` tokens: unpadded; right-padded with a hole; fully padded. Labels of 7 tokens."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, vocab_size, (3, length), generator=generator)
    attention_mask = torch.ones(3, length, dtype=torch.long)
    attention_mask[1, 2 * length // 3 :] = 0
    attention_mask[1, length // 10 : length // 5] = 0
    attention_mask[2] = 0
    labels = torch.randint(2, vocab_size, (3, 7), generator=generator)
    return input_ids, attention_mask, labels


def forward_backward(model, input_ids, attention_mask, labels, context=contextlib.nullcontext()):
    model.zero_grad()
    with context:
        outputs = model(input_ids, attention_mask, labels=labels)
    outputs.loss.backward()
    return outputs


def assert_finite_gradients(model):
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.isfinite().all(), name


def relative_error(actual, expected):
    return ((actual.float() - expected).norm() / expected.norm()).item()


# -------------------------------------------------------------------------------------------------- half precision


LONG = 2333  # not a multiple of the local-attention block


@pytest.fixture(scope="module")
def float32_run():
    input_ids, attention_mask, labels = batch(LONG)
    model = build()
    outputs = forward_backward(model, input_ids, attention_mask, labels)
    return outputs, {name: parameter.grad for name, parameter in model.named_parameters()}


@pytest.mark.parametrize(
    "dtype, mode, max_error",
    [
        (torch.float16, "weights", 0.01),
        (torch.float16, "autocast", 0.01),
        (torch.bfloat16, "weights", 0.05),
        (torch.bfloat16, "autocast", 0.05),
    ],
)
def test_half_precision_forward_and_backward_on_a_long_input(dtype, mode, max_error, float32_run):
    """2333 tokens, a hole, a fully padded row: loss, logits, encoder outputs and every gradient are finite with
    float16/bfloat16 weights and under autocast, and close to float32's at the real positions (measured: fp16 0.1%,
    bf16 0.5-1.7%; the bound leaves room for a few routing choices that rounding flips)."""
    reference, reference_grads = float32_run
    input_ids, attention_mask, labels = batch(LONG)
    model = build()
    context = contextlib.nullcontext()
    if mode == "weights":
        model.to(dtype)
    else:
        context = torch.autocast("cpu", dtype=dtype)
    outputs = forward_backward(model, input_ids, attention_mask, labels, context)

    assert outputs.loss.isfinite() and outputs.logits.isfinite().all()
    assert outputs.encoder_last_hidden_state.isfinite().all()
    assert_finite_gradients(model)
    real = attention_mask.bool()
    assert relative_error(outputs.encoder_last_hidden_state[real], reference.encoder_last_hidden_state[real]) < max_error
    assert relative_error(outputs.logits[:2], reference.logits[:2]) < max_error
    assert abs(outputs.loss.item() / reference.loss.item() - 1) < max_error
    for name, parameter in model.named_parameters():  # gradients point the way float32's do
        if "router" not in name:  # a router's gradient flows through few tokens: rounding may flip one of them
            cosine = torch.cosine_similarity(parameter.grad.float().flatten(), reference_grads[name].flatten(), dim=0)
            assert cosine > 0.9, (name, cosine.item())


def test_float16_huge_activations_are_clamped_not_infinite():
    """T5's fp16 guard: embeddings near float16's largest value (65504) grow past it in the residual stream; the
    blocks clamp instead of overflowing to inf."""
    model = build().to(torch.float16)
    with torch.no_grad():
        model.encoder.embed_tokens.weight.mul_(60000 / model.encoder.embed_tokens.weight.abs().max())
    input_ids, attention_mask, labels = batch(300)
    outputs = forward_backward(model, input_ids, attention_mask, labels)
    assert outputs.encoder_last_hidden_state.isfinite().all() and outputs.logits.isfinite().all()
    assert outputs.loss.isfinite()


# --------------------------------------------------------------------------------------------------------- routers


def record_router_calls(model):
    """Every router call as [name, router, hidden_states, mask, RouterOutput]: the inputs from a forward pre-hook, the
    output from what the router records (routers that select together return their scores from the module call)."""
    calls = []

    class Outputs(list):  # the router's `recorded` list: fills in its oldest call still waiting for an output
        def __init__(self, router):
            super().__init__()
            self.router = router

        def append(self, output):
            next(call for call in calls if call[1] is self.router and call[4] is None)[4] = output

    for name, module in model.named_modules():
        if isinstance(module, CoLT5Router):
            module.recorded = Outputs(module)
            module.register_forward_pre_hook(
                lambda module, args, name=name: calls.append([name, module, args[0], args[1], None])
            )
    return calls


@pytest.mark.parametrize("router_type", ROUTER_TYPES)
@pytest.mark.parametrize("straight_through", [True, False], ids=["straight-through", "soft-weights"])
@pytest.mark.parametrize("scale", [1e4, 1.0, 1e-6])
def test_router_scores_of_extreme_scale(scale, straight_through, router_type):
    """Router weights scaled by 1e4 or 1e-6: every router still routes the top-k real tokens by score (checked against
    scores recomputed in float64), its weights are finite, in [0, 1] and (coordinate descent, Sinkhorn) non-increasing
    from the best-scored slot down (their soft top-k is monotone in the score), and every gradient is finite.

    Coordinate descent: at 1e-6 the soft top-k is flat, every routed weight k_fetch / length. At 1e4 it saturates (soft
    scores at exactly 1 have no gradient), so the straight-through encoder routers get no gradient at all: extreme
    router scales stall router learning. Plain coordinate descent also moves its threshold by about epsilon * log(n)
    per iteration, so at 1e4 it is far from converged after `router_iterations`: a routed token's soft weight can be 0
    (it then adds nothing to its layer in soft-weight mode)."""
    model = build(router_straight_through=straight_through, router_type=router_type)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, CoLT5Router):
                module.weight.mul_(scale)
    calls = record_router_calls(model)
    input_ids, attention_mask, labels = batch(300)
    outputs = forward_backward(model, input_ids, attention_mask, labels)
    assert outputs.loss.isfinite()
    assert_finite_gradients(model)
    assert len(calls) == 3 * model.config.num_layers + model.config.num_decoder_layers

    for name, router, hidden_states, mask, routing in calls:
        scores = torch.einsum("bnd,rd->brn", hidden_states.double(), router.weight.double())  # (b, r, n)
        tolerance = 1e-5 * scores.abs().max()
        lengths = mask.sum(-1)
        for i, length in enumerate(lengths.tolist()):
            k = model.config.routed_count(router.num_tokens, length) if isinstance(router.num_tokens, float) else min(
                router.num_tokens, length
            )
            valid = routing.valid[i]  # (r, k_max)
            assert (valid.sum(-1) == k).all(), name
            for route in range(scores.shape[1]):
                chosen = routing.indices[i, route][valid[route]]
                assert mask[i, chosen].all() and len(set(chosen.tolist())) == k, name
                others = mask[i].clone()
                others[chosen] = False
                if k and others.any():  # top-k: no unchosen real token scores above a chosen one
                    assert scores[i, route, chosen].min() >= scores[i, route, others].max() - tolerance, name
                weights = routing.weights[i, route][valid[route]].detach()
                assert weights.isfinite().all() and (weights >= 0).all() and (weights <= 1 + 1e-6).all(), name
                if straight_through or k == length:
                    assert (weights == 1).all(), name
                    continue
                if router_type != "cum_softmax":  # its weight of a token is relative to the tokens ranked below
                    ranked = weights[scores[i, route, chosen].argsort(descending=True)]  # best-scored slot first
                    assert (ranked[1:] <= ranked[:-1] + 1e-6).all(), name
                if router_type == "coor_descent" and scale == 1e-6:
                    k_fetch = min(k * model.config.router_fetch_ratio, length)
                    torch.testing.assert_close(weights, torch.full_like(weights, k_fetch / length), rtol=1e-3, atol=0)

    if router_type == "coor_descent" and scale == 1e4 and straight_through:
        for name, router, *_ in calls:
            if name.startswith("encoder"):
                assert (router.weight.grad == 0).all(), name


@pytest.mark.parametrize("router_type", ROUTER_TYPES)
@pytest.mark.parametrize("straight_through", [True, False], ids=["straight-through", "soft-weights"])
def test_gradients_reach_every_router(straight_through, router_type):
    """At ordinary scale, the loss gradient reaches the weight of every router (3 per encoder layer, the routed
    cross-attention's in every decoder layer): under straight-through the routed tokens are multiplied by exactly 1 and
    the gradient flows only through the soft scores. Every gradient is finite, also with a fully padded row."""
    model = build(router_straight_through=straight_through, router_type=router_type)
    calls = record_router_calls(model)
    input_ids, attention_mask, labels = batch(200)
    forward_backward(model, input_ids, attention_mask, labels)
    assert_finite_gradients(model)
    routers = {name: module for name, module in model.named_modules() if isinstance(module, CoLT5Router)}
    assert len(routers) == 3 * model.config.num_layers + model.config.num_decoder_layers
    for name, router in routers.items():
        assert router.weight.grad.abs().sum() > 0, name
    if straight_through:
        assert all((routing.weights[routing.valid] == 1).all() for *_, routing in calls)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fully_padded_rows_give_finite_outputs_and_gradients(dtype):
    """Rows with no real token at all (every one of them here): no router takes a token, every attention sees only
    masked keys; outputs, loss and gradients stay finite."""
    model = build().to(dtype)
    input_ids, _, labels = batch(150)
    attention_mask = torch.zeros_like(input_ids)
    outputs = forward_backward(model, input_ids, attention_mask, labels)
    assert outputs.encoder_last_hidden_state.isfinite().all() and outputs.logits.isfinite().all()
    assert outputs.loss.isfinite()
    assert_finite_gradients(model)
    generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False)
    assert generated.shape == (3, 5)
