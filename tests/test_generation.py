"""Generation with a static cache, on the CPU: `generate(..., cache_implementation="static")` against the dynamic cache
and against greedy decoding written here without any cache; a decoding step compiled into one graph against the
eager step; Transformers' auto-compile criteria (they hold on CUDA with a static cache).

Environment switch: COLT5_COMPILE=0 skips the torch.compile tests (as in test_ecosystem.py).
"""

import os
from unittest import mock

import pytest
import torch
from transformers import CompileConfig, EncoderDecoderCache, StaticCache
from transformers.cache_utils import DynamicCache

from colt5_hf.modeling_colt5 import CACHE_FIELD, CoLT5ForConditionalGeneration
from tiny import build


needs_compile = pytest.mark.skipif(os.environ.get("COLT5_COMPILE", "1") == "0", reason="COLT5_COMPILE=0")

ROUTED = dict(num_cross_attention_routes=2, cross_attention_fraction=0.5, num_cross_attention_kv_heads=2)
CONFIGS = {
    "multi-query": {},  # the preset: one route over every encoder token, one key/value head
    "routed": ROUTED,  # 2 routes of half the tokens each, 2 key/value heads per route
}
NEW_TOKENS = 10


def encoder_batch(lengths=(48, 31, 20), seed=0):
    """Random ids, right-padded to the longest sample, with their (batch, length) mask."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, 384, (len(lengths), max(lengths)), generator=generator)
    attention_mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()
    return input_ids.masked_fill(attention_mask == 0, 0), attention_mask


def greedy_without_cache(model, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, new_tokens):
    """The reference: the whole prefix through the model at every step, no cache; EOS never chosen (as
    min_new_tokens does in generate)."""
    tokens, mask = decoder_input_ids, decoder_attention_mask
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=tokens,
                           decoder_attention_mask=mask, use_cache=False).logits[:, -1]
            logits[:, model.config.eos_token_id] = -float("inf")
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return tokens


def generate(model, input_ids, attention_mask, **options):
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, num_beams=1,
                          max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **options)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_static_cache_generate_equals_dynamic_cache_and_uncached_greedy(name, implementation):
    model = build(**CONFIGS[name])
    model.config._attn_implementation = implementation
    input_ids, attention_mask = encoder_batch()
    start = torch.full((len(input_ids), 1), model.config.decoder_start_token_id)
    expected = greedy_without_cache(model, input_ids, attention_mask, start, None, NEW_TOKENS)
    assert len(set(expected[:, 1:].flatten().tolist())) > 5  # a sequence worth comparing, not one repeated token

    # the cross-attention keys/values are computed once per encoder output: once per layer in the whole call
    calls = []
    for block in model.decoder.block:
        original = block.cross_attention.key_values
        block.cross_attention.key_values = lambda *args, original=original: calls.append(1) or original(*args)
    static = generate(model, input_ids, attention_mask, cache_implementation="static")
    assert len(calls) == model.config.num_decoder_layers
    dynamic = generate(model, input_ids, attention_mask)
    torch.testing.assert_close(static, expected, rtol=0, atol=0)
    torch.testing.assert_close(dynamic, expected, rtol=0, atol=0)


def test_static_cache_generate_with_a_padded_decoder_prompt():
    """Decoder prompts left-padded to one length, with their decoder_attention_mask: generate grows the mask each
    step; with a static cache it is padded to the cache's length (`create_masks_for_generate`)."""
    model = build(**ROUTED)
    input_ids, attention_mask = encoder_batch(seed=1)
    prompt = torch.tensor([[0, 17, 250, 33], [0, 0, 40, 81], [0, 0, 0, 99]])
    prompt_mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]])
    expected = greedy_without_cache(model, input_ids, attention_mask, prompt, prompt_mask, NEW_TOKENS)
    options = dict(decoder_input_ids=prompt, decoder_attention_mask=prompt_mask)
    static = generate(model, input_ids, attention_mask, cache_implementation="static", **options)
    dynamic = generate(model, input_ids, attention_mask, **options)
    torch.testing.assert_close(static, expected, rtol=0, atol=0)
    torch.testing.assert_close(dynamic, expected, rtol=0, atol=0)
    # the padding mask matters: without it the second and third samples decode otherwise
    unmasked = greedy_without_cache(model, input_ids, attention_mask, prompt, None, NEW_TOKENS)
    assert not torch.equal(unmasked[1:], expected[1:])


def static_cache(model, max_cache_len, encoder_length):
    config = model.config.get_text_config(decoder=True)
    return EncoderDecoderCache(StaticCache(config=config, max_cache_len=max_cache_len),
                               StaticCache(config=config, max_cache_len=encoder_length))


def test_static_cache_steps_equal_the_uncached_forward():
    """Step by step with a static cache (keys of the cache's full length, unwritten slots masked; cross-attention
    cache sized by the encoder length, routed keys in its first slots) the logits equal those of the whole prefix."""
    model = build(**ROUTED)
    input_ids, attention_mask = encoder_batch(seed=2)
    tokens = torch.randint(2, 384, (3, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        encoder_outputs = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
        expected = model(encoder_outputs=encoder_outputs, attention_mask=attention_mask, decoder_input_ids=tokens,
                         use_cache=False).logits
        cache = static_cache(model, max_cache_len=9, encoder_length=input_ids.shape[1])
        steps = [model(encoder_outputs=encoder_outputs, attention_mask=attention_mask, decoder_input_ids=tokens[:, :2],
                       **{CACHE_FIELD: cache}).logits]  # two positions at once, then one at a time
        for i in range(2, tokens.shape[1]):
            steps.append(model(encoder_outputs=encoder_outputs, attention_mask=attention_mask,
                               decoder_input_ids=tokens[:, i : i + 1], **{CACHE_FIELD: cache}).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=1e-5, atol=1e-5)
    assert int(cache.self_attention_cache.get_seq_length()) == tokens.shape[1]


def test_decoder_attention_mask_of_a_wrong_shape_is_an_error():
    model = build()
    input_ids, attention_mask = encoder_batch()
    tokens = torch.zeros(3, 2, dtype=torch.long)
    with torch.no_grad():
        encoder_outputs = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
        for cache in (None, EncoderDecoderCache(DynamicCache(), DynamicCache()), static_cache(model, 8, 48)):
            for bad in (torch.ones(3, 3), torch.ones(3, 1, 2, 2)):
                with pytest.raises(ValueError, match="decoder_attention_mask"):
                    model(encoder_outputs=encoder_outputs, attention_mask=attention_mask, decoder_input_ids=tokens,
                          decoder_attention_mask=bad, **({CACHE_FIELD: cache} if cache is not None else {}))


def test_auto_compile_criteria_hold_on_cuda_with_a_static_cache():
    """Transformers compiles the decoding step when the device is CUDA and the decoder's cache is static; checked
    here with the model's device reported as CUDA. Never on the CPU unless asked, never with a dynamic cache."""
    model = build()
    assert CoLT5ForConditionalGeneration._can_compile_fullgraph
    static = {CACHE_FIELD: static_cache(model, 8, 16)}
    dynamic = {CACHE_FIELD: EncoderDecoderCache(DynamicCache(), DynamicCache())}
    assert not model._valid_auto_compile_criteria(static, model.generation_config)  # CPU
    with mock.patch.object(type(model), "device", new_callable=mock.PropertyMock, return_value=torch.device("cuda")):
        assert model._valid_auto_compile_criteria(static, model.generation_config)
        assert not model._valid_auto_compile_criteria(dynamic, model.generation_config)


@needs_compile
def test_compiled_decoding_step_equals_eager():
    """A decoding step with a static cache compiles into one graph (fullgraph=True: no graph break, no host sync)
    and gives the eager logits at every step, without recompiling as the cache fills."""
    model = build(**ROUTED)
    input_ids, attention_mask = encoder_batch(seed=4)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        encoder_outputs = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
        caches = [static_cache(model, 8, input_ids.shape[1]) for _ in range(2)]
        start = torch.zeros(3, 1, dtype=torch.long)
        tokens = [model(encoder_outputs=encoder_outputs, attention_mask=attention_mask, decoder_input_ids=start,
                        **{CACHE_FIELD: cache}).logits.argmax(-1) for cache in caches]  # prefill, eager
        with mock.patch.object(torch._dynamo.config, "error_on_recompile", True):
            for _ in range(4):
                logits = [step(encoder_outputs=encoder_outputs, attention_mask=attention_mask,
                               decoder_input_ids=token, **{CACHE_FIELD: cache}).logits
                          for step, token, cache in zip((model, compiled), tokens, caches)]
                torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
                tokens = [logits[0].argmax(-1)] * 2


@needs_compile
def test_generate_auto_compiled_with_a_static_cache_equals_dynamic_cache():
    """generate's own compiled decoding (the CUDA path), forced onto the CPU by CompileConfig's switch, with
    fullgraph=True; a second call of the same shapes reuses the compiled step."""
    model = build(**ROUTED)
    input_ids, attention_mask = encoder_batch(seed=5)
    expected = generate(model, input_ids, attention_mask)
    compile_config = CompileConfig(fullgraph=True, mode="default")
    compile_config._compile_all_devices = True
    torch._dynamo.reset()
    compiled_calls = []
    get_compiled_call = model.get_compiled_call
    model.get_compiled_call = lambda config: compiled_calls.append(config) or get_compiled_call(config)
    static = generate(model, input_ids, attention_mask, cache_implementation="static", compile_config=compile_config)
    assert len(compiled_calls) == 1
    torch.testing.assert_close(static, expected, rtol=0, atol=0)
    with mock.patch.object(torch._dynamo.config, "error_on_recompile", True):
        again = generate(model, input_ids, attention_mask, cache_implementation="static",
                         compile_config=compile_config)
    torch.testing.assert_close(again, expected, rtol=0, atol=0)
