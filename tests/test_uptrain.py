"""colt5-hf uptrain and its data (colt5_hf/denoising.py): the denoisers against hand-computed examples, packing that
keeps every token once within the length bounds, the shipped mixtures, the command end to end with a loss per
denoiser, a run killed with SIGKILL that resumes to the weights of an uninterrupted run, and bad input refused with one
line before any work.

The killed run is this file run as a script (`python tests/test_uptrain.py OUTPUT_DIR [--kill-after-step N]`): the
command's own `run` with a callback that kills the process after a step."""

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import ByT5Tokenizer

from colt5_hf.denoising import (
    Denoiser,
    MixtureError,
    corrupt,
    denoising_data,
    encode,
    example_lengths,
    load_mixture,
    longest_chunk,
    mixture_names,
    pack,
    random_parts,
    sentinel_ids,
    span_counts,
    span_layout,
    token_stream,
)


BYTES = ByT5Tokenizer()
SENTINELS = sentinel_ids(BYTES)  # ByT5: <extra_id_0> ... <extra_id_124>, ids 259 ... 383
R = Denoiser("R", "span", 0.15, mean_span=3, mode="[NLU]")
X = Denoiser("X", "span", 0.5, mean_span=32, mode="[NLG]")
S = Denoiser("S", "prefix", 0.5, mode="[S2S]")


def byte_ids(text):
    return [byte + 3 for byte in text.encode()]  # ByT5: byte b is token b + 3 (pad, eos, unk first)


# ----------------------------------------------------------------------------------------------- the denoisers


def test_span_counts_round_the_rate_and_the_mean_span_length():
    assert span_counts(100, 0.15, 3) == (15, 5)
    assert span_counts(16384, 0.15, 3) == (2458, 819)  # 2457.6 noise tokens, 819.3 spans
    assert span_counts(16384, 0.5, 32) == (8192, 256)
    assert span_counts(1000, 0.15, 64) == (150, 2)
    assert span_counts(10, 0.5, 64) == (5, 1)  # at least one span
    assert span_counts(1, 0.15, 3) == (1, 1)  # a single token is all noise
    assert span_counts(3, 0.01, 3) == (1, 1)  # at least one noise token
    assert span_counts(4, 0.99, 1) == (3, 1)  # at least one kept token: spans alternate with kept runs


def test_corrupt_replaces_each_span_by_the_next_sentinel_hand_computed():
    tokens = list(range(10, 20))
    # kept 10 11 | noise 12 | kept 13 14 15 | noise 16 17 | kept 18 | noise 19
    inputs, targets = corrupt(tokens, kept=[2, 3, 1], noise=[1, 2, 1], sentinels=[900, 901, 902, 903])
    assert inputs.tolist() == [10, 11, 900, 13, 14, 15, 901, 18, 902]
    assert targets.tolist() == [900, 12, 901, 16, 17, 902, 19]
    # more spans than sentinels: the sentinels start again, the order still pairs input and target
    inputs, targets = corrupt(tokens, kept=[2, 3, 1], noise=[1, 2, 1], sentinels=[900, 901])
    assert inputs.tolist() == [10, 11, 900, 13, 14, 15, 901, 18, 900]
    assert targets.tolist() == [900, 12, 901, 16, 17, 900, 19]
    with pytest.raises(ValueError, match="the runs cover 9 tokens, not the chunk's 10"):
        corrupt(tokens, kept=[2, 3], noise=[1, 3], sentinels=[900])


def test_span_layout_has_the_counted_runs_starting_with_kept_tokens():
    rng = random.Random(0)
    lengths = []
    for length in (1, 2, 7, 100, 1000):
        for denoiser in (R, X):
            kept, noise = span_layout(denoiser, length, rng)
            expected_noise, spans = span_counts(length, denoiser.rate, denoiser.mean_span)
            assert len(kept) == len(noise) == spans
            assert sum(noise) == expected_noise and sum(kept) == length - expected_noise
            assert all(run > 0 for run in noise) and (length == 1 or all(run > 0 for run in kept))
            lengths += noise
    # prefix LM: one kept run, the chunk's beginning, then its last half (rounded to even)
    assert span_layout(S, 11, rng) == ([5], [6])
    assert span_layout(Denoiser("S4", "prefix", 0.25), 100, rng) == ([75], [25])


def test_random_parts_draws_every_cut_equally_often():
    """10 items in 3 non-empty runs: 36 ways, each as likely (chi-square, 36,000 draws)."""
    rng = random.Random(1)
    counts = {}
    for _ in range(36_000):
        parts = tuple(random_parts(10, 3, rng))
        assert len(parts) == 3 and sum(parts) == 10 and min(parts) > 0
        counts[parts] = counts.get(parts, 0) + 1
    assert len(counts) == 36
    chi_square = sum((count - 1000) ** 2 / 1000 for count in counts.values())
    assert chi_square < 70  # 35 degrees of freedom: p < 0.001 above 66.6


def test_denoised_examples_hand_computed_with_mode_prefixes_and_end_of_sequence():
    data = denoising_data(BYTES, [S, R])
    assert data.modes == {"S": byte_ids("[S2S]"), "R": byte_ids("[NLU]")}
    assert data.sentinels[:3] == [259, 260, 261] and data.eos == 1
    stream = token_stream([byte_ids("abcdefghij")], data.eos)  # 10 bytes and the end-of-sequence token
    (example,) = pack(stream, [S], data, length=64, max_target_length=64, seed=0)
    # 11 tokens, round(5.5) = 6 of them the target: "abcde" stays, "fghij</s>" goes behind <extra_id_0>
    assert example["input_ids"].tolist() == byte_ids("[S2S]") + byte_ids("abcde") + [259, 1]
    assert example["labels"].tolist() == [259] + byte_ids("fghij") + [1, 1]
    assert example["denoiser"] == 0

    # R on 100 tokens: 15 noise tokens in 5 spans; the sentinels in order in both input and target
    stream = np.arange(1000, 1100)
    (example,) = pack(stream, [R], data, length=200, max_target_length=100, seed=3)
    inputs, labels = example["input_ids"].tolist(), example["labels"].tolist()
    mode = byte_ids("[NLU]")
    assert inputs[:len(mode)] == mode and inputs[-1] == 1 and labels[-1] == 1
    assert [t for t in inputs if t in SENTINELS] == [t for t in labels if t in SENTINELS] == [259, 260, 261, 262, 263]
    assert len(inputs) == len(mode) + 85 + 5 + 1 and len(labels) == 15 + 5 + 1
    assert labels[0] == 259  # the target starts with the first span
    kept_tokens = [t for t in inputs[len(mode):-1] if t not in SENTINELS]
    noise_tokens = [t for t in labels[:-1] if t not in SENTINELS]
    assert sorted(kept_tokens + noise_tokens) == stream.tolist() and kept_tokens[0] == 1000


def test_text_that_spells_a_special_token_stays_text():
    """The .py files of Transformers hold "<extra_id_0>" and "</s>": as text, not as a sentinel or an end."""
    (ids,) = encode(BYTES, ["a<extra_id_0></s>"])
    assert ids == byte_ids("a<extra_id_0></s>") and not set(ids) & {1, *SENTINELS}


# ------------------------------------------------------------------------------------------------------ packing


def restore(example, data, mixture):
    """The chunk an example was made from: the input without mode prefix and end-of-sequence token, each sentinel
    replaced by what follows the same sentinel in the target."""
    mode_length = len(data.modes[mixture[example["denoiser"]].name])
    inputs, targets = example["input_ids"][mode_length:-1].tolist(), example["labels"][:-1].tolist()
    spans = []
    for token in targets:
        if token in data.sentinels:
            spans.append([])
        else:
            spans[-1].append(token)
    chunk, used = [], 0
    for token in inputs:
        if token in data.sentinels:
            chunk += spans[used]
            used += 1
        else:
            chunk.append(token)
    assert used == len(spans)
    return chunk


@pytest.mark.parametrize("length, max_target", [(64, 16), (256, 64), (300, 300)])
def test_packing_keeps_every_token_exactly_once_within_the_bounds(length, max_target):
    mixture = [R, X, S, Denoiser("R8", "span", 0.15, mean_span=8, mode="")]
    data = denoising_data(BYTES, mixture)
    generator = np.random.default_rng(length)
    documents = [generator.integers(3, 259, size=generator.integers(1, 700)).tolist() for _ in range(40)]
    stream = token_stream(documents, data.eos)
    examples = pack(stream, mixture, data, length, max_target, seed=5)
    restored = [token for example in examples for token in restore(example, data, mixture)]
    assert restored == stream.tolist()
    for example in examples[:-1]:  # packed: only the stream's last example may be short of both bounds
        inputs, targets = len(example["input_ids"]), len(example["labels"])
        assert inputs <= length and targets <= max_target
        assert inputs >= length - 1 or targets >= max_target - 1, (inputs, targets)
    assert len(examples[-1]["input_ids"]) <= length and len(examples[-1]["labels"]) <= max_target
    assert {example["denoiser"] for example in examples} == {0, 1, 2, 3}


def test_longest_chunk_is_the_largest_that_fits():
    for denoiser in (R, X, S):
        for length, max_target, mode in ((64, 16, 5), (512, 128, 0), (4096, 1024, 5)):
            longest = longest_chunk(denoiser, length, max_target, mode)
            inputs, targets = example_lengths(denoiser, longest, mode)
            assert inputs <= length and targets <= max_target
            inputs, targets = example_lengths(denoiser, longest + 1, mode)
            assert inputs > length or targets > max_target
    # R at 16384 tokens: a quarter of them as the target bound leaves the input full
    longest = longest_chunk(R, 16384, 4096, 5)
    assert example_lengths(R, longest, 5)[0] >= 16383
    # 5 mode tokens, a sentinel and the end fill 7 input tokens: a chunk of one token, all of it in the target
    assert longest_chunk(S, 7, 16, 5) == 1 and longest_chunk(S, 6, 16, 5) == 0
    assert longest_chunk(S, 64, 2, 0) == 0  # a target holds at least a sentinel, a token and the end


def test_the_same_seed_gives_the_same_examples_and_the_weights_are_the_shares():
    mixture = [Denoiser("A", "span", 0.15, mean_span=3, weight=3), Denoiser("B", "prefix", 0.5, weight=1)]
    data = denoising_data(BYTES, mixture)
    stream = np.random.default_rng(0).integers(3, 259, size=200_000)
    first, again = (pack(stream, mixture, data, 64, 32, seed=7) for _ in range(2))
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) and np.array_equal(a["labels"], b["labels"])
               for a, b in zip(first, again, strict=True))
    other = pack(stream, mixture, data, 64, 32, seed=8)
    assert [e["denoiser"] for e in other] != [e["denoiser"] for e in first]
    share = np.mean([example["denoiser"] == 0 for example in first])
    assert len(first) > 2500 and share == pytest.approx(0.75, abs=0.03)  # 3 sd: 0.025


def test_shipped_mixtures_load_and_bad_ones_are_named(tmp_path):
    assert mixture_names() == ["colt5", "ul2", "ul2r"]
    colt5 = load_mixture("colt5")
    assert [(d.name, d.kind, d.rate, d.mean_span, d.weight, d.mode) for d in colt5] == [
        ("R3", "span", 0.15, 3, 1, "[NLU]"), ("R8", "span", 0.15, 8, 1, "[NLU]"),
        ("X64", "span", 0.15, 64, 1, "[NLG]"), ("S", "prefix", 0.5, None, 1, "[S2S]")]
    assert len(load_mixture("ul2")) == 7 and len(load_mixture("ul2r")) == 4
    cases = {
        "[]": 'a mixture is a JSON object whose "denoisers" is a non-empty list',
        '{"denoisers": [{"name": "R", "kind": "span", "rate": 1.5, "mean_span": 3}]}':
            r"denoiser 'R': rate must lie strictly between 0 and 1, got 1.5",
        '{"denoisers": [{"name": "R", "kind": "span", "rate": 0.15}]}': "a span denoiser needs mean_span >= 1",
        '{"denoisers": [{"name": "S", "kind": "prefix", "rate": 0.5, "span": 3}]}': "unknown field.s. span",
        '{"denoisers": [{"name": "S", "kind": "lm", "rate": 0.5}]}': "kind 'lm' is not one of span, prefix",
        '{"denoisers": [{"name": "a b", "kind": "prefix", "rate": 0.5}]}': "use letters, digits",
        '{"denoisers": [{"name": "S", "kind": "prefix", "rate": 0.5}, {"name": "S", "kind": "prefix", "rate": 0.2}]}':
            "two denoisers are named 'S'",
        '{"denoisers": [{"kind": "prefix", "rate": 0.5}]}': "missing 1 required positional argument: 'name'",
        "{": "is not valid JSON",
    }
    for number, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"mixture{number}.json"
        path.write_text(text)
        with pytest.raises(MixtureError, match=message):
            load_mixture(str(path))
    with pytest.raises(MixtureError, match="'huge' is neither a mixture .colt5, ul2, ul2r. nor a JSON file"):
        load_mixture("huge")


# ------------------------------------------------------------------------------------------------- the command


def write_documents(folder):
    """Two text files and a JSONL file of documents, with an evaluation file."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = random.Random(0)
    words = "the a routed heavy light token layer branch attention local global span input target".split()

    def text(words_count):
        return " ".join(generator.choice(words) for _ in range(words_count)) + "."

    (folder / "one.txt").write_text(text(400))
    (folder / "two.md").write_text(text(300))
    (folder / "rows.jsonl").write_text("".join(json.dumps({"body": text(60)}) + "\n" for _ in range(10)))
    (folder / "eval.txt").write_text(text(200))
    return folder


UPTRAIN = ["--length", 96, "--max-target-length", 32, "--batch-size", 4, "--learning-rate", 3e-3,
           "--warmup-steps", 0, "--quiet", "--seed", 0, "--set", "dropout_rate=0.1"]


def uptrain_argv(data, output, *extra):
    return [str(part) for part in ["uptrain", "colt5-tiny", "--train-files", data / "one.txt", data / "two.md",
                                   data / "rows.jsonl", "--text-field", "body", *UPTRAIN, "--output-dir", output,
                                   *extra]]


def test_uptrain_reports_a_loss_per_denoiser_and_saves_the_model(tmp_path, capsys):
    from colt5_hf.cli import main

    data = write_documents(tmp_path / "data")
    output = tmp_path / "run"
    main(uptrain_argv(data, output, "--steps", 2, "--eval-steps", 2, "--eval-files", data / "eval.txt",
                      "--eval-examples", 3, "--eval-on-start"))
    out, err = capsys.readouterr()
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and sorted(summary) == sorted(
        ["output_dir", "steps", "train_loss", "eval_R3_loss", "eval_R8_loss", "eval_X64_loss", "eval_S_loss"])
    assert re.search(r"new model colt5-tiny: [\d,]+ parameters; \d+ training examples \(R3 \d+, R8 \d+, X64 \d+, S "
                     r"\d+\) of at most 96 input and 32 target tokens", err), err
    state = json.loads((output / "checkpoint-2" / "trainer_state.json").read_text())
    evaluated = [(entry["step"], key) for entry in state["log_history"] for key in entry if key.endswith("_loss")
                 and key.startswith("eval_")]
    assert evaluated == [(step, f"eval_{name}_loss") for step in (0, 2) for name in ("R3", "R8", "X64", "S")]
    from colt5_hf import CoLT5ForConditionalGeneration

    model = CoLT5ForConditionalGeneration.from_pretrained(output)
    assert torch.equal(model.lm_head.weight, load_file(output / "checkpoint-2" / "model.safetensors")["lm_head.weight"])
    assert len(ByT5Tokenizer.from_pretrained(output)) == 384

    # the evaluation loss is that of the denoised evaluation text: R3's first examples, computed here
    from colt5_hf.cli.common import collator

    mixture = load_mixture("colt5")
    denoising = denoising_data(BYTES, mixture)
    stream = token_stream(encode(BYTES, [(data / "eval.txt").read_text()]), denoising.eos)
    examples = pack(stream, mixture, denoising, 96, 32, seed=0, only="R3")[:3]
    batch = collator(BYTES)([{"input_ids": e["input_ids"].tolist(), "labels": e["labels"].tolist()}
                             for e in examples])
    with torch.no_grad():
        loss = model.eval()(**batch).loss.item()
    assert summary["eval_R3_loss"] == pytest.approx(loss, rel=1e-4)


def test_a_killed_uptrain_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path, capsys):
    data = write_documents(tmp_path / "data")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script's runs: the same sums in the same order
    try:
        script_run(data, tmp_path / "whole")
    finally:
        torch.set_num_threads(threads)
    killed = run_script(data, tmp_path / "killed", "--kill-after-step", 5)
    assert killed.returncode == -signal.SIGKILL
    assert sorted(path.name for path in (tmp_path / "killed").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    before = {path: path.stat().st_mtime_ns for path in (tmp_path / "killed").rglob("checkpoint-*/*")}
    resumed = run_script(data, tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # resumed from checkpoint-4, not started over: the checkpoints before the kill are left as they were
    assert {path: path.stat().st_mtime_ns for path in before} == before
    assert (tmp_path / "killed" / "checkpoint-6").is_dir()
    expected, actual = (load_file(path / "model.safetensors") for path in (tmp_path / "whole", tmp_path / "killed"))
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name
    initial = load_file(tmp_path / "killed" / "checkpoint-2" / "model.safetensors")
    assert not torch.equal(initial["lm_head.weight"], expected["lm_head.weight"])


def run_script(data, output, *options):
    return subprocess.run([sys.executable, __file__, str(data), str(output), *map(str, options)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if the command gets as far as loading a model: the checks under test come first."""
    def started(*args, **kwargs):
        raise AssertionError("uptrain started its work before checking its input")

    monkeypatch.setattr("colt5_hf.cli.uptrain.load_model", started)


def refused(argv, capsys, *patterns):
    from colt5_hf.cli import main

    with pytest.raises(SystemExit) as exit:
        main([str(part) for part in argv])
    err = capsys.readouterr().err
    assert exit.value.code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for pattern in patterns:
        assert re.search(pattern, err), (pattern, err)


def test_bad_input_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, no_work):
    data = write_documents(tmp_path / "data")
    output = tmp_path / "run"
    base = ["uptrain", "colt5-tiny", "--output-dir", output, "--length", 96]
    files = ["--train-files", data / "one.txt"]
    refused(base, capsys, "^colt5-hf uptrain: error: give the training text: --train-files FILE ... or --dataset NAME")
    refused([*base, *files, "--dataset", "c4"], capsys, r"or --dataset NAME \(not both\)$")
    refused([*base, *files, "--dataset-config", "en"], capsys, "--dataset-config goes with --dataset$")
    refused([*base, *files, "--denoisers", "huge"], capsys,
            r"--denoisers: 'huge' is neither a mixture \(colt5, ul2, ul2r\) nor a JSON file$")
    refused([*base, "--train-files", data / "missing.txt"], capsys, f"data file not found: {data / 'missing.txt'}$")
    (data / "empty.txt").write_text("\n\n")
    refused([*base, "--train-files", data / "one.txt", data / "empty.txt"], capsys, "empty.txt: the file holds no text$")
    (data / "latin1.txt").write_bytes(b"caf\xe9\n")
    refused([*base, "--train-files", data / "latin1.txt"], capsys, r"latin1.txt: line 1 is not UTF-8 \(byte 0xe9")
    refused([*base, "--train-files", data / "rows.jsonl"], capsys,
            r"rows.jsonl: no field 'text' \(--text-field\); the file has the fields body")
    refused(["uptrain", "colt5-tiny", "--output-dir", output, *files, "--length", 8], capsys,
            r"denoiser R3: inputs of 8 and targets of 2 tokens hold no text .*raise --length or --max-target-length$")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refused([*base, "--dataset", "allenai/c4", "--dataset-config", "en"], capsys,
            "--dataset allenai/c4: HF_HUB_OFFLINE is set, so the Hub is out of reach; export the dataset to JSONL or "
            "Parquet files where there is a network and pass them with --train-files$")
    assert not output.exists()


def test_a_tokenizer_without_sentinels_is_refused(tmp_path, capsys, no_work):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(40)]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
                            ).save_pretrained(tmp_path / "words")
    data = write_documents(tmp_path / "data")
    refused(["uptrain", "colt5-tiny", "--train-files", data / "one.txt", "--tokenizer", tmp_path / "words",
             "--length", 96, "--output-dir", tmp_path / "run"], capsys,
            r"the tokenizer has no sentinel tokens \(<extra_id_0>, <extra_id_1>, ...\) for the denoisers to mark spans "
            r"with: use a T5, mT5 or ByT5 tokenizer \(--tokenizer\)$")


def script_run(data, output_dir, kill_after_step=None, resume=False):
    """The script's run: 8 steps, a checkpoint every 2, the process killed after `kill_after_step`."""
    from transformers import TrainerCallback

    from colt5_hf.cli import build_parser
    from colt5_hf.cli import uptrain as uptrain_command

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == kill_after_step:
                os.kill(os.getpid(), signal.SIGKILL)

    argv = uptrain_argv(data, output_dir, "--steps", 8, "--save-steps", 2, *(["--resume"] if resume else []))
    uptrain_command.run(build_parser().parse_args(argv), callbacks=[Kill()])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="colt5-hf uptrain on test documents, optionally killed on the way")
    parser.add_argument("data", type=Path)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--kill-after-step", type=int)
    parser.add_argument("--resume", action="store_true")
    options = parser.parse_args()
    torch.set_num_threads(1)
    script_run(options.data, options.output_dir, options.kill_after_step, options.resume)
