"""CoLT5 end to end on a CPU in under a minute: build the tiny preset, train it to copy short random token sequences,
save it, load it back through AutoModelForSeq2SeqLM, and generate.

    .venv/bin/python examples/end_to_end.py [--steps 700] [--output runs/end_to_end]
"""

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForSeq2SeqLM
from transformers.utils import logging as transformers_logging

import colt5_hf  # registers "colt5" with the Auto classes
from colt5_hf import CoLT5Config, CoLT5ForConditionalGeneration


ROOT = Path(__file__).resolve().parent.parent
EOS = 1
FIRST_SYMBOL = 2  # token ids 0 (pad / decoder start) and 1 (EOS) are special


def copy_batch(generator, batch_size, length, symbols):
    """Random sequences of `length` symbols, then EOS; the target is the input itself."""
    tokens = torch.randint(FIRST_SYMBOL, FIRST_SYMBOL + symbols, (batch_size, length), generator=generator)
    tokens = torch.cat([tokens, torch.full((batch_size, 1), EOS)], dim=1)
    return {"input_ids": tokens, "labels": tokens.clone()}


def evaluate(model, batch):
    """Loss and teacher-forced token accuracy on a fixed batch."""
    model.eval()
    with torch.no_grad():
        outputs = model(**batch)
    model.train()
    accuracy = (outputs.logits.argmax(-1) == batch["labels"]).float().mean().item()
    return outputs.loss.item(), accuracy


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=6, help="symbols per sequence")
    parser.add_argument("--symbols", type=int, default=32, help="size of the alphabet")
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "end_to_end")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the tiny model's matrices are too small to gain from more threads
    transformers_logging.disable_progress_bar()
    start = time.perf_counter()

    config = CoLT5Config.from_preset("tiny")
    torch.manual_seed(args.seed)
    model = CoLT5ForConditionalGeneration(config).train()
    print(f"CoLT5 tiny preset: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{config.num_layers} encoder + {config.num_decoder_layers} decoder layers, d_model {config.d_model}")
    print(f"task: copy {args.length} random symbols of {args.symbols}, batch {args.batch_size}, {args.steps} steps\n")

    generator = torch.Generator().manual_seed(args.seed)
    held_out = copy_batch(torch.Generator().manual_seed(args.seed + 1), 64, args.length, args.symbols)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    print(f"{'step':>6} {'train loss':>11} {'held-out loss':>14} {'token accuracy':>15}")
    loss, accuracy = evaluate(model, held_out)
    print(f"{0:>6} {'':>11} {loss:>14.4f} {accuracy:>15.1%}")
    for step in range(1, args.steps + 1):
        train_loss = model(**copy_batch(generator, args.batch_size, args.length, args.symbols)).loss
        train_loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == args.steps:
            loss, accuracy = evaluate(model, held_out)
            print(f"{step:>6} {train_loss.item():>11.4f} {loss:>14.4f} {accuracy:>15.1%}")

    model.eval()
    model.save_pretrained(args.output)
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(args.output).eval()
    with torch.no_grad():
        difference = (reloaded(**held_out).logits - model(**held_out).logits).abs().max().item()
    files = ", ".join(sorted(p.name for p in args.output.iterdir()))
    print(f"\nsaved to {args.output} ({files})")
    print(f"reloaded as {type(reloaded).__name__} through AutoModelForSeq2SeqLM; max |logit difference| {difference:g}")

    generated = reloaded.generate(input_ids=held_out["input_ids"], max_new_tokens=args.length + 2, do_sample=False)
    generated = generated[:, 1:]  # drop the decoder start token
    exact = sum(
        row[: args.length + 1].tolist() == target.tolist()
        for row, target in zip(generated, held_out["input_ids"])
    )
    print(f"greedy generation copies {exact} of {len(generated)} held-out sequences exactly; for example:")
    for source, output in list(zip(held_out["input_ids"], generated))[:3]:
        print(f"  input {source.tolist()}  ->  output {output.tolist()}")
    print(f"\ndone in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
