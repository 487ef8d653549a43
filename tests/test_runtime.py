"""`abc_tvm.runtime`: loading a compiled module, its metadata, calls, and every refusal."""

from __future__ import annotations

import json
import platform
import shutil
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from abc_tvm.compiler import compile_model
from abc_tvm.errors import UserError
from abc_tvm.export import to_onnx
from abc_tvm.nn import ABCConv2d
from abc_tvm.runtime import MANIFEST_DIGEST_KEY, CompiledModel, load, manifest_digest, read_manifest


def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        ABCConv2d(3, 8, 3, padding=1, M=2, N=2), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        ABCConv2d(8, 4, 3, stride=2, padding=1, M=2, N=1, act="unipolar"),
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(onnx, so) of a two-layer ABC model, input [1, 3, 8, 8]."""
    d = tmp_path_factory.mktemp("rt")
    onnx_path, so = d / "tiny.onnx", d / "tiny.so"
    to_onnx(tiny_net(), torch.rand(1, 3, 8, 8), onnx_path)
    compile_model(onnx_path, "x86", so, quiet=True)
    return onnx_path, so


def ort_ref(onnx_path: Path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(onnx_path), opts).run(None, {"input": x})[0]


def reseal(manifest: dict) -> dict:
    """The manifest with its digest recomputed: these tests edit a field on purpose to
    reach the check behind the digest (test_tamper.py checks the digest itself)."""
    return {**manifest, MANIFEST_DIGEST_KEY: manifest_digest(manifest)}


def copy_module(so: Path, dst: Path) -> Path:
    shutil.copy(so, dst)
    shutil.copy(str(so) + ".json", str(dst) + ".json")
    return dst


def test_load_metadata_and_call_match_onnxruntime(tiny):
    onnx_path, so = tiny
    m = load(so, workers=2)
    assert isinstance(m, CompiledModel) and m.name == "tiny" and m.target == "x86"
    assert [(i.name, i.shape, i.dtype) for i in m.inputs] == [("input", (1, 3, 8, 8), "float32")]
    assert [(o.name, o.shape, o.dtype) for o in m.outputs] == [("output", (1, 4, 4, 4),
                                                                "float32")]
    assert m.batch_size == 1
    x = np.random.default_rng(0).uniform(-0.5, 1.5, (1, 3, 8, 8)).astype(np.float32)
    y = m(x)
    assert isinstance(y, np.ndarray) and y.shape == (1, 4, 4, 4)
    ref = ort_ref(onnx_path, x)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert len(m.run(x)) == 1


def test_wrong_inputs_are_refused(tiny):
    m = load(tiny[1], workers=1)
    with pytest.raises(UserError, match="shape"):
        m(np.zeros((1, 3, 8, 7), np.float32))
    with pytest.raises(UserError, match="float32"):
        m(np.zeros((1, 3, 8, 8), np.float64))
    with pytest.raises(UserError, match="1 input"):
        m(np.zeros((1, 3, 8, 8), np.float32), np.zeros((1, 3, 8, 8), np.float32))
    x = np.zeros((1, 3, 8, 8), np.float32)
    x[0, 1, 2, 3] = np.nan
    with pytest.raises(UserError, match="NaN"):
        m.run(x, finite=True)
    m(x)  # without finite=True the caller takes the responsibility
    with pytest.raises(UserError, match="workers"):
        load(tiny[1], workers=0)


def test_tampered_so_is_refused(tiny, tmp_path):
    bad = copy_module(tiny[1], tmp_path / "bad.so")
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256"):
        load(bad)


def test_corrupt_so_with_matching_hash_is_refused(tiny, tmp_path):
    """Someone rewrote both files: the hash matches, but it is no shared library."""
    bad = copy_module(tiny[1], tmp_path / "junk.so")
    bad.write_bytes(b"\x7fELF but not really" + bytes(200))
    manifest = json.loads(Path(str(bad) + ".json").read_text())
    import hashlib
    manifest["sha256"] = hashlib.sha256(bad.read_bytes()).hexdigest()
    Path(str(bad) + ".json").write_text(json.dumps(reseal(manifest)))
    with pytest.raises(UserError, match="cannot load"):
        load(bad)


def test_manifest_problems_are_refused(tiny, tmp_path):
    with pytest.raises(UserError, match="no such module"):
        load(tmp_path / "missing.so")
    lone = tmp_path / "lone.so"
    shutil.copy(tiny[1], lone)
    with pytest.raises(UserError, match="manifest"):
        load(lone)
    broken = copy_module(tiny[1], tmp_path / "broken.so")
    Path(str(broken) + ".json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_manifest(broken)
    nometa = copy_module(tiny[1], tmp_path / "nometa.so")
    manifest = json.loads(Path(str(nometa) + ".json").read_text())
    del manifest["inputs"]
    Path(str(nometa) + ".json").write_text(json.dumps(reseal(manifest)))
    with pytest.raises(UserError, match="inputs"):
        load(nometa)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="checks refusal on an x86_64 host")
@pytest.mark.parametrize(("target", "arch"), [("arm", "aarch64"), ("rpi4", "aarch64"),
                                              ("jetson-orin", "aarch64"), ("armv7", "armv7")])
def test_arm_module_is_refused_on_x86_host(tiny, tmp_path, target, arch):
    arm = copy_module(tiny[1], tmp_path / "arm.so")
    manifest = json.loads(Path(str(arm) + ".json").read_text())
    manifest["target"]["name"] = target
    Path(str(arm) + ".json").write_text(json.dumps(reseal(manifest)))
    with pytest.raises(UserError, match=f"compiled for {arch} .*--target {target}.*x86_64 host"):
        load(arm)


def test_concurrent_callers_get_their_own_answers(tiny):
    """8 threads x 25 calls, each with its own input: no mixed-up or corrupted outputs."""
    onnx_path, so = tiny
    m = load(so, workers=3)
    rng = np.random.default_rng(1)
    xs = [rng.uniform(-0.5, 1.5, (1, 3, 8, 8)).astype(np.float32) for _ in range(8)]
    refs = [m(x) for x in xs]
    for x, ref in zip(xs[:2], refs[:2], strict=True):
        np.testing.assert_allclose(ref, ort_ref(onnx_path, x), rtol=1e-4,
                                   atol=1e-4 * np.abs(ref).max())
    failures: list[str] = []

    def worker(k: int) -> None:
        for _ in range(25):
            y = m(xs[k])
            if not np.array_equal(y, refs[k]):
                failures.append(f"thread {k}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert 1 <= m.vms_created <= 3  # the pool never grows past `workers`
