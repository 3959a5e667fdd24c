#!/usr/bin/env bash
# Creates .venv (if missing) and installs colt5-hf with its test dependencies into it. Idempotent and quiet: a second
# run with an unchanged pyproject.toml does nothing. Needs only python3 (3.10 or newer).
#
# torch comes first, pinned to the CPU build that this project's machines hold on local disk: a bare torch requirement
# would pull the multi-GB CUDA build from PyPI. To use a GPU, install the CUDA build of torch that matches your driver
# into .venv before running this script; it keeps any torch that is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
pip() {  # quiet: drop the warnings about local index folders that lack a package
    .venv/bin/python -m pip --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2)
}

stamp=.venv/.colt5-hf-setup
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] \
    && .venv/bin/python -c "import importlib.metadata as m; m.version('colt5-hf')" 2>/dev/null; then
    exit 0
fi

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    pip install -q torch==2.13.0
fi
pip install -q -e ".[test]"
echo "$wanted" > "$stamp"
