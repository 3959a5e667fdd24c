"""The presets (colt5_hf/presets/, the same files as configs/): they load, their sizes are the CoLT5 paper's (Table 7,
T5.1.1 decoders), they build."""

import json
from pathlib import Path

import pytest
import torch

from colt5_hf import CoLT5Config, CoLT5ForConditionalGeneration
from colt5_hf.configuration_colt5 import PRESET_FOLDER, preset_names


CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PRESETS = ("tiny", "base", "large", "xl")

# Encoder: CoLT5 paper (arXiv 2303.09752) Table 7. Decoder: the T5.1.1 model of the same size (d_ff, heads).
PAPER = {
    #        layers d_model light/heavy heads light/heavy FF  decoder d_ff, heads
    "base": (12, 768, 3, 9, 1024, 8192, 2048, 12),
    "large": (24, 1024, 4, 12, 1408, 11264, 2816, 16),
    "xl": (24, 2048, 8, 24, 2560, 20480, 5120, 32),
}


def load(name):
    return CoLT5Config.from_preset(name)


def test_the_packaged_presets_are_the_files_in_configs():
    """configs/ is the copy to read; the package ships colt5_hf/presets/: they must not drift apart."""
    assert preset_names() == [f"colt5-{name}" for name in sorted(PRESETS)]
    assert sorted(path.name for path in CONFIGS.glob("*.json")) == sorted(path.name for path in PRESET_FOLDER.glob("*"))
    for path in CONFIGS.glob("*.json"):
        assert (PRESET_FOLDER / path.name).read_bytes() == path.read_bytes(), path.name


def test_from_preset_takes_either_name_and_overrides():
    for name in PRESETS:
        from_file = CoLT5Config.from_json_file(str(CONFIGS / f"colt5-{name}.json"))
        assert CoLT5Config.from_preset(name).to_dict() == from_file.to_dict()
    assert CoLT5Config.from_preset("colt5-large").to_dict() == CoLT5Config.from_preset("large").to_dict()
    assert CoLT5Config.from_preset("tiny", local_radius=7).local_radius == 7
    with pytest.raises(ValueError, match="no preset 'huge'; the presets are colt5-base, colt5-large, colt5-tiny, colt5-xl"):
        CoLT5Config.from_preset("huge")
    with pytest.raises(ValueError, match="no preset"):
        CoLT5Config.from_preset("../configs/colt5-tiny")  # a name, not a path
    with pytest.raises(ValueError, match="`local_radius`"):
        CoLT5Config.from_preset("tiny", local_radius=0)


def expected_parameter_count(config):
    """Parameters of CoLT5ForConditionalGeneration counted layer by layer from the config alone."""
    d, d_kv, buckets = config.d_model, config.d_kv, config.relative_attention_num_buckets

    def attention(q_heads, kv_heads):  # q, k, v, o projections
        return d * d_kv * (2 * q_heads + 2 * kv_heads)

    def gated_feed_forward(width):  # wi_0, wi_1, wo
        return 3 * d * width

    encoder_layer = (
        2 * d  # two layer norms
        + attention(config.num_light_heads, config.num_light_heads)
        + attention(config.num_heavy_heads, config.num_heavy_heads)
        + 3 * d  # q, kv and feed-forward routers, one vector each
        + gated_feed_forward(config.light_d_ff)
        + gated_feed_forward(config.heavy_d_ff)
    )
    routes = config.num_cross_attention_routes
    decoder_layer = (
        3 * d
        + attention(config.num_heads, config.num_heads)
        + attention(config.num_heads, routes * config.num_cross_attention_kv_heads)
        + (routes * d if config.cross_attention_fraction < 1 else 0)
        + gated_feed_forward(config.d_ff)
    )
    return (
        config.vocab_size * d  # shared token embedding
        + buckets * (config.num_light_heads + config.num_heavy_heads)  # encoder relative position bias
        + config.num_layers * encoder_layer
        + d  # encoder final norm
        + buckets * config.num_heads  # decoder relative position bias
        + config.num_decoder_layers * decoder_layer
        + d  # decoder final norm
        + config.vocab_size * d  # untied lm_head
    )


def test_every_preset_has_the_field_set_of_tiny():
    fields = {name: list(json.loads((CONFIGS / f"colt5-{name}.json").read_text())) for name in PRESETS}
    for name in PRESETS:
        assert fields[name] == fields["tiny"], name


@pytest.mark.parametrize("name", sorted(PAPER))
def test_preset_matches_the_paper(name):
    config = load(name)
    layers, d_model, light_heads, heavy_heads, light_ff, heavy_ff, d_ff, heads = PAPER[name]
    assert config.model_type == "colt5"
    assert (config.num_layers, config.num_decoder_layers, config.d_model) == (layers, layers, d_model)
    assert (config.num_light_heads, config.num_heavy_heads) == (light_heads, heavy_heads)
    assert (config.light_d_ff, config.heavy_d_ff) == (light_ff, heavy_ff)
    assert (config.d_ff, config.num_heads, config.d_kv, config.vocab_size) == (d_ff, heads, 64, 32128)
    # the paper's rules: light FF = d_ff / 2, heavy FF = 4 d_ff, light heads 1/4 and heavy heads 3/4 of T5's heads
    assert 2 * config.light_d_ff == config.d_ff and config.heavy_d_ff == 4 * config.d_ff
    assert 4 * config.num_light_heads == config.num_heads and 4 * config.num_heavy_heads == 3 * config.num_heads
    # LongT5 local radius 127; at n = 16384: 1024 routed queries, 2048 routed keys/values, 1024 routed FF tokens
    assert config.local_radius == 127
    n = 16384
    assert config.routed_count(config.attention_q_fraction, n) == 1024
    assert config.routed_count(config.attention_kv_fraction, n) == 2048
    assert config.routed_count(config.feed_forward_fraction, n) == 1024
    # the paper's decoder: multi-query cross-attention over every encoder token
    assert (config.num_cross_attention_routes, config.num_cross_attention_kv_heads) == (1, 1)
    assert config.cross_attention_fraction == 1.0
    assert not config.tie_word_embeddings


@pytest.mark.parametrize("name", PRESETS)
def test_preset_builds_with_the_parameter_count_of_its_sizes(name):
    config = load(name)
    with torch.device("meta"):  # no memory: XL has about 5.3e9 parameters
        model = CoLT5ForConditionalGeneration(config)
    assert sum(p.numel() for p in model.parameters()) == expected_parameter_count(config)
    assert len(model.encoder.block) == config.num_layers and len(model.decoder.block) == config.num_decoder_layers


def test_tiny_builds_trains_and_generates():
    config = load("tiny")
    torch.manual_seed(0)
    model = CoLT5ForConditionalGeneration(config)
    assert sum(p.numel() for p in model.parameters()) == expected_parameter_count(config)
    input_ids = torch.randint(2, config.vocab_size, (3, 40))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 25:] = 0
    labels = torch.randint(2, config.vocab_size, (3, 7))
    labels[2, 4:] = -100

    outputs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert outputs.logits.shape == (3, 7, config.vocab_size)
    assert torch.isfinite(outputs.loss)
    outputs.loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    # 40 tokens (25 in sample 1): the routers pick min_routed_tokens = 4 queries and FF tokens, ceil(40 / 8) = 5
    # keys/values, so the heavy branches run and take gradients
    assert model.encoder.block[0].feed_forward.heavy_feed_forward.wo.weight.grad.abs().sum() > 0
    assert model.encoder.block[0].attention.heavy_attention.o.weight.grad.abs().sum() > 0

    model.eval()
    generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=5, do_sample=False)
    assert generated.shape[0] == 3 and 2 <= generated.shape[1] <= 6
    assert (generated[:, 0] == config.decoder_start_token_id).all()
