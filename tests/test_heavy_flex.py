"""The heavy attention through flex attention (colt5_hf/heavy_flex_attention.py) on the CPU, against dense attention
with the bias gathered per pair and against the model's eager heavy attention: outputs and the gradients of queries,
keys, values and the bias table, with invalid keys, query and key counts that are no multiple of flex attention's
block, batches. The CUDA counterparts (fused kernels, bf16, memory growth) are in test_gpu.py.

Flex attention runs here in its eager form, which computes the dense scores (the fused kernels run on CUDA only).
torch refuses flex attention's backward on the CPU for inputs that take a gradient (its compiled CPU kernels have
none); the eager form's backward runs all the same, so the tests that take gradients of q, k and v lift that check
(`cpu_flex_backward`).
"""

import pytest
import torch
import torch.nn.attention.flex_attention as flex_module

from colt5_hf import CoLT5EncoderModel, modeling_colt5
from colt5_hf.heavy_flex_attention import BLOCK, heavy_flex_attention, valid_key_block_mask
from colt5_hf.modeling_colt5 import CoLT5HeavyAttention
from colt5_hf.t5_attention import offset_buckets, relative_position_bucket
from tiny import CountingBackend, relative_error, tiny_config


NUM_BUCKETS, MAX_DISTANCE = 8, 12  # few buckets, a short reach: near, logarithmic and far buckets at these lengths


@pytest.fixture
def cpu_flex_backward(monkeypatch):
    monkeypatch.setattr(flex_module, "_validate_device", lambda *tensors: None)


@pytest.fixture
def flex_on_cpu(monkeypatch, cpu_flex_backward):
    """The model takes heavy_flex_attention on the CPU too (by default on CUDA only); calls counted."""
    calls = {"flex": 0, "position_bias": 0}
    flex, position_bias = modeling_colt5.heavy_flex_attention, CoLT5HeavyAttention.position_bias

    def counted_flex(*args, **kwargs):
        calls["flex"] += 1
        return flex(*args, **kwargs)

    def counted_position_bias(*args, **kwargs):
        calls["position_bias"] += 1
        return position_bias(*args, **kwargs)

    monkeypatch.setattr(modeling_colt5, "HEAVY_FLEX_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(modeling_colt5, "heavy_flex_attention", counted_flex)
    monkeypatch.setattr(CoLT5HeavyAttention, "position_bias", counted_position_bias)
    return calls


def test_offset_buckets_give_the_bucket_of_every_offset():
    table = offset_buckets(32, 128)
    offsets = torch.arange(-1000, 1001)
    expected = relative_position_bucket(offsets, True, 32, 128)
    assert table.dtype == torch.int32 and table.shape == (257,)
    assert torch.equal(table[offsets.clamp(-128, 128) + 128].long(), expected)


def routed_inputs(b=3, heads=2, m=130, m_kv=150, n=400, d=8, dtype=torch.float64, seed=0):
    """Query and key slots of routed tokens: sorted distinct positions in [0, n) per sample; every key slot valid in
    sample 0, the first 100 in sample 1, the first 129 in sample 2 (the valid slots come first, as a router's). m and
    m_kv span two of flex attention's blocks, the second one partly; sample 2's valid keys end just inside it."""
    generator = torch.Generator().manual_seed(seed)

    def positions(count):
        return torch.stack([torch.randperm(n, generator=generator)[:count].sort().values for _ in range(b)])

    kv_count = torch.tensor([m_kv, 100, 129][:b]).clamp(max=m_kv)
    query, key, value = (torch.randn(b, heads, count, d, generator=generator, dtype=dtype) for count in (m, m_kv, m_kv))
    table = torch.randn(NUM_BUCKETS, heads, generator=generator, dtype=dtype)
    return query, key, value, positions(m), positions(m_kv), kv_count, table


def dense_reference(query, key, value, q_positions, kv_positions, kv_count, table):
    """softmax(q k^T + table[bucket(kv - q)]) v, the bias gathered for every pair, key slots past the count
    excluded."""
    bucket = relative_position_bucket(kv_positions[:, None, :] - q_positions[:, :, None], True, NUM_BUCKETS,
                                      MAX_DISTANCE)  # (b, m, m_kv)
    scores = query @ key.transpose(-1, -2) + table.t()[:, bucket].transpose(0, 1)
    valid = torch.arange(key.shape[-2]) < kv_count[:, None]
    return scores.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(-1) @ value


@pytest.mark.parametrize("table_gradient", [True, False])
def test_heavy_flex_attention_matches_dense_attention(table_gradient, cpu_flex_backward):
    """In float64 the function equals dense attention to rounding, outputs and the gradients of q, k, v and (where it
    takes one, through copies of the bias rows per group of queries) the bias table."""
    query, key, value, q_positions, kv_positions, kv_count, table = routed_inputs()
    assert (kv_positions[:, None, :] - q_positions[:, :, None]).abs().max() > MAX_DISTANCE  # far pairs present
    inputs = [query, key, value] + ([table] if table_gradient else [])
    for tensor in inputs:
        tensor.requires_grad_()
    out = heavy_flex_attention(query, key, value, q_positions, kv_positions, kv_count, table,
                               offset_buckets(NUM_BUCKETS, MAX_DISTANCE))
    expected = dense_reference(query, key, value, q_positions, kv_positions, kv_count, table)
    assert out.shape == expected.shape == query.shape
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, upstream)
    expected_grads = torch.autograd.grad(expected, inputs, upstream)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert expected_grad.norm() > 0
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-10)


def test_heavy_flex_attention_gives_zero_where_no_key_is_valid():
    query, key, value, q_positions, kv_positions, kv_count, table = routed_inputs(m=5, m_kv=7)
    kv_count[1] = 0
    out = heavy_flex_attention(query, key, value, q_positions, kv_positions, kv_count, table,
                               offset_buckets(NUM_BUCKETS, MAX_DISTANCE))
    assert (out[1] == 0).all() and (out[[0, 2]].abs().sum(-1) > 0).all()
    expected = dense_reference(query, key, value, q_positions, kv_positions, kv_count, table)
    torch.testing.assert_close(out[[0, 2]], expected[[0, 2]], rtol=1e-12, atol=1e-12)


def test_valid_key_block_mask_visits_the_blocks_of_the_valid_keys():
    """The fused kernels skip what the block mask leaves out (the eager form ignores it): every query block of a
    sample visits exactly the key blocks holding its valid key slots, in the key direction and in the transposed one
    the backward reads."""
    q_length, kv_length = 2 * BLOCK, 3 * BLOCK
    kv_count = torch.tensor([300, BLOCK, BLOCK + 2, 0])  # 3 blocks, the last partly; exactly 1; 2; none
    expected_blocks = torch.tensor([3, 1, 2, 0])
    mask = valid_key_block_mask(kv_count, q_length, kv_length)
    assert mask.seq_lengths == (q_length, kv_length)
    visited = torch.arange(3) < expected_blocks[:, None]  # (b, key blocks)
    assert torch.equal(mask.to_dense(), visited[:, None, None, :].expand(4, 1, 2, 3).int())
    assert torch.equal(mask.q_num_blocks, (visited.int() * 2)[:, None, :])  # each visited key block: both query blocks


def encoder_outputs(model, implementation, input_ids, attention_mask, upstream):
    model.config._attn_implementation = implementation
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    (out * upstream).sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("training", [False, True])
def test_encoder_under_flex_attention_matches_eager(training, flex_on_cpu):
    """A tiny encoder whose heavy attention takes heavy_flex_attention (every layer; the bias never built) equals the
    eager one: outputs at real tokens and every parameter's gradient, the relative position bias table's among them.
    Half the tokens routed as queries and three quarters as keys: 151 and 226 slots, two flex blocks each; a padded
    sample with fewer valid slots."""
    torch.manual_seed(0)
    config = tiny_config(attention_q_fraction=0.5, attention_kv_fraction=0.75, relative_attention_num_buckets=8,
                         relative_attention_max_distance=12)
    model = CoLT5EncoderModel(config).train(training)
    n = 301
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, config.vocab_size, (2, n), generator=generator)
    attention_mask = torch.ones(2, n, dtype=torch.long)
    attention_mask[1, 190:] = 0
    upstream = torch.randn(2, n, config.d_model, generator=generator) * attention_mask[..., None]
    eager_out, eager_grads = encoder_outputs(model, "eager", input_ids, attention_mask, upstream)
    assert flex_on_cpu == {"flex": 0, "position_bias": config.num_layers}
    flex_out, flex_grads = encoder_outputs(model, "flex_attention", input_ids, attention_mask, upstream)
    assert flex_on_cpu == {"flex": config.num_layers, "position_bias": config.num_layers}
    real = attention_mask.bool()
    assert relative_error(flex_out[real], eager_out[real]) < 1e-5
    assert flex_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        assert grad.norm() > 0, name
        assert relative_error(flex_grads[name], grad) < 1e-4, name


def test_heavy_attention_with_dropout_keeps_the_materialised_bias(flex_on_cpu):
    """Flex attention has no dropout: in training with dropout the heavy attention runs as under SDPA."""
    model = CoLT5EncoderModel(tiny_config(dropout_rate=0.1)).train()
    model.config._attn_implementation = "flex_attention"
    model(input_ids=torch.randint(2, 384, (1, 40)))
    assert flex_on_cpu == {"flex": 0, "position_bias": model.config.num_layers}
    model.eval()(input_ids=torch.randint(2, 384, (1, 40)))
    assert flex_on_cpu["flex"] == model.config.num_layers


def test_heavy_flex_attention_traces_into_one_graph():
    """Inside torch.compile (the encoder's compiled blocks) the function, its block mask and its score modification
    trace into one graph without a break; the valid key counts are an input of the graph, not constants baked into it.
    Forward only, as the model runs it on the CPU never."""
    query, key, value, q_positions, kv_positions, kv_count, table = routed_inputs(dtype=torch.float32)
    buckets = offset_buckets(NUM_BUCKETS, MAX_DISTANCE)
    backend = CountingBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(heavy_flex_attention, fullgraph=True, dynamic=False, backend=backend)
    with torch.no_grad():
        for count in (150, 60):
            kv_count[0] = count
            out = compiled(query, key, value, q_positions, kv_positions, kv_count, table, buckets)
            expected = dense_reference(query, key, value, q_positions, kv_positions, kv_count, table)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert backend.graphs == 1


def test_a_compiled_encoder_builds_the_bias_instead(flex_on_cpu):
    """Traced into a caller's compiled graph the heavy attention builds its bias (inductor's lowering of the inlined
    score modification erred beyond eager's rounding on a GPU) and still equals the eager encoder."""
    torch.manual_seed(0)
    model = CoLT5EncoderModel(tiny_config()).eval()
    model.config._attn_implementation = "flex_attention"
    input_ids = torch.randint(2, 384, (2, 64))
    with torch.no_grad():
        expected = model(input_ids=input_ids).last_hidden_state
        assert flex_on_cpu == {"flex": model.config.num_layers, "position_bias": 0}
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
        out = compiled(input_ids=input_ids).last_hidden_state
    assert flex_on_cpu["flex"] == model.config.num_layers and flex_on_cpu["position_bias"] > 0
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
