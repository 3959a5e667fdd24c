"""Does routing learn long-range relations? The tiny preset trained from scratch on the synthetic tasks of
colt5_hf/synthetic.py, for seeds x tasks x variants, one process per run, many at once.

Variants: the preset's routing (`preset`), every token routed (`full`: the heavy branch is full attention), local
attention only (`local`: the heavy branch's output zeroed and frozen with its routers), and the config options proposed
against stuck routing, each on its own (see VARIANTS). Every run writes runs/<length>/<task>.<variant>.seed<seed>.json
under --out (default $OUT or benchmarks/out/routing_tasks): the accuracy curve (exact match of the answer on held-out
examples at every evaluation), the share of the answer's tokens each router keeps, and the first step at >= 95%. Then a
table (routing_tasks.md) and the curves (routing_tasks.png).

    python benchmarks/routing_tasks.py --jobs 16 --deadline-s 480      # the default grid, on a GPU
    python benchmarks/routing_tasks.py --jobs 2 --cpu --tasks order --seeds 0 --steps 200
    python benchmarks/routing_tasks.py --from-json benchmarks/out/routing_tasks   # table and PNG of saved runs

Runs already written are kept (a grid cut short resumes); --force trains them again. --deadline-s stops every run
that is still training at that many seconds from the start (its record says so), so that a grid ends in time.
"""

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FULL = dict(attention_q_fraction=1.0, attention_kv_fraction=1.0, feed_forward_fraction=1.0)
# name: config overrides of the tiny preset (None: local attention only); TRAINING_OPTIONS among them are the
# training's, not the config's
VARIANTS = {
    "preset": {},
    "full": FULL,
    "local": None,
    "paper": dict(router_one_sided_gradient=False),
    "explore": dict(router_exploration=0.125),
    "leak": dict(router_one_sided_leak=0.1),
    "noise": dict(router_noise=1.0),
    "zero_heavy": dict(heavy_output_init=0.0),
    "slow_router": dict(router_lr_scale=0.1),
}
TRAINING_OPTIONS = ("router_lr_scale",)
DEFAULT_VARIANTS = ["preset", "full", "paper", "explore", "local:0"]
THRESHOLD = 0.95


def build_model(variant, seed, overrides=None):
    import torch

    from colt5_hf import CoLT5Config, CoLT5ForConditionalGeneration
    from colt5_hf.synthetic import switch_off_heavy_branch

    fields = {key: value for key, value in {**(VARIANTS[variant] or {}), **(overrides or {})}.items()
              if key not in TRAINING_OPTIONS}
    config = CoLT5Config.from_preset("tiny", dropout_rate=0.0, encoder_compile="off", **fields)
    torch.manual_seed(seed)
    model = CoLT5ForConditionalGeneration(config)
    if VARIANTS[variant] is None:
        switch_off_heavy_branch(model)
    return model


def kept_tokens(model, data, device):
    """{router ("<layer>.q", "<layer>.kv", "<layer>.ff"): (b, n) bool, the tokens it keeps} in one encoder pass."""
    import torch

    with torch.no_grad(), model.record_routing() as routing:
        model.encoder(input_ids=data.input_ids.to(device))
    kept = {}
    for name, calls in routing.items():
        parts = name.split(".")  # encoder.block.<i>.attention.q_router / .kv_router / feed_forward.router
        label = f"{parts[2]}.{ {'q_router': 'q', 'kv_router': 'kv', 'router': 'ff'}[parts[-1]] }"
        picked = calls[0]  # a route's positions are distinct: the invalid slots' False lands on no valid slot's True
        kept[label] = torch.zeros(data.input_ids.shape, dtype=torch.bool, device=device).scatter(
            1, picked.indices[:, 0], picked.valid[:, 0])
    return kept


def item_mask(data, device):
    """(b, n) bool: the answer's tokens (data.items)."""
    import torch

    positions = data.items.to(device)
    return torch.zeros(data.input_ids.shape, dtype=torch.bool, device=device).scatter(
        1, positions.clamp(min=0), positions >= 0)


def item_recall(model, data, device):
    """For every encoder router: the share of the answer's tokens among those it keeps, averaged over the examples."""
    items = item_mask(data, device)
    return {label: ((kept & items).sum(1) / items.sum(1)).mean().item()
            for label, kept in kept_tokens(model, data, device).items()}


def recall_by_token(model, data, device):
    """For every encoder router: {item character: share of its occurrences (as an item) that the router keeps}.
    In the first layer a router scores a token by its embedding alone, so it keeps every occurrence of a character
    or none (a character it never keeps there gets no gradient of its own)."""
    from colt5_hf import synthetic

    items, ids = item_mask(data, device), data.input_ids.to(device)
    return {
        label: {chr(token - synthetic.BYTE_OFFSET): round(kept[items & (ids == token)].float().mean().item(), 3)
                for token in ids[items].unique().tolist()}
        for label, kept in kept_tokens(model, data, device).items()
    }


def evaluate(model, data, device, batch_size):
    """Exact match (answer and end of sequence, argmax under teacher forcing: what greedy decoding gets right) and
    the mean loss."""
    import torch

    model.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for start in range(0, len(data.input_ids), batch_size):
            input_ids = data.input_ids[start:start + batch_size].to(device)
            labels = data.labels[start:start + batch_size].to(device)
            output = model(input_ids=input_ids, labels=labels)
            correct += (output.logits.argmax(-1) == labels).all(-1).sum().item()
            loss += output.loss.item() * len(labels)
    model.train()
    return correct / len(data.input_ids), loss / len(data.input_ids)


def train_run(task, variant, seed, *, length=512, steps=3000, batch_size=32, learning_rate=5e-4, warmup=100,
              eval_every=100, eval_examples=256, device="cpu", deadline=None, stable_evals=None, overrides=None,
              threads=None, return_model=False, filler=None, save_model=None, progress=None):
    """Train one model; returns its record. AdamW (no weight decay), linear warmup then a constant rate, gradients
    clipped at norm 1 (Trainer's defaults but the schedule). The data follow the model's geometry (its reach and
    position buckets). `stable_evals`: stop once that many evaluations in a row are at >= 95%; `deadline`: a
    time.time() after which training stops. `overrides`: config fields on top of the variant's. `return_model`:
    return (record, trained model); `save_model`: a path to save its state dict at; `progress`: called with the
    record so far (marked unfinished) after every evaluation."""
    import torch

    from colt5_hf import synthetic

    if threads is not None:
        torch.set_num_threads(threads)
    model = build_model(variant, seed, overrides).to(device).train()
    geometry = synthetic.Geometry.of(model.config)
    parameters = [p for p in model.parameters() if p.requires_grad]
    router_lr_scale = {**(VARIANTS[variant] or {}), **(overrides or {})}.get("router_lr_scale", 1.0)
    routers = {id(module.weight) for module in model.modules() if type(module).__name__ == "CoLT5Router"}
    groups = [{"params": [p for p in parameters if id(p) not in routers]},
              {"params": [p for p in parameters if id(p) in routers], "lr": learning_rate * router_lr_scale}]
    optimizer = torch.optim.AdamW([group for group in groups if group["params"]], lr=learning_rate,
                                  weight_decay=0.0, **({"fused": True} if device.startswith("cuda") else {}))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup)))
    filler = filler or synthetic.FILLER
    eval_data = synthetic.generate(task, eval_examples, synthetic.EVAL_SEED, length, geometry, filler=filler)
    recall_data = synthetic.generate(task, min(64, eval_examples), synthetic.EVAL_SEED, length, geometry,
                                     filler=filler)
    curve, reached, stopped, train_seconds, above = [], None, None, 0.0, 0
    loss_sum = torch.zeros((), device=device)  # summed on the device: no wait for the GPU at every step

    def evaluation(step, steps_since):
        nonlocal reached, above
        accuracy, eval_loss = evaluate(model, eval_data, device, batch_size)
        point = {"step": step, "accuracy": accuracy, "eval_loss": eval_loss,
                 "train_loss": loss_sum.item() / steps_since if steps_since else None, "seconds": train_seconds}
        if VARIANTS[variant] is not None:
            point["item_recall"] = item_recall(model, recall_data, device)
        loss_sum.zero_()
        curve.append(point)
        above = above + 1 if accuracy >= THRESHOLD else 0
        if reached is None and accuracy >= THRESHOLD:
            reached = step
        if progress is not None:
            progress(record("unfinished"))
        return accuracy

    def record(stopped):
        return {
            "task": task, "variant": variant, "seed": seed, "length": length, "config": VARIANTS[variant],
            "overrides": overrides or {}, "geometry": vars(geometry), "filler": filler, "steps": steps,
            "steps_done": curve[-1]["step"], "batch_size": batch_size, "learning_rate": learning_rate,
            "warmup": warmup, "device": device, "stopped": stopped, "steps_to_threshold": reached,
            "threshold": THRESHOLD, "final_accuracy": curve[-1]["accuracy"],
            "best_accuracy": max(point["accuracy"] for point in curve), "train_seconds": train_seconds,
            "step_seconds": train_seconds / max(1, curve[-1]["step"]),
            "calibration": synthetic.calibration(task, length, geometry), "curve": curve,
        }

    evaluation(0, 0)
    last_eval = 0
    for step in range(1, steps + 1):
        start = time.perf_counter()
        data = synthetic.batch(task, batch_size, seed, step, length, geometry, filler)
        loss = model(input_ids=data.input_ids.to(device), labels=data.labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        train_seconds += time.perf_counter() - start
        late = deadline is not None and time.time() > deadline
        if step % eval_every == 0 or step == steps or late:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            evaluation(step, step - last_eval)
            last_eval = step
            if stable_evals and above >= stable_evals:
                stopped = "stable"
                break
        if late:
            stopped = "deadline"
            break
    result = record(stopped)
    if VARIANTS[variant] is not None:
        result["final_recall_by_token"] = recall_by_token(model, recall_data, device)
    if save_model:
        result["model"] = str(save_model)
        torch.save(model.state_dict(), save_model)
    return (result, model) if return_model else result


def run_path(out, task, variant, seed, length):
    return Path(out) / "runs" / str(length) / f"{task}.{variant}.seed{seed}.json"


def job(args_dict, task, variant, seed, deadline):
    """One run in its own process; writes its JSON and returns its path."""
    args = argparse.Namespace(**args_dict)
    device = "cpu" if args.cpu else "cuda"
    path = run_path(args.out, task, variant, seed, args.length)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(record, target):
        temporary = target.with_name(target.name + ".tmp")
        temporary.write_text(json.dumps(record, indent=1))
        temporary.replace(target)  # never a half-written file

    partial = path.with_suffix(".partial")
    record = train_run(task, variant, seed, length=args.length, steps=args.steps, batch_size=args.batch_size,
                       learning_rate=args.learning_rate, warmup=args.warmup, eval_every=args.eval_every,
                       eval_examples=args.eval_examples, device=device, deadline=deadline,
                       stable_evals=args.stable_evals, overrides=args.set, threads=args.threads, filler=args.filler,
                       save_model=path.with_suffix(".pt") if args.save_models else None,
                       progress=lambda record: write(record, partial))
    write(record, path)
    partial.unlink(missing_ok=True)
    return str(path)


# ------------------------------------------------------------------------------------------------ table and plot


def load_records(out):
    """The finished runs' records, and the last evaluation of runs that did not finish (a grid killed from outside:
    marked stopped "unfinished")."""
    finished = sorted(Path(out).glob("runs/*/*.json"))
    unfinished = [path for path in sorted(Path(out).glob("runs/*/*.partial"))
                  if not path.with_suffix(".json").exists()]
    return [json.loads(path.read_text()) for path in finished + unfinished]


def group(records):
    groups = {}
    for record in records:
        groups.setdefault((record["length"], record["task"], record["variant"]), []).append(record)
    return groups


def order_key(length, task, variant):
    """Rows by length, then task as in synthetic.TASKS, then variant as in VARIANTS (others last, by name)."""
    from colt5_hf.synthetic import TASKS

    return (length, TASKS.index(task) if task in TASKS else len(TASKS), task,
            list(VARIANTS).index(variant) if variant in VARIANTS else len(VARIANTS), variant)


def table(records):
    """Markdown: per length, task and variant, the seeds at >= 95%, the steps they took (median, worst), the final and
    the worst accuracy, and the steps relative to full routing's median."""
    groups = group(records)
    lines = ["| length | task | variant | seeds >= 95% | steps to 95% (median / max) | vs full | final accuracy "
             "(mean / min) | shortcut / local ceilings |", "|---|---|---|---|---|---|---|---|"]
    for (length, task, variant), runs in sorted(groups.items(), key=lambda item: order_key(*item[0])):
        reached = [r["steps_to_threshold"] for r in runs if r["steps_to_threshold"] is not None]
        full = [r["steps_to_threshold"] for r in groups.get((length, task, "full"), [])
                if r["steps_to_threshold"] is not None]
        steps = f"{statistics.median(reached):.0f} / {max(reached)}" if reached else "-"
        ratio = (f"{statistics.median(reached) / statistics.median(full):.2f}x"
                 if reached and full and len(reached) == len(runs) else "-")
        finals = [r["final_accuracy"] for r in runs]
        calibration = runs[0]["calibration"]
        budget = f"{max(r['steps'] for r in runs)} steps"
        cut = [r["steps_done"] for r in runs if r["stopped"] in ("deadline", "unfinished")]
        if cut:  # runs stopped before their budget without reaching 95% for good
            budget += f"; {len(cut)} cut at {min(cut)}-{max(cut)}"
        lines.append(f"| {length} | {task} | {variant} | {len(reached)}/{len(runs)} (of {budget}) | {steps} | "
                     f"{ratio} | {100 * statistics.fmean(finals):.1f}% / {100 * min(finals):.1f}% | "
                     f"{100 * calibration['shortcut']:.0f}% / {100 * calibration['local']:.0f}% |")
    return "\n".join(lines)


def plot(records, path):
    """One panel per (task, variant): every seed's accuracy curve, the shortcut and local ceilings dashed."""
    from matplotlib.figure import Figure

    groups = group(records)
    rows = sorted({(length, task) for length, task, _ in groups}, key=lambda row: order_key(*row, "preset"))
    columns = [v for v in VARIANTS if any(key[2] == v for key in groups)]
    columns += sorted({key[2] for key in groups} - set(columns))
    figure = Figure(figsize=(3.2 * len(columns), 2.4 * len(rows)), layout="constrained")
    axes = figure.subplots(len(rows), len(columns), squeeze=False, sharey=True)
    for i, (length, task) in enumerate(rows):
        for j, variant in enumerate(columns):
            ax = axes[i][j]
            runs = groups.get((length, task, variant), [])
            for run in sorted(runs, key=lambda r: r["seed"]):
                ax.plot([p["step"] for p in run["curve"]], [p["accuracy"] for p in run["curve"]], linewidth=1,
                        label=f"seed {run['seed']}")
            if runs:
                calibration = runs[0]["calibration"]
                ax.axhline(calibration["shortcut"], color="grey", linestyle="--", linewidth=0.8)
                ax.axhline(calibration["local"], color="grey", linestyle=":", linewidth=0.8)
            ax.axhline(THRESHOLD, color="black", linewidth=0.5)
            ax.set_ylim(0, 1.02)
            if runs and i == 0 and j == 0:
                ax.legend(fontsize=6, loc="lower right")
            ax.set_title(f"{task} {length}: {variant}", fontsize=9)
            if i == len(rows) - 1:
                ax.set_xlabel("step")
            if j == 0:
                ax.set_ylabel("exact match")
    figure.savefig(path, dpi=90)
    return path


def report(out):
    records = load_records(out)
    if not records:
        raise SystemExit(f"no runs under {out}/runs")
    text = table(records)
    (Path(out) / "routing_tasks.md").write_text(text + "\n")
    print(text)
    try:
        curves = plot(records, Path(out) / "routing_tasks.png")
    except ImportError:  # a machine without matplotlib keeps the records: --from-json draws them elsewhere
        curves = "not drawn (no matplotlib here; --from-json elsewhere)"
    print(f"\n{len(records)} runs; table {Path(out) / 'routing_tasks.md'}, curves {curves}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=None, help="default: the suite (synthetic.SUITE)")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, metavar="VARIANT[:SEEDS]",
                        help=f"of {', '.join(VARIANTS)}; local:0,1 runs seeds 0 and 1 only (default: --seeds)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    # 5e-4: at 1e-3 full attention itself stays stuck on chain's hard seeds (docs/routing.md)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-examples", type=int, default=256)
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, one process each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even where there is a GPU")
    parser.add_argument("--stable-evals", type=int, default=3,
                        help="stop a run after this many evaluations in a row at >= 95%% (0: never)")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="config fields for every variant, e.g. local_radius=7 (JSON values)")
    parser.add_argument("--filler", default=None,
                        help="filler characters (default: synthetic.FILLER, dots; synthetic.NOISE: lowercase letters)")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="stop every run still training this many seconds after the start")
    parser.add_argument("--force", action="store_true", help="train again runs whose JSON exists")
    parser.add_argument("--save-models", action="store_true", help="save each trained model's state dict (.pt)")
    parser.add_argument("--out", default=None, help="folder (default $OUT or benchmarks/out/routing_tasks)")
    parser.add_argument("--from-json", metavar="FOLDER", help="only the table and the PNG of the runs saved there")
    args = parser.parse_args()
    if args.from_json:
        report(args.from_json)
        return
    import torch

    args.cpu = args.cpu or not torch.cuda.is_available()
    args.set = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.set)}
    if args.tasks is None:
        from colt5_hf.synthetic import SUITE

        args.tasks = list(SUITE)
    args.out = args.out or os.path.join(os.environ.get("OUT", "benchmarks/out"), "routing_tasks")
    variants = {}
    for spec in args.variants:
        name, _, seeds = spec.partition(":")
        if name not in VARIANTS:
            parser.error(f"unknown variant {name!r}; the variants are {', '.join(VARIANTS)}")
        variants[name] = [int(seed) for seed in seeds.split(",")] if seeds else args.seeds
    # seed by seed: a grid stopped by --deadline-s cuts the last seeds of every task and variant alike
    runs = [(task, variant, seed) for seed in sorted({s for seeds in variants.values() for s in seeds})
            for task in args.tasks for variant, seeds in variants.items() if seed in seeds
            if args.force or not run_path(args.out, task, variant, seed, args.length).exists()]
    start = time.time()
    deadline = None if args.deadline_s is None else start + args.deadline_s
    print(f"{len(runs)} runs, {args.jobs} at once, on {'the CPU' if args.cpu else torch.cuda.get_device_name()}",
          flush=True)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        futures = {pool.submit(job, vars(args), *run, deadline): run for run in runs}
        for future in concurrent.futures.as_completed(futures):
            record = json.loads(Path(future.result()).read_text())
            print(f"{time.time() - start:6.0f}s  {record['task']:>8} {record['variant']:>12} seed {record['seed']}: "
                  f"{100 * record['final_accuracy']:.1f}% after {record['steps_done']} steps "
                  f"({1000 * record['step_seconds']:.0f} ms/step), >= 95% at "
                  f"{record['steps_to_threshold']}", flush=True)
    report(args.out)


if __name__ == "__main__":
    main()
