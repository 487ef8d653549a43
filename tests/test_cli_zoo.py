"""`abc-tvm zoo`: writes a bundled model as canonical ONNX; bad input is one stderr line, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from abc_tvm import pattern

SCRIPT = Path(sys.executable).with_name("abc-tvm")  # the venv's console script


def _zoo(*args: str, cwd: Path, script: bool = False) -> subprocess.CompletedProcess:
    cmd = [str(SCRIPT)] if script else [sys.executable, "-m", "abc_tvm.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*cmd, "zoo", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def test_zoo_resnet20_writes_canonical_onnx(tmp_path):
    (tmp_path / "tmp").mkdir()
    r = _zoo("abc_resnet20", "-M", "2", "-N", "2", "-o", "tmp/x.onnx", cwd=tmp_path,
             script=SCRIPT.exists())
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "wrote tmp/x.onnx" in r.stdout
    model = onnx.load(os.fspath(tmp_path / "tmp" / "x.onnx"))
    onnx.checker.check_model(model, full_check=True)
    blocks = pattern.check_canonical(model)
    assert len(blocks) == 18
    assert {(b.M, b.N, b.act, b.alpha_kind) for b in blocks} == {(2, 2, "bipolar", "layer")}
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 32, 32]


def test_zoo_options(tmp_path, ort_run):
    r = _zoo("abc_resnet20", "-M", "1", "-N", "3", "--act", "unipolar", "--channelwise",
             "--image-size", "40", "--num-classes", "7", "--batch", "2", "--seed", "7",
             "-o", "y.onnx", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    model = onnx.load(os.fspath(tmp_path / "y.onnx"))
    blocks = pattern.check_canonical(model)
    assert {(b.M, b.N, b.act, b.alpha_kind) for b in blocks} == {(1, 3, "unipolar", "channel")}
    x = np.random.default_rng(0).uniform(0, 1, (2, 3, 40, 40)).astype(np.float32)
    assert ort_run(model, x).shape == (2, 7)


def _assert_clean_failure(r: subprocess.CompletedProcess, out: Path) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("abc-tvm zoo: error:"), lines[0]
    assert not out.exists()


@pytest.mark.parametrize("args,message", [
    (["abc_resnet20", "-M", "9"], "M must be an integer from 1 to 8"),
    (["abc_resnet20", "-N", "0"], "N must be an integer from 1 to 8"),
    (["abc_resnet99"], "unknown model 'abc_resnet99'"),
    (["abc_resnet20", "--image-size", "2"], "--image-size must be at least 8"),
    (["abc_resnet20", "--image-size", "0"], "--image-size must be at least 8"),
    (["abc_resnet20", "--num-classes", "-1"], "--num-classes must be at least 1"),
    (["abc_resnet20", "--batch", "0"], "--batch must be at least 1"),
], ids=["M9", "N0", "unknown-model", "image-size-2", "image-size-0", "num-classes--1",
        "batch-0"])
def test_zoo_bad_input_is_one_line_exit_2(args, message, tmp_path):
    out = tmp_path / "x.onnx"
    r = _zoo(*args, "-o", str(out), cwd=tmp_path)
    _assert_clean_failure(r, out)
    assert message in r.stderr


def test_zoo_missing_output_directory(tmp_path):
    out = tmp_path / "no" / "such" / "x.onnx"
    r = _zoo("abc_resnet20", "-M", "1", "-N", "1", "-o", str(out), cwd=tmp_path)
    _assert_clean_failure(r, out)
