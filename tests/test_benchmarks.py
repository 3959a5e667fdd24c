"""The benchmark scripts run end to end on the CPU with the tiny preset and write sane records (no timing checks)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


REPO = Path(__file__).resolve().parents[1]


def run_script(script, args, out, timeout=120):
    env = dict(os.environ, OUT=str(out), CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def benchmark_module(name, monkeypatch):
    """benchmarks/<name>.py imported (it imports its neighbour `common`)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_step_tiny_writes_records_and_table(tmp_path, monkeypatch):
    models = ["colt5-hf/eager", "longt5-local"]
    stdout = run_script("train_step.py", ["--tiny", "--models", *models, "--sizes", "256", "--steps", "1"], tmp_path)
    saved = json.loads((tmp_path / "train_step.json").read_text())
    assert saved["environment"]["device"] == "cpu"
    records = saved["records"]
    assert [(r["model"], r["n"]) for r in records] == [(model, 256) for model in models]
    for r in records:
        assert "error" not in r and "skipped" not in r, r
        assert r["device"] == "cpu" and r["layers"] == 2 and r["target_length"] == 16 and r["accumulation"] == 4
        assert len(r["step_times_s"]) == 2 and r["steps_timed"] == 1
        assert r["tokens_per_s"] > 0 and r["input_tokens_per_s"] > 0 and r["first_step_s"] > 0
        assert r["tokens_per_s"] == pytest.approx((256 + 16) * 4 / r["step_s"])
        assert r["weights"] == "float32" and math.isfinite(r["train_loss"])
    assert records[0]["encoder_compile"] == "off"
    table = stdout[stdout.index("model "):]
    assert "colt5-hf/eager" in table and "longt5-local" in table and "1.00x" in table
    # what --from-json prints: the table of the saved records
    assert benchmark_module("train_step", monkeypatch).table(records).strip() == table.strip()


def test_limits_search_records_peaks_times_and_a_warm_step(tmp_path, monkeypatch, capsys):
    """limits.py's search and table, its steps simulated (it needs a GPU): lengths double from --start until one fails,
    then bisect; each trial records its peak and seconds, and the longest good length runs once more for the time per
    step."""
    limits = benchmark_module("limits", monkeypatch)
    fits, calls = 300_000, []

    def step(model, mode, length):
        calls.append(length)
        if length > fits:
            raise RuntimeError("CUDA out of memory (simulated)")
        return length / 2**20, length / 1e6

    monkeypatch.setattr(limits, "step", step)
    monkeypatch.setattr(limits, "build", lambda preset, implementation: torch.nn.Linear(2, 2))
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["limits.py", "--presets", "large", "--modes", "inference", "--start", "65536",
                                      "--resolution", "4096"])
    limits.main()
    (record,) = json.loads((tmp_path / "limits.json").read_text())["records"]
    assert record["first_failure"] > fits >= record["longest"] > fits - max(4096, record["longest"] // 16)
    assert record["implementation"] == "flex_attention" and record["step_s"] == round(record["longest"] / 1e6, 3)
    assert calls[:4] == [65536, 131072, 262144, 524288] and calls[-1] == record["longest"]
    for trial in record["trials"]:
        assert ("error" in trial) == (trial["length"] > fits)
        assert "error" in trial or trial["seconds"] == round(trial["length"] / 1e6, 2)
    assert "s/step" in capsys.readouterr().out
