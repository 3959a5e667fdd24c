"""Generation at long inputs: 16384 input tokens, 128 new tokens (greedy, exactly 128: EOS suppressed), batch 1 and 8,
colt5-hf Large (24 + 24 layers) against transformers' LongT5-Large (transient-global). Random weights in bf16, random
input ids. Reports seconds per sample for the whole generate() call and for the encoder alone. Writes generate.json to
$OUT (or benchmarks/out).

    python benchmarks/generate.py [--length 16384] [--new-tokens 128] [--batches 1 8] [--models ...]
"""

import argparse
import json
import time

import torch

from common import LARGE, colt5_large_config, environment, error_text, free_memory, out_dir


MODELS = ["colt5-hf/flex_attention", "longt5-tglobal"]


def build(name):
    if name.startswith("colt5-hf"):
        from colt5_hf import CoLT5ForConditionalGeneration

        config = colt5_large_config(num_layers=24, num_decoder_layers=24)
        with torch.device("cuda"):
            model = CoLT5ForConditionalGeneration(config).to(torch.bfloat16)
        model.config._attn_implementation = name.split("/")[1]
        return model
    from transformers import LongT5Config, LongT5ForConditionalGeneration

    config = LongT5Config(**LARGE, num_layers=24, num_decoder_layers=24, encoder_attention_type="transient-global",
                          local_radius=127, global_block_size=16, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                          decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    with torch.device("cuda"):
        return LongT5ForConditionalGeneration(config).to(torch.bfloat16)


def timed(function):
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = function()
    torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--models", nargs="+", default=MODELS)
    args = parser.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    info = environment()
    print(json.dumps(info), flush=True)
    records = []
    for name in args.models:
        model = build(name).eval()
        for batch in args.batches:
            record = {"model": name, "batch": batch, "length": args.length, "new_tokens": args.new_tokens}
            generator = torch.Generator(device="cuda").manual_seed(batch)
            input_ids = torch.randint(2, LARGE["vocab_size"], (batch, args.length), device="cuda", generator=generator)
            attention_mask = torch.ones_like(input_ids)
            options = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                           num_beams=1)
            try:
                with torch.no_grad():
                    model.generate(input_ids=input_ids, attention_mask=attention_mask, **{**options,
                                   "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up, compilation
                    encoder_s, _ = timed(lambda: model.get_encoder()(input_ids=input_ids,
                                                                     attention_mask=attention_mask))
                    total_s, output = timed(lambda: model.generate(input_ids=input_ids,
                                                                   attention_mask=attention_mask, **options))
                record.update(generated=output.shape[1] - 1, total_s=total_s, s_per_sample=total_s / batch,
                              encoder_s=encoder_s, decode_s_per_token=(total_s - encoder_s) / args.new_tokens)
            except Exception as error:  # noqa: BLE001 - recorded, the benchmark goes on
                record["error"] = error_text(error)
            free_memory()
            records.append(record)
            print(json.dumps(record), flush=True)
            (out_dir() / "generate.json").write_text(json.dumps({"environment": info, "records": records}, indent=1))
        del model
        free_memory()
    print(f"{'model':26s} {'batch':>5s} {'s/sample':>9s} {'total s':>8s} {'encoder s':>9s} {'decode ms/token':>15s}")
    for r in records:
        if "error" in r:
            print(f"{r['model']:26s} {r['batch']:5d} {r['error']}")
        else:
            print(f"{r['model']:26s} {r['batch']:5d} {r['s_per_sample']:9.3f} {r['total_s']:8.2f} "
                  f"{r['encoder_s']:9.3f} {1000 * r['decode_s_per_token']:15.2f}")


if __name__ == "__main__":
    main()
