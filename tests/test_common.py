"""Transformers' common model checks (its tests/test_modeling_common.py and generation tester, run on every built-in
model, T5 among them), written here for CoLT5 where the other test files do not make them already; and the contract
of built-in T5 that issue 21 lists: an encoder model's config, attention weights under SDPA, switching the attention
implementation, weights that take the output's gradient, the renamed cache argument, float32 output projections in
float16.

Made elsewhere: save/load bit for bit, auto classes, tied embeddings, T5's initialisation of every weight, cached
against uncached generation, eager against SDPA, inputs_embeds, resizing (test_modeling.py); checkpointed gradients
equal to plain ones (test_training.py); device maps and offloading, half precision, torch.compile (test_ecosystem.py,
test_compile.py, test_generation.py). Not made: TorchScript and torch.fx tracing (not asked of v5 models), head
masking and pruning (gone from Transformers 5), flash attention (T5's position bias rules it out, as for T5).

Where a check as Transformers writes it cannot hold for a routed model, the test says why and checks what does hold:
the cross-attention cache holds routed multi-query keys (test_cache_holds_...), and the encoder's attention weights
take a gradient only where a branch computes (test_returned_hidden_states_...).
"""

import inspect
import json
import warnings

import pytest
import torch
from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration, T5Model
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging
from transformers.utils import logging as transformers_logging

from colt5_hf import CoLT5Config, CoLT5EncoderModel, CoLT5ForConditionalGeneration, CoLT5Model, modeling_colt5
from colt5_hf import t5_attention
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


# ------------------------------------------------------------------------------------------ attention weights


def weights_outputs(model, input_ids, attention_mask, decoder_input_ids, **options):
    return model(input_ids, attention_mask, decoder_input_ids=decoder_input_ids, output_attentions=True, **options)


@pytest.mark.parametrize("implementation", ["sdpa", "flex_attention"])
@torch.no_grad()
def test_output_attentions_under_a_fused_implementation_runs_the_eager_computation(implementation, tmp_path):
    """Built-in models warn where their fused attention has no weights; CoLT5 runs the eager computation for that
    call, with a one-time warning: the weights equal the eager model's, the outputs those of the call without
    weights."""
    build(**ROUTED).save_pretrained(tmp_path)
    eager = CoLT5ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    fused = CoLT5ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=implementation).eval()
    assert fused.config._attn_implementation == implementation
    inputs = (*padded_batch(), decoder_ids(3, 5))
    transformers_logging.warning_once.cache_clear()
    with CaptureLogger(modeling_colt5.logger) as captured:
        with_weights = [weights_outputs(fused, *inputs) for _ in range(2)]
    assert captured.out.count(f"attn_implementation={implementation!r} computes no attention weights") == 1
    expected = weights_outputs(eager, *inputs)
    for name in ("encoder_attentions", "decoder_attentions", "cross_attentions"):
        for weights, expected_weights in zip(getattr(with_weights[0], name), getattr(expected, name), strict=True):
            torch.testing.assert_close(weights, expected_weights, rtol=0, atol=0)
    without = fused(*inputs[:2], decoder_input_ids=inputs[2])
    assert without.encoder_attentions is None and without.cross_attentions is None
    torch.testing.assert_close(with_weights[0].logits, without.logits, rtol=1e-5, atol=1e-5)


def test_set_attn_implementation_switches_the_attention_at_run_time(monkeypatch):
    """Transformers lets a model switch implementations when its attention reads `config._attn_implementation` where
    it is used (it looks for `ALL_ATTENTION_FUNCTIONS.get_interface(` in the source). Every call with enough queries
    runs through SDPA here (the threshold at 1, as in test_modeling.py): switching to eager stops its calls, switching
    back resumes them, and the outputs agree."""
    monkeypatch.setattr(t5_attention, "SDPA_MIN_QUERIES", 1)
    sdpa_calls = []
    sdpa_kernel = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: sdpa_calls.append(1) or sdpa_kernel(*args, **kwargs))
    model = build(**ROUTED)
    assert type(model)._can_set_attn_implementation()
    inputs = (*padded_batch(), decoder_ids(3, 5))

    def run(implementation):
        sdpa_calls.clear()
        with CaptureLogger(logging.get_logger("transformers.modeling_utils")) as captured:
            model.set_attn_implementation(implementation)
        assert "does not support setting its attention implementation" not in captured.out
        assert model.config._attn_implementation == implementation
        with torch.no_grad():
            outputs = model(*inputs[:2], decoder_input_ids=inputs[2], output_attentions=implementation == "eager")
        return outputs, len(sdpa_calls)

    sdpa, sdpa_count = run("sdpa")
    eager, eager_count = run("eager")
    flex, flex_count = run("flex_attention")  # on the CPU its dense attention runs through SDPA as well
    again, again_count = run("sdpa")
    # each of the 2 encoder layers: light and heavy attention; each of the 2 decoder layers: self and cross
    assert sdpa_count == flex_count == again_count == 8 and eager_count == 0
    assert eager.encoder_attentions is not None  # the eager computation's weights, without a warning's fallback
    for outputs in (eager, flex, again):
        torch.testing.assert_close(outputs.logits, sdpa.logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attn_implementation 'eager', 'sdpa' and 'flex_attention'"):
        model.set_attn_implementation("paged|eager")


@pytest.mark.parametrize("cross_attention",
                         [dict(), ROUTED, dict(num_heads=8, num_cross_attention_kv_heads=2, **ROUTED)],
                         ids=["all-tokens", "two-routes", "gqa-two-routes"])
@torch.no_grad()
def test_cross_attentions_equal_a_dense_recomputation_over_the_encoder_positions(cross_attention):
    """(batch, heads, target, source length), as T5's: each head's weights at the encoder positions its route took
    (recorded by record_routing), computed here densely from the layer's inputs: softmax over those positions of the
    query against the router-scaled keys, 0 elsewhere."""
    model = build(**cross_attention)
    config = model.config
    input_ids, attention_mask = padded_batch()
    decoder_input_ids = decoder_ids(3, 5)
    layer = model.decoder.block[1].cross_attention
    seen = {}
    layer.register_forward_pre_hook(lambda module, args: seen.update(inputs=args[:2]))
    with model.record_routing() as routing:
        outputs = weights_outputs(model, input_ids, attention_mask, decoder_input_ids)
    hidden_states, encoder_hidden_states = seen["inputs"]
    heads, d_kv = config.num_heads, config.d_kv
    heads_per_route = heads // config.num_cross_attention_routes
    kv_heads_per_route = config.num_cross_attention_kv_heads
    query = (hidden_states @ layer.q.weight.T).unflatten(-1, (heads, d_kv))  # (b, t, h, d_kv)
    expected = torch.zeros(3, heads, 5, max(LENGTHS))
    for i, length in enumerate(LENGTHS):
        for head in range(heads):
            route = head // heads_per_route
            if layer.kv_router is None:
                positions, scale = torch.arange(length), torch.ones(length)
            else:
                (choice,) = routing["decoder.block.1.cross_attention.kv_router"]
                taken = choice.valid[i, route]
                positions, scale = choice.indices[i, route][taken], choice.weights[i, route][taken]
            kv_head = route * kv_heads_per_route + (head % heads_per_route) // (heads_per_route // kv_heads_per_route)
            rows = slice(kv_head * d_kv, (kv_head + 1) * d_kv)
            key = (encoder_hidden_states[i, positions] * scale[:, None]) @ layer.k.weight[rows].T  # (k, d_kv)
            expected[i, head][:, positions] = (query[i, :, head] @ key.T).softmax(-1)
    weights = outputs.cross_attentions[1]
    assert weights.shape == (3, heads, 5, max(LENGTHS))
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_returned_hidden_states_and_attentions_take_the_gradient_of_the_output(implementation):
    """Transformers' test_retain_grad_hidden_states_attentions: the tensors returned are those the output is computed
    from, so `retain_grad` on them gets a gradient. The encoder's weights hold two branches computed from them: the
    gradient at weight (i, j) of a head is <dL/d out_i, v_j> (out before the output projection) wherever the branch
    computes one (the light heads' three blocks around i's, the heavy heads' routed rows and columns), 0 elsewhere."""
    model = build(attn_implementation=implementation, **ROUTED)
    config = model.config
    input_ids, attention_mask = padded_batch()
    attention = model.encoder.block[0].attention
    captured = {}
    for name, branch in (("light", attention.light_attention), ("heavy", attention.heavy_attention)):
        branch.v.register_forward_hook(lambda module, args, out, name=name: captured.update({(name, "v"): out}))
        branch.o.register_full_backward_hook(
            lambda module, grad_input, grad_output, name=name: captured.update({(name, "grad"): grad_input[0]})
        )
    with model.record_routing() as routing:
        outputs = model(input_ids, attention_mask, decoder_input_ids=decoder_ids(3, 5), output_attentions=True,
                        output_hidden_states=True)
    returned = {name: getattr(outputs, name)[0] for name in (
        "encoder_hidden_states", "encoder_attentions", "decoder_hidden_states", "decoder_attentions",
        "cross_attentions")}
    for tensor in returned.values():
        tensor.retain_grad()
    outputs.logits.sum().backward()
    for name, tensor in returned.items():
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0, name

    def per_head(t):  # (b, tokens, h * d) -> (b, h, tokens, d)
        return t.unflatten(-1, (-1, config.d_kv)).transpose(1, 2)

    gradient = returned["encoder_attentions"].grad.double()  # (b, light + heavy heads, n, n)
    light, n, block = config.num_light_heads, max(LENGTHS), config.local_radius + 1
    position = torch.arange(n)
    window = (position[:, None] // block - position[None, :] // block).abs() <= 1
    expected_light = per_head(captured["light", "grad"]) @ per_head(captured["light", "v"]).transpose(-1, -2)
    torch.testing.assert_close(gradient[:, :light], (expected_light * window).double(), rtol=1e-4, atol=1e-6)

    routed_grads = per_head(captured["heavy", "grad"]) @ per_head(captured["heavy", "v"]).transpose(-1, -2)
    (q_choice,) = routing["encoder.block.0.attention.q_router"]
    (kv_choice,) = routing["encoder.block.0.attention.kv_router"]
    expected_heavy = torch.zeros_like(gradient[:, light:])
    for i in range(3):
        q_valid, kv_valid = q_choice.valid[i, 0], kv_choice.valid[i, 0]
        rows, columns = q_choice.indices[i, 0][q_valid], kv_choice.indices[i, 0][kv_valid]
        expected_heavy[i][:, rows[:, None], columns[None, :]] = routed_grads[i][:, q_valid][:, :, kv_valid].double()
    torch.testing.assert_close(gradient[:, light:], expected_heavy, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------- outputs and inputs


def test_forward_signature_begins_as_t5s_and_main_input_is_input_ids():
    """Positional calls written for T5 work: T5's named forward parameters open CoLT5's, in T5's order (the cache
    is `cache` in every version, where T5 has `past_key_values` before 5.24)."""
    for ours, t5 in ((CoLT5ForConditionalGeneration, T5ForConditionalGeneration), (CoLT5Model, T5Model),
                     (CoLT5EncoderModel, T5EncoderModel)):
        t5_names = [name.replace("past_key_values", "cache") for name in inspect.signature(t5.forward).parameters
                    if name != "kwargs"]
        assert list(inspect.signature(ours.forward).parameters)[: len(t5_names)] == t5_names, ours.__name__
        assert ours.main_input_name == "input_ids" == t5_names[1]


def model_inputs(model_class, labels=False):
    input_ids, attention_mask = padded_batch()
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask)
    if model_class is not CoLT5EncoderModel:
        inputs["decoder_input_ids"] = decoder_ids(3, 5)
    if labels:
        inputs["labels"] = decoder_ids(3, 5, seed=2)
    return inputs


def assert_equal_outputs(got, expected, where="output"):
    """Tensors bitwise equal, tuples element by element, other values (a cache) of the same type."""
    if isinstance(expected, torch.Tensor):
        assert torch.equal(got, expected), where
    elif isinstance(expected, tuple):
        assert isinstance(got, tuple) and len(got) == len(expected), where
        for i, (item, expected_item) in enumerate(zip(got, expected)):
            assert_equal_outputs(item, expected_item, f"{where}[{i}]")
    else:
        assert type(got) is type(expected), where


@pytest.mark.parametrize("model_class", [CoLT5ForConditionalGeneration, CoLT5Model, CoLT5EncoderModel])
@torch.no_grad()
def test_tuple_outputs_equal_the_output_objects(model_class):
    """Transformers' test_model_outputs_equivalence: return_dict=False (or config.return_dict=False) gives the output
    object's `to_tuple()`, with every optional output asked for or not."""
    model = build(model_class, **ROUTED)
    for options in (dict(), dict(output_hidden_states=True), dict(output_attentions=True),
                    dict(output_hidden_states=True, output_attentions=True)):
        inputs = {**model_inputs(model_class, labels=model_class is CoLT5ForConditionalGeneration), **options}
        expected = model(**inputs, return_dict=True)
        assert_equal_outputs(model(**inputs, return_dict=False), expected.to_tuple(), str(options))
        model.config.return_dict = False
        assert_equal_outputs(model(**inputs), expected.to_tuple(), f"config.return_dict=False, {options}")
        model.config.return_dict = True


@pytest.mark.parametrize("model_class", [CoLT5ForConditionalGeneration, CoLT5EncoderModel])
@torch.no_grad()
def test_attentions_and_hidden_states_asked_for_through_the_config(model_class):
    """Transformers' test_attention_outputs and test_hidden_states_output: one tensor per layer (hidden states: one
    more), of the sizes of T5's, whether asked for by argument or by the config."""
    config = tiny_config(num_layers=3, num_decoder_layers=2, output_attentions=True, output_hidden_states=True,
                         **ROUTED)
    torch.manual_seed(0)
    model = model_class(config).eval()
    inputs = model_inputs(model_class)
    n, heads = max(LENGTHS), config.num_light_heads + config.num_heavy_heads
    outputs = model(**inputs)
    by_argument = build(model_class, num_layers=3, num_decoder_layers=2, **ROUTED)(
        **inputs, output_attentions=True, output_hidden_states=True)
    encoder_attentions = outputs.attentions if model_class is CoLT5EncoderModel else outputs.encoder_attentions
    encoder_states = outputs.hidden_states if model_class is CoLT5EncoderModel else outputs.encoder_hidden_states
    assert [tuple(a.shape) for a in encoder_attentions] == [(3, heads, n, n)] * 3
    assert [tuple(h.shape) for h in encoder_states] == [(3, n, config.d_model)] * 4
    if model_class is CoLT5ForConditionalGeneration:
        assert [tuple(a.shape) for a in outputs.decoder_attentions] == [(3, config.num_heads, 5, 5)] * 2
        assert [tuple(a.shape) for a in outputs.cross_attentions] == [(3, config.num_heads, 5, n)] * 2
        assert [tuple(h.shape) for h in outputs.decoder_hidden_states] == [(3, 5, config.d_model)] * 3
    assert_equal_outputs(outputs.to_tuple(), by_argument.to_tuple())


@torch.no_grad()
def test_saved_folder_holds_a_generation_config_exactly_for_the_generating_class(tmp_path):
    """Transformers' test_save_load; untied weights stay two tensors after loading
    (test_load_save_without_tied_weights); a state dict in memory loads without a checkpoint
    (test_from_pretrained_no_checkpoint)."""
    for model_class in (CoLT5ForConditionalGeneration, CoLT5Model, CoLT5EncoderModel):
        model = build(model_class)
        folder = tmp_path / model_class.__name__
        model.save_pretrained(folder)
        assert (folder / "generation_config.json").is_file() == model.can_generate() == (
            model_class is CoLT5ForConditionalGeneration)
        from_memory = model_class.from_pretrained(None, config=model.config, state_dict=model.state_dict())
        for name, parameter in from_memory.state_dict().items():
            assert torch.equal(parameter, model.state_dict()[name]), name
    loaded = CoLT5ForConditionalGeneration.from_pretrained(tmp_path / "CoLT5ForConditionalGeneration")
    assert loaded.lm_head.weight.data_ptr() != loaded.encoder.embed_tokens.weight.data_ptr()
    assert not torch.equal(loaded.lm_head.weight, loaded.encoder.embed_tokens.weight)


@torch.no_grad()
def test_weights_load_across_the_base_and_head_classes(tmp_path):
    """Transformers' test_save_load_fast_init_from_base / to_base: the bare model's weights load into the head model
    (its LM head initialised) and back (the LM head dropped), and the encoder model takes the encoder of either."""
    seq2seq = build(**ROUTED)
    seq2seq.save_pretrained(tmp_path / "seq2seq")
    base = CoLT5Model.from_pretrained(tmp_path / "seq2seq")
    assert set(base.state_dict()) == set(seq2seq.state_dict()) - {"lm_head.weight"}
    base.save_pretrained(tmp_path / "base")
    with_head = CoLT5ForConditionalGeneration.from_pretrained(tmp_path / "base")
    encoder = CoLT5EncoderModel.from_pretrained(tmp_path / "base")
    for model in (base, with_head, encoder):
        for name, parameter in model.state_dict().items():
            if name != "lm_head.weight":
                assert torch.equal(parameter, seq2seq.state_dict()[name]), name
    assert not torch.equal(with_head.lm_head.weight, seq2seq.lm_head.weight)
    # the model's initialisation (T5X's, std d_model**-0.5 = 0.125) of a head the base checkpoint lacks
    assert 0.1 < with_head.lm_head.weight.std() < 0.15


@pytest.mark.parametrize("model_class", [CoLT5ForConditionalGeneration, CoLT5Model, CoLT5EncoderModel])
@torch.no_grad()
def test_input_and_output_embeddings(model_class):
    """Transformers' test_model_get_set_embeddings and resize tests: the token embedding is the encoder's and the
    decoder reads it too; the LM head is the output embedding (none for the other classes); a resize to a multiple
    keeps the old rows."""
    model = build(model_class)
    embeddings = model.get_input_embeddings()
    assert isinstance(embeddings, torch.nn.Embedding) and embeddings is model.encoder.embed_tokens
    output_embeddings = model.get_output_embeddings()
    assert (output_embeddings is model.lm_head) if model_class is CoLT5ForConditionalGeneration else (
        output_embeddings is None)
    inputs = model_inputs(model_class)
    before = model(**inputs)[0]
    replacement = torch.nn.Embedding(model.config.vocab_size, model.config.d_model)
    replacement.weight.copy_(embeddings.weight * 2)
    model.set_input_embeddings(replacement)
    assert model.get_input_embeddings() is replacement
    assert not torch.allclose(model(**inputs)[0], before)
    model.set_input_embeddings(embeddings)
    old_rows = embeddings.weight.clone()
    resized = model.resize_token_embeddings(400, pad_to_multiple_of=64)
    assert resized.weight.shape == (448, model.config.d_model) and model.config.vocab_size == 448
    assert torch.equal(model.get_input_embeddings().weight[:384], old_rows)
    if model_class is CoLT5ForConditionalGeneration:
        assert model.lm_head.weight.shape == (448, model.config.d_model)
    torch.testing.assert_close(model(**inputs)[0][..., :384], before[..., :384], rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_mismatched_shapes_load_only_when_asked_and_are_reinitialised(tmp_path):
    """Transformers' test_load_with_mismatched_shapes: a checkpoint of another vocabulary size is an error unless
    `ignore_mismatched_sizes`, and then the mismatched tensors are initialised and the others loaded."""
    model = build()
    model.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        CoLT5ForConditionalGeneration.from_pretrained(tmp_path, vocab_size=400)
    loaded = CoLT5ForConditionalGeneration.from_pretrained(tmp_path, vocab_size=400, ignore_mismatched_sizes=True)
    assert loaded.lm_head.weight.shape == (400, 64)
    assert 0.1 < loaded.lm_head.weight.std() < 0.15  # the model's initialisation, std d_model**-0.5 = 0.125
    for name, parameter in loaded.state_dict().items():
        if name not in ("lm_head.weight", "encoder.embed_tokens.weight"):
            assert torch.equal(parameter, model.state_dict()[name]), name


@torch.no_grad()
def test_every_output_of_a_padded_batch_equals_each_sample_alone():
    """Transformers' test_batching_equivalence, on every output (hidden states, all three attentions, logits). For a
    routed model it holds because each sample's routed count comes from its own real length (per-sample k), so a
    padded sample routes as it does alone; with one k for the whole batch it could not. Padded positions are free
    in the batch: rows of padded queries are not compared, and no real query may give them weight."""
    model = build(**ROUTED)
    input_ids, attention_mask = padded_batch()
    decoder_input_ids = decoder_ids(3, 5)
    options = dict(output_attentions=True, output_hidden_states=True)
    batch = model(input_ids, attention_mask, decoder_input_ids=decoder_input_ids, **options)
    for i, length in enumerate(LENGTHS):
        alone = model(input_ids[i : i + 1, :length], decoder_input_ids=decoder_input_ids[i : i + 1], **options)

        def close(batched, single, what):
            torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5, msg=f"sample {i}: {what}")

        close(batch.logits[i], alone.logits[0], "logits")
        for layer, (states, single) in enumerate(zip(batch.encoder_hidden_states, alone.encoder_hidden_states)):
            close(states[i, :length], single[0], f"encoder hidden states {layer}")
        for layer, (weights, single) in enumerate(zip(batch.encoder_attentions, alone.encoder_attentions)):
            close(weights[i, :, :length, :length], single[0], f"encoder attentions {layer}")
            assert not weights[i, :, :length, length:].any()
        for name in ("decoder_hidden_states", "decoder_attentions"):
            for layer, (value, single) in enumerate(zip(getattr(batch, name), getattr(alone, name))):
                close(value[i], single[0], f"{name} {layer}")
        for layer, (weights, single) in enumerate(zip(batch.cross_attentions, alone.cross_attentions)):
            close(weights[i, ..., :length], single[0], f"cross attentions {layer}")
            assert not weights[i, ..., length:].any()


# ----------------------------------------------------------------------------------------------------- training


# Transformers 5.24 renamed gradient checkpointing to activation checkpointing; 5.17 has the old names only
CHECKPOINTING_RENAMED = r"ignore:`(gradient_checkpointing_\w+|is_gradient_checkpointing)` is deprecated:FutureWarning"


@pytest.mark.filterwarnings(CHECKPOINTING_RENAMED)
@pytest.mark.parametrize("checkpointing", [None, dict(use_reentrant=False), dict(use_reentrant=True)],
                         ids=["no-checkpointing", "non-reentrant", "reentrant"])
def test_every_parameter_gets_a_gradient_in_a_training_step(checkpointing):
    """Transformers' test_training and test_training_gradient_checkpointing: with and without checkpointing, every
    parameter (routers, bias tables and the routed cross-attention included) receives a nonzero gradient; enabling
    and disabling checkpointing sets every block's flag."""
    model = build(**ROUTED).train()
    blocks = [*model.encoder.block, *model.decoder.block]
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        assert model.is_gradient_checkpointing and all(block.gradient_checkpointing for block in blocks)
    model(**model_inputs(CoLT5ForConditionalGeneration, labels=True)).loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing and not any(block.gradient_checkpointing for block in blocks)


@pytest.mark.filterwarnings(CHECKPOINTING_RENAMED)
def test_frozen_embeddings_with_reentrant_checkpointing_train_through_enable_input_require_grads():
    """PEFT's setting (Transformers' test_enable_input_require_grads): with the embeddings frozen, reentrant
    checkpointing passes no gradient into a block unless its input requires one; enable_input_require_grads makes the
    embedding output require it, for the encoder and the decoder (which read the same embedding)."""
    model = build(**ROUTED).train()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trained = [model.encoder.block[0].attention.light_attention.q.weight,
               model.decoder.block[0].self_attention.q.weight]
    for parameter in trained:
        parameter.requires_grad_(True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(use_reentrant=True))
    model.enable_input_require_grads()
    model(**model_inputs(CoLT5ForConditionalGeneration, labels=True)).loss.backward()
    for parameter in trained:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------- generation


def generate(model, **inputs):
    return model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)


@torch.no_grad()
def test_generate_from_inputs_embeds_equals_generate_from_input_ids():
    model = build(**ROUTED)
    input_ids, attention_mask = padded_batch()
    expected = generate(model, input_ids=input_ids, attention_mask=attention_mask)
    embeds = model.get_input_embeddings()(input_ids)
    assert torch.equal(generate(model, inputs_embeds=embeds, attention_mask=attention_mask), expected)


@torch.no_grad()
def test_generate_continues_from_the_cache_it_returned():
    """Transformers' test_generate_continue_from_past_key_values: 3 tokens, then 3 more from the returned cache (the
    whole sequence passed with its mask, which tells generate how much is cached), equal 6 at once."""
    model = build(**ROUTED)
    input_ids, attention_mask = padded_batch()
    expected = generate(model, input_ids=input_ids, attention_mask=attention_mask)
    first = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=3, min_new_tokens=3,
                           do_sample=False, return_dict_in_generate=True)
    cache = getattr(first, CACHE_FIELD)
    assert cache.get_seq_length() == 3  # the start token and two generated ones; the third is not fed yet
    continued = model.generate(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=first.sequences,
                               decoder_attention_mask=torch.ones_like(first.sequences), max_new_tokens=3,
                               min_new_tokens=3, do_sample=False, **{CACHE_FIELD: cache})
    assert torch.equal(continued, expected)


@torch.no_grad()
def test_generate_returns_per_step_attentions_and_hidden_states():
    """Transformers' test_greedy_generate_dict_outputs: with output_attentions / output_hidden_states / output_scores,
    generate (default SDPA: the weights from the eager computation) returns, per step, one tensor per decoder layer
    of T5's shapes (cross-attention over the encoder's positions), and the same tokens as without them."""
    model = build(num_layers=3, num_decoder_layers=2, **ROUTED)
    config = model.config
    input_ids, attention_mask = padded_batch()
    n, steps = max(LENGTHS), 4
    plain = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=steps,
                           min_new_tokens=steps, do_sample=False)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=steps,
                         min_new_tokens=steps, do_sample=False, return_dict_in_generate=True, output_scores=True,
                         output_attentions=True, output_hidden_states=True)
    assert torch.equal(out.sequences, plain)
    assert len(out.scores) == len(out.decoder_attentions) == len(out.cross_attentions) == steps
    assert len(out.encoder_attentions) == 3 and len(out.encoder_hidden_states) == 4
    for step in range(steps):
        assert [tuple(a.shape) for a in out.decoder_attentions[step]] == [(3, config.num_heads, 1, step + 1)] * 2
        assert [tuple(a.shape) for a in out.cross_attentions[step]] == [(3, config.num_heads, 1, n)] * 2
        assert [tuple(h.shape) for h in out.decoder_hidden_states[step]] == [(3, 1, config.d_model)] * 3
        for weights in out.cross_attentions[step]:
            for i, length in enumerate(LENGTHS):
                assert not weights[i, ..., length:].any()
            torch.testing.assert_close(weights.sum(-1), torch.ones(3, config.num_heads, 1))


@torch.no_grad()
def test_assisted_and_prompt_lookup_decoding_equal_greedy():
    """Transformers' test_assisted_decoding_matches_greedy_search / prompt lookup: candidate tokens from another model
    (another seed: many are rejected, so the self-attention cache is cropped) or from the prompt change nothing.
    Transformers runs both for one sample at a time."""
    model, assistant = build(**ROUTED), build(seed=1, **ROUTED)
    input_ids, _ = padded_batch()
    for i, length in enumerate(LENGTHS):
        inputs = dict(input_ids=input_ids[i : i + 1, :length])
        expected = generate(model, **inputs)
        assert torch.equal(generate(model, **inputs, assistant_model=assistant), expected)
        assert torch.equal(generate(model, **inputs, prompt_lookup_num_tokens=2), expected)


@torch.no_grad()
def test_left_padded_inputs_give_the_outputs_of_right_padded_ones():
    """Transformers' test_left_padding_compatibility. Positions enter CoLT5 only as differences (relative bias in both
    branches) and the routers pick among real tokens, so a sample padded on the left gives the logits it gives padded
    on the right."""
    model = build(**ROUTED)
    input_ids, attention_mask = padded_batch()
    n = max(LENGTHS)
    left_ids, left_mask = torch.zeros_like(input_ids), torch.zeros_like(attention_mask)
    for i, length in enumerate(LENGTHS):
        left_ids[i, n - length :], left_mask[i, n - length :] = input_ids[i, :length], 1
    decoder_input_ids = decoder_ids(3, 5)
    right = model(input_ids, attention_mask, decoder_input_ids=decoder_input_ids).logits
    left = model(left_ids, left_mask, decoder_input_ids=decoder_input_ids).logits
    torch.testing.assert_close(left, right, rtol=1e-5, atol=1e-5)
    assert torch.equal(generate(model, input_ids=left_ids, attention_mask=left_mask),
                       generate(model, input_ids=input_ids, attention_mask=attention_mask))


@torch.no_grad()
def test_cache_holds_t5s_self_attention_layout_and_routed_cross_attention_keys():
    """Transformers' test_past_key_values_format, with CoLT5's cross-attention: per decoder layer the self-attention
    cache holds (batch, heads, decoded, d_kv) as T5's; the cross-attention cache holds the routed keys and values,
    (batch, routes * key/value heads per route, routed count of the padded length, d_kv), where T5 holds
    (batch, heads, source length, d_kv): multi-query, multi-route attention by design."""
    model = build(num_cross_attention_kv_heads=2, **ROUTED)
    config = model.config
    input_ids, attention_mask = padded_batch()
    outputs = model(input_ids, attention_mask, decoder_input_ids=decoder_ids(3, 5), use_cache=True)
    cache = getattr(outputs, CACHE_FIELD)
    routed = config.routed_count(config.cross_attention_fraction, max(LENGTHS))
    for layer in range(config.num_decoder_layers):
        self_layer = cache.self_attention_cache.layers[layer]
        cross_layer = cache.cross_attention_cache.layers[layer]
        assert self_layer.keys.shape == self_layer.values.shape == (3, config.num_heads, 5, config.d_kv)
        assert cross_layer.keys.shape == cross_layer.values.shape == (3, 2 * 2, routed, config.d_kv)
