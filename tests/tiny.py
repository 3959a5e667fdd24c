"""The tiny preset (configs/colt5-tiny.json), shared by the test files."""

import json
from pathlib import Path

import torch

from colt5_hf import CoLT5Config, CoLT5ForConditionalGeneration


TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "colt5-tiny.json"


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
