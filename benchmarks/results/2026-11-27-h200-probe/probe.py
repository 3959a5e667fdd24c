"""Throwaway probe: why is decoding slow, and where does the encoder block graph-break under torch.compile?"""
import sys, time, json, os
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
import torch
from common import colt5_large_config
from colt5_hf import CoLT5ForConditionalGeneration
from torch.profiler import profile, ProfilerActivity
OUT = os.environ.get("OUT", "/tmp")
torch.manual_seed(0)
cfg = colt5_large_config(num_layers=2, num_decoder_layers=24)
with torch.device("cuda"):
    m = CoLT5ForConditionalGeneration(cfg).to(torch.bfloat16).eval()
for impl in ("sdpa", "flex_attention"):
    m.config._attn_implementation = impl
    for b in (1, 8):
        x = torch.randint(2, 32000, (b, 16384), device="cuda")
        am = torch.ones_like(x)
        with torch.no_grad():
            enc = m.get_encoder()(input_ids=x, attention_mask=am)
            opts = dict(encoder_outputs=enc, attention_mask=am, do_sample=False)
            m.generate(**opts, max_new_tokens=4, min_new_tokens=4)
            for T in (8, 40):
                torch.cuda.synchronize(); t0 = time.perf_counter()
                m.generate(**opts, max_new_tokens=T, min_new_tokens=T)
                torch.cuda.synchronize(); print(impl, "b", b, "tokens", T, "s", round(time.perf_counter() - t0, 3), flush=True)
            if b == 1 and impl == "flex_attention":
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                    m.generate(**opts, max_new_tokens=8, min_new_tokens=8)
                    torch.cuda.synchronize()
                t = p.key_averages().table(sort_by="cuda_time_total", row_limit=25)
                t2 = p.key_averages().table(sort_by="cpu_time_total", row_limit=25)
                open(f"{OUT}/decode_profile.txt", "w").write(t + "\n\n" + t2)
                print(t[:6000])
# compile graph breaks of one encoder block
blk = m.encoder.block[0]
h = torch.randn(1, 16384, 1024, device="cuda", dtype=torch.bfloat16)
mask = torch.ones(1, 16384, dtype=torch.bool, device="cuda")
from colt5_hf.modeling_colt5 import branch_bias_tables
lt, hw = branch_bias_tables(cfg, m.encoder.relative_attention_bias, "cuda")
try:
    ex = torch._dynamo.explain(blk)(h, mask, lt, hw, "flex_attention")
    print("graphs", ex.graph_count, "breaks", ex.graph_break_count)
    for r in ex.break_reasons[:10]:
        print("BREAK", str(r.reason)[:300], r.user_stack[-1] if r.user_stack else "")
except Exception as e:
    print("explain failed", type(e).__name__, str(e)[:1000])
