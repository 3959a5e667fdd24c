#!/usr/bin/env bash
# Creates .venv (if missing) and installs colt5-hf with its test dependencies into it, at the versions of
# constraints.txt (those the test suite last passed with), so that every fresh machine gets the same versions. Idempotent
# and quiet: a second run with unchanged pyproject.toml and constraints.txt does nothing. Needs only python3 (3.10 or
# newer). scripts/test-latest.sh runs the suite on the newest releases instead.
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
wanted="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] \
    && .venv/bin/python -c "import importlib.metadata as m; m.version('colt5-hf')" 2>/dev/null; then
    exit 0
fi

# The pins were resolved on Python 3.11; another Python may need other releases of the same packages.
constraints=.venv/constraints.txt
if .venv/bin/python -c "import sys; sys.exit(sys.version_info[:2] != (3, 11))"; then
    cp constraints.txt "$constraints"
else
    echo "setup.sh: Python $(.venv/bin/python -c 'import platform; print(platform.python_version())') is not the" \
        "Python 3.11 that constraints.txt was resolved on: installing the newest releases instead" >&2
    : > "$constraints"
fi
if .venv/bin/python -c "import torch" 2>/dev/null; then
    sed -i '/^torch==/d' "$constraints"  # keep the torch that is there (a CUDA build, say)
else
    pip install -q -c "$constraints" "torch==$(sed -n 's/^torch==//p' constraints.txt)"
fi
pip install -q -c "$constraints" -e ".[test]"
echo "$wanted" > "$stamp"
