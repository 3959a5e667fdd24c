#!/usr/bin/env bash
# On a machine with 2 GPUs, checks that DDP and FSDP (accelerate launch) train the same model as one GPU, through
# examples/train_multi_gpu.py and through the `colt5-hf train` command; then the 2-GPU device_map test and the CUDA
# Trainer mixed-precision tests. Logs and run records go to $OUT (default runs/multi-gpu).
#
#     bash scripts/check_multi_gpu.sh    # defaults: STEPS=10 LENGTH=2048 CONFIG=configs/colt5-base.json, float32
#
# Float32 and 10 steps by default: runs that differ only in the order of their gradient sums give the same losses to
# about 1e-4 for 10 steps and then drift apart (2 x H200: up to 3% by step 15), so longer runs compare less.
set -u
OUT=${OUT:-runs/multi-gpu}
WORK=${WORK:-/tmp/colt5-multi-gpu}
STEPS=${STEPS:-10}
LENGTH=${LENGTH:-2048}
CONFIG=${CONFIG:-configs/colt5-base.json}
PRECISION=${PRECISION:-}  # --bf16 or --fp16 for mixed precision (then RTOL=2e-2: the runs round differently)
RTOL=${RTOL:-1e-3}
LR=${LR:-3e-4}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT" "$WORK"
log=$OUT/multi_gpu.log
status=0
run() {  # run "label" command...: log it, time it, remember a failure
  local label=$1; shift
  echo "=== $label: $*" | tee -a "$log"
  local start=$SECONDS
  "$@" >>"$log" 2>&1 || { echo "FAILED ($?): $label" | tee -a "$log"; status=1; }
  echo "--- $label took $((SECONDS - start)) s" | tee -a "$log"
}
nvidia-smi --query-gpu=index,name,memory.total --format=csv | tee -a "$log"

# 1. examples/train_multi_gpu.py: global batch 16 in every run, dropout off
ARGS="--config $CONFIG --source-length $LENGTH --target-length 64 --max-steps $STEPS --learning-rate $LR $PRECISION"
run "one GPU" env CUDA_VISIBLE_DEVICES=0 python3 examples/train_multi_gpu.py train --output-dir "$WORK/one" --per-device-batch 8 --grad-accum 2 $ARGS
run "DDP, 2 GPUs" accelerate launch --config_file accelerate_configs/ddp.yaml examples/train_multi_gpu.py train \
  --output-dir "$WORK/ddp" --per-device-batch 8 $ARGS
run "FSDP, 2 GPUs" accelerate launch --config_file accelerate_configs/fsdp.yaml examples/train_multi_gpu.py train \
  --output-dir "$WORK/fsdp" --per-device-batch 8 $ARGS
run "compare" python3 examples/train_multi_gpu.py compare "$WORK/one" "$WORK/ddp" "$WORK/fsdp" \
  --source-length "$LENGTH" --target-length 64 --rtol "$RTOL" --eval-samples 4
cp "$WORK"/one/run.json "$OUT/one.json" 2>/dev/null; cp "$WORK"/ddp/run.json "$OUT/ddp.json" 2>/dev/null
cp "$WORK"/fsdp/run.json "$OUT/fsdp.json" 2>/dev/null

# 2. the colt5-hf train command: demo task, tiny preset, dropout off, global batch 16
# few steps: runs that sum gradients in another order drift apart after about 10 updates (see accelerate_configs/README.md)
CLI="train --model colt5-tiny --set dropout_rate=0.0 --demo-task --steps 8 --eval-steps 4 --eval-examples 64 $PRECISION \
  --quiet --overwrite-output-dir"
run "colt5-hf train, one GPU" env CUDA_VISIBLE_DEVICES=0 python3 -m colt5_hf.cli $CLI --batch-size 16 --output-dir "$WORK/cli-one"
run "colt5-hf train, DDP" accelerate launch --config_file accelerate_configs/ddp.yaml -m colt5_hf.cli $CLI \
  --batch-size 8 --output-dir "$WORK/cli-ddp"
run "colt5-hf train, FSDP" accelerate launch --config_file accelerate_configs/fsdp.yaml -m colt5_hf.cli $CLI \
  --batch-size 8 --output-dir "$WORK/cli-fsdp"
run "colt5-hf train: compare and reload" python3 - "$WORK" "$RTOL" <<'EOF'
import json, sys
from pathlib import Path
import torch
from colt5_hf import CoLT5ForConditionalGeneration

work = Path(sys.argv[1])
runs = {name: work / f"cli-{name}" for name in ("one", "ddp", "fsdp")}
inputs = {"input_ids": torch.randint(2, 200, (2, 64), generator=torch.Generator().manual_seed(0)),
          "decoder_input_ids": torch.randint(2, 200, (2, 8), generator=torch.Generator().manual_seed(1))}
reference = None
for name, folder in runs.items():
    state = json.loads(max(folder.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name[11:]))
                       .read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    evals = [entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry]
    model = CoLT5ForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        cpu = model(**inputs).logits
        gpu = model.to("cuda")(**{k: v.cuda() for k, v in inputs.items()}).logits.cpu()
    print(f"{name:5s} train losses {losses} eval losses {evals} | reloaded: CPU vs GPU logits max diff "
          f"{(cpu - gpu).abs().max():.2e}")
    if reference is None:
        reference = losses, evals
    else:
        worst = max(abs(a - b) / abs(b) for a, b in zip(losses + evals, reference[0] + reference[1]))
        print(f"      largest relative difference from one GPU: {worst:.2e}")
        assert worst < float(sys.argv[2]), name
EOF

# 3. tests that need CUDA or 2 GPUs
run "pytest: 2-GPU device_map" python3 -m pytest -q -p no:cacheprovider tests/test_ecosystem.py -k two_gpus -rA
run "pytest: CUDA Trainer fp16/bf16 (one GPU)" env CUDA_VISIBLE_DEVICES=0 python3 -m pytest -q -p no:cacheprovider \
  tests/test_ecosystem.py -k mixed_precision_on_cuda -rA
grep -E "FAILED|passed|failed|^=== |took|largest|losses|run  |max \|" "$log" | tail -60
exit $status
