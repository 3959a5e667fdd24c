"""The default fast path on CUDA (`CoLT5Config.encoder_compile`, colt5_hf/fast_path.py) with inductor: training with
gradient accumulation, optimizer steps and evaluation in between equals the eager model, with and without CUDA graphs,
the decoder compiled with the encoder; a variable-length epoch compiles the encoder once per input bucket and the
decoder once per pair of input and target buckets; generate takes the static cache and the compiled encoder and gives
the eager tokens. Skipped without a CUDA GPU; the CPU counterparts (Dynamo with the eager backend) are in
test_fast_path.py.
"""

import copy

import pytest
import torch

from colt5_hf import CoLT5Config, CoLT5ForConditionalGeneration, fast_path
from colt5_hf.fast_path import length_bucket, target_bucket
from tiny import CountingBackend, benchmark_module, relative_error


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MIN_LENGTH = 512  # COMPILE_MIN_LENGTH for these tests: small models at short lengths compile fast


@pytest.fixture(autouse=True)
def short_inputs_compile(monkeypatch):
    monkeypatch.setattr(fast_path, "COMPILE_MIN_LENGTH", MIN_LENGTH)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def small_model(setting, implementation="flex_attention", seed=0):
    torch.manual_seed(seed)
    config = CoLT5Config(
        vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=3, num_decoder_layers=2, num_heads=4,
        num_light_heads=2, num_heavy_heads=2, local_radius=31, min_routed_tokens=4, router_iterations=20,
        dropout_rate=0.0, encoder_compile=setting,
    )
    model = CoLT5ForConditionalGeneration(config).cuda()
    model.config._attn_implementation = implementation
    return model


def micro_batch(n, seed, target_length=9):
    """Two samples of n input tokens, the second padded from n / 2 on, and their targets, the second's padded from
    two thirds on (decoder_attention_mask 0, labels -100)."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    input_ids = torch.randint(2, 128, (2, n), device="cuda", generator=generator)
    attention_mask = torch.ones(2, n, dtype=torch.long, device="cuda")
    attention_mask[1, n // 2 :] = 0
    decoder_attention_mask = torch.ones(2, target_length, dtype=torch.long, device="cuda")
    decoder_attention_mask[1, 2 * target_length // 3 :] = 0
    labels = torch.randint(2, 128, (2, target_length), device="cuda", generator=generator)
    labels = labels.masked_fill(decoder_attention_mask == 0, -100)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                decoder_attention_mask=decoder_attention_mask)


def train(model, steps, accumulation):
    """What Trainer does: per optimizer step, `accumulation` micro-batches' losses backward without zeroing in between,
    then AdamW and zero_grad(set_to_none=True), then an evaluation loss (eval mode, no gradients: CUDA graphs under
    every setting). Returns the training losses, the gradients of the last step and the evaluation losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, evaluation, lengths = [], [], ((600, 9), (900, 21), (700, 9), (1000, 21))
    for step in range(steps):
        model.train()
        for micro in range(accumulation):
            n, target_length = lengths[(step * accumulation + micro) % len(lengths)]
            loss = model(**micro_batch(n, seed=step * 10 + micro, target_length=target_length)).loss / accumulation
            loss.backward()
            losses.append(loss.item())
        gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad():
            evaluation.append(model(**micro_batch(800, seed=99, target_length=11)).loss.item())
    return losses, gradients, evaluation


@pytest.mark.parametrize("setting, implementation", [("auto", "flex_attention"), ("auto", "sdpa"),
                                                     ("cuda_graphs", "flex_attention")])
def test_training_with_gradient_accumulation_equals_eager(setting, implementation):
    """Two optimizer steps of three accumulated micro-batches of different input and odd target lengths (so different
    pairs of buckets), each followed by an evaluation loss: the losses and the last step's accumulated gradients of
    the fast path, the encoder and the decoder compiled, are the eager model's. Under CUDA graphs the second
    micro-step's backward would read a first gradient that a replay overwrote, unless it is copied out, for the
    decoder's parameters as for the encoder's."""
    model = small_model(setting, implementation)
    reference = copy.deepcopy(model)
    reference.config.encoder_compile = "off"
    losses, gradients, evaluation = train(model, steps=2, accumulation=3)
    eager_losses, eager_gradients, eager_evaluation = train(reference, steps=2, accumulation=3)
    training_mode = "reduce-overhead" if setting == "cuda_graphs" else "default"
    assert {variant[0] for variant in model.decoder.compile_report.seen} == {training_mode, "reduce-overhead"}
    assert not reference.decoder.compile_report.seen
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(evaluation), torch.tensor(eager_evaluation), rtol=1e-4, atol=1e-5)
    assert gradients.keys() == eager_gradients.keys()
    for name, gradient in gradients.items():
        assert relative_error(gradient, eager_gradients[name]) < 1e-3, name
    for (name, parameter), eager_parameter in zip(model.named_parameters(), reference.parameters()):
        assert relative_error(parameter.detach(), eager_parameter.detach()) < 1e-4, name


def test_a_variable_length_epoch_compiles_once_per_bucket(monkeypatch):
    """Twenty input lengths in four buckets (640, 768, 896, 1024), targets of 9 and 10 tokens in turn (target bucket
    16) and one of 20 (target bucket 32), training steps: the encoder's layer compiles once per input bucket, the
    decoder's once per pair of buckets (every block of a stack shares its layer), each in one graph."""
    backend = CountingBackend()
    monkeypatch.setattr(fast_path, "COMPILE_BACKEND", backend)
    model = small_model("auto").train()
    lengths = [(n, (9, 10)[i % 2]) for i, n in enumerate(range(520, 1020, 25))] + [(1000, 20)]
    buckets = {length_bucket(n) for n, _ in lengths}
    pairs = {(length_bucket(n), target_bucket(t)) for n, t in lengths}
    assert buckets == {640, 768, 896, 1024} and len(pairs) == 5
    for seed, (n, target_length) in enumerate(lengths):
        model(**micro_batch(n, seed, target_length)).loss.backward()
    assert backend.graphs == len(buckets) + len(pairs)
    assert len(model.decoder.compile_report.seen) == len(pairs)


@pytest.mark.parametrize("implementation", ["flex_attention", "sdpa"])
def test_generate_takes_the_fast_path_and_gives_the_eager_tokens(implementation):
    """model.generate with no options: the input padded to its bucket, the encoder compiled, the static cache whose
    decoding step Transformers compiles; the tokens of the eager model with the dynamic cache (float32: no near ties)."""
    model = small_model("auto", implementation).eval()
    reference = copy.deepcopy(model)
    reference.config.encoder_compile = "off"
    inputs = micro_batch(700, seed=5)
    del inputs["labels"], inputs["decoder_attention_mask"]
    with torch.no_grad():
        fast = model.generate(**inputs, max_new_tokens=10, do_sample=False)
        assert hasattr(model, "_compiled_call")  # the decoding step went through torch.compile
        assert model.encoder.compile_report.seen  # and the encoder's layer too
        assert not model.decoder.compile_report.seen  # the decoder's steps: generate's own compiled step
        eager = reference.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert not hasattr(reference, "_compiled_call")
    torch.testing.assert_close(fast, eager, rtol=0, atol=0)


def test_the_command_trains_evaluates_and_generates_on_the_fast_path(tmp_path, monkeypatch, capsys):
    """colt5-hf train (gradient accumulation, evaluation in the middle, CUDA graphs asked for with --set), evaluate and
    generate on CUDA with 600-token inputs: the encoder's compiled layer runs in each; --no-compile keeps it eager."""
    from colt5_hf.cli import main

    from colt5_hf import modeling_colt5

    calls = []  # the modes the compiled layers (encoder's and decoder's) were asked for
    compiled_layer = modeling_colt5.compiled_layer
    monkeypatch.setattr(modeling_colt5, "compiled_layer",
                        lambda layer, mode: calls.append(mode) or compiled_layer(layer, mode))
    output = tmp_path / "run"
    assert main(["train", "--model", "colt5-tiny", "--demo-task", "--demo-length", "600", "--steps", "2",
                 "--batch-size", "2", "--gradient-accumulation-steps", "2", "--eval-steps", "1",
                 "--eval-examples", "4", "--set", "encoder_compile=cuda_graphs", "--output-dir", str(output),
                 "--quiet"]) in (0, None)
    assert "reduce-overhead" in calls
    calls.clear()
    assert main(["evaluate", str(output), "--demo-task", "--demo-length", "600", "--eval-examples", "4"]) in (0, None)
    assert calls
    calls.clear()
    text = "x" * 300 + "A" + "y" * 200 + "B" + "z" * 98
    assert main(["generate", str(output), "--text", text, "--max-new-tokens", "4"]) in (0, None)
    generated = capsys.readouterr().out.splitlines()[-1]
    assert calls
    calls.clear()
    assert main(["generate", str(output), "--text", text, "--max-new-tokens", "4", "--no-compile"]) in (0, None)
    assert not calls and capsys.readouterr().out.splitlines()[-1] == generated


def test_a_converted_t5_small_trains_compiled_at_4096_tokens_in_bf16(monkeypatch):
    """The uptrain recipe's shape on a GPU (benchmarks/uptrain.py: a T5.1.1-small-shaped model converted with the
    presets' routing, batches of 4 x 4096 tokens with padded samples, bf16 autocast), two layers a stack: the training
    step compiles every layer it meets (none falls back to eager) and gives the eager step's loss and gradients."""
    from transformers import T5Config, T5ForConditionalGeneration

    from colt5_hf.conversion import colt5_config_from_source, convert_t5_to_colt5

    torch.manual_seed(0)
    source_config = T5Config(vocab_size=384, d_model=512, d_kv=64, num_heads=8, d_ff=1024, num_layers=2,
                             num_decoder_layers=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                             dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    uptrain = benchmark_module("uptrain", monkeypatch)
    routing = uptrain.routing_settings(4096, source_config.num_heads)["preset"]  # the recipe's conversion
    config = colt5_config_from_source(source_config, dropout_rate=0.0, encoder_compile="auto", **routing)
    model = convert_t5_to_colt5(T5ForConditionalGeneration(source_config), config).cuda().train()
    generator = torch.Generator(device="cuda").manual_seed(0)
    attention_mask = torch.ones(4, 4096, dtype=torch.long, device="cuda")
    attention_mask[2, 3000:], attention_mask[3, 1500:] = 0, 0
    labels = torch.randint(2, 384, (4, 1024), device="cuda", generator=generator)
    labels[1:, 700:] = -100
    batch = dict(input_ids=torch.randint(2, 384, (4, 4096), device="cuda", generator=generator) * attention_mask,
                 attention_mask=attention_mask, labels=labels)

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        grads = [p.grad.float().flatten() for p in model.parameters() if p.grad is not None]
        return loss.detach().float(), torch.cat(grads)

    failures = fast_path._compile_failures
    loss, grads = step()
    assert fast_path._compile_failures == failures, "a layer fell back to eager: its compilation failed"
    assert model.encoder.compile_report.seen and model.decoder.compile_report.seen
    model.config.encoder_compile = "off"
    eager_loss, eager_grads = step()
    assert relative_error(loss, eager_loss) < 1e-2
    assert relative_error(grads, eager_grads) < 0.05
