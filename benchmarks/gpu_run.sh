#!/usr/bin/env bash
# What one call on a GPU machine runs: GPU tests, then the benchmarks, every log and result under $OUT.
# Usage: bash benchmarks/gpu_run.sh [tests] [parts] [routing] [profile] [encoder] [generate] [limits] [train] [multigpu]
#        [routing_tasks]
# (default: all but parts, train and routing_tasks (calls of their own: they fill their budgets) and multigpu, which
# needs 2 GPUs)
# TEST_FILES picks the tests of the tests stage (default: the three GPU test files and the Hub copy of the kernels);
# PYTEST_ARGS adds pytest options ("-n 4": four processes share the GPU, pytest-xdist).
# Wheels for packages the machine lacks are taken from .whl/ if present: datasets, dill and multiprocess for the
# command and its tests; colt5-attention 0.2.2 and its dependencies for the tests that compare against it.
set -u
export PYTHONUNBUFFERED=1 OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
stages=${*:-tests routing profile encoder generate limits}
log=$OUT/run.log
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'triton', triton.__version__)"
} 2>&1 | tee -a "$log"
for stage in $stages; do
  echo "=== $stage $(date -u +%FT%TZ)" | tee -a "$log"
  case $stage in
    tests) timeout ${TESTS_TIMEOUT:-560} python3 -m pytest -o addopts= -v -rfE --tb=short --timeout 400 -p no:cacheprovider ${PYTEST_ARGS:-} ${TEST_FILES:-tests/test_gpu_fast_path.py tests/test_gpu_compile.py tests/test_gpu.py tests/test_ecosystem.py::test_custom_code_copy_of_the_kernels_imports_beside_colt5_hf} > "$OUT/tests.log" 2>&1; grep -E "passed|failed|FAILED|Error" "$OUT/tests.log" | tail -30 | tee -a "$log" ;;
    routing) timeout 60 python3 benchmarks/routing.py 2>&1 | tee -a "$log" ;;
    parts) { timeout 120 python3 benchmarks/parts.py --check && timeout ${PARTS_TIMEOUT:-300} python3 benchmarks/parts.py ${PARTS_ARGS:-}; } 2>&1 | grep -v Warning | tee -a "$log" ;;
    profile) timeout ${PROFILE_TIMEOUT:-120} python3 benchmarks/profile_encoder.py ${PROFILE_ARGS:-} 2>&1 | grep "^== " | tee -a "$log" ;;
    encoder) timeout ${ENCODER_TIMEOUT:-300} python3 benchmarks/encoder.py ${ENCODER_ARGS:-} 2>&1 | tee -a "$log" ;;
    generate) timeout ${GENERATE_TIMEOUT:-240} python3 benchmarks/generate.py ${GENERATE_ARGS:-} 2>&1 | tee -a "$log" ;;
    limits) timeout ${LIMITS_TIMEOUT:-420} python3 benchmarks/limits.py ${LIMITS_ARGS:-} 2>&1 | tail -12 | tee -a "$log" ;;
    train) timeout ${TRAIN_TIMEOUT:-580} python3 benchmarks/train_step.py ${TRAIN_ARGS:-} 2>&1 | tee -a "$log" ;;
    routing_tasks) timeout ${ROUTING_TASKS_TIMEOUT:-580} python3 benchmarks/routing_tasks.py --jobs 16 --deadline-s 480 ${ROUTING_TASKS_ARGS:-} --out "$OUT/routing_tasks" 2>&1 | tail -40 | tee -a "$log" ;;
    multigpu) OUT=$OUT timeout ${MULTIGPU_TIMEOUT:-540} bash scripts/check_multi_gpu.sh 2>&1 | tail -40 | tee -a "$log" ;;
  esac
done
