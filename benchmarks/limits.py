"""The longest input each preset handles on this GPU: batch 1, bf16 weights, for inference (encoder + one decoding
step, no gradients) and for a training step (forward and backward of the seq2seq loss on 128 target tokens, then an
AdamW step: gradients and the optimizer's two moments in bf16, the weights' dtype, held in every peak after the first
step). Lengths are searched by doubling
from --start until a step runs out of memory (or fails otherwise), then by bisection down to --resolution of the
longest good length. Each trial records its peak and its wall time (which includes compiling flex attention for a new
shape); the longest good length then runs once more, warm, for the time per step. Prints a table and writes
limits.json to $OUT (or benchmarks/out).

    python benchmarks/limits.py [--presets base large xl] [--modes inference training] [--budget-s 100]

Under flex_attention (the default) the heavy attention computes its bias inside the kernel, so inference memory grows
linearly with the input; the longest inference input of colt5-large, say, from 131072 tokens on:

    python benchmarks/limits.py --presets large --modes inference --start 131072 --budget-s 420
"""

import argparse
import json
import time

import torch

from common import environment, error_text, free_memory, out_dir


TARGET_LENGTH = 128


def build(preset, implementation):
    from colt5_hf import CoLT5Config, CoLT5ForConditionalGeneration

    config = CoLT5Config.from_preset(preset, dropout_rate=0.0, encoder_compile="off")  # the uncompiled model's limits
    with torch.device("cuda"):
        model = CoLT5ForConditionalGeneration(config).to(torch.bfloat16)
    model.config._attn_implementation = implementation
    return model


def step(model, mode, length, optimizer):
    """One step at `length` input tokens (training: `optimizer` steps); returns its peak allocated GiB and its wall
    seconds."""
    vocab = model.config.vocab_size
    input_ids = torch.randint(2, vocab, (1, length), device="cuda")
    labels = torch.randint(2, vocab, (1, TARGET_LENGTH), device="cuda")
    free_memory()
    torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    if mode == "inference":
        with torch.no_grad():
            model.eval()(input_ids=input_ids, decoder_input_ids=labels[:, :1])
    else:
        model.train()(input_ids=input_ids, labels=labels).loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30, time.perf_counter() - began


def search(model, mode, start, resolution, budget_s, longest, optimizer):
    """(longest good length, its peak GiB, first failing length or None, failure text, trials)."""
    began, trials = time.perf_counter(), []
    good, good_peak, bad, failure = None, None, None, None

    def attempt(length):
        nonlocal good, good_peak, bad, failure
        try:
            peak, seconds = step(model, mode, length, optimizer)
            good, good_peak = length, peak
            trials.append({"length": length, "peak_gib": round(peak, 2), "seconds": round(seconds, 2)})
            return True
        except Exception as error:  # noqa: BLE001 - out of memory is the expected end of the search
            model.zero_grad(set_to_none=True)
            bad, failure = length, error_text(error)
            trials.append({"length": length, "error": failure})
            return False
        finally:
            free_memory()

    length = start
    while length <= longest and attempt(length) and time.perf_counter() - began < budget_s:
        length *= 2
    if good is not None and bad is not None:
        low, high = good, bad
        while high - low > max(resolution, good // 16) and time.perf_counter() - began < budget_s:
            middle = low + max(resolution, (high - low) // 2 // resolution * resolution)
            low, high = (middle, high) if attempt(middle) else (low, middle)
    return good, good_peak, bad, failure, trials


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["base", "large", "xl"])
    parser.add_argument("--modes", nargs="+", default=["inference", "training"])
    parser.add_argument("--implementation", default="flex_attention")
    parser.add_argument("--start", type=int, default=16384)
    parser.add_argument("--resolution", type=int, default=4096)
    parser.add_argument("--longest", type=int, default=2**21, help="stop doubling here")
    parser.add_argument("--budget-s", type=float, default=100.0, help="search time per preset and mode")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute each block in the backward")
    args = parser.parse_args()
    info = environment()
    print(json.dumps(info), flush=True)
    records = []
    for preset in args.presets:
        model = build(preset, args.implementation)
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        params_gib = sum(p.numel() for p in model.parameters()) * 2 / 2**30
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)  # its moments: twice the weights, from step one
        for mode in args.modes:
            good, peak, bad, failure, trials = search(model, mode, args.start, args.resolution, args.budget_s,
                                                      args.longest, optimizer)
            step_s = None
            if good is not None:  # warm: compiled for this shape in the search
                try:
                    step_s = round(step(model, mode, good, optimizer)[1], 3)
                except Exception as error:  # noqa: BLE001 - a repeat that fails (fragmentation) is reported, not fatal
                    step_s = error_text(error)
                finally:
                    model.zero_grad(set_to_none=True)
                    free_memory()
            record = {"preset": preset, "mode": mode, "implementation": args.implementation,
                      "gradient_checkpointing": args.gradient_checkpointing,
                      "optimizer": "AdamW, moments in bf16" if mode == "training" else None,
                      "params_gib": round(params_gib, 2), "longest": good, "peak_gib": peak and round(peak, 2),
                      "step_s": step_s, "first_failure": bad, "failure": failure, "trials": trials}
            records.append(record)
            print(json.dumps(record), flush=True)
            (out_dir() / "limits.json").write_text(json.dumps({"environment": info, "records": records}, indent=1))
        del model, optimizer
        free_memory()
    print(f"\n{info['device']} ({info.get('gpu_memory_gib')} GiB), batch 1, bf16, {args.implementation}"
          + (", gradient checkpointing" if args.gradient_checkpointing else ""))
    print(f"{'preset':7s} {'mode':10s} {'params GiB':>10s} {'longest ok':>11s} {'peak GiB':>9s} {'s/step':>8s} "
          f"{'first failure':>14s}  why")
    for r in records:
        seconds = f"{r['step_s']:8.2f}" if isinstance(r["step_s"], float) else f"{'-':>8s}"
        print(f"{r['preset']:7s} {r['mode']:10s} {r['params_gib']:10.2f} {r['longest'] or 0:11d} "
              f"{r['peak_gib'] or 0:9.2f} {seconds} {r['first_failure'] or 0:14d}  {r['failure'] or 'not reached'}")


if __name__ == "__main__":
    main()
