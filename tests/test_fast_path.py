"""The compiled path (`colt5_hf/fast_path.py`) on the CPU: which calls take it, the length buckets, and that the
bucketed, compiled path computes what the eager path does (outputs, losses, accumulated gradients, generated tokens),
for the encoder and for the decoder that compiles with it in forwards without a cache.

On the CPU the path is off (COMPILE_DEVICES); the tests switch it on for the CPU and compile with Dynamo and the eager
backend (a graph counter): what they check is the padding, the dispatch, the gradient handling and how often the
layers compile, not inductor's code. tests/test_gpu_fast_path.py runs the path on CUDA with inductor and CUDA graphs.
"""

import pytest
import torch

from colt5_hf import CoLT5EncoderModel, CoLT5ForConditionalGeneration, fast_path
from colt5_hf.fast_path import RECOMPILE_LIMIT, compiled_layer, encoder_compile_mode, length_bucket, target_bucket
from colt5_hf.modeling_colt5 import CACHE_FIELD
from tiny import CountingBackend, build, tiny_config


MIN_LENGTH = 24  # the tiny tests' stand-in for COMPILE_MIN_LENGTH


@pytest.fixture
def on_cpu(monkeypatch):
    """The compiled path switched on for CPU inputs of MIN_LENGTH tokens or more; yields the graph counter."""
    backend = CountingBackend("eager")
    monkeypatch.setattr(fast_path, "COMPILE_DEVICES", ("cpu",))
    monkeypatch.setattr(fast_path, "COMPILE_MIN_LENGTH", MIN_LENGTH)
    monkeypatch.setattr(fast_path, "COMPILE_BACKEND", backend)
    torch._dynamo.reset()
    yield backend
    torch._dynamo.reset()


def test_length_buckets_hold_the_input_with_at_most_a_quarter_more():
    lengths = range(8, 70000, 7)
    buckets = [length_bucket(n) for n in lengths]
    assert all(n <= bucket <= n * 1.25 for n, bucket in zip(lengths, buckets))
    assert buckets == sorted(buckets)
    assert all(length_bucket(bucket) == bucket for bucket in buckets)  # a bucket's length is its own bucket
    assert len({length_bucket(n) for n in range(2048, 16385)}) == 13
    assert [length_bucket(n) for n in (2048, 2049, 16384, 16385)] == [2048, 2560, 16384, 20480]
    assert all(length_bucket(n) % 512 == 0 for n in range(2048, 70000, 97))


def test_target_buckets_are_powers_of_two_from_sixteen():
    table = {1: 16, 2: 16, 9: 16, 15: 16, 16: 16, 17: 32, 31: 32, 32: 32, 33: 64, 100: 128, 128: 128, 129: 256,
             300: 512, 511: 512, 512: 512, 513: 1024}
    assert {t: target_bucket(t) for t in table} == table
    lengths = range(1, 5000)
    assert all(t <= target_bucket(t) <= max(2 * t - 2, 16) for t in lengths)  # at most 2x above the floor
    assert all(target_bucket(target_bucket(t)) == target_bucket(t) for t in lengths)
    assert sorted({target_bucket(t) for t in range(1, 513)}) == [16, 32, 64, 128, 256, 512]


def test_the_compiled_variants_stay_under_the_recompile_limit(monkeypatch):
    """The bound of fast_path's docstring: 13 input buckets (2048-16384 tokens) x 6 target buckets (1-512 tokens) x
    2 modes (training with gradients, inference without) fit RECOMPILE_LIMIT, and compiling a layer raises both of
    Dynamo's limits (per guard set and per code object) to it."""
    input_buckets = {length_bucket(n) for n in range(2048, 16385)}
    target_buckets = {target_bucket(t) for t in range(1, 513)}
    assert len(input_buckets) * len(target_buckets) * 2 == 156 <= RECOMPILE_LIMIT
    assert len(input_buckets) * len({length_bucket(t) for t in range(1, 513)}) > RECOMPILE_LIMIT  # why targets differ
    names = ("recompile_limit", "accumulated_recompile_limit")
    if not hasattr(torch._dynamo.config, names[0]):
        names = ("cache_size_limit", "accumulated_cache_size_limit")
    monkeypatch.setattr(fast_path, "_compiled_layers", {})
    with torch._dynamo.config.patch(**dict.fromkeys(names, 8)):
        compiled_layer(lambda x: x, "default")
        assert [getattr(torch._dynamo.config, name) for name in names] == [RECOMPILE_LIMIT] * 2


def test_which_calls_compile(monkeypatch):
    monkeypatch.setattr(fast_path, "COMPILE_DEVICES", ("cpu",))
    long, short = torch.zeros(1, fast_path.COMPILE_MIN_LENGTH), torch.zeros(1, fast_path.COMPILE_MIN_LENGTH - 1)

    def mode(hidden_states=long, output_attentions=False, checkpointing=False, implementation="sdpa", **overrides):
        config = tiny_config(**overrides)
        config._attn_implementation = implementation
        return encoder_compile_mode(config, hidden_states, output_attentions, checkpointing)

    assert mode() == "default"  # training keeps no CUDA graphs unless asked
    assert mode(encoder_compile="cuda_graphs") == "reduce-overhead"
    assert mode(encoder_compile="cuda_graphs", checkpointing=True) == "default"  # a checkpoint replays in backward
    with torch.no_grad():
        assert mode() == mode(encoder_compile="cuda_graphs", checkpointing=True) == "reduce-overhead"
    assert mode(encoder_compile="off") is None
    assert mode(hidden_states=short) is None
    assert mode(output_attentions=True) is None
    assert mode(implementation="eager") is None
    monkeypatch.setattr(fast_path, "COMPILE_DEVICES", ("cuda",))
    assert mode() is None  # CPU inputs: off by default


def test_encoder_compile_is_validated_and_not_saved(tmp_path):
    """A choice of the running process, like attn_implementation: a loaded model starts from the default, and a
    keyword argument of from_pretrained sets it."""
    with pytest.raises(ValueError, match="encoder_compile"):
        tiny_config(encoder_compile="always")
    build(encoder_compile="cuda_graphs").save_pretrained(tmp_path)
    assert "encoder_compile" not in (tmp_path / "config.json").read_text()
    assert CoLT5ForConditionalGeneration.from_pretrained(tmp_path).config.encoder_compile == "auto"
    assert CoLT5ForConditionalGeneration.from_pretrained(tmp_path, encoder_compile="off").config.encoder_compile == "off"


def encoder_inputs(length, seed=0):
    """Two samples: the second padded from two thirds of `length` on."""
    generator = torch.Generator().manual_seed(seed + length)
    input_ids = torch.randint(2, 384, (2, length), generator=generator)
    attention_mask = torch.ones(2, length, dtype=torch.long)
    attention_mask[1, 2 * length // 3 :] = 0
    return input_ids, attention_mask


def accumulated(model, steps):
    """Encoder outputs of each micro-step and the parameter gradients accumulated over all of them (no zeroing in
    between, as under gradient accumulation)."""
    model.zero_grad(set_to_none=True)
    outputs = []
    for input_ids, attention_mask in steps:
        out = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        (out * attention_mask[..., None] * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        outputs.append(out.detach())
    return outputs, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("setting", ["auto", "cuda_graphs"])
def test_compiled_path_with_gradient_accumulation_equals_eager(on_cpu, setting):
    """Three micro-steps of different lengths, gradients accumulated: the bucketed, compiled encoder gives the eager
    encoder's outputs and gradients; under "cuda_graphs" the gradients go through the hook that copies them out of a
    graph's memory."""
    torch.manual_seed(0)
    model = CoLT5EncoderModel(tiny_config(num_layers=3, encoder_compile=setting)).train()
    steps = [encoder_inputs(length, seed) for seed, length in enumerate((40, 29, 53))]
    compiled_outputs, compiled_grads = accumulated(model, steps)
    assert on_cpu.graphs >= 1
    model.config.encoder_compile = "off"
    eager_outputs, eager_grads = accumulated(model, steps)
    for compiled, eager, (_, attention_mask) in zip(compiled_outputs, eager_outputs, steps):
        assert compiled.shape == eager.shape  # the bucket's padding is cut off again
        real = attention_mask.bool()  # a padding position's output depends on the padding after it
        torch.testing.assert_close(compiled[real], eager[real], rtol=1e-5, atol=1e-5)
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) == len(list(model.parameters()))
    for name, grad in compiled_grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_variable_length_epoch_compiles_once_per_bucket(on_cpu):
    """Every block shares the compiled layer, and every length in a bucket reuses its graph: an epoch over 30
    different lengths compiles no more graphs than it meets buckets (for training and inference each)."""
    torch.manual_seed(0)
    model = CoLT5EncoderModel(tiny_config(num_layers=3)).train()
    lengths = list(range(MIN_LENGTH, MIN_LENGTH + 60, 2))
    for length in lengths:
        input_ids, attention_mask = encoder_inputs(length)
        model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.sum().backward()
    buckets = {length_bucket(n) for n in lengths}
    assert len(buckets) < len(lengths) and on_cpu.graphs <= len(buckets)
    graphs = on_cpu.graphs
    with torch.no_grad():
        model.eval()
        for length in lengths:
            model(*encoder_inputs(length))
    assert on_cpu.graphs - graphs <= len(buckets)


def test_short_inputs_and_attention_weights_stay_eager(on_cpu):
    model = CoLT5EncoderModel(tiny_config()).eval()
    with torch.no_grad():
        model(*encoder_inputs(MIN_LENGTH - 1))
        assert on_cpu.graphs == 0
        model.config._attn_implementation = "eager"
        weights = model(*encoder_inputs(MIN_LENGTH + 5), output_attentions=True).attentions
    assert on_cpu.graphs == 0 and weights[0].shape[-1] == MIN_LENGTH + 5


def test_hidden_states_of_the_compiled_path_are_the_real_tokens_rows(on_cpu):
    model = CoLT5EncoderModel(tiny_config()).eval()
    input_ids, attention_mask = encoder_inputs(MIN_LENGTH + 5)
    with torch.no_grad():
        compiled = model(input_ids, attention_mask, output_hidden_states=True).hidden_states
        model.config.encoder_compile = "off"
        eager = model(input_ids, attention_mask, output_hidden_states=True).hidden_states
    assert len(compiled) == len(eager)
    real = attention_mask.bool()
    for ours, reference in zip(compiled, eager):
        assert ours.shape == reference.shape
        torch.testing.assert_close(ours[real], reference[real], rtol=1e-5, atol=1e-5)


def test_generate_on_the_fast_path_gives_the_eager_tokens(on_cpu):
    """generate pads the input to its bucket and takes the static cache: the same tokens as the dynamic cache on the
    unpadded input, with the compiled encoder."""
    model = build()
    input_ids, attention_mask = encoder_inputs(MIN_LENGTH + 7)
    options = dict(max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        fast = model.generate(input_ids=input_ids, attention_mask=attention_mask, **options)
        assert on_cpu.graphs >= 1
        model.config.encoder_compile = "off"
        eager = model.generate(input_ids=input_ids, attention_mask=attention_mask, **options)
    torch.testing.assert_close(fast, eager, rtol=0, atol=0)


def test_gradient_checkpointing_on_the_compiled_path_equals_eager(on_cpu):
    """Checkpointed blocks replay the compiled layer in the backward (without CUDA graphs even under "cuda_graphs"):
    the gradients are the eager model's."""
    torch.manual_seed(0)
    model = CoLT5EncoderModel(tiny_config(num_layers=2, encoder_compile="cuda_graphs")).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    steps = [encoder_inputs(length, seed) for seed, length in enumerate((40, 53))]
    compiled_outputs, compiled_grads = accumulated(model, steps)
    assert on_cpu.graphs >= 1
    model.config.encoder_compile = "off"
    eager_outputs, eager_grads = accumulated(model, steps)
    for compiled, eager, (_, attention_mask) in zip(compiled_outputs, eager_outputs, steps):
        real = attention_mask.bool()
        torch.testing.assert_close(compiled[real], eager[real], rtol=1e-5, atol=1e-5)
    for name, grad in compiled_grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-5, msg=name)


# The decoder: it compiles in the forwards that run the encoder compiled and decode without a cache.


def seq2seq_model(**overrides):
    """The tiny preset in training mode, its cross-attention routed over two routes: their routers see the encoder's
    output padded to its bucket."""
    torch.manual_seed(0)
    config = tiny_config(cross_attention_fraction=0.5, num_cross_attention_routes=2, **overrides)
    return CoLT5ForConditionalGeneration(config).train()


def seq2seq_inputs(length, target_length, seed=0):
    """Two samples (`encoder_inputs`) with targets of `target_length` tokens, the second's padded from two thirds on
    (decoder_attention_mask 0, labels -100)."""
    input_ids, attention_mask = encoder_inputs(length, seed)
    generator = torch.Generator().manual_seed(seed + 1000 * target_length)
    decoder_attention_mask = torch.ones(2, target_length, dtype=torch.long)
    decoder_attention_mask[1, 2 * target_length // 3 :] = 0
    labels = torch.randint(2, 384, (2, target_length), generator=generator).masked_fill(decoder_attention_mask == 0,
                                                                                         -100)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                decoder_attention_mask=decoder_attention_mask)


def trained(model, steps):
    """Logits and loss of each micro-step and the parameter gradients accumulated over all of them, as Trainer's
    gradient accumulation computes them: no zeroing in between, each loss summed over its labelled tokens and divided
    by those of all the micro-steps (`num_items_in_batch`)."""
    model.zero_grad(set_to_none=True)
    items = sum(int((inputs["labels"] != -100).sum()) for inputs in steps)
    logits, losses = [], []
    for inputs in steps:
        outputs = model(**inputs, num_items_in_batch=items)
        outputs.loss.backward()
        logits.append(outputs.logits.detach())
        losses.append(outputs.loss.detach())
    return logits, losses, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_trains_as_eager(model, steps):
    compiled_logits, compiled_losses, compiled_grads = trained(model, steps)
    model.config.encoder_compile = "off"
    eager_logits, eager_losses, eager_grads = trained(model, steps)
    for compiled, eager in zip(compiled_logits, eager_logits):
        assert compiled.shape == eager.shape  # the bucket's padding is cut off again
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)  # every target position, padded or not
    torch.testing.assert_close(torch.stack(compiled_losses), torch.stack(eager_losses), rtol=1e-5, atol=1e-6)
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) == len(list(model.parameters()))
    for name, grad in compiled_grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("setting, mode", [("auto", "default"), ("cuda_graphs", "reduce-overhead")])
def test_decoder_compiled_path_with_gradient_accumulation_equals_eager(on_cpu, setting, mode):
    """Three micro-steps of Trainer's gradient accumulation, inputs and odd-length targets of different lengths (so
    different pairs of buckets), padded batches on both sides: the bucketed, compiled decoder (with the encoder) gives
    the eager model's logits, losses and accumulated gradients."""
    model = seq2seq_model(encoder_compile=setting)
    lengths = [(40, 9), (29, 17), (53, 21), (31, 2)]  # 17: twice its tokens, 2: eight times (the floor)
    steps = [seq2seq_inputs(n, t, seed) for seed, (n, t) in enumerate(lengths)]
    assert all(target_bucket(t) > t for _, t in lengths)  # every target is padded
    assert_trains_as_eager(model, steps)
    assert model.decoder.compile_report.seen == {
        (mode, (2, target_bucket(t)), length_bucket(n), True, True, torch.float32, False) for n, t in lengths
    }


def test_decoder_gradient_checkpointing_on_the_compiled_path_equals_eager(on_cpu):
    """Checkpointed decoder blocks replay the compiled layer in the backward (without CUDA graphs even under
    "cuda_graphs"): the gradients are the eager model's."""
    model = seq2seq_model(encoder_compile="cuda_graphs")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lengths = [(40, 9), (53, 13)]
    assert_trains_as_eager(model, [seq2seq_inputs(n, t, seed) for seed, (n, t) in enumerate(lengths)])
    assert {variant[0] for variant in model.decoder.compile_report.seen} == {"default"}


def test_a_variable_length_epoch_compiles_the_decoder_once_per_pair_of_buckets(on_cpu):
    """Twelve (input, target) length pairs in three input buckets and two target buckets: the encoder's layer compiles
    once per input bucket, the decoder's (shared by its three blocks) once per pair of buckets that occurs, each in
    one graph."""
    model = seq2seq_model(num_decoder_layers=3)
    lengths = [(n, t) for n in (26, 28, 31, 33) for t in (9, 17, 30)]
    input_buckets = {length_bucket(n) for n, _ in lengths}
    pairs = {(length_bucket(n), target_bucket(t)) for n, t in lengths}
    assert (len(input_buckets), len(pairs)) == (3, 6)
    for seed, (n, t) in enumerate(lengths):
        model(**seq2seq_inputs(n, t, seed)).loss.backward()
    assert on_cpu.graphs == len(input_buckets) + len(pairs)
    assert len(model.decoder.compile_report.seen) == len(pairs)


def test_an_epoch_of_every_target_length_compiles_the_decoder_once_per_target_bucket(on_cpu):
    """Training steps on inputs of one bucket with targets of every length from 1 to 100 tokens: the decoder's layer
    compiles once per target bucket (16, 32, 64, 128), where length buckets would have compiled it 23 times."""
    model = seq2seq_model()
    n, lengths = MIN_LENGTH + 9, range(1, 101)
    for t in lengths:
        model(**seq2seq_inputs(n, t, seed=t)).loss.backward()
    buckets = {target_bucket(t) for t in lengths}
    assert buckets == {16, 32, 64, 128} and len({length_bucket(t) for t in lengths}) == 23
    assert on_cpu.graphs == 1 + len(buckets)  # the encoder's layer once, the decoder's once per target bucket
    assert model.decoder.compile_report.seen == {
        ("default", (2, b), length_bucket(n), True, True, torch.float32, False) for b in buckets}


def test_which_forwards_compile_the_decoder(on_cpu):
    """The decoder compiles in forwards without a cache that run the encoder compiled: an evaluation loss (labels
    given), a training forward; a cache (an inference forward without labels, or one asked for), `encoder_outputs`
    (generate's steps), attention weights and short inputs keep it eager. Forwards with labels or in training make
    no cache unless asked."""
    model = seq2seq_model().eval()
    inputs = seq2seq_inputs(40, 9)
    decoder_inputs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                          decoder_input_ids=model._shift_right(inputs["labels"]),
                          decoder_attention_mask=inputs["decoder_attention_mask"])
    seen = model.decoder.compile_report.seen
    with torch.no_grad():
        compiled = model(**inputs)
        assert getattr(compiled, CACHE_FIELD) is None
        assert seen == {("reduce-overhead", (2, 16), 40, False, False, torch.float32, False)}
        seen.clear()
        cached = model(**decoder_inputs)
        assert getattr(cached, CACHE_FIELD) is not None  # as T5: an inference forward returns its cache
        assert getattr(model(**inputs, use_cache=True), CACHE_FIELD) is not None
        model(**inputs, encoder_outputs=(compiled.encoder_last_hidden_state,))
        model(**inputs, output_attentions=True)
        model(**seq2seq_inputs(MIN_LENGTH - 1, 9))
        model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=3,
                       do_sample=False)
        assert not seen
        model.config.encoder_compile = "off"
        eager = model(**inputs)
    torch.testing.assert_close(compiled.logits, eager.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled.logits, cached.logits, rtol=1e-5, atol=1e-5)
    model.config.encoder_compile = "auto"
    model.train()
    assert getattr(model(**decoder_inputs), CACHE_FIELD) is None
    assert seen == {("default", (2, 16), 40, True, True, torch.float32, False)}


def test_decoder_hidden_states_of_the_compiled_path_are_the_real_positions_rows(on_cpu):
    model = seq2seq_model().eval()
    inputs = seq2seq_inputs(MIN_LENGTH + 5, 11)
    with torch.no_grad():
        compiled = model(**inputs, output_hidden_states=True).decoder_hidden_states
        assert model.decoder.compile_report.seen
        model.config.encoder_compile = "off"
        eager = model(**inputs, output_hidden_states=True).decoder_hidden_states
    assert len(compiled) == len(eager) == model.config.num_decoder_layers + 1
    for ours, reference in zip(compiled, eager):
        assert ours.shape == reference.shape
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


class FailingBackend:
    """A torch.compile backend whose compilations fail as a compiler's bug does (Inductor raising, wrapped by Dynamo
    in BackendCompilerFailed); counts its attempts."""

    def __init__(self):
        self.attempts = 0

    def __call__(self, graph_module, example_inputs):
        self.attempts += 1
        raise RuntimeError("PassManager::run failed")


@pytest.mark.parametrize("setting", ["auto", "cuda_graphs"])
def test_a_variant_that_fails_to_compile_runs_eagerly_once_warned(monkeypatch, caplog, setting):
    """Every compilation fails: two micro-steps of one pair of buckets train as the eager model does (logits, losses,
    accumulated gradients), one warning per stack names the error, and no variant is tried a second time."""
    backend = FailingBackend()
    monkeypatch.setattr(fast_path, "COMPILE_DEVICES", ("cpu",))
    monkeypatch.setattr(fast_path, "COMPILE_MIN_LENGTH", MIN_LENGTH)
    monkeypatch.setattr(fast_path, "COMPILE_BACKEND", backend)
    monkeypatch.setattr(fast_path, "_compiled_layers", {})
    torch._dynamo.reset()
    model = seq2seq_model(encoder_compile=setting)
    steps = [seq2seq_inputs(40, 9, seed) for seed in range(2)]  # one pair of buckets: one variant per stack
    with caplog.at_level("WARNING", logger="colt5_hf.fast_path"):
        assert_trains_as_eager(model, steps)
    torch._dynamo.reset()
    failures = [record.getMessage() for record in caplog.records if "failed" in record.getMessage()]
    assert len(failures) == 2 and all("PassManager::run failed" in message for message in failures), failures
    assert {message.split(" layer ")[0] for message in failures} == {
        "CoLT5: compiling the CoLT5EncoderBlock", "CoLT5: compiling the CoLT5DecoderBlock"}
    assert backend.attempts == 2  # the first block of each stack, once
    assert not any("compiled its layer" in record.getMessage() for record in caplog.records)


def test_a_backward_that_fails_to_compile_runs_eagerly_from_the_forward(monkeypatch, caplog):
    """The forward compiles and the backward does not: with gradients the backward compiles with the forward (not at
    the first backward), so its failure is caught there, the variant runs eagerly and trains as the eager model does;
    inference compiles the forward alone and runs compiled."""
    from torch._dynamo.backends.common import aot_autograd

    attempts = {"forward": 0, "backward": 0}

    def forward_compiler(graph_module, example_inputs):
        attempts["forward"] += 1
        return graph_module.forward

    def backward_compiler(graph_module, example_inputs):
        attempts["backward"] += 1
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(fast_path, "COMPILE_DEVICES", ("cpu",))
    monkeypatch.setattr(fast_path, "COMPILE_MIN_LENGTH", MIN_LENGTH)
    monkeypatch.setattr(fast_path, "COMPILE_BACKEND", aot_autograd(fw_compiler=forward_compiler,
                                                                   bw_compiler=backward_compiler))
    monkeypatch.setattr(fast_path, "_compiled_layers", {})
    torch._dynamo.reset()
    model = seq2seq_model()
    steps = [seq2seq_inputs(40, 9, seed) for seed in range(2)]
    with caplog.at_level("WARNING", logger="colt5_hf.fast_path"):
        assert_trains_as_eager(model, steps)
        assert attempts == {"forward": 2, "backward": 2}  # each stack's training variant, once
        model.config.encoder_compile = "auto"
        with torch.no_grad():
            model.eval()(**steps[0])
    torch._dynamo.reset()
    assert attempts == {"forward": 4, "backward": 2}  # inference: no backward to compile
    failures = [record.getMessage() for record in caplog.records if "failed" in record.getMessage()]
    assert len(failures) == 2 and all("PassManager::run failed" in message for message in failures), failures
    compiled = [record.getMessage() for record in caplog.records if "compiled its layer" in record.getMessage()]
    assert len(compiled) == 2 and all("inference, no gradients" in message for message in compiled), compiled
