"""What the test files share: the tiny preset (configs/colt5-tiny.json), a graph-counting torch.compile backend, a
relative error and the benchmark scripts as modules."""

import importlib.util
import json
from pathlib import Path

import torch

from colt5_hf import CoLT5Config, CoLT5ForConditionalGeneration


REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "colt5-tiny.json"


def tiny_values():
    values = json.loads(TINY_CONFIG.read_text())
    values.pop("model_type")
    return values


def tiny_config(**overrides):
    return CoLT5Config(**{**tiny_values(), **overrides})


def build(model_class=CoLT5ForConditionalGeneration, seed=0, **overrides):
    """A tiny model in eval mode, seeded."""
    torch.manual_seed(seed)
    return model_class(tiny_config(**overrides)).eval()


# Two float32 evaluations of the same function whose matmuls sum in different orders (other shapes, a cache, another
# attention kernel, or MKL's kernel choice by CPU and alignment): a reordered sum of K terms moves by up to about
# K * 2^-24 of the sum of |terms|, 1.5e-5 for the tiny preset's K <= 256 at the logits' scale (about 1). Seen on AVX2
# and AVX kernels (MKL_ENABLE_INSTRUCTIONS): 1.3e-5. A wrong cache, mask or routing moves them by 1e-3 or more.
REORDERED_FLOAT32 = dict(atol=4e-5, rtol=1e-5)


def relative_error(actual, expected):
    """||actual - expected|| / ||expected||, in float64."""
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp(min=1e-30)).item()


class CountingBackend:
    """A torch.compile backend that counts the graphs Dynamo hands over (one per compilation) and compiles them with
    `backend`."""

    def __init__(self, backend="inductor"):
        self.backend, self.graphs = torch._dynamo.lookup_backend(backend), 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return self.backend(graph_module, example_inputs)


def benchmark_module(name, monkeypatch):
    """benchmarks/<name>.py imported (it imports its neighbour `common`)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
