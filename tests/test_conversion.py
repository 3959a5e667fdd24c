"""Conversion from T5.1.1 / LongT5 checkpoints: with every token routed and full-width cross-attention the converted
CoLT5 model computes the source model's logits; mean-pooled multi-query conversion stays close."""

import pytest
import torch
from transformers import LongT5Config, LongT5ForConditionalGeneration, T5Config, T5ForConditionalGeneration

from colt5_hf import CoLT5ForConditionalGeneration
from colt5_hf.conversion import colt5_config_from_source, convert_checkpoint, convert_t5_to_colt5


SIZES = dict(vocab_size=120, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
             relative_attention_num_buckets=32, relative_attention_max_distance=64, dropout_rate=0.0,
             feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0,
             eos_token_id=1)
# every token routed, light radius past the inputs: CoLT5's two branches then add up to T5's full attention and FF
ALL_ROUTED = dict(attention_q_fraction=1.0, attention_kv_fraction=1.0, feed_forward_fraction=1.0, local_radius=40,
                  num_light_heads=1, num_heavy_heads=3, light_d_ff=20, heavy_d_ff=64)


def randomise(model, seed):
    """Random values everywhere (layer norms and an untied head too, as in real T5.1.1 checkpoints), so that a
    weight copied to the wrong place changes the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                parameter.copy_(1 + 0.3 * torch.randn(parameter.shape, generator=generator))
        model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape, generator=generator))
    return model.eval()


def source_t5(seed=0):
    torch.manual_seed(seed)
    return randomise(T5ForConditionalGeneration(T5Config(**SIZES)), seed)


def source_longt5(seed=0):
    torch.manual_seed(seed)
    config = LongT5Config(**SIZES, encoder_attention_type="local", local_radius=40)
    return randomise(LongT5ForConditionalGeneration(config), seed)


def inputs(seed=1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, SIZES["vocab_size"], (3, 30), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 21:] = 0  # a padded sample
    attention_mask[2, 9:] = 0
    decoder_input_ids = torch.randint(2, SIZES["vocab_size"], (3, 7), generator=generator)
    return dict(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)


def logits(model, batch):
    with torch.no_grad():
        output = model(**batch, use_cache=False).logits
    return output.masked_fill(~batch["attention_mask"][:, :1, None].bool(), 0)  # every sample has a real token


@pytest.mark.parametrize("make_source", [source_t5, source_longt5], ids=["t5", "longt5-local"])
@pytest.mark.parametrize("routes,kv_heads", [(1, 4), (2, 2)])
def test_converted_model_reproduces_source_logits(make_source, routes, kv_heads):
    source = make_source()
    config = colt5_config_from_source(
        source.config, **ALL_ROUTED, num_cross_attention_routes=routes, num_cross_attention_kv_heads=kv_heads
    )
    converted = convert_t5_to_colt5(source, config).eval()
    batch = inputs()
    expected = logits(source, batch)
    assert not config.tie_word_embeddings  # T5.1.1: no d_model**-0.5 output scaling
    torch.testing.assert_close(logits(converted, batch), expected, atol=2e-5, rtol=1e-4)


def test_partition_of_weights():
    """Direct checks of where each source weight lands (independent of the forward pass)."""
    source = source_t5()
    config = colt5_config_from_source(source.config, **ALL_ROUTED)
    converted = convert_t5_to_colt5(source, config)
    weights = source.state_dict()
    block = converted.encoder.block[1]
    q = weights["encoder.block.1.layer.0.SelfAttention.q.weight"]
    assert torch.equal(block.attention.light_attention.q.weight, q[:8])  # one light head of d_kv 8
    assert torch.equal(block.attention.heavy_attention.q.weight, q[8:])
    wo = weights["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    heavy_wo = block.feed_forward.heavy_feed_forward.wo.weight
    assert torch.equal(block.feed_forward.light_feed_forward.wo.weight, wo[:, :20])
    assert torch.equal(heavy_wo[:, :28], wo[:, 20:])
    assert torch.count_nonzero(heavy_wo[:, 28:]) == 0  # the extra heavy units add nothing yet...
    heavy_wi = block.feed_forward.heavy_feed_forward.wi_0.weight
    assert torch.count_nonzero(heavy_wi[28:]) == heavy_wi[28:].numel()  # ...but can learn: random input weights
    assert torch.equal(converted.encoder.relative_attention_bias.weight,
                       weights["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"])
    assert torch.equal(converted.lm_head.weight, source.lm_head.weight)


def test_converted_weights_do_not_depend_on_the_head_initialisation(monkeypatch):
    """Conversion overwrites the LM head, so the initialisation a model trained from scratch gets (T5X's fan-in head)
    leaves converted models as they were with Transformers' T5 initialisation (std 1.0): under the same seed, every
    converted weight is equal, the routers' fresh ones included (both draw the same random numbers)."""
    source = source_t5()
    config = colt5_config_from_source(source.config)
    torch.manual_seed(5)
    converted = convert_t5_to_colt5(source, config).state_dict()
    original_init = CoLT5ForConditionalGeneration._init_weights

    def t5_head_init(self, module):
        original_init(self, module)
        if isinstance(module, CoLT5ForConditionalGeneration):
            torch.nn.init.normal_(module.lm_head.weight, std=1.0)

    monkeypatch.setattr(CoLT5ForConditionalGeneration, "_init_weights", t5_head_init)
    torch.manual_seed(5)
    fresh_t5_head = CoLT5ForConditionalGeneration(config)
    assert 0.9 < fresh_t5_head.lm_head.weight.std() < 1.1  # the patch is in force
    torch.manual_seed(5)
    with_t5_head = convert_t5_to_colt5(source, config).state_dict()
    assert converted.keys() == with_t5_head.keys()
    for name, weight in converted.items():
        assert torch.equal(weight, with_t5_head[name]), name
    assert torch.equal(converted["lm_head.weight"], source.lm_head.weight)


def test_multi_query_conversion_mean_pools_and_stays_close():
    source = source_t5()
    # trained cross-attention heads are largely redundant (the premise of GQA uptraining): give the four key/value
    # heads of every layer a shared part plus 20% head-specific noise
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for block in source.decoder.block:
            for linear in (block.layer[1].EncDecAttention.k, block.layer[1].EncDecAttention.v):
                shared = linear.weight[:8].clone()
                noise = torch.randn(linear.weight.shape, generator=generator) * shared.std()
                linear.weight.copy_(shared.repeat(4, 1) + 0.2 * noise)
    config = colt5_config_from_source(source.config, **ALL_ROUTED)  # default: one key/value head (MQA)
    assert config.num_cross_attention_kv_heads == 1
    converted = convert_t5_to_colt5(source, config).eval()
    k = source.state_dict()["decoder.block.0.layer.1.EncDecAttention.k.weight"]  # (4 heads * 8, 32)
    expected_k = (k[0:8] + k[8:16] + k[16:24] + k[24:32]) / 4
    torch.testing.assert_close(converted.decoder.block[0].cross_attention.k.weight, expected_k)

    batch = inputs()
    reference = logits(source, batch)
    pooled_error = (logits(converted, batch) - reference).norm() / reference.norm()
    # the same model with its first key/value head kept instead of the mean: pooling must do better
    first_head = convert_t5_to_colt5(source, config).eval()
    with torch.no_grad():
        for block, source_block in zip(first_head.decoder.block, source.decoder.block):
            block.cross_attention.k.weight.copy_(source_block.layer[1].EncDecAttention.k.weight[:8])
            block.cross_attention.v.weight.copy_(source_block.layer[1].EncDecAttention.v.weight[:8])
    first_head_error = (logits(first_head, batch) - reference).norm() / reference.norm()
    assert 0 < pooled_error < 0.3  # measured 0.17 (first head alone: 0.24)
    assert pooled_error < 0.85 * first_head_error


def test_convert_checkpoint_folder_round_trip(tmp_path):
    source = source_t5()
    source.save_pretrained(tmp_path / "t5")
    converted = convert_checkpoint(tmp_path / "t5", **ALL_ROUTED, num_cross_attention_kv_heads=4).eval()
    converted.save_pretrained(tmp_path / "colt5")
    reloaded = CoLT5ForConditionalGeneration.from_pretrained(tmp_path / "colt5").eval()
    batch = inputs()
    torch.testing.assert_close(logits(reloaded, batch), logits(source, batch), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(feed_forward_proj="relu"), "gated feed-forward"),
        (dict(encoder_attention_type="transient-global"), "transient-global"),
    ],
)
def test_unsupported_sources_are_refused(change, message):
    config_class = LongT5Config if "encoder_attention_type" in change else T5Config
    with pytest.raises(ValueError, match=message):
        colt5_config_from_source(config_class(**{**SIZES, **change}))


def test_partition_that_does_not_fit_is_refused():
    source_config = T5Config(**SIZES)
    with pytest.raises(ValueError, match="num_light_heads"):
        colt5_config_from_source(source_config, num_light_heads=2, num_heavy_heads=3)
    with pytest.raises(ValueError, match="heavy_d_ff"):
        colt5_config_from_source(source_config, light_d_ff=8, heavy_d_ff=16)
