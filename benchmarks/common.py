"""Shared pieces of the benchmark scripts: the Large shapes, CUDA timing, environment description."""

import datetime
import gc
import os
import platform
import statistics
import sys
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the LongT5/T5.1.1-Large shape, which CoLT5-Large (paper Table 7) shares its light parts with
LARGE = dict(vocab_size=32128, d_model=1024, d_kv=64, d_ff=2816, num_heads=16)


def colt5_large_config(**overrides):
    """The packaged colt5-large preset, dropout off for timing. `encoder_compile` is "off" unless a row asks for the
    model's own compiled path: the other rows choose their path (eager or compiled by hand) themselves."""
    from colt5_hf import CoLT5Config

    return CoLT5Config.from_preset("large", **{"dropout_rate": 0.0, "encoder_compile": "off", **overrides})


def environment():
    import transformers

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def cuda_time(step, warmup=2, budget_s=2.0, min_reps=3, max_reps=20, between=None):
    """Median milliseconds of `step()` by CUDA events, after `warmup` calls; as many repeats as fit in `budget_s`.
    `between()` runs untimed before every call (e.g. dropping gradients)."""
    for _ in range(warmup):
        if between:
            between()
        step()
    torch.cuda.synchronize()
    times = []
    reps = max_reps
    while len(times) < reps:
        if between:
            between()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        if len(times) == 1:
            reps = int(min(max_reps, max(min_reps, budget_s * 1000 / max(times[0], 1e-3))))
    return statistics.median(times)


def free_memory():
    gc.collect()
    torch.cuda.empty_cache()


def error_text(error):
    if isinstance(error, torch.OutOfMemoryError):
        return "out of memory"
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}"


def out_dir(default="benchmarks/out"):
    path = Path(os.environ.get("OUT", default))
    path.mkdir(parents=True, exist_ok=True)
    return path
