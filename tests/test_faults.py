"""Faults during training: a Trainer run killed with SIGKILL resumes from its last complete checkpoint and ends with the
same weights as an uninterrupted run; a checkpoint being written when the process dies is never taken as complete.

The training runs are this file run as a script (`python tests/test_faults.py OUTPUT_DIR [options]`) in a subprocess:
a tiny CoLT5 (dropout on, so the restored RNG states matter) trained by transformers.Trainer on a fixed synthetic
dataset for 10 steps, a checkpoint every 3 steps.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "colt5-tiny.json"
MAX_STEPS, SAVE_STEPS = 10, 3


# ---------------------------------------------------------------------------------------------- the training script


class SyntheticDataset(torch.utils.data.Dataset):
    """48 samples of 50 tokens, right-padded to random lengths, with 8 labels each: the same for every seed of the
    training run."""

    def __init__(self):
        generator = torch.Generator().manual_seed(1234)
        self.input_ids = torch.randint(2, 384, (48, 50), generator=generator)
        lengths = torch.randint(10, 51, (48,), generator=generator)
        self.attention_mask = (torch.arange(50)[None] < lengths[:, None]).long()
        self.labels = torch.randint(2, 384, (48, 8), generator=generator)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


def train(output_dir, kill_after_step=None, kill_while_saving_step=None, resume=False):
    import transformers
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from colt5_hf import CoLT5Config, CoLT5ForConditionalGeneration
    from colt5_hf.checkpoints import last_complete_checkpoint

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    values = json.loads(TINY_CONFIG.read_text())
    values.pop("model_type")
    torch.manual_seed(0)
    model = CoLT5ForConditionalGeneration(CoLT5Config(**{**values, "dropout_rate": 0.1}))
    arguments = TrainingArguments(
        output_dir=str(output_dir), max_steps=MAX_STEPS, save_steps=SAVE_STEPS, save_strategy="steps",
        per_device_train_batch_size=4, learning_rate=3e-3, warmup_steps=2, seed=0, use_cpu=True, report_to=[],
        logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == kill_after_step:
                os.kill(os.getpid(), signal.SIGKILL)

    trainer = Trainer(model=model, args=arguments, train_dataset=SyntheticDataset(), callbacks=[Kill()])
    if kill_while_saving_step is not None:
        import safetensors.torch
        import transformers.modeling_utils

        save_file = transformers.modeling_utils.safe_save_file

        def save_half_then_die(tensors, filename, metadata=None):
            if trainer.state.global_step != kill_while_saving_step:
                return save_file(tensors, filename, metadata=metadata)
            data = safetensors.torch.save(tensors, metadata=metadata)
            with open(filename, "wb") as file:
                file.write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)

        transformers.modeling_utils.safe_save_file = save_half_then_die

    checkpoint = last_complete_checkpoint(output_dir) if resume else None
    if resume:
        print(f"resuming from {checkpoint}", flush=True)
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(str(Path(output_dir) / "final"))


# ---------------------------------------------------------------------------------------------------------- tests


def run_training(output_dir, *options):
    return subprocess.run(
        [sys.executable, __file__, str(output_dir), *options], capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
    )


def final_weights(output_dir):
    return load_file(Path(output_dir) / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    result = run_training(output_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return final_weights(output_dir)


def assert_same_weights(actual, expected):
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def test_killed_run_resumes_to_the_same_weights(uninterrupted, tmp_path):
    killed = run_training(tmp_path, "--kill-after-step", "7")
    assert killed.returncode == -signal.SIGKILL
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert not (tmp_path / "final").exists()

    resumed = run_training(tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {tmp_path / 'checkpoint-6'}" in resumed.stdout
    assert_same_weights(final_weights(tmp_path), uninterrupted)


def test_checkpoint_being_written_at_the_kill_is_never_taken_as_complete(uninterrupted, tmp_path):
    """Killed halfway through writing checkpoint-9's model.safetensors: Transformers' own get_last_checkpoint picks the
    partial folder; ours skips it, the folder does not load as a model, and the resumed run (from checkpoint-6)
    rewrites checkpoint-9 and ends with the uninterrupted run's weights."""
    from transformers.trainer_utils import get_last_checkpoint

    from colt5_hf import CoLT5ForConditionalGeneration
    from colt5_hf.checkpoints import is_complete_checkpoint, last_complete_checkpoint

    killed = run_training(tmp_path, "--kill-while-saving-step", "9")
    assert killed.returncode == -signal.SIGKILL
    partial = tmp_path / "checkpoint-9"
    written = {path.name for path in partial.iterdir()}
    assert "model.safetensors" in written and not written & {"optimizer.pt", "rng_state.pth", "trainer_state.json"}
    assert get_last_checkpoint(str(tmp_path)) == str(partial)
    assert not is_complete_checkpoint(partial)
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-6")
    with pytest.raises(OSError, match="truncated or corrupt"):
        CoLT5ForConditionalGeneration.from_pretrained(partial)

    resumed = run_training(tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {tmp_path / 'checkpoint-6'}" in resumed.stdout
    assert is_complete_checkpoint(partial)
    assert_same_weights(final_weights(tmp_path), uninterrupted)


@pytest.fixture(scope="module")
def complete_checkpoint(tmp_path_factory):
    """A checkpoint folder as Trainer writes it, without running Trainer: model, optimizer, scheduler, RNG, state."""
    from colt5_hf import CoLT5Config, CoLT5ForConditionalGeneration

    values = json.loads(TINY_CONFIG.read_text())
    values.pop("model_type")
    folder = tmp_path_factory.mktemp("run") / "checkpoint-6"
    model = CoLT5ForConditionalGeneration(CoLT5Config(**values))
    model.save_pretrained(folder)
    optimizer = torch.optim.AdamW(model.parameters())
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save({"last_epoch": 6}, folder / "scheduler.pt")
    torch.save({"cpu": torch.get_rng_state()}, folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 6}))
    return folder


def damage(folder, how):
    if how == "no-trainer-state":
        (folder / "trainer_state.json").unlink()
    elif how == "truncated-trainer-state":
        path = folder / "trainer_state.json"
        path.write_text(path.read_text()[:5])
    elif how == "trainer-state-of-another-step":
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    elif how == "no-weights":
        (folder / "model.safetensors").unlink()
    elif how in ("truncated-weights", "truncated-optimizer", "truncated-scheduler"):
        path = folder / {"truncated-weights": "model.safetensors", "truncated-optimizer": "optimizer.pt",
                         "truncated-scheduler": "scheduler.pt"}[how]
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 100])


@pytest.mark.parametrize(
    "how",
    [None, "no-trainer-state", "truncated-trainer-state", "trainer-state-of-another-step", "no-weights",
     "truncated-weights", "truncated-optimizer", "truncated-scheduler"],
)
def test_last_complete_checkpoint_skips_every_kind_of_partial_folder(complete_checkpoint, tmp_path, how):
    import shutil

    from colt5_hf.checkpoints import last_complete_checkpoint

    for step in (3, 6):
        shutil.copytree(complete_checkpoint, tmp_path / f"checkpoint-{step}")
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    (tmp_path / "checkpoint-12-tmp").mkdir()  # not a checkpoint name
    damage(tmp_path / "checkpoint-6", how)
    expected = "checkpoint-6" if how is None else "checkpoint-3"
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / expected)
    assert last_complete_checkpoint(tmp_path / "missing") is None


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="train the tiny CoLT5 with Trainer, optionally dying on the way")
    parser.add_argument("output_dir")
    parser.add_argument("--kill-after-step", type=int)
    parser.add_argument("--kill-while-saving-step", type=int)
    parser.add_argument("--resume", action="store_true")
    options = parser.parse_args()
    train(options.output_dir, options.kill_after_step, options.kill_while_saving_step, options.resume)
