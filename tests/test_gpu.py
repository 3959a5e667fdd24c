"""CUDA fast paths (the Triton kernels of colt5_hf/*_kernel.py, flex attention) against the eager reference paths. Skipped without a CUDA GPU.

- the fused coordinate descent (Triton) against routing.coordinate_descent's eager loop: forward and backward, with
  masks, empty rows and per-row k, rows held in registers (<= 16k tokens) and streamed (up to 64k);
- the routers' top-k selection on CUDA (the Triton kernel up to 16k tokens, the sort beyond) against the sort on the
  CPU, with ties (-0 and +0 among them), masks, k = 0 and k = every real token;
- the flex-attention light attention against the blocked eager light attention;
- the heavy attention's bias lookup (heads first; gradient by the `bucket_sums` kernel) against F.embedding, and its
  bias table's gradient recomputed tile by tile (`heavy_bias_gradient_table`) against autograd in float64;
- the heavy attention through flex attention, its bias computed inside the kernel (`heavy_flex_attention`), against
  the eager heavy attention, forward and backward, and its memory growing linearly with the input where the eager
  one's grows quadratically;
- whole encoders under each attn_implementation against the eager one (also with 64 or more routed queries, where the
  heavy attention's bias gradient comes from its kernel), and with the fused routing against the same model with the
  eager coordinate-descent loop.
"""

import pytest
import torch

from colt5_hf import CoLT5Config, CoLT5EncoderModel, modeling_colt5, routing
from colt5_hf.modeling_colt5 import CoLT5HeavyAttention, CoLT5LocalAttention
from colt5_hf.t5_attention import bucket_bias, mask_value, relative_position_bucket
from tiny import relative_error


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

if torch.cuda.is_available():
    from colt5_hf import heavy_bias_gradient_kernel
    from colt5_hf.coordinate_descent_kernel import fused_coordinate_descent
    from colt5_hf.top_k_kernel import RESIDENT_ROW, fused_top_k_positions


def eager_coordinate_descent(scores, mask, k, iterations, epsilon, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(routing, "fused_coordinate_descent", None)
        return routing.coordinate_descent(scores, mask, k, iterations=iterations, epsilon=epsilon)


def random_rows(n, seed, scale=1.0, rows=4):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    scores = torch.randn(rows, n, generator=generator, device="cuda") * scale
    mask = torch.rand(rows, n, generator=generator, device="cuda") < 0.8
    mask[0] = True  # every token real
    mask[1] = False  # no token real: zeros and zero gradient
    lengths = mask.sum(-1, keepdim=True).float().clamp(min=1)
    k = torch.minimum(torch.tensor([[n / 16 * 9 / 8], [3.0], [1.0], [n / 8]], device="cuda")[:rows], lengths)
    return scores, mask, k


@pytest.mark.parametrize("n", [200, 4096, 16384, 20000, 65536])
@pytest.mark.parametrize("scale, epsilon, iterations", [(1.0, 1.0, 50), (8.0, 0.5, 20)])
def test_fused_coordinate_descent_matches_eager(n, scale, epsilon, iterations, monkeypatch):
    scores, mask, k = random_rows(n, seed=n, scale=scale)
    upstream = torch.randn_like(scores)
    expected_scores = scores.clone().requires_grad_()
    expected = eager_coordinate_descent(expected_scores, mask, k, iterations, epsilon, monkeypatch)
    expected.backward(upstream)
    for early_exit in (True, False):
        fused_scores = scores.clone().requires_grad_()
        soft = fused_coordinate_descent(fused_scores, mask, k, iterations=iterations, epsilon=epsilon,
                                        early_exit=early_exit)
        soft.backward(upstream)
        assert torch.isfinite(soft).all() and torch.isfinite(fused_scores.grad).all()
        assert relative_error(soft, expected) < 1e-5
        assert relative_error(fused_scores.grad, expected_scores.grad) < 1e-4
        assert (soft[1] == 0).all() and (fused_scores.grad[1] == 0).all()
        assert (soft[~mask] == 0).all() and (fused_scores.grad[~mask] == 0).all()


def autograd_node_names(tensor):
    """Class names of every node of the autograd graph behind `tensor`."""
    names, seen, stack = set(), set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_fused_coordinate_descent_is_the_dispatch_on_cuda_and_keeps_batch_shape(monkeypatch):
    scores, mask, k = random_rows(1000, seed=0)
    scores, mask, k = scores.view(2, 2, -1).requires_grad_(), mask.view(2, 2, -1), k.view(2, 2, 1)
    soft = routing.coordinate_descent(scores, mask, k, iterations=30, epsilon=1.0)
    assert any("colt5_coordinate_descent" in name for name in autograd_node_names(soft))  # the custom op's backward
    expected = eager_coordinate_descent(scores, mask, k, 30, 1.0, monkeypatch)
    assert soft.shape == expected.shape == (2, 2, 1000)
    assert relative_error(soft, expected) < 1e-5
    torch.testing.assert_close(soft.sum(-1), expected.sum(-1), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("n", [200, 16384, 20000, 65536])
@pytest.mark.parametrize("ties", [False, True])
def test_top_k_positions_on_cuda_match_the_sort(n, ties):
    """routing.top_k_positions on CUDA (the kernel up to 16k tokens, the sort beyond) against the sort on the CPU."""
    scores, mask, k = random_rows(n, seed=n + ties)
    if ties:  # few distinct values, negative zeros among them
        scores = (scores * 2).round() / 2
        scores[2, : n // 2] = 0.0
        scores[2, n // 2 :] = -0.0
    mask[1, :3] = True  # a row with 3 real tokens: every one of them routed
    k = torch.tensor([n // 16, 3, n // 8, 0], device="cuda")
    k_max = n // 8
    # the reference on the CPU: comparison sorts (a GPU radix sort might order -0.0 and +0.0)
    expected = routing.top_k_positions(scores.cpu(), mask.cpu(), k.cpu(), k_max)
    if n <= RESIDENT_ROW:  # the kernel itself
        assert torch.equal(fused_top_k_positions(scores, mask, k, k_max).cpu(), expected)
    else:
        with pytest.raises(ValueError, match="at most 16384 tokens"):
            fused_top_k_positions(scores, mask, k, k_max)
    got = routing.top_k_positions(scores, mask, k, k_max)  # the CUDA dispatch
    assert got.dtype == torch.long and torch.equal(got.cpu(), expected)
    for row in range(4):
        picked = got[row, : k[row]]
        assert (picked.diff() > 0).all() and mask[row, picked].all()
        assert len(set(got[row].tolist())) == k_max
        left_out = mask[row].clone()
        left_out[picked] = False
        if k[row] and left_out.any():  # no real token left out scores above the lowest picked score
            assert scores[row][left_out].max() <= scores[row, picked].min()


def small_config(radius, **kwargs):
    """Eager encoder blocks (encoder_compile="off"): these tests compare the eager fast paths with the reference."""
    return CoLT5Config(
        vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, num_light_heads=2,
        num_heavy_heads=2, local_radius=radius, min_routed_tokens=4, router_iterations=20, dropout_rate=0.0,
        **{"encoder_compile": "off", **kwargs},
    )


@pytest.mark.parametrize(
    "radius, n, dtype", [(127, 1000, torch.float32), (15, 200, torch.float32), (127, 4096, torch.bfloat16)]
)
def test_flex_local_attention_matches_eager(radius, n, dtype):
    torch.manual_seed(radius + n)
    config = small_config(radius)
    layer = CoLT5LocalAttention(config).cuda().to(dtype)
    for linear in (layer.q, layer.k, layer.v, layer.o):
        torch.nn.init.normal_(linear.weight, std=0.1)
    hidden = torch.randn(2, n, config.d_model, device="cuda", dtype=dtype)
    mask = torch.ones(2, n, dtype=torch.bool, device="cuda")
    mask[1, n - n // 3 :] = False  # padded sample
    mask[1, 5] = False  # a hole
    table = torch.randn(config.num_light_heads, 2 * radius + 1, device="cuda", requires_grad=True)
    upstream = torch.randn(2, n, config.d_model, device="cuda", dtype=dtype) * mask[..., None]

    results = {}
    for implementation in ("eager", "flex_attention"):
        config._attn_implementation = implementation  # the layer reads it at every call
        layer.zero_grad()
        table.grad = None
        out = layer(hidden, mask, table)
        (out.float() * upstream.float()).sum().backward()
        grads = [p.grad.clone() for p in layer.parameters()] + [table.grad.clone()]
        results[implementation] = (out[mask], grads)
    tolerance = 2e-4 if dtype == torch.float32 else 3e-2
    (eager_out, eager_grads), (flex_out, flex_grads) = results["eager"], results["flex_attention"]
    assert relative_error(flex_out, eager_out) < tolerance
    for flex_grad, eager_grad in zip(flex_grads, eager_grads):
        assert relative_error(flex_grad, eager_grad) < tolerance


def encoder_outputs(model, inputs, mask, upstream):
    model.zero_grad()
    out = model(input_ids=inputs, attention_mask=mask).last_hidden_state
    (out.float() * upstream).sum().backward()
    grads = {name: p.grad.detach().float().cpu() for name, p in model.named_parameters() if p.grad is not None}
    return out.detach().float().cpu(), grads


def assert_fast_path_matches_eager(implementation, n, padded_from, after_eager=lambda: None):
    """A small encoder's outputs and every parameter gradient under `implementation` equal the eager path's, two
    samples of n tokens, the second padded from `padded_from` (upstream gradient zero at padding). `after_eager` runs
    between the two passes."""
    torch.manual_seed(0)
    config = small_config(31)
    model = CoLT5EncoderModel(config).cuda()
    inputs = torch.randint(2, config.vocab_size, (2, n), device="cuda")
    mask = torch.ones(2, n, dtype=torch.long, device="cuda")
    mask[1, padded_from:] = 0
    upstream = torch.randn(2, n, config.d_model, device="cuda") * mask[..., None]
    model.config._attn_implementation = "eager"
    eager_out, eager_grads = encoder_outputs(model, inputs, mask, upstream)
    after_eager()
    model.config._attn_implementation = implementation
    fast_out, fast_grads = encoder_outputs(model, inputs, mask, upstream)
    real = mask.bool().cpu()
    assert relative_error(fast_out[real], eager_out[real]) < 1e-4
    assert eager_grads.keys() == fast_grads.keys()
    for name in eager_grads:
        assert relative_error(fast_grads[name], eager_grads[name]) < 1e-3, name
    return config


@pytest.mark.parametrize("implementation", ["sdpa", "flex_attention"])
def test_encoder_fast_paths_match_eager(implementation):
    assert_fast_path_matches_eager(implementation, 700, 500)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bucket_bias_matches_embedding(dtype):
    bucket = torch.randint(0, 32, (2, 300, 700), device="cuda", dtype=torch.int32)
    weight = torch.randn(32, 12, device="cuda", dtype=dtype, requires_grad=True)
    upstream = torch.randn(12, 2, 300, 700, device="cuda", dtype=dtype)
    reference_weight = weight.detach().double().requires_grad_()
    expected = torch.nn.functional.embedding(bucket.long(), reference_weight).permute(3, 0, 1, 2)  # heads first
    (expected * upstream.double()).sum().backward()
    out = bucket_bias(bucket, weight)
    (out * upstream).sum().backward()
    assert torch.equal(out.double(), expected.detach())
    assert relative_error(weight.grad, reference_weight.grad) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype, launch", [(torch.float32, "model"), (torch.bfloat16, "model"),
                                           (torch.float32, "near tile 16, shuffled keys")])
def test_heavy_bias_gradient_kernel_matches_autograd(dtype, launch):
    """The bias table's gradient of softmax(q k^T + table[bucket(kv - q)]) v from the kernel, against autograd through
    the attention with the bias gathered per pair, in float64 from the same inputs. Query and key counts that are no
    multiple of the kernel's tile, invalid keys (mask_value, no gradient), keys near and far (every bucket), the keys
    in three splits of 256 (the last one ragged) whose row statistics the kernel combines. The model's launch (the
    custom op), and one whose near sums take 16 queries a program (the far sums 64) with the keys' positions out of
    order (the kernels assume neither tiles in common nor sorted positions)."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    b, heads, m, m_kv, n, d, buckets = 2, 3, 150, 600, 3000, 64, 32

    def positions(count):
        return torch.stack([torch.randperm(n, generator=generator, device="cuda")[:count].sort().values
                            for _ in range(b)])

    q_positions, kv_positions = positions(m), positions(m_kv)
    if launch != "model":
        kv_positions = kv_positions[:, torch.randperm(m_kv, generator=generator, device="cuda")]
    kv_valid = torch.ones(b, m_kv, dtype=torch.bool, device="cuda")
    kv_valid[1, -20:] = False
    # (b, length, h, d) memory seen as (b, h, length, d), as the model's head views: the kernel reads strided rows
    query, key, value = (torch.randn(b, length, heads, d, generator=generator, device="cuda").to(dtype).transpose(1, 2)
                         for length in (m, m_kv, m_kv))
    weight = torch.randn(buckets, heads, generator=generator, device="cuda").to(dtype)
    grad_out = torch.randn(b, m, heads, d, generator=generator, device="cuda").to(dtype).transpose(1, 2)

    reference_weight = weight.double().requires_grad_()
    bucket = relative_position_bucket((kv_positions[:, None, :] - q_positions[:, :, None]).int(), True, buckets, 128)
    bias = reference_weight.t()[:, bucket].transpose(0, 1)  # (b, h, m, m_kv)
    bias = torch.where(kv_valid[:, None, None, :], bias, mask_value(dtype))
    out = (query.double() @ key.double().transpose(-1, -2) + bias).softmax(-1) @ value.double()
    (out * grad_out.double()).sum().backward()
    assert len(bucket.unique()) == buckets - 1  # every bucket but buckets // 2 (a positive offset of 0: none)

    offsets = torch.arange(-128, 129, dtype=torch.int32, device="cuda")  # those beyond share the end buckets
    arguments = (query, key, value, out.detach().to(dtype), grad_out, q_positions, kv_positions, kv_valid,
                 relative_position_bucket(offsets, True, buckets, 128), weight)
    if launch == "model":
        got = heavy_bias_gradient_kernel.heavy_bias_gradient_table(*arguments)
    else:
        got = heavy_bias_gradient_kernel.launch_heavy_bias_gradient(*arguments, near_query_tile=16)
    assert relative_error(got, reference_weight.grad) < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("implementation", ["sdpa", "flex_attention"])
def test_encoder_heavy_bias_gradient_kernel_matches_eager(implementation, monkeypatch):
    """At n = 2000 the heavy attention routes 125 queries (SDPA's range): without dropout the fast paths detach its
    bias and take the bias table's gradient from the kernel (counted: once per layer); outputs and every gradient
    equal the eager path's."""
    calls, kernel = [], heavy_bias_gradient_kernel.heavy_bias_gradient_table
    monkeypatch.setattr(heavy_bias_gradient_kernel, "heavy_bias_gradient_table", lambda *args: calls.append(1) or kernel(*args))

    def no_kernel_calls():
        assert calls == []

    config = assert_fast_path_matches_eager(implementation, 2000, 1500, after_eager=no_kernel_calls)
    assert len(calls) == config.num_layers


def random_routing(b, n, k, counts, generator):
    """A RouterOutput of one route: per sample `counts[i]` valid slots at sorted distinct positions in [0, n) (the
    valid slots first, as a router's), the rest invalid; weights in (0.5, 1.5) taking a gradient, 0 at invalid slots."""
    indices = torch.stack([torch.randperm(n, generator=generator, device="cuda")[:k].sort().values for _ in range(b)])
    valid = torch.arange(k, device="cuda") < torch.tensor(counts, device="cuda")[:, None]
    weights = (torch.rand(b, k, generator=generator, device="cuda") + 0.5) * valid
    return routing.RouterOutput(indices[:, None], weights[:, None].requires_grad_(), valid[:, None])


def heavy_config(d_model, d_kv, heads):
    """The heavy attention's shape: `heads` heavy heads of `d_kv` over `d_model`; T5's 32 buckets up to 128."""
    return CoLT5Config(vocab_size=128, d_model=d_model, d_kv=d_kv, d_ff=128, num_layers=1, num_heads=4,
                       num_light_heads=2, num_heavy_heads=heads, dropout_rate=0.0, encoder_compile="off")


def heavy_inputs(config, n, seed, dtype):
    """Hidden states (2, n, d_model) taking a gradient, the routings of n / 16 queries and n / 8 keys (the second
    sample with fewer valid slots, as a padded one has) and a float32 bias table (buckets, heavy heads)."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    m, m_kv = n // 16, n // 8
    hidden = torch.randn(2, n, config.d_model, generator=generator, device="cuda").to(dtype).requires_grad_()
    q_routing = random_routing(2, n, m, [m, m // 2 + 1], generator)
    kv_routing = random_routing(2, n, m_kv, [m_kv, m_kv // 3 + 1], generator)
    table = torch.randn(config.relative_attention_num_buckets, config.num_heavy_heads, generator=generator,
                        device="cuda", requires_grad=True)
    return hidden, q_routing, kv_routing, table


@pytest.mark.parametrize("heads, d_kv, dtype, n, table_gradient", [
    (12, 64, torch.bfloat16, 4096, "kernel"),  # colt5-large's heavy heads
    (2, 16, torch.float32, 3000, "kernel"),
    (2, 16, torch.float32, 3000, "score modification"),
    (3, 64, torch.bfloat16, 5000, "score modification"),
])
def test_heavy_flex_attention_matches_eager(heads, d_kv, dtype, n, table_gradient, monkeypatch):
    """CoLT5HeavyAttention under flex_attention (its bias computed inside the kernel: `position_bias` never runs)
    against the eager path: the output and the gradients of the projections, the hidden states, both routings'
    weights and the bias table. The table's gradient from HeavyBiasGradient's kernel (counted), or, with the kernel
    off, from flex attention's backward through the score modification. Routed counts that are no multiple of flex
    attention's blocks at n = 3000 and 5000; invalid slots in the second sample."""
    torch.manual_seed(n)
    config = heavy_config(256, d_kv, heads)
    layer = CoLT5HeavyAttention(config).cuda().to(dtype)
    for linear in (layer.q, layer.k, layer.v, layer.o):
        torch.nn.init.normal_(linear.weight, std=0.05)
    hidden, q_routing, kv_routing, table = heavy_inputs(config, n, seed=n, dtype=dtype)
    upstream = torch.randn(2, n // 16, config.d_model, device="cuda")
    kernel_calls, kernel = [], heavy_bias_gradient_kernel.heavy_bias_gradient_table
    monkeypatch.setattr(heavy_bias_gradient_kernel, "heavy_bias_gradient_table",
                        lambda *args: kernel_calls.append(1) or kernel(*args))
    if table_gradient == "score modification":
        monkeypatch.setattr(modeling_colt5, "HeavyBiasGradient", None)

    leaves = [*layer.parameters(), hidden, q_routing.weights, kv_routing.weights, table]
    results = {}
    for implementation in ("eager", "flex_attention"):
        config._attn_implementation = implementation  # the layer reads it at every call
        if implementation == "flex_attention":
            monkeypatch.setattr(CoLT5HeavyAttention, "position_bias", None)  # a call would fail
        for leaf in leaves:
            leaf.grad = None
        out = layer(hidden, q_routing, kv_routing, table)
        (out.float() * upstream).sum().backward()
        results[implementation] = (out.float(), [leaf.grad.float().clone() for leaf in leaves])
    assert len(kernel_calls) == (table_gradient == "kernel")  # the flex pass's, the eager pass has none
    tolerance = 2e-4 if dtype == torch.float32 else 3e-2
    (eager_out, eager_grads), (flex_out, flex_grads) = results["eager"], results["flex_attention"]
    assert relative_error(flex_out, eager_out) < tolerance
    for index, (flex_grad, eager_grad) in enumerate(zip(flex_grads, eager_grads, strict=True)):
        assert eager_grad.norm() > 0 and relative_error(flex_grad, eager_grad) < tolerance, index


def heavy_peak_gib(layer, n, backward):
    """Peak GiB allocated by one call of the heavy attention (and its backward) at n tokens, above what its inputs
    hold."""
    hidden, q_routing, kv_routing, table = heavy_inputs(layer.config, n, seed=0, dtype=torch.bfloat16)
    upstream = torch.randn(2, n // 16, layer.config.d_model, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.set_grad_enabled(backward):
        out = layer(hidden, q_routing, kv_routing, table)
        if backward:
            out.backward(upstream)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**30
    del hidden, q_routing, kv_routing, table, upstream, out
    layer.zero_grad(set_to_none=True)
    return peak


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
def test_heavy_flex_attention_memory_grows_linearly(backward):
    """The heavy attention of colt5-large's shape (12 heads of 64, d_model 1024), bf16, two samples, at 32768 and
    65536 tokens: under flex_attention its peak memory doubles with the input (at most 2.5x), where the eager path's,
    which builds the (b, h, n/16, n/8) bias, grows about fourfold (at least 3.2x: the measure sees it), and at 65536
    tokens it stays under a tenth of the eager path's."""
    config = heavy_config(1024, 64, 12)
    layer = CoLT5HeavyAttention(config).cuda().to(torch.bfloat16)
    peaks = {}
    for implementation in ("flex_attention", "eager"):
        config._attn_implementation = implementation
        for n in (32768, 65536):  # flex attention compiles for these shapes outside the measurement
            heavy_peak_gib(layer, n, backward)
        peaks[implementation] = [heavy_peak_gib(layer, n, backward) for n in (32768, 65536)]
    (flex_short, flex_long), (eager_short, eager_long) = peaks["flex_attention"], peaks["eager"]
    assert eager_long / eager_short > 3.2, peaks
    assert flex_long / flex_short < 2.5, peaks
    assert flex_long < eager_long / 10, peaks


def test_encoder_fused_routing_matches_eager_loop(monkeypatch):
    torch.manual_seed(1)
    config = small_config(31)
    model = CoLT5EncoderModel(config).cuda()
    model.config._attn_implementation = "eager"
    n = 600
    inputs = torch.randint(2, config.vocab_size, (2, n), device="cuda")
    mask = torch.ones(2, n, dtype=torch.long, device="cuda")
    mask[0, 450:] = 0
    upstream = torch.randn(2, n, config.d_model, device="cuda") * mask[..., None]
    fused_out, fused_grads = encoder_outputs(model, inputs, mask, upstream)
    with monkeypatch.context() as patch:
        patch.setattr(routing, "fused_coordinate_descent", None)
        eager_out, eager_grads = encoder_outputs(model, inputs, mask, upstream)
    real = mask.bool().cpu()
    assert relative_error(fused_out[real], eager_out[real]) < 1e-5
    for name in eager_grads:
        assert relative_error(fused_grads[name], eager_grads[name]) < 1e-4, name
    routers = [name for name in eager_grads if name.endswith("router.weight")]
    assert len(routers) == 6 and all(fused_grads[name].norm() > 0 for name in routers)


# ------------------------------------------------------------------------------------- generation, static cache


@pytest.mark.parametrize(
    "implementation, cross_attention, dtype, tolerance",
    [("sdpa", {}, torch.bfloat16, 3e-2),
     ("flex_attention", dict(num_cross_attention_routes=2, cross_attention_fraction=0.5, num_cross_attention_kv_heads=2),
      torch.float32, 1e-4)],
)
def test_generate_with_static_cache_is_compiled_and_equals_dynamic_cache(implementation, cross_attention, dtype,
                                                                         tolerance):
    """generate(cache_implementation="static") on CUDA compiles the decoding step (Transformers' auto-compile, CUDA
    graphs; fullgraph=True so that a graph break fails) and decodes the tokens of the dynamic cache. Every step's logits
    agree with the dynamic cache's to `tolerance` (relative, over the step: the compiled step rounds differently; in bf16
    single logits of about 1 differed by up to 0.18 on an H200); tokens may part only at a near tie of the dynamic
    run's scores, and the comparison ends there. 2600 input tokens: the cross-attention's 2600 (1300 routed) keys take
    chunked_attention in 13 (10) chunks."""
    from transformers import CompileConfig

    from colt5_hf import CoLT5ForConditionalGeneration

    torch.manual_seed(2)
    config = small_config(31, num_decoder_layers=2, **cross_attention)
    model = CoLT5ForConditionalGeneration(config).cuda().to(dtype).eval()
    model.config._attn_implementation = implementation
    n = 2600
    inputs = torch.randint(2, config.vocab_size, (2, n), device="cuda")
    mask = torch.ones(2, n, dtype=torch.long, device="cuda")
    mask[1, 210:] = 0
    with torch.no_grad():
        encoder_outputs = model.get_encoder()(input_ids=inputs, attention_mask=mask)
    options = dict(encoder_outputs=encoder_outputs, attention_mask=mask, max_new_tokens=12, min_new_tokens=12,
                   do_sample=False, num_beams=1, output_logits=True, output_scores=True, return_dict_in_generate=True)
    dynamic = model.generate(**options)
    torch._dynamo.reset()
    static = model.generate(**options, cache_implementation="static", compile_config=CompileConfig(fullgraph=True))
    assert hasattr(model, "_compiled_call")  # the decoding steps went through torch.compile
    assert static.sequences.shape == dynamic.sequences.shape
    for step, (static_logits, dynamic_logits) in enumerate(zip(static.logits, dynamic.logits)):
        assert relative_error(static_logits, dynamic_logits) < tolerance, f"step {step}"
        parted = static.sequences[:, step + 1] != dynamic.sequences[:, step + 1]
        if parted.any():
            top2 = dynamic.scores[step].float().topk(2).values
            assert ((top2[:, 0] - top2[:, 1])[parted] < 50 * tolerance).all(), f"tokens part at step {step}, no tie"
            break
