"""Model-level tests of CoLT5Model, CoLT5ForConditionalGeneration and CoLT5EncoderModel on tiny configs (CPU).

The tiny preset routes 1/16 of the tokens as attention queries and feed-forward inputs and 1/8 as attention
keys/values, at least 4 each; the sequences below (97, 70, 41 tokens) are long enough that every router takes fewer
tokens than a sample has, and not multiples of the local-attention block (radius 15 + 1).
"""

import math

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from colt5_hf import CoLT5Config, CoLT5EncoderModel, CoLT5ForConditionalGeneration, CoLT5Model, RouterOutput
from colt5_hf import modeling_colt5, t5_attention
from tiny import REORDERED_FLOAT32, build, tiny_config


LENGTHS = (97, 70, 41)
ROUTED_CROSS_ATTENTION = dict(num_cross_attention_routes=2, cross_attention_fraction=0.5)
CROSS_ATTENTION_SETTINGS = {
    "one-route-all-tokens": dict(num_cross_attention_routes=1, cross_attention_fraction=1.0),
    "two-routes-half-tokens": ROUTED_CROSS_ATTENTION,
    "gqa-two-routes": dict(num_heads=8, num_cross_attention_kv_heads=2, **ROUTED_CROSS_ATTENTION),
}


def padded_batch(lengths=LENGTHS, vocab_size=384, seed=1):
    """Right-padded token ids in [2, vocab_size) and mask. Padding holds random tokens, not pad ids: the mask alone
    must hide it."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, vocab_size, (len(lengths), max(lengths)), generator=generator)
    attention_mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    return input_ids, attention_mask


def decoder_ids(batch, length, vocab_size=384, seed=2):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab_size, (batch, length), generator=generator)


def assert_routing_active(config, lengths=LENGTHS):
    for fraction in (config.attention_q_fraction, config.attention_kv_fraction, config.feed_forward_fraction):
        assert all(config.routed_count(fraction, length) < length for length in lengths)


# ---------------------------------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("cross_attention", ["one-route-all-tokens", "two-routes-half-tokens"])
@pytest.mark.parametrize("token_range", [384, 12], ids=["all-tokens", "few-repeated-tokens"])
@torch.no_grad()
def test_padded_sample_matches_sample_alone(cross_attention, token_range):
    """Few distinct tokens make exact ties among router scores (a token's first-layer score depends on its id only):
    the routers must break them the same way whatever the batch's shape."""
    model = build(**CROSS_ATTENTION_SETTINGS[cross_attention])
    assert_routing_active(model.config)
    input_ids, attention_mask = padded_batch(vocab_size=token_range)
    encoded = model.encoder(input_ids, attention_mask).last_hidden_state
    generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False)
    for i, length in enumerate(LENGTHS):
        alone_ids = input_ids[i : i + 1, :length]
        torch.testing.assert_close(encoded[i, :length], model.encoder(alone_ids).last_hidden_state[0], atol=1e-5, rtol=1e-5)
        alone = model.generate(input_ids=alone_ids, max_new_tokens=8, do_sample=False)[0]
        assert torch.equal(generated[i, : len(alone)], alone)
        assert (generated[i, len(alone) :] == model.config.pad_token_id).all()


@torch.no_grad()
def test_every_sample_of_a_batch_equals_its_batch_of_one_run():
    model = build(**ROUTED_CROSS_ATTENTION)
    input_ids, attention_mask = padded_batch((97, 97, 70))
    decoder_input_ids = decoder_ids(3, 9)
    logits = model(input_ids, attention_mask, decoder_input_ids=decoder_input_ids).logits
    for i, length in enumerate((97, 97, 70)):
        alone = model(input_ids[i : i + 1, :length], decoder_input_ids=decoder_input_ids[i : i + 1]).logits
        torch.testing.assert_close(logits[i], alone[0], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------- round trips


def outputs_of(model, input_ids, attention_mask, decoder_input_ids):
    if isinstance(model, CoLT5EncoderModel):
        return model(input_ids, attention_mask).last_hidden_state
    outputs = model(input_ids, attention_mask, decoder_input_ids=decoder_input_ids)
    return outputs.logits if isinstance(model, CoLT5ForConditionalGeneration) else outputs.last_hidden_state


@pytest.mark.parametrize("model_class", [CoLT5ForConditionalGeneration, CoLT5Model, CoLT5EncoderModel])
@torch.no_grad()
def test_save_and_load_reproduce_outputs_bit_for_bit(model_class, tmp_path):
    model = build(model_class, **ROUTED_CROSS_ATTENTION)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = model_class.from_pretrained(tmp_path).eval()
    assert type(loaded) is model_class
    assert {**loaded.config.to_dict(), "_name_or_path": ""} == model.config.to_dict()
    loaded_state = loaded.state_dict()
    assert loaded_state.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded_state[name], tensor), name
    inputs = (*padded_batch(), decoder_ids(3, 6))
    assert torch.equal(outputs_of(loaded, *inputs), outputs_of(model, *inputs))


@torch.no_grad()
def test_auto_classes_from_config_and_from_saved_folder(tmp_path):
    config = tiny_config()
    assert type(AutoConfig.for_model("colt5")) is CoLT5Config
    inputs = (*padded_batch(), decoder_ids(3, 6))
    for auto_class, model_class in ((AutoModel, CoLT5Model), (AutoModelForSeq2SeqLM, CoLT5ForConditionalGeneration)):
        torch.manual_seed(0)
        from_auto = auto_class.from_config(config).eval()
        assert type(from_auto) is model_class
        direct = build(model_class)  # same seed, same initialisation
        assert torch.equal(outputs_of(from_auto, *inputs), outputs_of(direct, *inputs))

    model = build()
    model.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is CoLT5Config
    seq2seq = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert type(seq2seq) is CoLT5ForConditionalGeneration
    assert torch.equal(outputs_of(seq2seq, *inputs), outputs_of(model, *inputs))
    bare = AutoModel.from_pretrained(tmp_path).eval()  # the encoder-decoder without its lm_head
    assert type(bare) is CoLT5Model
    decoder_states = model(*inputs[:2], decoder_input_ids=inputs[2], output_hidden_states=True).decoder_hidden_states
    assert torch.equal(outputs_of(bare, *inputs), decoder_states[-1])


@torch.no_grad()
def test_tied_word_embeddings_tie_lm_head_and_survive_save_and_load(tmp_path):
    model = build(tie_word_embeddings=True)
    assert model.lm_head.weight is model.encoder.embed_tokens.weight
    input_ids, attention_mask = padded_batch()
    decoder_input_ids = decoder_ids(3, 6)
    outputs = model(input_ids, attention_mask, decoder_input_ids=decoder_input_ids, output_hidden_states=True)
    # T5's tied head: logits = (d_model ** -0.5 * decoder output) . embedding^T
    expected = outputs.decoder_hidden_states[-1] * model.config.d_model**-0.5 @ model.encoder.embed_tokens.weight.T
    torch.testing.assert_close(outputs.logits, expected)

    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as saved:
        assert "lm_head.weight" not in saved.keys() and "encoder.embed_tokens.weight" in saved.keys()
    loaded = CoLT5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.tie_word_embeddings
    assert loaded.lm_head.weight is loaded.encoder.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert torch.equal(loaded(input_ids, attention_mask, decoder_input_ids=decoder_input_ids).logits, outputs.logits)


# ---------------------------------------------------------------------------------------------- initialisation


def expected_init(name, shape, config):
    """T5.1.1's initialisation, extended to CoLT5 (the untied head: T5X's): ("constant", value) or ("normal", std), from
    the parameter's name."""
    factor, d_model, d_kv = config.initializer_factor, config.d_model, config.d_kv
    leaf = name.split(".")[-2]
    if "layer_norm" in leaf:
        return "constant", factor
    if leaf == "embed_tokens":
        return "normal", factor
    if leaf == "lm_head":
        return "normal", factor * d_model**-0.5  # T5X's fan-in scaling of the untied head
    if leaf in ("relative_attention_bias", "router", "q_router", "kv_router", "k", "v", "wi_0", "wi_1"):
        return "normal", factor * d_model**-0.5
    if leaf == "q":
        return "normal", factor * (d_model * d_kv) ** -0.5
    if leaf in ("o", "wo"):
        return "normal", factor * shape[1] ** -0.5  # 1 / sqrt(fan-in)
    raise AssertionError(f"no initialisation expected for parameter {name}")


@pytest.mark.parametrize("factor", [1.0, 3.0])
def test_every_parameter_is_initialised_as_t5(factor):
    model = build(initializer_factor=factor, **ROUTED_CROSS_ATTENTION)
    assert [name for name, _ in model.named_buffers()] == ["encoder.bias_rows"]  # indices, tested below
    for name, parameter in model.named_parameters():
        kind, value = expected_init(name, parameter.shape, model.config)
        values = parameter.detach().double().flatten()
        if kind == "constant":
            assert (values == value).all(), name
            continue
        sampling_error = 5 / math.sqrt(2 * values.numel())  # relative error of a sample std, 5 sigma
        assert abs(values.std().item() / value - 1) < sampling_error, (name, values.std().item(), value)
        assert abs(values.mean().item()) < 5 * value / math.sqrt(values.numel()), name


def test_encoder_bias_rows_follow_t5_bucketing_after_loading(tmp_path):
    """The encoder's one buffer, the rows of its bias table the branches read (every bucket, then the bucket of each
    local offset), is not saved: a model loaded on the meta device rebuilds it, and it matches T5's bucketing."""
    from transformers.models.t5.modeling_t5 import T5Attention

    build(local_radius=5, relative_attention_num_buckets=8, relative_attention_max_distance=12).save_pretrained(tmp_path)
    model = CoLT5Model.from_pretrained(tmp_path)
    offsets = torch.arange(-5, 6)
    expected = torch.cat([torch.arange(8), T5Attention._relative_position_bucket(offsets, True, 8, 12)])
    assert torch.equal(model.encoder.bias_rows, expected)
    assert "encoder.bias_rows" not in model.state_dict()


@torch.no_grad()
def test_initial_loss_is_about_log_vocabulary():
    """Trained from scratch, the tiny model starts near the loss of a uniform guess, ln(384) = 5.95: the untied head's
    fan-in initialisation gives logits of unit scale (cross-entropy about ln V + var / 2). Transformers' T5 head,
    std 1.0, starts at about 25 here."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 384, (8, 64), generator=generator)
    labels = torch.randint(3, 384, (8, 6), generator=generator)
    losses = [build(seed=seed)(input_ids=input_ids, labels=labels).loss.item() for seed in range(3)]
    log_vocabulary = math.log(384)
    assert all(log_vocabulary < loss < log_vocabulary + 1.0 for loss in losses), losses


def test_heavy_output_init_zero_starts_the_heavy_branch_at_zero():
    """heavy_output_init=0: the heavy attention's `o` and the heavy feed-forward's `wo` start at zero and every other
    weight as by default (the same seed draws the same numbers); the heavy branch then adds exactly nothing, and the
    routers get no gradient (their weights scale a zero output) while the output projections do."""
    default = dict(build().named_parameters())
    model = build(heavy_output_init=0.0).train()
    heavy_outputs = {name for name in default
                     if name.endswith(("heavy_attention.o.weight", "heavy_feed_forward.wo.weight"))}
    assert len(heavy_outputs) == 2 * model.config.num_layers
    for name, parameter in model.named_parameters():
        if name in heavy_outputs:
            assert not parameter.any(), name
        else:
            assert torch.equal(parameter, default[name]), name
    halved = dict(build(heavy_output_init=0.5).named_parameters())
    for name in heavy_outputs:
        torch.testing.assert_close(halved[name], 0.5 * default[name])

    input_ids, attention_mask = padded_batch()
    assert_routing_active(model.config)
    labels = decoder_ids(len(LENGTHS), 5)
    model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
    routers = [module for name, module in model.named_modules()
               if name.startswith("encoder") and name.endswith("router")]
    assert len(routers) == 3 * model.config.num_layers and all(not router.weight.grad.any() for router in routers)
    assert all(dict(model.named_parameters())[name].grad.abs().sum() > 0 for name in heavy_outputs)
    with torch.no_grad():  # which tokens are routed makes no difference: the same weights routing every token
        every_token = build(heavy_output_init=0.0, attention_q_fraction=1.0, attention_kv_fraction=1.0,
                            feed_forward_fraction=1.0)
        expected = every_token.encoder(input_ids, attention_mask).last_hidden_state
        torch.testing.assert_close(model.eval().encoder(input_ids, attention_mask).last_hidden_state, expected)


@torch.no_grad()
def test_initializer_factor_scales_every_parameter():
    """Same seed, factor 1 vs 2.5: every normal-initialised parameter is exactly 2.5x, every norm weight 2.5. A
    parameter left at PyTorch's default or at torch.empty memory would not follow the factor."""
    base = dict(build(initializer_factor=1.0, **ROUTED_CROSS_ATTENTION).named_parameters())
    scaled = dict(build(initializer_factor=2.5, **ROUTED_CROSS_ATTENTION).named_parameters())
    for name, parameter in scaled.items():
        assert parameter.abs().sum() > 0, name
        torch.testing.assert_close(parameter, 2.5 * base[name], msg=name)


# -------------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("cross_attention", list(CROSS_ATTENTION_SETTINGS))
@pytest.mark.parametrize(
    "mode",
    [dict(do_sample=False), dict(do_sample=False, num_beams=3), dict(do_sample=True, top_k=0, temperature=0.7)],
    ids=["greedy", "beam", "sampling"],
)
@torch.no_grad()
def test_generation_with_cache_equals_generation_without(cross_attention, mode):
    model = build(**CROSS_ATTENTION_SETTINGS[cross_attention])
    input_ids, attention_mask = padded_batch()
    results = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        results.append(
            model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=7, use_cache=use_cache,
                output_scores=True, return_dict_in_generate=True, **mode,
            )
        )
    cached, uncached = results
    assert cached.sequences.shape[1] > 2
    assert torch.equal(cached.sequences, uncached.sequences)
    for cached_scores, uncached_scores in zip(cached.scores, uncached.scores, strict=True):
        torch.testing.assert_close(cached_scores, uncached_scores, atol=1e-4, rtol=1e-4)
    if "num_beams" in mode:
        torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_layers, num_decoder_layers", [(2, 5), (3, 1)])
@torch.no_grad()
def test_generation_with_more_or_fewer_decoder_than_encoder_layers(num_layers, num_decoder_layers):
    """Transformers sizes the decoder cache from the config: it must count the decoder's layers, not the encoder's."""
    model = build(num_layers=num_layers, num_decoder_layers=num_decoder_layers)
    input_ids, attention_mask = padded_batch()
    for mode in (dict(), dict(num_beams=2)):
        cached, uncached = (
            model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=5, use_cache=use_cache,
                           **mode)
            for use_cache in (True, False)
        )
        assert torch.equal(cached, uncached)


@pytest.mark.parametrize("cross_attention", list(CROSS_ATTENTION_SETTINGS))
@torch.no_grad()
def test_decoder_full_forward_equals_cached_step_by_step_decoding(cross_attention):
    model = build(**CROSS_ATTENTION_SETTINGS[cross_attention])
    input_ids, attention_mask = padded_batch()
    decoder_input_ids = decoder_ids(3, 8)
    encoder_outputs = model.encoder(input_ids, attention_mask)
    full = model(
        encoder_outputs=encoder_outputs, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
        use_cache=False,
    ).logits
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    pieces = []
    for start, end in ((0, 3), (3, 4), (4, 6), (6, 7), (7, 8)):  # a prompt, single steps and a multi-token step
        pieces.append(
            model(
                encoder_outputs=encoder_outputs, attention_mask=attention_mask,
                decoder_input_ids=decoder_input_ids[:, start:end], cache=cache, use_cache=True,
            ).logits
        )
    assert cache.get_seq_length() == 8
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, **REORDERED_FLOAT32)


@pytest.mark.parametrize("model_class", [CoLT5ForConditionalGeneration, CoLT5Model])
@torch.no_grad()
def test_loss_and_training_forwards_fill_no_cache_unless_asked(model_class):
    """A cache serves decoding after the call: a forward with labels (training, an evaluation loss) or in training
    mode fills none unless asked (use_cache=True); an inference forward without labels returns one, as T5's. The
    outputs are the same either way."""
    model = build(model_class)
    input_ids, attention_mask = padded_batch()
    decoder_input_ids = decoder_ids(3, 6)

    def forward(**kwargs):
        outputs = model(input_ids, attention_mask, decoder_input_ids=decoder_input_ids, **kwargs)
        cache = getattr(outputs, modeling_colt5.CACHE_FIELD)
        return outputs[0 if model_class is CoLT5Model else "logits"], None if cache is None else cache.get_seq_length()

    cached, length = forward()
    assert length == 6
    if model_class is CoLT5ForConditionalGeneration:
        assert forward(labels=decoder_input_ids)[1] is None
        assert forward(labels=decoder_input_ids, use_cache=True)[1] == 6
    model.train()
    uncached, length = forward()
    assert length is None and forward(use_cache=True)[1] == 6
    # equal up to float32 rounding: a cache holds the keys and values in another memory layout (contiguous, where
    # the projection's are a transposed view), and some CPUs' matmul kernels then sum in another order (1e-6 apart)
    torch.testing.assert_close(uncached, cached)


# ----------------------------------------------------------------------------------------------------- outputs


@torch.no_grad()
def test_output_hidden_states():
    model = build(num_layers=3, num_decoder_layers=2)
    input_ids, attention_mask = padded_batch()
    decoder_input_ids = decoder_ids(3, 5)
    outputs = model(input_ids, attention_mask, decoder_input_ids=decoder_input_ids, output_hidden_states=True)
    embed = model.encoder.embed_tokens
    assert len(outputs.encoder_hidden_states) == 3 + 1
    assert all(h.shape == (3, 97, 64) for h in outputs.encoder_hidden_states)
    assert torch.equal(outputs.encoder_hidden_states[0], embed(input_ids))
    assert torch.equal(outputs.encoder_hidden_states[-1], outputs.encoder_last_hidden_state)
    assert len(outputs.decoder_hidden_states) == 2 + 1
    assert all(h.shape == (3, 5, 64) for h in outputs.decoder_hidden_states)
    assert torch.equal(outputs.decoder_hidden_states[0], embed(decoder_input_ids))
    torch.testing.assert_close(model.lm_head(outputs.decoder_hidden_states[-1]), outputs.logits)

    encoder_only = CoLT5EncoderModel(model.config).eval()
    encoder_only.load_state_dict(model.state_dict(), strict=False)
    hidden_states = encoder_only(input_ids, attention_mask, output_hidden_states=True).hidden_states
    assert len(hidden_states) == 4
    for mine, theirs in zip(hidden_states, outputs.encoder_hidden_states):
        assert torch.equal(mine, theirs)


def row_sums_are_one(probabilities):
    return torch.allclose(probabilities.sum(-1), torch.ones(()), atol=1e-5)


@pytest.mark.parametrize("cross_attention", ["one-route-all-tokens", "two-routes-half-tokens"])
@torch.no_grad()
def test_output_attentions_eager(cross_attention):
    model = build(attn_implementation="eager", **CROSS_ATTENTION_SETTINGS[cross_attention])
    config = model.config
    input_ids, attention_mask = padded_batch()
    decoder_input_ids = decoder_ids(3, 5)
    outputs = model(input_ids, attention_mask, decoder_input_ids=decoder_input_ids, output_attentions=True)

    n, light = 97, config.num_light_heads
    distance = (torch.arange(n)[None] - torch.arange(n)[:, None]).abs()
    assert len(outputs.encoder_attentions) == config.num_layers
    for layer in outputs.encoder_attentions:
        assert layer.shape == (3, config.num_light_heads + config.num_heavy_heads, n, n)
        for i, length in enumerate(LENGTHS):
            light_rows, heavy_rows = layer[i, :light, :length], layer[i, light:, :length]  # real queries
            assert row_sums_are_one(light_rows)
            assert (light_rows[..., length:] == 0).all()  # no mass on padding
            assert (light_rows[..., distance[:length] > config.local_radius] == 0).all()  # band
            # heavy heads: the routed queries' rows sum to 1 over the routed keys, every other row is 0
            row_sums = heavy_rows.sum(-1)
            routed_rows = torch.isclose(row_sums, torch.ones(()), atol=1e-5)
            assert (routed_rows | (row_sums == 0)).all()
            assert (routed_rows.sum(-1) == config.routed_count(config.attention_q_fraction, length)).all()
            routed_columns = (heavy_rows > 0).any(-2)  # (heavy heads, n)
            assert (routed_columns.sum(-1) == config.routed_count(config.attention_kv_fraction, length)).all()
            assert not routed_columns[:, length:].any()

    assert len(outputs.decoder_attentions) == len(outputs.cross_attentions) == config.num_decoder_layers
    for layer in outputs.decoder_attentions:
        assert layer.shape == (3, config.num_heads, 5, 5)
        assert row_sums_are_one(layer)
        assert (layer.triu(1) == 0).all()  # causal
    # cross-attention: over the encoder's positions; each head's route takes its own tokens, the same for every query
    routed = config.cross_attention_fraction < 1
    heads_per_route = config.num_heads // config.num_cross_attention_routes
    for layer in outputs.cross_attentions:
        assert layer.shape == (3, config.num_heads, 5, n)
        assert row_sums_are_one(layer)
        for i, length in enumerate(LENGTHS):
            taken = layer[i] > 0  # (heads, 5, n)
            real_keys = config.routed_count(config.cross_attention_fraction, length) if routed else length
            assert (taken.sum(-1) == real_keys).all() and not taken[..., length:].any()
            assert (taken == taken[:, :1]).all()
            route_columns = taken[:, 0].unflatten(0, (-1, heads_per_route))  # (routes, heads of the route, n)
            assert (route_columns == route_columns[:, :1]).all()


# ----------------------------------------------------------------------------------------- embeddings and inputs


@torch.no_grad()
def test_resize_token_embeddings_keeps_outputs_of_old_tokens():
    model = build()
    vocab_size = model.config.vocab_size
    input_ids, attention_mask = padded_batch(vocab_size=300)
    decoder_input_ids = decoder_ids(3, 6, vocab_size=300)

    def logits():
        return model(input_ids, attention_mask, decoder_input_ids=decoder_input_ids).logits

    before = logits()
    for new_size in (vocab_size + 13, 300):
        model.resize_token_embeddings(new_size)
        assert model.config.vocab_size == new_size
        assert model.encoder.embed_tokens.weight.shape == model.lm_head.weight.shape == (new_size, 64)
        assert model.get_input_embeddings() is model.encoder.embed_tokens
        after = logits()
        assert after.shape[-1] == new_size
        common = min(new_size, vocab_size)
        torch.testing.assert_close(after[..., :common], before[..., :common], atol=1e-6, rtol=1e-6)

    tied = build(tie_word_embeddings=True)
    tied.resize_token_embeddings(vocab_size + 13)
    assert tied.lm_head.weight is tied.encoder.embed_tokens.weight
    assert tied.lm_head.weight.shape == (vocab_size + 13, 64)


@torch.no_grad()
def test_inputs_embeds_equal_input_ids():
    model = build(**ROUTED_CROSS_ATTENTION)
    input_ids, attention_mask = padded_batch()
    decoder_input_ids = decoder_ids(3, 6)
    embed = model.get_input_embeddings()
    from_ids = model(input_ids, attention_mask, decoder_input_ids=decoder_input_ids).logits
    from_embeds = model(
        inputs_embeds=embed(input_ids), attention_mask=attention_mask, decoder_inputs_embeds=embed(decoder_input_ids)
    ).logits
    assert torch.equal(from_embeds, from_ids)
    mixed = model(inputs_embeds=embed(input_ids), attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)
    assert torch.equal(mixed.logits, from_ids)
    encoder = CoLT5EncoderModel(model.config).eval()
    encoder.load_state_dict(model.state_dict(), strict=False)
    assert torch.equal(
        encoder(inputs_embeds=embed(input_ids), attention_mask=attention_mask).last_hidden_state,
        encoder(input_ids, attention_mask).last_hidden_state,
    )


@pytest.mark.parametrize(
    "sdpa_min_queries, chunked_min_keys",
    [(1, t5_attention.CHUNKED_MIN_KEYS), (t5_attention.SDPA_MIN_QUERIES, t5_attention.CHUNKED_MIN_KEYS),
     (t5_attention.SDPA_MIN_QUERIES, 2)],
    ids=["sdpa-everywhere", "default", "chunked-keys"],
)
@pytest.mark.parametrize("cross_attention", ["one-route-all-tokens", "gqa-two-routes"])
@torch.no_grad()
def test_eager_and_sdpa_give_the_same_outputs(cross_attention, sdpa_min_queries, chunked_min_keys, tmp_path,
                                              monkeypatch):
    # by default the tiny model's attention calls have too few queries for SDPA and too few keys for chunks (they take
    # the matmul path): with the threshold at 1 every call goes through SDPA's kernels; with chunks from 2 keys on the
    # decoding steps' cross-attention (and the heavy attention's few routed queries) take chunked_attention
    monkeypatch.setattr(t5_attention, "SDPA_MIN_QUERIES", sdpa_min_queries)
    monkeypatch.setattr(t5_attention, "CHUNKED_MIN_KEYS", chunked_min_keys)
    chunked_calls = []
    chunked = t5_attention.chunked_attention
    monkeypatch.setattr(t5_attention, "chunked_attention",
                        lambda *args: chunked_calls.append(args[-1]) or chunked(*args))
    sdpa_calls = []
    sdpa_kernel = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: sdpa_calls.append(1) or sdpa_kernel(*args, **kwargs))
    build(**CROSS_ATTENTION_SETTINGS[cross_attention]).save_pretrained(tmp_path)
    eager = CoLT5ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    sdpa = CoLT5ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert (eager.config._attn_implementation, sdpa.config._attn_implementation) == ("eager", "sdpa")
    input_ids, attention_mask = padded_batch()
    decoder_input_ids = decoder_ids(3, 6)
    eager_out = eager(input_ids, attention_mask, decoder_input_ids=decoder_input_ids)
    sdpa_out = sdpa(input_ids, attention_mask, decoder_input_ids=decoder_input_ids)
    for i, length in enumerate(LENGTHS):  # padded encoder positions are garbage in both: compare real tokens
        torch.testing.assert_close(
            sdpa_out.encoder_last_hidden_state[i, :length], eager_out.encoder_last_hidden_state[i, :length],
            **REORDERED_FLOAT32,
        )
    torch.testing.assert_close(sdpa_out.logits, eager_out.logits, **REORDERED_FLOAT32)
    generate = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(sdpa.generate(**generate), eager.generate(**generate))
    assert (len(sdpa_calls) > 0) == (sdpa_min_queries == 1)
    assert (len(chunked_calls) > 0) == (chunked_min_keys == 2)


def test_key_chunks_divide_the_keys_near_the_square_root_of_a_sixteenth():
    assert [t5_attention.key_chunks(keys) for keys in (16384, 65536, 16000, 2600, 4099)] == [32, 64, 32, 13, 1]


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_chunked_attention_equals_softmax_attention(dtype, atol):
    """chunked_attention against softmax(q k^T + bias) v in float64: a sample whose first chunks are all masked, a
    fully masked row, and a per-head, per-query bias (a decoding step's self-attention shape) beside a per-sample key
    mask (the cross-attention's)."""
    torch.manual_seed(0)
    keys, masked = 60, t5_attention.mask_value(dtype)
    query = torch.randn(2, 4, 3, 8, dtype=dtype)
    key, value = torch.randn(2, 4, keys, 8, dtype=dtype), torch.randn(2, 4, keys, 8, dtype=dtype)
    keep = torch.rand(2, keys) < 0.6
    keep[1, :25] = False
    key_mask = torch.zeros(2, 1, 1, keys, dtype=dtype).masked_fill(~keep[:, None, None], masked)
    position_bias = torch.randn(1, 4, 3, keys, dtype=dtype)
    position_bias[0, :, 2] = masked  # the last query sees no key
    for bias in (key_mask, position_bias):
        scores = query.double() @ key.double().transpose(-1, -2) + bias.double()
        expected = torch.softmax(scores, -1) @ value.double()
        for chunks in (2, 6, 12):  # chunks of 30, 10 and 5 keys
            out = t5_attention.chunked_attention(query, key, value, bias, chunks)
            assert out.dtype == dtype and out.shape == expected.shape
            torch.testing.assert_close(out.double(), expected, atol=atol, rtol=0)


# ------------------------------------------------------------------------------------------------------------ loss


@torch.no_grad()
def test_loss_with_ignored_labels_equals_hand_computation():
    model = build()
    input_ids, attention_mask = padded_batch()
    labels = decoder_ids(3, 6)
    labels[0, 4:] = -100  # padded targets
    labels[1, 2] = -100  # an ignored token inside a target
    labels[2, 5] = -100
    outputs = model(input_ids, attention_mask, labels=labels)

    # shift right by hand: decoder starts with decoder_start_token_id; an ignored label fed back becomes the pad id
    decoder_input_ids = torch.cat([torch.zeros(3, 1, dtype=torch.long), labels[:, :-1]], dim=1)
    decoder_input_ids[decoder_input_ids == -100] = model.config.pad_token_id
    logits = model(input_ids, attention_mask, decoder_input_ids=decoder_input_ids).logits  # fills a cache
    torch.testing.assert_close(outputs.logits, logits)  # up to the cache's layout (see the test above)
    log_probs = logits.double().log_softmax(-1)
    token_losses = -log_probs.gather(-1, labels.clamp(min=0)[..., None])[..., 0]  # (b, t)
    counted = labels != -100
    summed = token_losses[counted].sum()
    assert counted.sum() == 14
    torch.testing.assert_close(outputs.loss.double(), summed / 14, atol=1e-6, rtol=1e-6)

    for num_items_in_batch in (40, torch.tensor(40)):  # Trainer's count over all accumulated micro-batches
        loss = model(input_ids, attention_mask, labels=labels, num_items_in_batch=num_items_in_batch).loss
        torch.testing.assert_close(loss.double(), summed / 40, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------------------- routing


@torch.no_grad()
def test_record_routing_returns_every_routers_choice():
    model = build(**ROUTED_CROSS_ATTENTION)
    config = model.config
    input_ids, attention_mask = padded_batch()
    with model.record_routing() as routing:
        model(input_ids, attention_mask, decoder_input_ids=decoder_ids(3, 5))

    fractions = {}
    for layer in range(config.num_layers):
        fractions[f"encoder.block.{layer}.attention.q_router"] = (config.attention_q_fraction, 1)
        fractions[f"encoder.block.{layer}.attention.kv_router"] = (config.attention_kv_fraction, 1)
        fractions[f"encoder.block.{layer}.feed_forward.router"] = (config.feed_forward_fraction, 1)
    for layer in range(config.num_decoder_layers):
        fractions[f"decoder.block.{layer}.cross_attention.kv_router"] = (config.cross_attention_fraction, 2)
    assert routing.keys() == fractions.keys()

    for name, (fraction, routes) in fractions.items():
        (choice,) = routing[name]  # one call per forward
        assert isinstance(choice, RouterOutput)
        k_max = config.routed_count(fraction, 97)
        assert choice.indices.shape == choice.valid.shape == choice.weights.shape == (3, routes, k_max)
        for i, length in enumerate(LENGTHS):
            k = config.routed_count(fraction, length)
            assert k < length
            assert (choice.valid[i].sum(-1) == k).all() and choice.valid[i, :, :k].all()  # valid slots first
            chosen = choice.indices[i, :, :k]
            assert (chosen < length).all(), name  # only real tokens
            assert all(len(set(route.tolist())) == k for route in chosen)
            assert (choice.weights[i, :, :k] == 1).all() and (choice.weights[i, :, k:] == 0).all()

    # independent check of the first router: the k real tokens with the best raw scores of the normalised embeddings,
    # exact ties (repeated tokens) going to the earlier position
    block = model.encoder.block[0]
    hidden = block.attention_layer_norm(model.encoder.embed_tokens(input_ids))
    scores = (hidden @ block.attention.q_router.weight[0]).tolist()  # (b, n)
    (choice,) = routing["encoder.block.0.attention.q_router"]
    for i, length in enumerate(LENGTHS):
        k = config.routed_count(config.attention_q_fraction, length)
        expected = sorted(range(length), key=lambda position: (-scores[i][position], position))[:k]
        assert set(choice.indices[i, 0, :k].tolist()) == set(expected)

    model(input_ids, attention_mask, decoder_input_ids=decoder_ids(3, 5))  # hooks are gone after the block
    assert all(len(calls) == 1 for calls in routing.values())

    with model.record_routing() as routing:  # cached generation routes the encoder output once, not per step
        model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=5, do_sample=False)
    assert routing.keys() == fractions.keys()
    assert all(len(calls) == 1 for calls in routing.values())


# ------------------------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_heads=4, num_cross_attention_routes=3), "`num_heads` \\(4\\).*`num_cross_attention_routes` \\(3\\)"),
        (dict(num_heads=4, num_cross_attention_routes=2, num_cross_attention_kv_heads=4), "num_cross_attention_kv_heads"),
        (dict(d_model=-64), "`d_model` must be a positive integer"),
        (dict(num_layers=0), "`num_layers` must be a positive integer"),
        (dict(heavy_d_ff=-1), "`heavy_d_ff` must be a positive integer"),
        (dict(attention_q_fraction=0.0), "`attention_q_fraction` must be a fraction in \\(0, 1\\]"),
        (dict(attention_kv_fraction=1.5), "`attention_kv_fraction` must be a fraction in \\(0, 1\\]"),
        (dict(feed_forward_fraction=-0.1), "`feed_forward_fraction` must be a fraction"),
        (dict(cross_attention_fraction=2.0), "`cross_attention_fraction` must be a fraction"),
        (dict(router_type="top_k"), "`router_type` must be one of.*'sinkhorn'"),
        (dict(router_temperature=0.0), "`router_temperature` must be a positive number"),
    ],
)
def test_invalid_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


@torch.no_grad()
def test_bad_inputs_raise_clear_errors():
    model = build()
    input_ids, attention_mask = padded_batch()
    decoder_input_ids = decoder_ids(3, 5)
    embeds = model.encoder.embed_tokens(input_ids)

    with pytest.raises(ValueError, match=r"`attention_mask` has shape \(3, 96\).*\(3, 97\)"):
        model(input_ids, attention_mask[:, :-1], decoder_input_ids=decoder_input_ids)
    with pytest.raises(ValueError, match="`attention_mask` has shape"):
        model.encoder(input_ids, attention_mask[:2])
    with pytest.raises(ValueError, match="empty input"):
        model(input_ids[:, :0], attention_mask[:, :0], decoder_input_ids=decoder_input_ids)
    with pytest.raises(ValueError, match="empty decoder inputs"):
        model(input_ids, attention_mask, decoder_input_ids=decoder_input_ids[:, :0])
    with pytest.raises(ValueError, match="exactly one of `input_ids` and `inputs_embeds`"):
        model(input_ids, attention_mask, inputs_embeds=embeds, decoder_input_ids=decoder_input_ids)
    with pytest.raises(ValueError, match="exactly one of `input_ids` and `inputs_embeds`"):
        model(attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)
    with pytest.raises(ValueError, match="exactly one of `decoder_input_ids` and `decoder_inputs_embeds`"):
        model(input_ids, attention_mask, decoder_input_ids=decoder_input_ids,
              decoder_inputs_embeds=model.encoder.embed_tokens(decoder_input_ids))
    with pytest.raises(ValueError, match="`decoder_attention_mask` covers 6 positions.*5 new"):
        model(input_ids, attention_mask, decoder_input_ids=decoder_input_ids,
              decoder_attention_mask=torch.ones(3, 6, dtype=torch.long))
