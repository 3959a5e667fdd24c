#!/usr/bin/env bash
# Runs the test suite on the newest releases of every dependency (the package's own ranges, no constraints) in a fresh
# .venv-latest. With --update, a green run rewrites constraints.txt with the versions it used, which scripts/setup.sh
# and CI then install. torch stays at the CPU build that constraints.txt names (set TORCH_SPEC, e.g. "torch==2.14.1",
# for another): a bare torch requirement would pull the multi-GB CUDA build.
#
#   bash scripts/test-latest.sh            # pytest arguments may follow, e.g. -x tests/test_modeling.py
#   bash scripts/test-latest.sh --update
set -euo pipefail
cd "$(dirname "$0")/.."

update=0
if [ "${1:-}" = "--update" ]; then
    update=1
    shift
fi
rm -rf .venv-latest
python3 -m venv .venv-latest
pip() {
    .venv-latest/bin/python -m pip --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2)
}
pip install -q "${TORCH_SPEC:-torch==$(sed -n 's/^torch==//p' constraints.txt)}"
pip install -q --upgrade -e ".[test]"
pip list --format=freeze --exclude-editable | grep -iE '^(torch|transformers|peft|accelerate|datasets|safetensors)=='
.venv-latest/bin/python -m pytest "$@"

if [ "$update" = 1 ]; then
    {
        sed -n '1,2p' constraints.txt
        pip freeze --exclude-editable | sed 's/^\(torch==[^+]*\)+.*/\1/'
    } > constraints.txt.new
    mv constraints.txt.new constraints.txt
    echo "constraints.txt updated"
fi
