"""torch.compile of the CoLT5 encoder on the CPU (tiny preset, eager coordinate-descent loop): one graph per block with
no graph break, the same compiled graph for every layer, results equal to eager. The CUDA counterparts (fused Triton
coordinate descent, flex attention, CUDA graphs) are in test_gpu_compile.py.

Recompilation: with dynamic=False a new input length compiles once more (Dynamo guards on the static shapes); going
back to a length seen before reuses its graph. COLT5_COMPILE=0 skips the tests that run inductor.
"""

import copy
import os

import pytest
import torch

from colt5_hf import CoLT5EncoderModel
from colt5_hf.flex_local_attention import flex_local_attention
from colt5_hf.modeling_colt5 import CoLT5LocalAttention
from colt5_hf.t5_attention import bucket_bias
from tiny import CountingBackend, tiny_config


needs_inductor = pytest.mark.skipif(os.environ.get("COLT5_COMPILE", "1") == "0", reason="COLT5_COMPILE=0")


def encoder(num_layers=3, seed=0):
    """A tiny encoder in training mode (dropout is 0 in the preset) with distinct random weights per layer."""
    torch.manual_seed(seed)
    return CoLT5EncoderModel(tiny_config(num_layers=num_layers)).encoder.train()


def inputs(n, seed=0):
    """Two samples of n tokens: the second padded after two thirds of its length and with a hole at position 7."""
    generator = torch.Generator().manual_seed(seed + n)
    input_ids = torch.randint(2, 384, (2, n), generator=generator)
    attention_mask = torch.ones(2, n, dtype=torch.long)
    attention_mask[1, 2 * n // 3 :] = 0
    attention_mask[1, 7] = 0
    upstream = torch.randn(2, n, 64, generator=generator)
    return input_ids, attention_mask, upstream


def run(model, input_ids, attention_mask, upstream):
    """Output (b, n, d) of `model` (a module or torch.compile of one) and the parameter gradients of
    sum(output * upstream), gradients cleared first."""
    module = getattr(model, "_orig_mod", model)  # the parameters under their own names
    module.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    (out * upstream).sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in module.named_parameters()}


def assert_same(compiled, eager, rtol):
    (out, grads), (eager_out, eager_grads) = compiled, eager
    torch.testing.assert_close(out, eager_out, rtol=rtol, atol=rtol)
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        error = ((grad - eager_grads[name]).norm() / eager_grads[name].norm()).item()
        assert eager_grads[name].norm() > 0 and error < rtol, (name, error)


@needs_inductor
def test_compiled_blocks_share_one_graph_and_match_eager():
    model = encoder(num_layers=2)
    reference = copy.deepcopy(model)
    backend = CountingBackend("inductor")
    torch._dynamo.reset()
    for block in model.block:
        block.compile(fullgraph=True, dynamic=False, backend=backend)
    batch = inputs(300)
    assert_same(run(model, *batch), run(reference, *batch), rtol=1e-5)
    assert backend.graphs == 1  # every layer runs the first layer's graph: no recompilation per layer


def test_whole_encoder_is_one_graph_and_matches_eager():
    # aot_eager: Dynamo's graph and AOTAutograd's forward and backward graphs, run by eager kernels (the graph capture
    # is what is tested here; inductor's code for the same graph in the test above and in test_gpu.py)
    model = encoder()
    reference = copy.deepcopy(model)
    backend = CountingBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend=backend)
    batch = inputs(300)
    assert_same(run(compiled, *batch), run(reference, *batch), rtol=1e-6)
    assert backend.graphs == 1
    # no mask: every token real (the mask is made on the inputs' device, in the graph)
    input_ids, _, upstream = batch
    assert_same(run(compiled, input_ids, None, upstream), run(reference, input_ids, None, upstream), rtol=1e-6)


def test_new_input_length_recompiles_once():
    model = encoder()
    reference = copy.deepcopy(model)
    backend = CountingBackend("aot_eager")
    torch._dynamo.reset()
    for block in model.block:
        block.compile(fullgraph=True, dynamic=False, backend=backend)
    with torch.no_grad():  # forward graphs only: what is counted is Dynamo's compilations
        for n, graphs in ((300, 1), (260, 2), (300, 2), (260, 2)):
            input_ids, attention_mask, _ = inputs(n)
            out = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            expected = reference(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
            assert backend.graphs == graphs, n


def test_flex_local_attention_traces_into_one_graph():
    # flex attention has no backward on the CPU: forward only; the model takes this path on CUDA
    torch.manual_seed(0)
    config = tiny_config(local_radius=31)
    config._attn_implementation = "eager"
    layer = CoLT5LocalAttention(config)
    n, h = 300, config.num_light_heads
    hidden = torch.randn(2, n, config.d_model)
    table = torch.randn(h, 2 * config.local_radius + 1)

    def light_attention(hidden, mask, table):
        def heads(t):
            return t.view(2, n, h, -1).transpose(1, 2)

        out = flex_local_attention(
            heads(layer.q(hidden)), heads(layer.k(hidden)), heads(layer.v(hidden)), mask, table, config.local_radius
        )
        return layer.o(out.transpose(1, 2).reshape(2, n, -1))

    backend = CountingBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(light_attention, fullgraph=True, dynamic=False, backend=backend)
    with torch.no_grad():
        for padded_from in (200, 100):  # the key mask is an input of the graph, not a constant baked into it
            mask = torch.ones(2, n, dtype=torch.bool)
            mask[1, padded_from:] = False
            expected = layer(hidden, mask, table)
            torch.testing.assert_close(compiled(hidden, mask, table)[mask], expected[mask], rtol=1e-5, atol=1e-5)
    assert backend.graphs == 1


@pytest.mark.parametrize("head_dim, tiles", [(64, "measured"), (16, "measured"), (128, "inductor's")])
def test_flex_local_attention_sets_its_measured_tiles_up_to_head_dim_64(monkeypatch, head_dim, tiles):
    """The tiles measured for the Large light attention (head dim 64) go to flex attention; larger head dims keep
    inductor's own choice (the measured forward tiles would outgrow shared memory in float32 at 128)."""
    from colt5_hf import flex_local_attention as local

    seen = []
    monkeypatch.setattr(local, "flex_attention", lambda *args, kernel_options, **kwargs: seen.append(
        kernel_options) or args[0])
    q = torch.randn(1, 2, 128, head_dim)
    local.flex_local_attention(q, q, q, torch.ones(1, 128, dtype=torch.bool), torch.randn(2, 63), 31)
    assert seen == [local.LOCAL_KERNEL_OPTIONS if tiles == "measured" else {}]
    assert seen[0] == {} or (seen[0]["fwd_BLOCK_M"], seen[0]["fwd_BLOCK_N"]) == (128, 64)


@needs_inductor
def test_bucket_bias_compiles_with_its_gradient():
    generator = torch.Generator().manual_seed(0)
    bucket = torch.randint(0, 32, (2, 40, 70), generator=generator)
    weight = torch.randn(32, 6, generator=generator, requires_grad=True)
    upstream = torch.randn(6, 2, 40, 70, generator=generator)
    torch._dynamo.reset()
    compiled = torch.compile(bucket_bias, fullgraph=True)
    out = compiled(bucket, weight)
    (grad,) = torch.autograd.grad((out * upstream).sum(), weight)
    expected = torch.nn.functional.embedding(bucket, weight).permute(3, 0, 1, 2)  # heads first
    (expected_grad,) = torch.autograd.grad((expected * upstream).sum(), weight)
    assert torch.equal(out, expected)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)
