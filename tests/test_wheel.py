"""The wheel is complete: built from this checkout and installed into a fresh venv (with a
Python other than the suite's when the machine has one), it compiles the zoo's ABC-ResNet-18
M=N=1 with the shipped tuning database applied, and the result runs.

The venv gets the runtime dependencies only (no torch): the model is exported here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _other_python() -> str:
    """A Python 3.11+ other than this one (3.13, 3.12, 3.11 in that order; a pyenv shim
    that refuses to run is skipped for its `pyenv prefix`), else this one."""
    mine = f"{sys.version_info.major}.{sys.version_info.minor}"
    for v in ("3.13", "3.12", "3.11"):
        if v == mine:
            continue
        candidates = [f"python{v}"]
        if shutil.which("pyenv"):
            p = subprocess.run(["pyenv", "prefix", v], capture_output=True, text=True)
            if p.returncode == 0:
                candidates.append(str(Path(p.stdout.strip()) / "bin" / f"python{v}"))
        for exe in candidates:
            try:
                if subprocess.run([exe, "-c", ""], capture_output=True).returncode == 0:
                    return exe
            except OSError:
                continue
    return sys.executable


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(ROOT)], check=True, capture_output=True)
    (whl,) = out.glob("abc_tvm-*.whl")
    return whl


def test_wheel_carries_what_the_package_reads(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for m, level in (("m1n1", "v4"), ("m3n3", "v4"), ("m5n5", "v3")):
        for f in ("database_tuning_record.json", "database_workload.json", "tasks.json"):
            assert f"abc_tvm/tuning_logs/abc_resnet18_{m}_x86-64-{level}/{f}" in names
    assert "abc_tvm/tuning_logs/README.md" in names
    for f in ("abc_run.cc", "run.sh", "README.bundle.md"):
        assert f"abc_tvm/deploy/{f}" in names
    assert {"abc_tvm/relay_passes/abc_rewrite.py", "abc_tvm/schedules/cpu.py"} <= names
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    assert "Requires-Python: >=3.11\n" in zipfile.ZipFile(wheel).read(meta).decode()


def test_wheel_in_a_fresh_venv_compiles_with_the_shipped_tuning(wheel, tmp_path, ort_run,
                                                                max_rel_err):
    import torch

    from abc_tvm.export import to_onnx
    from abc_tvm.models import abc_resnet18

    python = _other_python()
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    bin_ = venv / "bin"
    pip = subprocess.run([str(bin_ / "python"), "-m", "pip", "install", "-q", str(wheel)],
                         capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-2000:]
    version = subprocess.run([str(bin_ / "abc-tvm"), "--version"], capture_output=True,
                             text=True, check=True).stdout
    assert version.startswith("abc-tvm 0.") and "popcount" in version

    model = tmp_path / "r18.onnx"
    to_onnx(abc_resnet18(1, 1, seed=0).eval(), torch.rand(1, 3, 224, 224), model)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run = subprocess.run([str(bin_ / "abc-tvm"), "compile", str(model), "-o",
                          str(tmp_path / "r18.so"), "--report", str(tmp_path / "r.json")],
                         capture_output=True, text=True, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    from abc_tvm import targets
    from abc_tvm.hostcpu import host_cpu

    if targets.x86_level(host_cpu().flags) != "x86-64-v4":  # the m1n1 records are AVX-512's
        assert report["tuning_databases"] == []
        pytest.skip("this CPU has no AVX-512: the shipped M=N=1 database is not for it")
    (db,) = report["tuning_databases"]
    assert Path(db).name == "abc_resnet18_m1n1_x86-64-v4" and str(venv) in db  # the wheel's
    assert report["tuned_kernels"]

    x = np.random.default_rng(0).random((1, 3, 224, 224), np.float32)
    np.save(tmp_path / "x.npy", x)
    subprocess.run([str(bin_ / "abc-tvm"), "run", str(tmp_path / "r18.so"), "--input",
                    str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy")],
                   check=True, capture_output=True, cwd=tmp_path, env=env)
    assert max_rel_err(np.load(tmp_path / "y.npy"), ort_run(str(model), x)) <= 1e-2
