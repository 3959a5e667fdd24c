"""The benchmark scripts run end to end on the CPU with the tiny preset and write sane records (no timing checks)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tiny import REPO, benchmark_module


def run_script(script, args, out, timeout=120):
    env = dict(os.environ, OUT=str(out), CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


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


def test_uptrain_tiny_converts_exactly_and_reports_both_sides(tmp_path, monkeypatch):
    """The uptraining experiment end to end on a few files: the all-routed conversion starts from the dense source's
    loss, each run's evaluation at its start is the separate evaluation's, and CoLT5 counts fewer FLOPs."""
    stdout = run_script("uptrain.py", ["--packages", "pluggy", "iniconfig", "--length", "64", "--pretrain-steps", "2",
                                       "--steps", "2", "--eval-steps", "1", "--eval-examples", "2", "--batch-size", "2",
                                       "--warmup-steps", "0", "--timing-skip", "0"], tmp_path, timeout=300)
    record = json.loads((tmp_path / "uptrain.json").read_text())
    assert sorted(record["corpus"]["packages"]) == ["iniconfig", "pluggy"] and record["corpus"]["eval"]["files"] >= 1
    source, all_routed = record["start"]["dense source"], record["start"]["CoLT5, all routed"]
    assert list(source) == ["R3", "R8", "X64", "S"]
    assert all_routed == pytest.approx(source, rel=1e-5)
    assert record["dense"]["eval"]["0"] == pytest.approx(source, rel=1e-6)
    assert sorted(record["colt5"]["eval"], key=int) == ["0", "1", "2"]
    assert record["colt5"]["eval"]["0"] != pytest.approx(source, rel=1e-3)  # routing 1/16 of the tokens changes it
    flops = record["flops_per_example"]
    assert 0 < flops["colt5"] < flops["dense"] and flops["target_tokens"] == 16
    assert (tmp_path / "uptrain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    module = benchmark_module("uptrain", monkeypatch)
    assert module.table(record).strip() in stdout
    assert record["colt5"]["eager_fallbacks"] == 0 and "ran eagerly" not in stdout  # the CPU never compiles here
    record["colt5"]["eager_fallbacks"] = 2
    assert module.table(record).endswith("2 layer variant(s) failed to compile and ran eagerly.")
    # the FLOP count of a one-layer dense T5 by hand: d 8, 2 heads of 2, d_ff 16, vocabulary 10, 4 inputs, 2 targets
    from transformers import T5Config

    config = T5Config(vocab_size=10, d_model=8, d_kv=2, num_heads=2, d_ff=16, num_layers=1, num_decoder_layers=1)
    encoder = 4 * 4 * 8 * 4 + 2 * 2 * 4 * 4 * 4 + 3 * 4 * 8 * 16  # projections, scores and values, gated FF
    decoder = (4 * 2 * 8 * 4 + 2 * 2 * 2 * 2 * 4) + (2 * 2 * 8 * 4 + 2 * 4 * 8 * 4 + 2 * 2 * 2 * 4 * 4) + 3 * 2 * 8 * 16
    assert module.forward_flops(config, 4, 2) == 2 * (encoder + decoder + 2 * 8 * 10)


def test_routing_tasks_writes_records_table_and_curves(tmp_path, monkeypatch):
    """benchmarks/routing_tasks.py on the CPU, a few steps at a short geometry: one record per run (variant seeds
    given as local:0), every evaluation in the curve with the routers' recall of the answer's tokens, then the table
    and the PNG; --from-json rebuilds the same table."""
    geometry = ["--set", "local_radius=3", "relative_attention_max_distance=32", "--length", "160"]
    stdout = run_script("routing_tasks.py", ["--cpu", "--jobs", "2", "--tasks", "order", "--variants", "preset",
                                             "paper", "local:0", "--seeds", "0", "1", "--steps", "4",
                                             "--eval-every", "2", "--eval-examples", "8", *geometry,
                                             "--out", str(tmp_path)], tmp_path, timeout=300)
    records = [json.loads(path.read_text()) for path in sorted((tmp_path / "runs" / "160").glob("*.json"))]
    assert sorted((r["task"], r["variant"], r["seed"]) for r in records) == sorted(
        [("order", variant, seed) for variant in ("preset", "paper") for seed in (0, 1)] + [("order", "local", 0)])
    assert not list(tmp_path.glob("runs/160/*.partial"))
    for r in records:
        assert [point["step"] for point in r["curve"]] == [0, 2, 4] and r["steps_done"] == 4
        assert r["geometry"] == {"reach": 6, "near_max": 26, "far_min": 27}
        assert all(0 <= point["accuracy"] <= 1 and math.isfinite(point["eval_loss"]) for point in r["curve"])
        assert r["calibration"]["task"] == r["task"] and r["calibration"]["local"] <= r["calibration"]["shortcut"]
        recall = r["curve"][-1].get("item_recall")
        if r["variant"] == "local":
            assert recall is None and r["config"] is None
        else:
            assert set(recall) == {"0.q", "0.kv", "0.ff", "1.q", "1.kv", "1.ff"}
            assert all(0 <= share <= 1 for share in recall.values())
    assert next(r for r in records if r["variant"] == "paper")["config"] == {"router_one_sided_gradient": False}
    table = (tmp_path / "routing_tasks.md").read_text()
    assert table.strip() in stdout and "| 160 | order | paper | 0/2 (of 4 steps) |" in table
    assert (tmp_path / "routing_tasks.png").read_bytes()[:4] == b"\x89PNG"
    module = benchmark_module("routing_tasks", monkeypatch)
    assert module.table(module.load_records(tmp_path)).strip() == table.strip()
    # a run killed from outside left only its last evaluation: counted, and the table says where it was cut
    preset = next(r for r in records if r["variant"] == "preset")
    cut = {**preset, "seed": 7, "stopped": "unfinished", "steps_done": 2, "curve": preset["curve"][:2]}
    (tmp_path / "runs" / "160" / "order.preset.seed7.partial").write_text(json.dumps(cut))
    assert "| 160 | order | preset | 0/3 (of 4 steps; 1 cut at 2-2) |" in module.table(module.load_records(tmp_path))


def test_limits_search_records_peaks_times_and_a_warm_step(tmp_path, monkeypatch, capsys):
    """limits.py's search and table, its steps simulated (it needs a GPU): lengths double from --start until one fails,
    then bisect; each trial records its peak and seconds, and the longest good length runs once more for the time per
    step."""
    limits = benchmark_module("limits", monkeypatch)
    fits, calls = 300_000, []

    def step(model, mode, length, optimizer=None):
        assert isinstance(optimizer, torch.optim.AdamW)  # training steps it; its moments are in every peak
        calls.append(length)
        if length > fits:
            raise RuntimeError("CUDA out of memory (simulated)")
        return length / 2**20, length / 1e6

    monkeypatch.setattr(limits, "step", step)
    monkeypatch.setattr(limits, "build", lambda preset, implementation: torch.nn.Linear(2, 2))
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["limits.py", "--presets", "large", "--modes", "inference", "training",
                                      "--start", "65536", "--resolution", "4096"])
    limits.main()
    record, training = json.loads((tmp_path / "limits.json").read_text())["records"]
    assert (record["optimizer"], training["optimizer"]) == (None, "AdamW, moments in bf16")
    assert training["longest"] == record["longest"]
    calls = calls[:len(calls) // 2]  # the inference search's
    assert record["first_failure"] > fits >= record["longest"] > fits - max(4096, record["longest"] // 16)
    assert record["implementation"] == "flex_attention" and record["step_s"] == round(record["longest"] / 1e6, 3)
    assert calls[:4] == [65536, 131072, 262144, 524288] and calls[-1] == record["longest"]
    for trial in record["trials"]:
        assert ("error" in trial) == (trial["length"] > fits)
        assert "error" in trial or trial["seconds"] == round(trial["length"] / 1e6, 2)
    assert "s/step" in capsys.readouterr().out


def test_the_readmes_performance_table_is_the_results_json():
    """Every number of the README's performance table, read back from the benchmark records it cites (device
    included): steps and peaks of train_step.py, seconds per sample of generate.py, the ratios to LongT5 local."""
    results = REPO / "benchmarks" / "results"
    train = [r for n in (4096, 8192, 16384, 65536)
             for r in json.loads((results / "train-step-h100" / f"train_step_{n}.json").read_text())["records"]]
    generate = json.loads((results / "generate-user-h100" / "generate.json").read_text())["records"]
    assert {r["device"] for r in train + generate} == {"NVIDIA H100 80GB HBM3"}
    readme = (REPO / "README.md").read_text()
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in readme[readme.index("## Performance"):readme.index("## Uptraining")].splitlines()
            if line.startswith("| ") and not line.startswith("|---")}

    def step(model, n):
        r = next(r for r in train if r["model"] == model and r["n"] == n)
        return "out of memory" if r.get("error") else f"{r['step_s']:.3f} s"

    def peak(model, n):
        return f"{next(r for r in train if r['model'] == model and r['n'] == n)['peak_gib']:.1f} GiB"

    local, default, fast = "longt5-local", "colt5-hf/default", "colt5-hf/fast"
    def speedup(model, n):
        return next(r for r in train if r["model"] == model and r["n"] == n)["speedup_vs_longt5_local"]

    for n, label in ((4096, "4096 input tokens"), (8192, "8192 input tokens"),
                     (65536, "65536 input tokens, gradient checkpointing")):
        assert rows[f"training step, {label}"] == [
            f"{step(local, n)}, {peak(local, n)}",
            *(f"{step(m, n)} ({speedup(m, n):.2f}x), {peak(m, n)}" for m in (default, fast))]
    assert {r["gradient_checkpointing"] for r in train if r["n"] == 65536} == {True}
    assert rows["training step, 16384 input tokens"] == [
        "out of memory", f"{step(default, 16384)}, {peak(default, 16384)}", f"{step(fast, 16384)}, {peak(fast, 16384)}"]
    assert step(local, 16384) == "out of memory"
    for batch in (1, 8):
        colt5, longt5 = (next(r["s_per_sample"] for r in generate if r["model"] == m and r["batch"] == batch)
                         for m in ("colt5-hf/user", "longt5-local"))
        cells = rows[f"`generate`, batch {batch}, s per sample"]
        assert float(cells[0]) == pytest.approx(longt5, abs=0.006)
        assert float(cells[1].split()[0]) == pytest.approx(colt5, abs=0.0006)
        assert cells[1].split()[1] == f"({longt5 / colt5:.1f}x)"


def test_the_readmes_uptraining_tables_are_the_results_json(monkeypatch):
    """The README's uptraining tables, the CPU's and the GPU's in that order, are the tables of the records they
    come from."""
    module = benchmark_module("uptrain", monkeypatch)
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Uptraining"):readme.index("## Where the code lives")]
    blocks = [[line for line in block.splitlines() if line.startswith("|")] for block in section.split("\n\n")]
    tables = ["\n".join(lines) for lines in blocks if lines]
    results = REPO / "benchmarks" / "results"
    records = [json.loads((results / folder / "uptrain.json").read_text())
               for folder in ("uptrain-cpu", "uptrain-gpu-h100")]
    assert records[1]["environment"]["device"] == "NVIDIA H100 80GB HBM3"
    assert tables == [module.table(record).split("\n\n")[0].strip() for record in records]
