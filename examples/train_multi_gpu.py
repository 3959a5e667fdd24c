"""Train CoLT5 with Seq2SeqTrainer on a synthetic task, in one process or in several under `accelerate launch` (DDP or
FSDP), then compare the runs: runs with the same global batch train the same model, so their losses agree, and each
run's checkpoint loads on the CPU (and on a GPU when there is one).

    # one GPU: global batch 16 = 8 samples x 2 accumulation steps
    python examples/train_multi_gpu.py train --output-dir runs/one --per-device-batch 8 --grad-accum 2
    # two GPUs: global batch 16 = 8 samples x 2 processes
    accelerate launch --config_file accelerate_configs/ddp.yaml examples/train_multi_gpu.py train \
        --output-dir runs/ddp --per-device-batch 8
    accelerate launch --config_file accelerate_configs/fsdp.yaml examples/train_multi_gpu.py train \
        --output-dir runs/fsdp --per-device-batch 8
    python examples/train_multi_gpu.py compare runs/one runs/ddp runs/fsdp

The task: copy the first `--target-length` tokens of a random token sequence in reverse order. Sample i depends only
on (--seed, i), so every process and every run sees the same data; dropout is off unless --dropout is given.
Precision is a training flag (--bf16 / --fp16), the same for every run; the accelerate configs leave it to the script.
"""

import argparse
import gc
import json
import math
import os
import sys
from pathlib import Path

import torch
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

from colt5_hf import CoLT5Config, CoLT5ForConditionalGeneration


REPO = Path(__file__).resolve().parents[1]


class ReverseTask(torch.utils.data.Dataset):
    """Sample i: `source-length` token slots, the first 60-100% real tokens in [2, vocab), the rest padding (0);
    labels are the first `target_length` tokens reversed, followed by EOS (1)."""

    def __init__(self, size, vocab_size, source_length, target_length, seed):
        self.size, self.vocab_size, self.seed = size, vocab_size, seed
        self.source_length, self.target_length = source_length, target_length

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        shortest = max(math.ceil(0.6 * self.source_length), self.target_length)
        length = int(torch.randint(shortest, self.source_length + 1, (), generator=generator))
        input_ids = torch.zeros(self.source_length, dtype=torch.long)
        input_ids[:length] = torch.randint(2, self.vocab_size, (length,), generator=generator)
        attention_mask = (torch.arange(self.source_length) < length).long()
        labels = torch.cat([input_ids[: self.target_length].flip(0), torch.tensor([1])])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def train(args):
    if not args.cpu and torch.cuda.device_count() > 1 and "WORLD_SIZE" not in os.environ:
        # one process seeing several GPUs: Trainer would use nn.DataParallel (a larger global batch than recorded, and
        # no autocast for --bf16/--fp16)
        raise SystemExit(f"{torch.cuda.device_count()} GPUs are visible: use `accelerate launch` for several GPUs, or "
                         "CUDA_VISIBLE_DEVICES=0 for one")
    if args.model:
        overrides = {} if args.dropout is None else {"dropout_rate": args.dropout}
        model = CoLT5ForConditionalGeneration.from_pretrained(args.model, **overrides)
    else:
        config = CoLT5Config.from_json_file(args.config)
        config.dropout_rate = args.dropout or 0.0
        torch.manual_seed(args.seed)  # the same initial weights in every process and every run
        model = CoLT5ForConditionalGeneration(config)
    dataset = ReverseTask(args.num_samples, model.config.vocab_size, args.source_length, args.target_length, args.seed)
    training_args = Seq2SeqTrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.per_device_batch,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        bf16=args.bf16,
        fp16=args.fp16,
        gradient_checkpointing=args.gradient_checkpointing,
        dataloader_drop_last=True,
        use_cpu=args.cpu,
    )
    trainer = Seq2SeqTrainer(model=model, args=training_args, train_dataset=dataset)
    trainer.train()
    trainer.save_model(str(Path(args.output_dir) / "final"))  # full weights on rank 0 (FSDP: FULL_STATE_DICT)
    state = trainer.accelerator.state
    if trainer.is_world_process_zero():
        run = {
            "distributed_type": str(state.distributed_type).split(".")[-1],
            "num_processes": state.num_processes,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.cpu else "cpu",
            "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
            "global_batch": args.per_device_batch * args.grad_accum * state.num_processes,
            "command": " ".join(sys.argv),
            "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        }
        (Path(args.output_dir) / "run.json").write_text(json.dumps(run, indent=1))
        print(json.dumps({key: value for key, value in run.items() if key != "losses"}))
        print("losses:", " ".join(f"{loss:.4f}" for loss in run["losses"]))
    trainer.accelerator.wait_for_everyone()


@torch.no_grad()
def evaluation_loss(model, dataset, device, count=16):
    model.to(device).eval()
    batch = {key: torch.stack([dataset[i][key] for i in range(count)]).to(device) for key in dataset[0]}
    return model(**batch).loss.item()


def compare(args):
    runs = [json.loads((Path(folder) / "run.json").read_text()) for folder in args.runs]
    reference = runs[0]["losses"]
    ok = True
    print(f"{'run':<28} {'type':<12} {'procs':>5} {'batch':>5} {'device':<24} {'max |dloss|':>11} {'eval loss':>9}")
    for folder, run in zip(args.runs, runs):
        losses = run["losses"]
        if len(losses) != len(reference):
            raise SystemExit(f"{folder}: {len(losses)} logged losses, the first run has {len(reference)}")
        worst = max(abs(a - b) / max(abs(b), 1e-8) for a, b in zip(losses, reference))
        ok &= worst <= args.rtol
        model = CoLT5ForConditionalGeneration.from_pretrained(Path(folder) / "final")
        config = model.config
        dataset = ReverseTask(args.eval_samples, config.vocab_size, args.source_length, args.target_length, seed=12345)
        line = evaluation_loss(model, dataset, "cpu", args.eval_samples)
        text = f"{line:9.4f}"
        if torch.cuda.is_available():
            gpu = evaluation_loss(model, dataset, "cuda", args.eval_samples)
            text += f" (GPU {gpu:.4f})"
        print(f"{folder:<28} {run['distributed_type']:<12} {run['num_processes']:>5} {run['global_batch']:>5} "
              f"{run['device'][:24]:<24} {worst:>11.2e} {text}")
    print("losses per step:")
    for step, values in enumerate(zip(*(run["losses"] for run in runs)), 1):
        print(f"  {step:>4} " + " ".join(f"{value:.4f}" for value in values))
    if not ok:
        raise SystemExit(f"losses differ from the first run by more than rtol {args.rtol}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("train", help="train one run (use `accelerate launch` for several processes)")
    run.add_argument("--output-dir", required=True)
    run.add_argument("--config", default=str(REPO / "configs" / "colt5-tiny.json"), help="config JSON (new model)")
    run.add_argument("--model", help="a saved model folder to fine-tune instead of a new model")
    run.add_argument("--max-steps", type=int, default=50)
    run.add_argument("--per-device-batch", type=int, default=8)
    run.add_argument("--grad-accum", type=int, default=1)
    run.add_argument("--learning-rate", type=float, default=1e-3)
    run.add_argument("--num-samples", type=int, default=4096)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--dropout", type=float, default=None, help="dropout rate (default: 0 for comparable runs)")
    run.add_argument("--bf16", action="store_true")
    run.add_argument("--fp16", action="store_true")
    run.add_argument("--gradient-checkpointing", action="store_true")
    run.add_argument("--cpu", action="store_true", help="train on the CPU even where there is a GPU")
    check = commands.add_parser("compare", help="compare the losses and checkpoints of finished runs")
    check.add_argument("runs", nargs="+", help="output folders of `train`; the first is the reference")
    check.add_argument("--rtol", type=float, default=1e-2, help="largest relative difference of a step's loss")
    check.add_argument("--eval-samples", type=int, default=16)
    for command in (run, check):
        command.add_argument("--source-length", type=int, default=512)
        command.add_argument("--target-length", type=int, default=32)
    args = parser.parse_args(argv)
    if args.command == "compare":
        return compare(args)
    train(args)
    if torch.distributed.is_initialized():
        # tear down in order, before exit: first the DDP wrapper (freeing it while its process group is gone can hang),
        # then the group (a rank leaving while gloo's threads still run can abort)
        gc.collect()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
