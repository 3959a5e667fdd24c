"""The package as a user installs it: a wheel built from the checkout, installed (not editable) into a fresh virtual
environment, runs the `colt5-hf` command from a folder outside the checkout, with the presets it ships.

Cheap and offline: the wheel is built without build isolation from a copy of the sources, and installed without its
dependencies into a venv that reads them from this test's environment (a .pth line naming its site-packages, whose
own .pth files, among them the editable install of this checkout, are not run)."""

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


def run(command, **kwargs):
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=180, **kwargs)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.mark.wheel
def test_the_installed_wheel_trains_a_preset_outside_the_checkout(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    shutil.copytree(ROOT / "colt5_hf", source / "colt5_hf", ignore=shutil.ignore_patterns("__pycache__"))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", tmp_path / "wheels", source])
    wheel, = (tmp_path / "wheels").glob("colt5_hf-*.whl")

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    packages = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    (Path(packages) / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel])

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    installed = run([python, "-c", "import colt5_hf; from colt5_hf import CoLT5Config; "
                     "print(colt5_hf.__file__); print(CoLT5Config.from_preset('large').d_model)"],
                    cwd=elsewhere, env=env).stdout.split()
    assert Path(installed[0]).is_relative_to(venv) and installed[1] == "1024"

    result = run([venv / "bin" / "colt5-hf", "train", "--model", "colt5-tiny", "--demo-task", "--steps", 1,
                  "--output-dir", "out", "--quiet"], cwd=elsewhere, env=env)
    assert json.loads(result.stdout.strip().splitlines()[-1])["steps"] == 1
    assert (elsewhere / "out" / "model.safetensors").is_file()
