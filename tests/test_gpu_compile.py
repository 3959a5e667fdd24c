"""torch.compile of the CoLT5 encoder on CUDA: the fused Triton coordinate descent (custom ops colt5::coordinate_descent
and colt5::coordinate_descent_backward), flex attention with its block mask and the heavy attention's bias lookup (and,
with 64 or more routed queries, its bias gradient kernel) in one graph (fullgraph=True), equal to eager; forward and
training steps under CUDA graphs (mode="reduce-overhead").
Skipped without a CUDA GPU. The CPU counterparts are in test_compile.py.
"""

import copy

import pytest
import torch

from colt5_hf import CoLT5Config, CoLT5EncoderModel, routing
from tiny import CountingBackend, relative_error


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def small_encoder(dtype, seed=0):
    torch.manual_seed(seed)
    config = CoLT5Config(
        vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, num_light_heads=2,
        num_heavy_heads=2, local_radius=31, min_routed_tokens=4, router_iterations=20, dropout_rate=0.0,
        encoder_compile="off",  # compiled by hand here; the reference copies stay eager
    )
    return CoLT5EncoderModel(config).cuda().to(dtype).encoder


def batch(n=700, seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed + n)
    input_ids = torch.randint(2, 128, (2, n), device="cuda", generator=generator)
    attention_mask = torch.ones(2, n, dtype=torch.long, device="cuda")
    attention_mask[1, 500:] = 0
    attention_mask[1, 9] = 0
    upstream = torch.randn(2, n, 64, device="cuda", generator=generator)
    return input_ids, attention_mask, upstream


def outputs(model, input_ids, attention_mask, upstream):
    module = getattr(model, "_orig_mod", model)
    module.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    (out.float() * upstream).sum().backward()
    real = attention_mask.bool()
    return out.detach().float()[real], {name: p.grad.float() for name, p in module.named_parameters()}


# Inductor and eager differ by rounding only, so the routers pick the same tokens. In bf16 inductor would keep some
# intermediate results in float32 where eager rounds them to bf16, enough to swap a near-tied token in a router (seen:
# 16% on a heavy feed-forward's gradient): emulate_precision_casts rounds where eager does.
TOLERANCE = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (2e-2, 5e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("implementation", ["flex_attention", "sdpa"])
def test_compiled_encoder_matches_eager(implementation, dtype):
    encoder = small_encoder(dtype).train()
    encoder.config._attn_implementation = implementation
    reference = copy.deepcopy(encoder)
    backend = CountingBackend()
    torch._dynamo.reset()
    compiled = torch.compile(encoder, fullgraph=True, dynamic=False, backend=backend)
    inputs = batch()
    with torch._inductor.config.patch(emulate_precision_casts=True):
        out, grads = outputs(compiled, *inputs)
    eager_out, eager_grads = outputs(reference, *inputs)
    out_tolerance, grad_tolerance = TOLERANCE[dtype]
    assert relative_error(out, eager_out) < out_tolerance
    assert grads.keys() == eager_grads.keys()
    for name in grads:
        assert eager_grads[name].norm() > 0 and relative_error(grads[name], eager_grads[name]) < grad_tolerance, name
    assert backend.graphs == 1


def test_compiled_encoder_beyond_the_selection_kernels_rows_matches_eager():
    """At 20000 tokens, more than the Triton selection kernel holds (routing.RESIDENT_ROW), the routers select through
    top_k_positions' sorts, traced into the graph: it compiles (inductor in torch 2.11 failed to generate code for
    a scatter-and-cumsum version at 32768 tokens) and equals eager, outputs and gradients."""
    assert routing.RESIDENT_ROW < 20000
    encoder = small_encoder(torch.float32).train()
    encoder.config._attn_implementation = "flex_attention"
    reference = copy.deepcopy(encoder)
    backend = CountingBackend()
    torch._dynamo.reset()
    compiled = torch.compile(encoder, fullgraph=True, dynamic=False, backend=backend)
    inputs = batch(20000)
    out, grads = outputs(compiled, *inputs)
    eager_out, eager_grads = outputs(reference, *inputs)
    assert relative_error(out, eager_out) < 1e-4
    for name in grads:
        assert eager_grads[name].norm() > 0 and relative_error(grads[name], eager_grads[name]) < 1e-3, name
    assert backend.graphs == 1


def test_compiled_training_with_the_heavy_bias_gradient_kernel_matches_eager(monkeypatch):
    """At n = 2000 the heavy attention routes 125 queries: the compiled encoder runs it through flex attention with the
    bias table detached and the table's gradient from heavy_bias_gradient_kernel.HeavyBiasGradient, in one graph (its
    second Triton kernel launched once per layer, counted at run time inside the custom op); outputs and gradients
    equal the eager implementation's."""
    from colt5_hf import heavy_bias_gradient_kernel

    launches, kernel = [], heavy_bias_gradient_kernel._heavy_near_sums

    class CountedKernel:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(heavy_bias_gradient_kernel, "_heavy_near_sums", CountedKernel())
    encoder = small_encoder(torch.float32).train()
    encoder.config._attn_implementation = "flex_attention"
    reference = copy.deepcopy(encoder)
    reference.config._attn_implementation = "eager"
    backend = CountingBackend()
    torch._dynamo.reset()
    compiled = torch.compile(encoder, fullgraph=True, dynamic=False, backend=backend)
    input_ids, attention_mask, upstream = batch(2000)
    # padded positions' outputs are arbitrary and differ between implementations: no gradient flows from them
    inputs = input_ids, attention_mask, upstream * attention_mask[..., None]
    out, grads = outputs(compiled, *inputs)
    eager_out, eager_grads = outputs(reference, *inputs)
    assert relative_error(out, eager_out) < 1e-4
    assert grads.keys() == eager_grads.keys()
    for name in grads:
        assert eager_grads[name].norm() > 0 and relative_error(grads[name], eager_grads[name]) < 1e-3, name
    assert backend.graphs == 1
    assert len(launches) == encoder.config.num_layers


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_compiled_encoder_under_flex_attention_at_head_dim_64_matches_eager(training):
    """colt5-large's head dim (64), bf16, 4096 tokens (256 routed queries, 512 keys): the encoder compiled under
    flex_attention, in one graph for inference (no-grad graphs) and for training. Inside a compiled graph the heavy
    attention builds its bias (heavy_flex_attention, inlined there, erred several times eager's rounding); both bf16
    paths are measured against the eager path in float32 on the same weights, and the compiled one may err at most
    twice as much (plus 0.01 for gradients; the routers' gradients up to the bf16 gradient tolerance, below)."""
    torch.manual_seed(0)
    config = CoLT5Config(
        vocab_size=128, d_model=256, d_kv=64, d_ff=256, num_layers=2, num_heads=4, num_light_heads=2,
        num_heavy_heads=2, local_radius=127, min_routed_tokens=4, router_iterations=20, dropout_rate=0.0,
        encoder_compile="off",
    )
    encoder = CoLT5EncoderModel(config).cuda().to(torch.bfloat16).encoder.train(training)
    reference = copy.deepcopy(encoder)
    reference.config._attn_implementation = "eager"
    exact = copy.deepcopy(reference).float()  # the bf16 weights, computed in float32
    encoder.config._attn_implementation = "flex_attention"
    backend = CountingBackend()
    torch._dynamo.reset()
    compiled = torch.compile(encoder, fullgraph=True, dynamic=False, backend=backend)
    n = 4096
    generator = torch.Generator(device="cuda").manual_seed(n)
    input_ids = torch.randint(2, 128, (2, n), device="cuda", generator=generator)
    attention_mask = torch.ones(2, n, dtype=torch.long, device="cuda")
    attention_mask[1, 3000:] = 0
    upstream = torch.randn(2, n, config.d_model, device="cuda", generator=generator) * attention_mask[..., None]
    exact_out, exact_grads = outputs(exact, input_ids, attention_mask, upstream)
    eager_out, eager_grads = outputs(reference, input_ids, attention_mask, upstream)
    with torch._inductor.config.patch(emulate_precision_casts=True):
        if training:
            out, grads = outputs(compiled, input_ids, attention_mask, upstream)
        else:
            with torch.no_grad():
                out = compiled(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
            out = out[attention_mask.bool()]
    eager_error, error = relative_error(eager_out, exact_out), relative_error(out, exact_out)
    assert error < 2 * eager_error + 1e-3, f"compiled bf16 {error:.4f}, eager bf16 {eager_error:.4f} off float32"
    if training:
        for name in grads:
            assert exact_grads[name].norm() > 0, name
            eager_error, error = (relative_error(g, exact_grads[name]) for g in (eager_grads[name], grads[name]))
            bound = 2 * eager_error + 1e-2
            if "router" in name:
                # a router's gradient reaches it through every routed token's soft top-k weight, and bf16 rounding
                # moves it by 0.003 to 0.05 (relative) in the eager model alone, router to router of one encoder
                # (this config at 2048 tokens, eager bf16 against float32 on the CPU): eager's error on one router
                # is no yardstick for the compiled one's, which is held to the bf16 gradient tolerance instead
                bound = max(bound, TOLERANCE[torch.bfloat16][1])
            assert error < bound, f"{name}: compiled bf16 {error:.4f}, eager bf16 {eager_error:.4f}"
    assert backend.graphs == 1


@pytest.mark.parametrize("implementation", ["flex_attention", "sdpa"])
def test_compiled_blocks_share_one_graph(implementation):
    encoder = small_encoder(torch.float32).train()
    encoder.config._attn_implementation = implementation
    reference = copy.deepcopy(encoder)
    backend = CountingBackend()
    torch._dynamo.reset()
    for block in encoder.block:
        block.compile(fullgraph=True, dynamic=False, backend=backend)
    inputs = batch(n=600)
    (out, grads), (eager_out, eager_grads) = outputs(encoder, *inputs), outputs(reference, *inputs)
    assert relative_error(out, eager_out) < 1e-4
    for name in grads:
        assert relative_error(grads[name], eager_grads[name]) < 1e-3, name
    assert backend.graphs == 1  # both layers run one compiled graph


@pytest.mark.parametrize("implementation", ["flex_attention", "sdpa"])
def test_encoder_forward_under_cuda_graphs_matches_eager(implementation):
    from torch._dynamo.utils import counters

    encoder = small_encoder(torch.float32).eval()
    encoder.config._attn_implementation = implementation
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(encoder, fullgraph=True, dynamic=False, mode="reduce-overhead")
    with torch.no_grad():
        for seed in (0, 1, 2, 3):  # warm-up, recording, then replays with new inputs of the same shape
            input_ids, attention_mask, _ = batch(seed=seed)
            torch.compiler.cudagraph_mark_step_begin()
            out = compiled(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.clone()
            expected = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            real = attention_mask.bool()
            assert relative_error(out[real], expected[real]) < 1e-4, seed
    assert counters["inductor"]["cudagraph_skips"] == 0  # the graph ran under CUDA graphs


@pytest.mark.parametrize("compiled_unit", ["blocks", "encoder"])
@pytest.mark.parametrize("implementation", ["flex_attention", "sdpa"])
def test_encoder_training_steps_under_cuda_graphs_match_eager(implementation, compiled_unit):
    """Blocks, or the whole encoder, compiled with mode="reduce-overhead" (benchmarks/encoder.py's cudagraphs and
    cudagraphs-stack rows): forward and backward replay CUDA graphs and give eager's outputs and gradients, step after
    step with new inputs of the same shape."""
    from torch._dynamo.utils import counters

    encoder = small_encoder(torch.float32).train()
    encoder.config._attn_implementation = implementation
    reference = copy.deepcopy(encoder)
    torch._dynamo.reset()
    counters.clear()
    compiled = encoder
    if compiled_unit == "encoder":
        compiled = torch.compile(encoder, fullgraph=True, dynamic=False, mode="reduce-overhead")
    else:
        for block in encoder.block:
            block.compile(fullgraph=True, dynamic=False, mode="reduce-overhead")
    for seed in (0, 1, 2, 3):  # warm-up, recording, then replays
        inputs = batch(seed=seed)
        torch.compiler.cudagraph_mark_step_begin()
        out, grads = outputs(compiled, *inputs)
        eager_out, eager_grads = outputs(reference, *inputs)
        assert relative_error(out, eager_out) < 1e-4, seed
        for name in grads:
            assert relative_error(grads[name], eager_grads[name]) < 1e-3, (seed, name)
    assert counters["inductor"]["cudagraph_skips"] == 0  # forward and backward ran under CUDA graphs


def test_coordinate_descent_custom_op_passes_opcheck():
    from colt5_hf.kernel_layout import LOG2E

    generator = torch.Generator(device="cuda").manual_seed(0)
    scores = torch.randn(3, 1000, device="cuda", generator=generator, requires_grad=True)
    mask = torch.rand(3, 1000, device="cuda", generator=generator) < 0.8
    k = torch.tensor([70.0, 3.0, 1.0], device="cuda")
    torch.library.opcheck(torch.ops.colt5.coordinate_descent.default, (scores, mask, k, 20, LOG2E, True))
    soft, history, steps, final_alpha, row_scale = torch.ops.colt5.coordinate_descent(scores, mask, k, 20, LOG2E, True)
    grad_soft = torch.randn_like(soft)
    torch.library.opcheck(
        torch.ops.colt5.coordinate_descent_backward.default,
        (grad_soft, scores.detach(), mask, soft.detach(), history, steps, final_alpha, row_scale, LOG2E),
    )
