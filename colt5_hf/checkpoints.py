"""Training checkpoints: the newest one that a killed run finished writing.

Transformers' Trainer (5.x) writes a checkpoint straight into `checkpoint-N` (no temporary folder renamed at the end):
the model first, then optimizer, scheduler, RNG states, and `trainer_state.json` last. A run killed while saving leaves a
`checkpoint-N` folder that `transformers.trainer_utils.get_last_checkpoint` picks all the same; resuming from it fails
(no trainer_state.json) or, worse, starts from a truncated file. `last_complete_checkpoint` skips such folders.
"""

import json
import re
import zipfile
from pathlib import Path

from safetensors import SafetensorError, safe_open


CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def is_complete_checkpoint(folder) -> bool:
    """Whether a Trainer checkpoint folder was written to the end: `trainer_state.json` parses and (for a
    `checkpoint-N` folder) names step N; every safetensors weights file (each shard of an index; the adapter of a PEFT
    model) opens, which safetensors refuses for a truncated file; optimizer and scheduler states, where present, are
    whole zip archives (torch.save's format: a truncated one has no central directory)."""
    folder = Path(folder)
    name = CHECKPOINT_NAME.match(folder.name)
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
        if name is not None and state.get("global_step") != int(name.group(1)):
            return False
    except (OSError, ValueError, AttributeError):
        return False
    if not has_complete_weights(folder):
        return False
    return all(zipfile.is_zipfile(folder / file) for file in ("optimizer.pt", "scheduler.pt") if (folder / file).exists())


def has_complete_weights(folder) -> bool:
    """Whether a saved model folder holds safetensors weights (each shard of an index; the adapter of a PEFT model)
    that all open, which safetensors refuses for a truncated file."""
    folder = Path(folder)
    try:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weights = {folder / shard for shard in json.loads(index.read_text())["weight_map"].values()}
        else:
            weights = {path for path in (folder / "model.safetensors", folder / "adapter_model.safetensors")
                       if path.is_file()}
        if not weights:
            return False
        for path in weights:
            with safe_open(path, framework="pt"):
                pass
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError):
        return False
    return True


def last_complete_checkpoint(output_dir) -> str | None:
    """The newest complete `checkpoint-N` folder of `output_dir`, as a string for
    `Trainer.train(resume_from_checkpoint=...)`, or None. Incomplete folders are left where they are: the resumed run
    writes its own checkpoint N over them."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    checkpoints = []
    for path in output_dir.iterdir():
        name = CHECKPOINT_NAME.match(path.name)
        if name is not None and path.is_dir():
            checkpoints.append((int(name.group(1)), path))
    for _, path in sorted(checkpoints, reverse=True):
        if is_complete_checkpoint(path):
            return str(path)
    return None


__all__ = ["is_complete_checkpoint", "has_complete_weights", "last_complete_checkpoint"]
