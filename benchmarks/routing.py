"""Routing cost at long inputs: the three routers of one CoLT5-Large encoder layer, fused Triton coordinate descent
against the eager loop, and the coordinate descent alone with and without the exact early exit.

One process, one GPU, batch 1, hidden states random and RMS-normalised (as the routers see them), router weights at
their initialisation. Writes routing.json to $OUT (or benchmarks/out).

    python benchmarks/routing.py [--sizes 4096 16384 32768 65536]
"""

import argparse
import json

import torch

from common import colt5_large_config, cuda_time, environment, out_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 32768, 65536])
    args = parser.parse_args()
    from colt5_hf import routing
    from colt5_hf.coordinate_descent_kernel import fused_coordinate_descent
    from colt5_hf.routing import CoLT5Router

    config = colt5_large_config()
    torch.manual_seed(0)
    with torch.device("cuda"):
        routers = [CoLT5Router(config, fraction) for fraction in
                   (config.attention_q_fraction, config.attention_kv_fraction, config.feed_forward_fraction)]
        for router in routers:
            torch.nn.init.normal_(router.weight, std=config.d_model**-0.5)
    info = environment()
    print(json.dumps(info), flush=True)
    records = []
    for n in args.sizes:
        hidden = torch.randn(1, n, config.d_model, device="cuda")
        hidden = (hidden * hidden.pow(2).mean(-1, keepdim=True).rsqrt()).to(torch.bfloat16)
        mask = torch.ones(1, n, dtype=torch.bool, device="cuda")
        record = {"n": n, "iterations": config.router_iterations}

        def routers_forward():
            return [router(hidden, mask) for router in routers]

        def routers_backward():
            outputs = routers_forward()
            sum(out.weights.float().sum() * (i + 1) for i, out in enumerate(outputs)).backward()

        for label, fused in (("fused", routing.fused_coordinate_descent), ("eager", None)):
            saved, routing.fused_coordinate_descent = routing.fused_coordinate_descent, fused
            try:
                with torch.no_grad():
                    record[f"routers_fwd_ms_{label}"] = cuda_time(routers_forward)
                record[f"routers_fwdbwd_ms_{label}"] = cuda_time(routers_backward)
            finally:
                routing.fused_coordinate_descent = saved

        # the coordinate descent alone, one row per router as in the model (three launches)
        scores = [torch.einsum("bnd,rd->brn", hidden.float(), router.weight.float()).detach() for router in routers]
        ks = [torch.full((1, 1, 1), config.routed_count(r.fraction, n) * config.router_fetch_ratio, device="cuda")
              for r in routers]
        masks = [mask[:, None, :]] * 3
        for early_exit in (True, False):
            label = "early_exit" if early_exit else "all_iterations"

            def descent(grad=False):
                outs = []
                for s, m, k in zip(scores, masks, ks):
                    s = s.requires_grad_(grad)
                    outs.append(fused_coordinate_descent(s, m, k, iterations=config.router_iterations,
                                                         epsilon=config.router_epsilon, early_exit=early_exit))
                if grad:
                    sum(o.sum() for o in outs).backward()

            with torch.no_grad():
                record[f"descent_fwd_ms_{label}"] = cuda_time(descent)
            record[f"descent_fwdbwd_ms_{label}"] = cuda_time(lambda: descent(True))
        records.append(record)
        print(json.dumps(record), flush=True)
    (out_dir() / "routing.json").write_text(json.dumps({"environment": info, "records": records}, indent=1))
    keys = [k for k in records[0] if k not in ("n", "iterations")]
    print(f"{'n':>6s} " + " ".join(f"{k:>28s}" for k in keys))
    for r in records:
        print(f"{r['n']:6d} " + " ".join(f"{r[k]:28.3f}" for k in keys))


if __name__ == "__main__":
    main()
