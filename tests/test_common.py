"""Transformers' common model checks (its tests/test_modeling_common.py and generation tester, run on every built-in
model, T5 among them), written here for CoLT5 where test_modeling.py, test_generation.py, test_training.py and
test_ecosystem.py do not make them already; and the contract of built-in T5 that issue 21 lists: an encoder model's
config, attention weights under SDPA, switching the attention implementation, weights that take gradients, the
renamed cache argument, float32 output projections in float16.

Where a check as Transformers writes it cannot hold for a routed model, the test says why and checks what does.
"""

import json
import warnings

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from colt5_hf import CoLT5Config, CoLT5EncoderModel, CoLT5ForConditionalGeneration, CoLT5Model
from colt5_hf.modeling_colt5 import CACHE_FIELD
from tiny import build, tiny_config, tiny_values


LENGTHS = (45, 31, 20)  # longer than the tiny preset's minimum routed count (4): every router leaves tokens out
ROUTED = dict(num_cross_attention_routes=2, cross_attention_fraction=0.5)


def padded_batch(lengths=LENGTHS, seed=0):
    """Right-padded ids in [2, 384) (random tokens in the padding too: the mask alone must hide it) and the mask."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, 384, (len(lengths), max(lengths)), generator=generator)
    attention_mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()
    return input_ids, attention_mask


def decoder_ids(batch, length, seed=1):
    return torch.randint(2, 384, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- the encoder model


@torch.no_grad()
def test_encoder_model_config_is_encoder_only_and_round_trips(tmp_path):
    """As T5EncoderModel: the encoder's config says is_encoder_decoder=False and use_cache=False, saves so and loads
    back; the seq2seq config it was built from is left as it was."""
    config = tiny_config()
    torch.manual_seed(0)
    encoder = CoLT5EncoderModel(config).eval()
    assert (encoder.config.is_encoder_decoder, encoder.config.use_cache) == (False, False)
    assert (config.is_encoder_decoder, config.use_cache) == (True, True)
    encoder.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["is_encoder_decoder"], saved["use_cache"]) == (False, False)

    loaded = CoLT5EncoderModel.from_pretrained(tmp_path).eval()
    assert loaded.config.is_encoder_decoder is False
    input_ids, attention_mask = padded_batch()
    expected = encoder(input_ids, attention_mask).last_hidden_state
    assert torch.equal(loaded(input_ids, attention_mask).last_hidden_state, expected)
    assert CoLT5Config.from_pretrained(tmp_path).is_encoder_decoder is False

    # an encoder's config is no encoder-decoder's: loading one into a seq2seq class says how to add the decoder
    with pytest.raises(ValueError, match="CoLT5ForConditionalGeneration is an encoder-decoder.*is_encoder_decoder"):
        CoLT5ForConditionalGeneration.from_pretrained(tmp_path)
    seq2seq = CoLT5ForConditionalGeneration.from_pretrained(tmp_path, is_encoder_decoder=True, use_cache=True).eval()
    assert torch.equal(seq2seq.encoder(input_ids, attention_mask).last_hidden_state, expected)
    assert CoLT5Config(**tiny_values(), is_encoder_decoder=False).is_encoder_decoder is False


# ------------------------------------------------------------------------------------------ the cache argument


def future_warnings(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]


@torch.no_grad()
def test_past_key_values_takes_the_cache_with_the_warning_of_built_in_models():
    """Transformers 5.24 renamed the cache argument to `cache`: from then on the old name works and warns, in the same
    words as for T5; before, `past_key_values` is the name (generate passes it) and does not warn."""
    model = build(**ROUTED)
    input_ids, attention_mask = padded_batch()
    decoder_input_ids = decoder_ids(3, 4)
    encoder_outputs = model.get_encoder()(input_ids, attention_mask)

    def step(**cache_argument):
        return model(encoder_outputs=encoder_outputs, attention_mask=attention_mask,
                     decoder_input_ids=decoder_input_ids, use_cache=True, **cache_argument)

    old_name, new_name = (EncoderDecoderCache(DynamicCache(), DynamicCache()) for _ in range(2))
    through_old_name, messages = future_warnings(lambda: step(past_key_values=old_name))
    assert old_name.get_seq_length() == 4  # the cache passed under the old name is the one the decoder filled
    if CACHE_FIELD == "cache":
        torch.testing.assert_close(through_old_name.logits, step(cache=new_name).logits, rtol=0, atol=0)
        t5 = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=8, num_layers=1,
                                                 num_heads=2, decoder_start_token_id=0)).eval()
        t5_cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        _, t5_messages = future_warnings(lambda: t5(input_ids=input_ids[:, :5] % 32,
                                                    decoder_input_ids=decoder_input_ids % 32, past_key_values=t5_cache))
        assert len(t5_messages) == 1
        assert messages == [t5_messages[0].replace("T5ForConditionalGeneration", "CoLT5ForConditionalGeneration")]
    else:
        assert messages == []


@pytest.mark.parametrize("mode", [dict(), dict(num_beams=2), dict(cache_implementation="static")],
                         ids=["greedy", "beam", "static-cache"])
@torch.no_grad()
def test_generate_emits_no_future_warning(mode):
    model = build(**ROUTED)
    input_ids, attention_mask = padded_batch()
    generated, messages = future_warnings(lambda: model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False, **mode
    ))
    assert generated.shape[1] > 1 and messages == []


# --------------------------------------------------------------------------------------------------- float16


@torch.no_grad()
def test_float16_loading_keeps_the_output_projections_in_float32(tmp_path):
    """T5's `_keep_in_fp32_modules = ["wo"]`: loaded in float16, every feed-forward's `wo` stays float32 (its input is
    cast to it) and everything else is float16; the forward and generate run and stay close to float32. bfloat16
    needs no such exception and loads whole."""
    model = build(**ROUTED)
    model.save_pretrained(tmp_path)
    half = CoLT5ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float16).eval()
    kept = [name for name, parameter in half.named_parameters() if parameter.dtype == torch.float32]
    assert kept and all("wo" in name.split(".") for name in kept)
    assert len(kept) == 2 * model.config.num_layers + model.config.num_decoder_layers  # light, heavy; decoder
    assert all(p.dtype == torch.float16 for name, p in half.named_parameters() if name not in kept)
    input_ids, attention_mask = padded_batch()
    decoder_input_ids = decoder_ids(3, 5)
    logits = half(input_ids, attention_mask, decoder_input_ids=decoder_input_ids).logits
    expected = model(input_ids, attention_mask, decoder_input_ids=decoder_input_ids).logits
    assert torch.isfinite(logits).all()
    assert ((logits.float() - expected).norm() / expected.norm()).item() < 1e-2
    assert half.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=3).shape[1] > 1
    bf16 = CoLT5ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(parameter.dtype == torch.bfloat16 for parameter in bf16.parameters())
