"""Mistakes through the Python API are errors (or warnings) at the point of the mistake that name what the user did:
config fields set wrongly, unknown keywords, a config made invalid after construction and then saved, inputs of the
wrong shape (issue 24)."""

import pytest
import torch
from transformers.testing_utils import CaptureLogger

from colt5_hf import CoLT5Config, CoLT5ForConditionalGeneration
from colt5_hf import configuration_colt5
from tiny import build, tiny_values


def test_a_head_count_that_leaves_no_heads_for_the_other_branch_names_the_field_that_was_set():
    with pytest.raises(ValueError, match=r"`num_light_heads` \(6\) must be between 1 and `num_heads` - 1 \(3\)"):
        CoLT5Config(num_heads=4, num_light_heads=6)
    with pytest.raises(ValueError, match=r"`num_heavy_heads` \(4\) must be between 1"):
        CoLT5Config(num_heads=4, num_heavy_heads=4)
    with pytest.raises(ValueError, match=r"`num_heads` \(1\) must be at least 2"):
        CoLT5Config(num_heads=1)
    config = CoLT5Config(num_heads=4, num_light_heads=3)
    assert (config.num_light_heads, config.num_heavy_heads) == (3, 1)


def test_an_unknown_keyword_is_kept_with_a_warning_that_suggests_the_field():
    logger = configuration_colt5.logger
    with CaptureLogger(logger) as captured:
        config = CoLT5Config(**tiny_values(), num_light_head=1, colour="red")
    assert "`num_light_head` is not a CoLT5Config field (did you mean `num_light_heads`?)" in captured.out
    assert "`colour` is not a CoLT5Config field;" in captured.out
    assert config.num_light_heads == 2 and config.colour == "red"  # kept, as Transformers keeps unknown keys
    with CaptureLogger(logger) as captured:
        CoLT5Config(**tiny_values(), torch_dtype="float32")  # keywords Transformers passes itself: no warning
    assert captured.out == ""


def test_a_config_made_invalid_after_construction_is_not_saved(tmp_path):
    config = CoLT5Config(**tiny_values())
    config.router_fetch_ratio = float("inf")
    with pytest.raises(ValueError, match="`router_fetch_ratio` must be a finite number >= 1, got inf"):
        config.save_pretrained(tmp_path / "config")
    assert not (tmp_path / "config").exists()

    model = build()
    model.config.attention_q_fraction = 2.0
    with pytest.raises(ValueError, match="`attention_q_fraction` must be a fraction"):
        model.save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model").exists()
    model.config.attention_q_fraction = 0.5  # valid again: saved, and loads
    model.save_pretrained(tmp_path / "model")
    assert CoLT5ForConditionalGeneration.from_pretrained(tmp_path / "model").config.attention_q_fraction == 0.5


@pytest.mark.parametrize("call", ["forward", "generate"])
def test_inputs_of_the_wrong_shape_are_errors_naming_the_shape(call):
    model = build()

    def run(**inputs):
        with torch.no_grad():
            if call == "generate":
                return model.generate(**inputs, max_new_tokens=2)
            return model(**inputs, decoder_input_ids=torch.zeros(1, 1, dtype=torch.long))

    with pytest.raises(ValueError, match=r"`input_ids` has shape \(0, 5\): pass \(batch, length\), with at least one"):
        run(input_ids=torch.ones(0, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`input_ids` has shape \(5,\): pass \(batch, length\).*x\[None\]"):
        run(input_ids=torch.ones(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`inputs_embeds` has shape \(5, 64\): pass \(batch, length, d_model\)"):
        run(inputs_embeds=torch.ones(5, 64))
    assert run(input_ids=torch.ones(1, 5, dtype=torch.long)) is not None


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_generate_names_a_decoder_mask_longer_than_the_decoders_start(cache_implementation):
    """A target mask (from a training batch, say) given to generate, which starts the decoder from one token: one error
    before the encoder runs, with the dynamic cache and with the static one, whose compiled step would not notice."""
    model = build().eval()
    inputs = dict(input_ids=torch.ones(2, 7, dtype=torch.long), max_new_tokens=2,
                  cache_implementation=cache_implementation)
    with pytest.raises(ValueError, match=r"`decoder_attention_mask` covers 9 positions but generation starts from 1 "):
        model.generate(**inputs, decoder_attention_mask=torch.ones(2, 9, dtype=torch.long))
    start = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="covers 2 positions but generation starts from 3 decoder token"):
        model.generate(**inputs, decoder_input_ids=start, decoder_attention_mask=torch.ones(2, 2, dtype=torch.long))
    with torch.no_grad():
        out = model.generate(**inputs, decoder_input_ids=start, decoder_attention_mask=torch.ones_like(start))
    assert out.shape == (2, 5)
