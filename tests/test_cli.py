"""The colt5-hf command end to end on tiny data: train -> evaluate -> generate -> inspect, demo, convert, --resume,
and the errors it gives for bad inputs."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM, ByT5Tokenizer, T5Config, T5ForConditionalGeneration, TrainerCallback

import colt5_hf  # noqa: F401  (registers the Auto classes)
from colt5_hf.cli import build_parser, main
from colt5_hf.cli import train as train_command
from colt5_hf import synthetic
from colt5_hf.cli.common import DEMO_EVAL_SEED, demo_evaluation_pairs, demo_pairs, load_model
from colt5_hf.cli.generate import one_line
from colt5_hf.data import DataError, load_pairs
from colt5_hf.synthetic import switch_off_heavy_branch


PAIRS = [{"source": f"reverse {word}", "target": word[::-1]} for word in
         ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo",
          "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango")]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run(argv, capsys):
    """main(argv) -> (stdout, stderr)."""
    main([str(a) for a in argv])
    captured = capsys.readouterr()
    return captured.out, captured.err


def fails(argv, capsys, *patterns):
    """main(argv) must exit with status 2 and an error message matching every pattern."""
    with pytest.raises(SystemExit) as excinfo:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert excinfo.value.code == 2, err
    for pattern in patterns:
        assert re.search(pattern, err), (pattern, err)
    return err


TRAIN = ["--model", "colt5-tiny", "--batch-size", 4, "--learning-rate", 3e-3, "--quiet", "--seed", 0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained 4 steps on a JSONL file, with evaluation every 2 steps."""
    folder = tmp_path_factory.mktemp("cli")
    train_file = write_jsonl(folder / "train.jsonl", PAIRS[:16])
    eval_file = write_jsonl(folder / "eval.jsonl", PAIRS[16:])
    output = folder / "model"
    main([str(a) for a in ["train", *TRAIN, "--train-file", train_file, "--eval-file", eval_file,
                               "--steps", 4, "--eval-steps", 2, "--output-dir", output]])
    return output, eval_file


def test_train_saves_a_loadable_model_with_evaluation_during_training(trained, capsys):
    output, _ = trained
    assert (output / "model.safetensors").is_file() and (output / "config.json").is_file()
    assert (output / "checkpoint-2").is_dir() and (output / "checkpoint-4").is_dir()
    state = json.loads((output / "checkpoint-4" / "trainer_state.json").read_text())
    evaluations = [entry for entry in state["log_history"] if "eval_exact_match" in entry]
    assert [entry["step"] for entry in evaluations] == [2, 4]
    model = AutoModelForSeq2SeqLM.from_pretrained(output)
    assert type(model).__name__ == "CoLT5ForConditionalGeneration"
    checkpoint = load_file(output / "checkpoint-4" / "model.safetensors")
    assert torch.equal(model.state_dict()["lm_head.weight"], checkpoint["lm_head.weight"])


def test_evaluate_matches_an_independent_computation(trained, capsys):
    output, eval_file = trained
    out, _ = run(["evaluate", output, "--file", eval_file, "--batch-size", 3], capsys)
    metrics = json.loads(out.strip().splitlines()[-1])

    model = AutoModelForSeq2SeqLM.from_pretrained(output).eval()
    tokenizer = ByT5Tokenizer()
    losses, tokens, correct = 0.0, 0, 0
    with torch.no_grad():
        for pair in PAIRS[16:]:  # one example at a time: no padding involved
            input_ids = torch.tensor([tokenizer(pair["source"]).input_ids])
            labels = torch.tensor([tokenizer(pair["target"]).input_ids])
            losses += model(input_ids=input_ids, labels=labels).loss.item() * labels.shape[1]
            tokens += labels.shape[1]
            generated = model.generate(input_ids=input_ids, max_new_tokens=labels.shape[1] + 8)
            correct += tokenizer.decode(generated[0], skip_special_tokens=True) == pair["target"]
    assert metrics["examples"] == 4
    assert metrics["loss"] == pytest.approx(losses / tokens, rel=1e-4)
    assert metrics["exact_match"] == correct / 4


def test_generate_prints_one_line_per_input(trained, capsys):
    output, _ = trained
    out, _ = run(["generate", output, "--text", "reverse alpha", "--text", "reverse zulu", "--max-new-tokens", 5],
                 capsys)
    model = AutoModelForSeq2SeqLM.from_pretrained(output).eval()
    tokenizer = ByT5Tokenizer()
    expected = []
    for text in ("reverse alpha", "reverse zulu"):
        generated = model.generate(input_ids=torch.tensor([tokenizer(text).input_ids]), max_new_tokens=5)
        expected.append(tokenizer.decode(generated[0], skip_special_tokens=True))
    assert out.splitlines() == [one_line(text) for text in expected]


def test_generate_writes_an_output_with_line_breaks_on_one_line():
    # a model's output is any text: ByT5 decodes bytes such as a form feed, which str.splitlines() also breaks at
    assert one_line("a\nb\x0cc\u2028d\r\x85é") == "a\\nb\\x0cc\\u2028d\\r\\x85é"
    assert len(one_line("".join(map(chr, range(0x3000)))).splitlines()) == 1


def test_generate_and_evaluate_compile_the_encoder_unless_no_compile(trained, capsys, monkeypatch):
    """The commands take the model's compiled path where it applies (here switched on for the CPU and short inputs,
    compiled by Dynamo's eager backend) and `--no-compile` keeps the encoder eager; the outputs are the same."""
    from colt5_hf import fast_path
    from tiny import CountingBackend

    output, _ = trained
    backend = CountingBackend("eager")
    monkeypatch.setattr(fast_path, "COMPILE_DEVICES", ("cpu",))
    monkeypatch.setattr(fast_path, "COMPILE_MIN_LENGTH", 8)
    monkeypatch.setattr(fast_path, "COMPILE_BACKEND", backend)
    torch._dynamo.reset()
    try:
        argv = ["generate", output, "--text", "reverse alpha bravo", "--max-new-tokens", 5]
        eager, _ = run(argv + ["--no-compile"], capsys)
        assert backend.graphs == 0
        compiled, _ = run(argv, capsys)
        assert backend.graphs >= 1 and compiled == eager
        graphs = backend.graphs
        run(["evaluate", output, "--demo-task", "--eval-examples", 4, "--no-compile"], capsys)
        assert backend.graphs == graphs
    finally:
        torch._dynamo.reset()


def test_inspect_writes_a_png_with_the_routed_counts(trained, capsys, tmp_path):
    output, _ = trained
    text = "x" * 40 + "A" + "y" * 80 + "B" + "z" * 37
    plot = tmp_path / "routing.png"
    out, _ = run(["inspect", output, "--text", text, "--output", plot], capsys)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(plot).ndim == 3
    config = AutoModelForSeq2SeqLM.from_pretrained(output).config
    n = len(text) + 1  # bytes + end-of-sequence token
    for layer in range(config.num_layers):
        for part, fraction in (("attention q", config.attention_q_fraction),
                               ("attention kv", config.attention_kv_fraction),
                               ("feed-forward", config.feed_forward_fraction)):
            match = re.search(rf"^encoder {layer} {part}\s+(\d+) / (\d+) ", out, re.MULTILINE)
            assert match and match.groups() == (str(config.routed_count(fraction, n)), str(n)), out


def test_train_from_csv_and_parquet_with_field_options(tmp_path, capsys):
    import pandas

    frame = pandas.DataFrame({"document": [p["source"] for p in PAIRS[:8]], "summary": [p["target"] for p in PAIRS[:8]]})
    frame.to_csv(tmp_path / "train.csv", index=False)
    frame.to_parquet(tmp_path / "train.parquet")
    for name in ("train.csv", "train.parquet"):
        pairs = load_pairs(tmp_path / name, "document", "summary")
        assert pairs.column_names == ["source", "target"] and pairs[3] == PAIRS[3]
    out, _ = run(["train", *TRAIN, "--train-file", tmp_path / "train.parquet", "--source-field", "document",
                  "--target-field", "summary", "--steps", 2, "--output-dir", tmp_path / "out"], capsys)
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 2


class StopAt(TrainerCallback):
    """Interrupts training after `step` (as a crash after the checkpoint of that step would)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", PAIRS)  # 20 examples: 5 steps an epoch
    common = ["train", *TRAIN, "--train-file", train_file, "--steps", 8, "--save-steps", 2]
    parser = build_parser()
    main([str(a) for a in [*common, "--output-dir", tmp_path / "whole"]])

    interrupted = parser.parse_args([str(a) for a in [*common, "--output-dir", tmp_path / "resumed"]])
    train_command.run(interrupted, callbacks=[StopAt(4)])
    assert (tmp_path / "resumed" / "checkpoint-4").is_dir() and not (tmp_path / "resumed" / "checkpoint-6").exists()
    at_step_4 = load_file(tmp_path / "resumed" / "model.safetensors")
    main([str(a) for a in [*common, "--output-dir", tmp_path / "resumed", "--resume"]])

    whole = load_file(tmp_path / "whole" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(at_step_4["lm_head.weight"], whole["lm_head.weight"])


def test_demo_runs_both_models_and_the_local_one_keeps_its_heavy_branch_off(tmp_path, capfd):
    # capfd: the two trainings run in child processes that print to the inherited stdout
    out, _ = run(["demo", "--steps", 4, "--eval-steps", 2, "--eval-examples", 8, "--batch-size", 8,
                  "--demo-length", 440, "--output-dir", tmp_path], capfd)
    rows = [line for line in out.splitlines() if re.match(r"(CoLT5 \(routed\)|local attention only)\s+\d+", line)]
    assert len(rows) == 2 * 2 + 2  # two evaluations per model, then the final table
    local = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "local-only")
    fresh = load_model("colt5-tiny")[0]
    for name, weight in local.state_dict().items():
        if ".heavy_attention.o." in name or ".heavy_feed_forward.wo." in name:
            assert torch.count_nonzero(weight) == 0, name
    colt5 = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "colt5")
    heavy = colt5.encoder.block[0].attention.heavy_attention.o.weight
    assert torch.count_nonzero(heavy) == heavy.numel()
    assert fresh.config.to_dict()["local_radius"] == local.config.local_radius == 15


def test_demo_task_is_the_nearest_task_at_the_models_geometry():
    config = load_model("colt5-tiny")[0].config
    pairs = demo_pairs(config, 50, seed=3, length=512)
    assert list(pairs) == synthetic.examples("nearest", 50, 3, 512, synthetic.Geometry.of(config))
    for example in pairs:
        source = example["source"]
        items = {c: i for i, c in enumerate(source) if c != "."}
        anchor = items.pop("#")
        (near, near_position), (far, far_position) = sorted(items.items(), key=lambda item: abs(item[1] - anchor))
        assert len(source) == 511 and example["target"] == near
        assert 64 <= abs(near_position - anchor) <= 90 < 91 <= abs(far_position - anchor)  # gap 2 * 30 + 4
    with pytest.raises(DataError, match="the demo task: nearest: inputs of 300 tokens are too short"):
        demo_pairs(config, 1, seed=0, length=300)


def test_local_attention_alone_cannot_tell_which_letter_is_nearer():
    """The demo's premise: with the heavy branch off, swapping the two letters of a demo example gives the same
    logits (the encoder's outputs are permuted, and cross-attention has no positions), so one of the two is answered
    wrongly, and on the evaluation set, which holds each example's mirror, such a model scores exactly 50%; with the
    heavy branch on (routing every token) the logits differ."""
    def perturbed(model):
        with torch.no_grad():  # make every trained weight count: the band's edge, the layer norms, the bias tables
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.add_(0.2 * torch.randn_like(parameter))
        return model.eval()

    torch.manual_seed(0)
    local = perturbed(switch_off_heavy_branch(load_model("colt5-tiny")[0]))
    torch.manual_seed(0)  # every token routed: whether the routers' random scores pick the letters is beside the point
    routed = perturbed(load_model("colt5-tiny", dict.fromkeys(
        ["attention_q_fraction", "attention_kv_fraction", "feed_forward_fraction"], 1.0))[0])
    tokenizer = ByT5Tokenizer()

    def logits(model, text):
        with torch.no_grad():
            return model(input_ids=torch.tensor([tokenizer(text).input_ids]),
                         decoder_input_ids=torch.zeros(1, 1, dtype=torch.long)).logits

    # the evaluation set: each example followed by its mirror, the two letters swapped and the other one the answer
    evaluation = list(demo_evaluation_pairs(local.config, 8, length=512))
    assert evaluation[::2] == list(demo_pairs(local.config, 4, DEMO_EVAL_SEED, 512))
    for example, mirror in zip(evaluation[::2], evaluation[1::2]):
        (p, a), (q, b) = [(i, c) for i, c in enumerate(example["source"]) if c not in ".#"]
        source = example["source"]
        assert mirror["source"] == source[:p] + b + source[p + 1:q] + a + source[q + 1:]
        assert {example["target"], mirror["target"]} == {a, b} and example["target"] != mirror["target"]
        torch.testing.assert_close(logits(local, source), logits(local, mirror["source"]), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(logits(routed, source), logits(routed, mirror["source"]), atol=1e-3)
    # closer to an end than the task allows, the ends give the order away: the margin is needed
    near_end = "." * 100 + "A" + "." * 120 + "B" + "." * 33
    assert not torch.allclose(logits(local, near_end), logits(local, near_end.replace("A", "b").replace("B", "A")
                                                                  .replace("b", "B")), atol=1e-3)


def test_convert_command_reproduces_the_source_logits(tmp_path, capsys):
    config = T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0)
    torch.manual_seed(0)
    source = T5ForConditionalGeneration(config).eval()
    source.save_pretrained(tmp_path / "t5")
    ByT5Tokenizer().save_pretrained(tmp_path / "t5")
    out, _ = run(["convert", tmp_path / "t5", tmp_path / "colt5", "--set", "num_cross_attention_kv_heads=4",
                  "--set", "attention_q_fraction=1", "--set", "attention_kv_fraction=1",
                  "--set", "feed_forward_fraction=1", "--set", "local_radius=64"], capsys)
    report = json.loads(out.strip().splitlines()[-1])
    assert report["encoder_heads"] == {"light": 1, "heavy": 3} and report["tokenizer"] == f"copied from {tmp_path / 't5'}"
    converted = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "colt5").eval()
    input_ids = torch.randint(3, 259, (2, 50))
    decoder_input_ids = torch.randint(3, 259, (2, 6))
    with torch.no_grad():
        expected = source(input_ids=input_ids, decoder_input_ids=decoder_input_ids).logits
        actual = converted(input_ids=input_ids, decoder_input_ids=decoder_input_ids).logits
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)
    fails(["convert", tmp_path / "t5", tmp_path / "colt5"], capsys, "not empty")
    fails(["convert", tmp_path / "missing", tmp_path / "x"], capsys, "not found")


def test_errors_name_the_problem(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", PAIRS[:4])
    out = tmp_path / "out"
    fails(["train", *TRAIN, "--train-file", tmp_path / "nope.jsonl", "--steps", 1, "--output-dir", out], capsys,
          "data file not found", "nope.jsonl")
    fails(["train", *TRAIN, "--train-file", good, "--source-field", "text", "--steps", 1, "--output-dir", out],
          capsys, "no field 'text'", "--source-field", "source, target")
    fails(["train", *TRAIN, "--train-file", write_jsonl(tmp_path / "empty.jsonl", []), "--steps", 1,
           "--output-dir", out], capsys, "no examples")
    (tmp_path / "data.txt").write_text("hello")
    fails(["train", *TRAIN, "--train-file", tmp_path / "data.txt", "--steps", 1, "--output-dir", out], capsys,
          "unknown data format")
    fails(["train", *TRAIN, "--train-file", good, "--max-source-length", 10, "--steps", 1, "--output-dir", out],
          capsys, r"longer than --max-source-length 10", "--truncate")
    fails(["train", "--model", "colt5-nano", "--train-file", good, "--steps", 1, "--output-dir", out], capsys,
          "not a model folder, a config file or a preset", "colt5-tiny")
    fails(["train", *TRAIN, "--train-file", good, "--steps", 1, "--output-dir", out, "--resume"], capsys,
          "no complete checkpoint")
    fails(["train", *TRAIN, "--train-file", good, "--steps", 1, "--output-dir", out, "--set", "colour=1"], capsys,
          "colour: not a CoLT5Config field")
    fails(["evaluate", tmp_path / "no-model", "--file", good], capsys, "model folder not found")
    fails(["demo", "--demo-length", 100, "--output-dir", out], capsys, "too short")
    T5ForConditionalGeneration(T5Config(vocab_size=384, d_model=16, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
                                        feed_forward_proj="gated-gelu")).save_pretrained(tmp_path / "t5")
    fails(["train", "--model", tmp_path / "t5", "--train-file", good, "--steps", 1, "--output-dir", out], capsys,
          "'t5' model", "colt5-hf convert")

    # --truncate cuts and says so; the model trains on what is left
    _, err = run(["train", *TRAIN, "--train-file", good, "--max-source-length", 10, "--truncate", "--steps", 1,
                  "--output-dir", out], capsys)
    assert re.search(r"truncated 4 of 4 sources to 10 tokens \(\d+ tokens cut, longest was \d+\)", err)
    fails(["train", *TRAIN, "--train-file", good, "--steps", 1, "--output-dir", out], capsys, "not empty",
          "--resume")


def test_train_refuses_several_gpus_in_one_process(tmp_path, capsys, monkeypatch):
    """Several visible GPUs without a launcher would make Trainer fall back to nn.DataParallel (no autocast, a larger
    batch): the command says how to run instead. Under a launcher (WORLD_SIZE set) or with --cpu it trains."""
    good = write_jsonl(tmp_path / "good.jsonl", PAIRS[:4])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    fails(["train", *TRAIN, "--train-file", good, "--steps", 1, "--output-dir", tmp_path / "out"], capsys,
          "2 GPUs are visible to a single process", "accelerate launch", "CUDA_VISIBLE_DEVICES=0")
    run(["train", *TRAIN, "--train-file", good, "--steps", 1, "--output-dir", tmp_path / "cpu", "--cpu"], capsys)
    assert (tmp_path / "cpu" / "model.safetensors").exists()


def test_generate_keeps_to_the_ids_its_tokenizer_decodes(tmp_path, capsys):
    """A model whose vocabulary (1024) is larger than the ByT5 byte tokenizer's (384), saved without a tokenizer,
    made to prefer ids beyond the tokenizer: ByT5 cannot write those out (it raised inside decode). generate,
    evaluate and inspect keep generation to the tokenizer's ids: the outputs are the model's best byte tokens."""
    from colt5_hf import CoLT5Config, CoLT5ForConditionalGeneration

    torch.manual_seed(0)
    config = CoLT5Config.from_preset("tiny", vocab_size=1024)
    model = CoLT5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        direction = torch.randn(config.d_model)
        model.lm_head.weight[1000] = 50 * direction  # one of the two wins every step by a wide margin
        model.lm_head.weight[1001] = -50 * direction
    model.save_pretrained(tmp_path / "model")
    tokenizer = ByT5Tokenizer()
    input_ids = torch.tensor([tokenizer("reverse alpha").input_ids])
    with torch.no_grad():
        unrestricted = model.generate(input_ids=input_ids, max_new_tokens=4)
        # the same model with only the tokenizer's rows of the output layer: greedy decoding within its ids
        head = model.lm_head
        model.lm_head = torch.nn.Linear(config.d_model, len(tokenizer), bias=False)
        model.lm_head.weight.copy_(head.weight[:len(tokenizer)])
        expected = model.generate(input_ids=input_ids, max_new_tokens=4)
    assert (unrestricted[0, 1:] >= 1000).all() and (expected[0, 1:] < len(tokenizer)).all()
    out, _ = run(["generate", tmp_path / "model", "--text", "reverse alpha", "--max-new-tokens", 4], capsys)
    assert out.splitlines() == [one_line(tokenizer.decode(expected[0], skip_special_tokens=True))]
    write_jsonl(tmp_path / "pairs.jsonl", [{"source": "reverse alpha", "target": "ahpla"}])
    out, _ = run(["evaluate", tmp_path / "model", "--file", tmp_path / "pairs.jsonl", "--max-new-tokens", 4], capsys)
    assert json.loads(out)["examples"] == 1
    run(["inspect", tmp_path / "model", "--text", "reverse alpha", "--output", tmp_path / "routing.png"], capsys)
    assert (tmp_path / "routing.png").stat().st_size > 0
