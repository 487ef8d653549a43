"""End to end: exported ABC models compiled for x86, arm and cuda, checked against ONNX Runtime."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import tvm

from abc_tvm.compiler import compile_model
from abc_tvm.export import to_onnx
from abc_tvm.models import abc_resnet18, abc_resnet20
from abc_tvm.nn import ABCConv2d
from abc_tvm.runtime import load


def ort_run(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def compiled_output(model: onnx.ModelProto, x: np.ndarray, tmp_path, target: str = "x86"):
    so = tmp_path / f"m_{target}.so"
    report = compile_model(model, target, so, quiet=True)
    return so, report


@pytest.fixture(scope="module")
def two_layer(tmp_path_factory) -> onnx.ModelProto:
    torch.manual_seed(3)
    net = torch.nn.Sequential(
        ABCConv2d(3, 16, 3, padding=1, M=3, N=2), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        ABCConv2d(16, 8, 3, stride=2, padding=1, M=2, N=3, act="unipolar", channelwise=True),
    )
    return to_onnx(net, torch.rand(2, 3, 12, 12))


@pytest.mark.parametrize("model_fn,M,N,kw", [
    (abc_resnet20, 3, 3, {}),
    (abc_resnet20, 2, 1, {"act": "unipolar", "channelwise": True}),
])
def test_resnet20_agrees_with_ort(model_fn, M, N, kw, tmp_path):
    """Whole networks: same argmax as ONNX Runtime on every batch item, every ABC conv binary."""
    model = to_onnx(model_fn(M, N, seed=1, **kw), torch.rand(1, 3, 32, 32))
    so, report = compiled_output(model, None, tmp_path)
    assert len(report.abc_layers) == 18
    assert not [f for f in report.float_ops if f["op"] == "Conv" and "3" in f["name"][-6:]
                and "shortcut" not in f["name"] and "stem" not in f["name"]]
    rng = np.random.default_rng(0)
    m = load(so)
    for _ in range(3):
        x = rng.uniform(0, 1, (1, 3, 32, 32)).astype(np.float32)
        y, ref = m(x), ort_run(model, x)
        assert y.argmax(1).tolist() == ref.argmax(1).tolist()
        assert np.corrcoef(y.ravel(), ref.ravel())[0, 1] > 0.99


def test_resnet18_small_image_agrees_with_ort(tmp_path):
    model = to_onnx(abc_resnet18(1, 1, num_classes=10, seed=2), torch.rand(1, 3, 64, 64))
    so, report = compiled_output(model, None, tmp_path)
    assert len(report.abc_layers) == 16
    x = np.random.default_rng(1).uniform(0, 1, (1, 3, 64, 64)).astype(np.float32)
    assert load(so)(x).argmax(1).tolist() == ort_run(model, x).argmax(1).tolist()


def test_batch_two_matches_ort(two_layer, tmp_path):
    so, report = compiled_output(two_layer, None, tmp_path)
    assert [(a["M"], a["N"]) for a in report.abc_layers] == [(3, 2), (2, 3)]
    x = np.random.default_rng(2).uniform(-0.5, 1.5, (2, 3, 12, 12)).astype(np.float32)
    y, ref = load(so)(x), ort_run(two_layer, x)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_float_only_model_compiles_with_warning(tmp_path, capfd):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    buf = tmp_path / "f.onnx"
    torch.onnx.export(net, (torch.rand(1, 3, 8, 8),), buf, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"])
    report = compile_model(buf, "x86", tmp_path / "f.so", quiet=True)
    # the canonical form writes the bias as an Add after the conv, as TVM imports it
    assert report.abc_layers == [] and {f["op"] for f in report.float_ops} == {"Conv", "Add",
                                                                               "Relu"}
    assert "no ABC convolution found" in capfd.readouterr().err
    x = np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(load(tmp_path / "f.so")(x), ort_run(str(buf), x), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None,
                    reason="aarch64 cross compiler missing (make setup installs it)")
def test_arm_output_is_aarch64_with_neon_cnt(two_layer, tmp_path):
    so, _ = compiled_output(two_layer, None, tmp_path, "arm")
    head = so.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64
    asm = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(so)], capture_output=True,
                         text=True, check=True).stdout
    assert "\tcnt\t" in asm
    with pytest.raises(ValueError, match="aarch64"):
        load(so)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc missing: cannot build CUDA")
def test_cuda_output_carries_popc_kernels(two_layer, tmp_path):
    so, report = compiled_output(two_layer, None, tmp_path, "cuda")
    assert all(a["word_bits"] == 32 for a in report.abc_layers)
    assert b"__popc" in so.read_bytes()
    if not tvm.cuda(0).exist:
        pytest.skip("compiled and checked for __popc; no CUDA GPU here to run it")
    x = np.random.default_rng(4).uniform(-0.5, 1.5, (2, 3, 12, 12)).astype(np.float32)
    ref = ort_run(two_layer, x)
    np.testing.assert_allclose(load(so)(x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
