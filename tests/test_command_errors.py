"""The colt5-hf command under bad input and faults (issue 24): every mistake is one line on stderr naming the problem
and the fix, found before any work where it can be, with a documented exit status (docs/command.md): 2 usage, 1 the
work failed, 130 interrupted; nothing written by a refused command; disk full and Ctrl-C leave a run that --resume
continues. Most cases call main() in this process; those about the process itself (a real SIGINT, bytes in argv,
COLT5_HF_DEBUG) run the command."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

from colt5_hf import CoLT5Config, CoLT5ForConditionalGeneration
from colt5_hf.checkpoints import last_complete_checkpoint
from colt5_hf.cli import main
from colt5_hf.cli.inspect import check_image_file
from colt5_hf.data import DataError, tokenize_pairs


PAIRS = [{"source": f"reverse {word}", "target": word[::-1]} for word in
         ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")]
TRAIN = ["train", "--model", "colt5-tiny", "--batch-size", 4, "--quiet"]


def command(argv, capsys):
    """main(argv) in this process -> (exit status, stdout, stderr)."""
    try:
        main([str(part) for part in argv])
        status = 0
    except SystemExit as exit:
        status = exit.code
    out, err = capsys.readouterr()
    return status, out, err


def refused(argv, capsys, status, *patterns):
    """The command ends with `status` and one stderr line matching every pattern, nothing else on stderr."""
    code, _, err = command(argv, capsys)
    assert code == status, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for pattern in patterns:
        assert re.search(pattern, err), (pattern, err)
    return err


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", PAIRS)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A saved tiny model with its (byte) tokenizer, as train leaves it."""
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    CoLT5ForConditionalGeneration(CoLT5Config.from_preset("tiny")).save_pretrained(folder)
    ByT5Tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if the command gets as far as loading a model: the checks under test come first."""
    def started(*args, **kwargs):
        raise AssertionError("the command started its work before checking its options")

    for module in ("train", "evaluate", "generate", "inspect"):
        name = "load_model" if module == "train" else "load_saved_model"
        monkeypatch.setattr(f"colt5_hf.cli.{module}.{name}", started)


# -------------------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("argv, message", [
    (TRAIN + ["--steps", "-5"], "argument --steps: must be positive, got -5"),
    (TRAIN + ["--steps", "0"], "argument --steps: must be positive, got 0"),
    (TRAIN + ["--batch-size", "0"], "argument --batch-size: must be positive, got 0"),
    (TRAIN + ["--eval-steps", "0"], "argument --eval-steps: must be positive, got 0"),
    (TRAIN + ["--learning-rate", "nan"], "argument --learning-rate: must be positive, got nan"),
    (TRAIN + ["--learning-rate", "fast"], "argument --learning-rate: expected a number, got 'fast'"),
    (TRAIN + ["--max-source-length", "0", "--truncate"], "argument --max-source-length: must be positive, got 0"),
    (TRAIN + ["--warmup-steps", "-1"], "argument --warmup-steps: must be at least 0, got -1"),
    (["generate", "m", "--text", "x", "--num-beams", "0"], "argument --num-beams: must be positive, got 0"),
    (["generate", "m", "--text", "x", "--max-new-tokens", "0"], "argument --max-new-tokens: must be positive"),
    (["evaluate", "m", "--demo-task", "--batch-size", "0"], "argument --batch-size: must be positive"),
    (["demo", "--steps", "0"], "argument --steps: must be positive, got 0"),
    (["inspect", "m", "--text", "x", "--index", "-1"], "argument --index: must be at least 0, got -1"),
])
def test_numbers_out_of_range_are_usage_errors_naming_the_option(argv, message, tmp_path, capsys, no_work):
    status, _, err = command([*argv, "--output-dir", tmp_path / "out"] if argv[0] in ("train", "demo") else argv,
                             capsys)
    assert status == 2 and message in err, err
    assert not (tmp_path / "out").exists()


def test_a_length_limit_below_one_is_an_error_in_the_data_api():
    """tokenize_pairs cut `ids[:limit - 1]` for a limit of 0 and reported a cut that did not happen."""
    pairs = datasets.Dataset.from_list(PAIRS)
    with pytest.raises(DataError, match="--max-source-length must be a positive number of tokens, got 0"):
        tokenize_pairs(pairs, ByT5Tokenizer(), 0, None, truncate=True)
    with pytest.raises(DataError, match="--max-target-length must be a positive number of tokens, got -2"):
        tokenize_pairs(pairs, ByT5Tokenizer(), None, -2, truncate=True)


# ------------------------------------------------------------------------------------------------- output paths


@contextlib.contextmanager
def unprivileged():
    """Permission bits do not stop root from writing: as root, run the block with the effective uid of `nobody`.
    What the commands import lazily is imported first (as nobody, a Python installed under /root cannot read its own
    standard library)."""
    if os.geteuid() != 0:
        yield
        return
    check_image_file("routing.png")  # imports matplotlib's figure and its list of formats
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.fixture
def read_only_folder():
    """A folder no one but root may write, below folders everyone may enter (pytest's tmp_path is root's alone)."""
    base = Path(tempfile.mkdtemp(prefix="colt5-hf-read-only-"))
    base.chmod(0o755)
    folder = base / "read-only"
    folder.mkdir(mode=0o555)
    folder.chmod(0o555)
    yield folder
    shutil.rmtree(base)


def test_unwritable_outputs_are_refused_before_any_work(read_only_folder, data, tmp_path, capsys, no_work):
    with unprivileged():
        refused([*TRAIN, "--train-file", data, "--steps", 1, "--output-dir", read_only_folder / "run"], capsys, 2,
                rf"^colt5-hf train: error: --output-dir {read_only_folder / 'run'}: cannot write there \(Permission "
                r"denied\); choose a folder you can write to$")
        refused(["evaluate", "m", "--file", data, "--predictions", read_only_folder / "p.jsonl"], capsys, 2,
                r"--predictions .*p.jsonl: cannot write it \(Permission denied\)")
        refused(["inspect", "m", "--text", "x", "--output", read_only_folder / "r.png"], capsys, 2,
                r"--output .*r.png: cannot write it \(Permission denied\)")
        refused(["demo", "--output-dir", read_only_folder / "demo"], capsys, 2, "--output-dir .*: cannot write there")
    assert list(read_only_folder.iterdir()) == []
    refused([*TRAIN, "--train-file", data, "--steps", 1, "--output-dir", data / "run"], capsys, 2,
            f"--output-dir {data / 'run'}: {data} is a file, not a folder")
    refused(["evaluate", "m", "--file", data, "--predictions", tmp_path / "missing" / "p.jsonl"], capsys, 2,
            f"the folder {tmp_path / 'missing'} does not exist")
    refused(["inspect", "m", "--text", "x", "--output", tmp_path / "routing.xyz"], capsys, 2,
            r"--output .*routing.xyz: name an image file ending in one of .*\.png")


def test_a_full_disk_while_saving_is_one_line_and_resume_skips_the_partial_checkpoint(data, tmp_path, capsys,
                                                                                      monkeypatch):
    """safetensors raises SafetensorError on a full disk (its message below, from a real full tmpfs); the checkpoint
    being written is left half-written, as Trainer writes in place."""
    import transformers.modeling_utils

    save_file = transformers.modeling_utils.safe_save_file
    output = tmp_path / "run"

    def disk_full_in_checkpoint_2(tensors, filename, metadata=None):
        if "checkpoint-2" not in str(filename):
            return save_file(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(b"\0" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", disk_full_in_checkpoint_2)
    common = [*TRAIN, "--train-file", data, "--steps", 3, "--save-steps", 1, "--output-dir", output]
    code, _, err = command(common, capsys)
    assert code == 1, err
    assert "Traceback" not in err and not (output / "model.safetensors").exists()
    assert re.search(rf"^colt5-hf train: error: could not write {output / 'checkpoint-2'}: Error while serializing: "
                     r"I/O error: No space left on device \(os error 28\) \([\d,]+ MiB free there\); free space there "
                     r"or choose another --output-dir; --resume continues from the last complete checkpoint$",
                     err.splitlines()[-1]), err
    assert last_complete_checkpoint(output) == str(output / "checkpoint-1")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)  # space again
    code, out, err = command([*common, "--resume"], capsys)
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["steps"] == 3 and last_complete_checkpoint(output).endswith("-3")


# ----------------------------------------------------------------------------------------------------- training


def snapshot(folder):
    return {str(path.relative_to(folder)): path.stat().st_mtime_ns for path in sorted(Path(folder).rglob("*"))}


def test_resume_of_a_finished_run_says_so_and_writes_nothing(data, tmp_path, capsys):
    output = tmp_path / "run"
    common = [*TRAIN, "--train-file", data, "--steps", 2, "--save-steps", 1, "--output-dir", output]
    assert command(common, capsys)[0] == 0
    before = snapshot(output)
    code, out, err = command([*common, "--resume"], capsys)
    assert code == 0, err
    assert ("nothing left to do: the run finished at step 2 of 2 (checkpoint-2); its model is in "
            f"{output}") in err
    assert json.loads(out.splitlines()[-1]) == {"output_dir": str(output), "steps": 2}
    assert snapshot(output) == before and not (output / "checkpoint-3").exists()

    # killed after its last checkpoint, before the final model was written whole: saved from that checkpoint
    (output / "model.safetensors").write_bytes(b"\0" * 10)
    code, out, err = command([*common, "--resume"], capsys)
    assert code == 0 and "held no complete model: saved it from checkpoint-2" in err, err
    final = load_file(output / "model.safetensors")
    checkpoint = load_file(output / "checkpoint-2" / "model.safetensors")
    assert final.keys() == checkpoint.keys() and all(torch.equal(final[name], checkpoint[name]) for name in final)


def test_ctrl_c_during_training_is_one_line_with_exit_status_130(data, tmp_path):
    output, log = tmp_path / "run", tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "colt5_hf.cli", *[str(a) for a in TRAIN], "--train-file", str(data),
             "--steps", "100000", "--save-steps", "2", "--output-dir", str(output)],
            stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            for _ in range(600):  # the first checkpoint: training is under way
                if last_complete_checkpoint(output) or process.poll() is not None:
                    break
                time.sleep(0.1)
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=120) == 130, log.read_text()[-3000:]
        finally:
            process.kill()
    err = log.read_text()
    assert "Traceback" not in err, err
    assert re.fullmatch(r"colt5-hf train: interrupted at step (\d+) of 100000; --resume continues from "
                        r"checkpoint-(\d+)", err.splitlines()[-1]), err
    assert last_complete_checkpoint(output) is not None


# ---------------------------------------------------------------------------------------------------- bad input


def test_data_files_that_are_not_utf8_are_errors_naming_the_line(data, model_folder, tmp_path, capsys, no_work):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(data.read_bytes() + b'{"source": "caf\xe9", "target": "x"}\n')
    line = rf"{bad}: line 9 is not UTF-8 \(byte 0xe9 at byte 16 of the line\); save the file as UTF-8"
    refused([*TRAIN, "--train-file", bad, "--steps", 1, "--output-dir", tmp_path / "run"], capsys, 2, line)
    refused(["evaluate", model_folder, "--file", bad], capsys, 2, line)
    refused(["generate", model_folder, "--file", bad], capsys, 2, line)
    csv = tmp_path / "bad.csv"
    csv.write_bytes(b"source,target\nok,fine\n\xff,x\n")
    refused(["generate", model_folder, "--file", csv], capsys, 2, r"bad.csv: line 3 is not UTF-8 \(byte 0xff at byte 1")


def run_command(argv, **env):
    return subprocess.run([sys.executable, "-m", "colt5_hf.cli", *argv], capture_output=True, timeout=120,
                          env={**os.environ, **env})


def test_text_that_is_not_utf8_is_one_line_and_debug_shows_the_traceback(model_folder):
    """Bytes in argv that are not UTF-8 reach Python as lone surrogates, which the tokenizer cannot encode."""
    argv = [b"generate", str(model_folder).encode(), b"--text", b"caf\xe9"]
    result = run_command(argv, COLT5_HF_DEBUG="")
    assert result.returncode == 2
    assert result.stderr.decode().splitlines() == [
        "colt5-hf generate: error: --text is not UTF-8 text (byte 0xe9 at character 4); pass UTF-8 text"]
    debug = run_command(argv, COLT5_HF_DEBUG="1")
    assert debug.returncode == 1 and b"Traceback" in debug.stderr and b"CommandError: --text is not" in debug.stderr


def test_bad_config_files_are_one_line_naming_the_file(model_folder, tmp_path, capsys):
    values = json.loads((model_folder / "config.json").read_text())
    cases = {
        "truncated": ((model_folder / "config.json").read_text()[:30], r"is not valid JSON \(.* at line \d+, column"),
        "list": ("[1, 2]", "holds a JSON list, not a config"),
        "no-model-type": (json.dumps({k: v for k, v in values.items() if k != "model_type"}),
                          'has no "model_type": a CoLT5 config says "model_type": "colt5"'),
    }
    for name, (text, message) in cases.items():
        folder = tmp_path / name
        shutil.copytree(model_folder, folder)
        (folder / "config.json").write_text(text)
        refused(["generate", folder, "--text", "x"], capsys, 2, re.escape(str(folder / "config.json")) + " " + message)
        (tmp_path / f"{name}.json").write_text(text)
        refused([*TRAIN, "--model", tmp_path / f"{name}.json", "--demo-task", "--steps", 1, "--output-dir",
                 tmp_path / "run"], capsys, 2, re.escape(str(tmp_path / f"{name}.json")) + " " + message)


def test_tokenizer_paths_that_hold_no_tokenizer_are_named(model_folder, tmp_path, capsys):
    for spec, message in ((tmp_path / "nowhere", "no such folder"), (tmp_path, "the folder holds none of "),
                          (model_folder / "config.json", "not a folder")):
        refused(["generate", model_folder, "--text", "x", "--tokenizer", spec], capsys, 2,
                f"colt5-hf generate: error: no tokenizer at {re.escape(str(spec))}: {message}")


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    """A tiny T5.1.1 checkpoint without a tokenizer, beside the same with its weights as a pickle and a tokenizer."""
    folder = tmp_path_factory.mktemp("t5")
    model = T5ForConditionalGeneration(T5Config(vocab_size=384, d_model=16, d_kv=4, d_ff=16, num_layers=1,
                                                num_heads=2, feed_forward_proj="gated-gelu",
                                                decoder_start_token_id=0))
    model.save_pretrained(folder / "safetensors")
    (folder / "pickle").mkdir()
    model.config.save_pretrained(folder / "pickle")
    torch.save(model.state_dict(), folder / "pickle" / "pytorch_model.bin")
    ByT5Tokenizer().save_pretrained(folder / "pickle")
    return folder


def test_convert_needs_a_tokenizer_and_writes_nothing_without_one(t5_folder, model_folder, tmp_path, capsys):
    """Transformers builds an empty tokenizer (103 special tokens) for a folder that has none: converting a T5 folder
    without one used to write it and report 'tokenizer copied'."""
    source = t5_folder / "safetensors"
    refused(["convert", source, tmp_path / "out"], capsys, 2,
            f"{source} holds no tokenizer .*: pass --tokenizer with the one the checkpoint was trained with")
    assert not (tmp_path / "out").exists()
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(source).save_pretrained(tmp_path / "empty-tokenizer")  # what used to be written
    refused(["convert", source, tmp_path / "out", "--tokenizer", tmp_path / "empty-tokenizer"], capsys, 2,
            r"the tokenizer from .*empty-tokenizer has no vocabulary \(1 tokens besides 103 special ones\)")
    refused(["generate", model_folder, "--text", "x", "--tokenizer", tmp_path / "empty-tokenizer"], capsys, 2,
            "has no vocabulary")
    assert not (tmp_path / "out").exists()
    code, out, err = command(["convert", source, tmp_path / "out", "--tokenizer", t5_folder / "pickle"], capsys)
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["tokenizer"] == f"copied from {t5_folder / 'pickle'}"
    assert len(AutoTokenizer.from_pretrained(tmp_path / "out")) == 384


def test_convert_refuses_pickled_weights_unless_allowed(t5_folder, tmp_path, capsys, monkeypatch):
    source = t5_folder / "pickle"
    load = torch.load

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load (pickle) was called")

    monkeypatch.setattr(torch, "load", refuse)
    refused(["convert", source, tmp_path / "out"], capsys, 2,
            rf"{source} holds its weights only as a pickle \(pytorch_model.bin\), which can run code when loaded: "
            r".*--allow-pickle")
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(torch, "load", load)
    code, _, err = command(["convert", source, tmp_path / "out", "--allow-pickle"], capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_an_unexpected_error_is_one_line_with_exit_status_1_and_debug_raises_it(model_folder, capsys, monkeypatch):
    def fails(*args, **kwargs):
        raise RuntimeError("something broke\nover two lines")

    monkeypatch.setattr("colt5_hf.cli.generate.load_saved_model", fails)
    argv = ["generate", model_folder, "--text", "x"]
    refused(argv, capsys, 1, "^colt5-hf generate: error: RuntimeError: something broke over two lines "
                             r"\(--debug shows the traceback\)$")
    with pytest.raises(RuntimeError, match="something broke"):
        main([str(part) for part in [*argv, "--debug"]])
    monkeypatch.setenv("COLT5_HF_DEBUG", "1")
    with pytest.raises(RuntimeError, match="something broke"):
        main([str(part) for part in argv])


def test_the_data_cache_is_in_the_output_folder_or_where_hf_datasets_cache_says(data, model_folder, tmp_path,
                                                                               capsys, monkeypatch):
    """Not datasets' hidden cache under ~/.cache: train keeps its Arrow files in --output-dir/data-cache, the other
    commands read data files into memory; HF_DATASETS_CACHE, where set, wins."""
    hidden = tmp_path / "hidden-default-cache"
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hidden)
    assert command([*TRAIN, "--train-file", data, "--eval-file", data, "--steps", 1, "--output-dir",
                    tmp_path / "run"], capsys)[0] == 0
    assert command(["evaluate", model_folder, "--file", data], capsys)[0] == 0
    assert not hidden.exists()
    assert list((tmp_path / "run" / "data-cache").rglob("*.arrow"))

    chosen = tmp_path / "chosen-cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(chosen))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", chosen)
    assert command([*TRAIN, "--train-file", data, "--steps", 1, "--output-dir", tmp_path / "run2"], capsys)[0] == 0
    assert list(chosen.rglob("*.arrow")) and not (tmp_path / "run2" / "data-cache").exists()
