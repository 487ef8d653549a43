"""`abc-tvm compile` and `abc-tvm run` as a user meets them: outputs, and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from abc_tvm.export import to_onnx
from abc_tvm.nn import ABCConv2d


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "abc_tvm.cli", *args], capture_output=True,
                          text=True, env=env, timeout=600)


def assert_user_error(proc: subprocess.CompletedProcess, command: str, *words: str) -> None:
    """Exit 2, exactly one stderr line naming the problem, no traceback."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"abc-tvm {command}: error:"), lines[0]
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        ABCConv2d(6, 8, 3, padding=1, M=2, N=2), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        ABCConv2d(8, 8, 3, stride=2, padding=1, M=3, N=1, channelwise=True, act="unipolar"),
    )
    path = tmp_path_factory.mktemp("m") / "small.onnx"
    to_onnx(net, torch.rand(1, 6, 10, 10), path)
    return path


@pytest.fixture(scope="module")
def compiled(small_model, tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("c")
    so, report = out / "small.so", out / "report.json"
    proc = cli("compile", str(small_model), "--target", "x86", "-o", str(so),
               "--report", str(report), "--require-binary")
    assert proc.returncode == 0, proc.stderr
    assert "2 ABC layer(s)" in proc.stdout
    assert "WARNING" not in proc.stderr, proc.stderr
    return so, report


def test_compile_writes_so_manifest_and_report(compiled, small_model):
    so, report_path = compiled
    manifest = json.loads(Path(str(so) + ".json").read_text())
    assert manifest["inputs"] == [{"name": "input", "shape": [1, 6, 10, 10], "dtype": "float32"}]
    assert manifest["outputs"][0]["shape"] == [1, 8, 5, 5]
    assert manifest["target"]["name"] == "x86"
    import hashlib
    assert manifest["sha256"] == hashlib.sha256(so.read_bytes()).hexdigest()
    report = json.loads(report_path.read_text())
    layers = report["abc_layers"]
    assert [(a["M"], a["N"], a["alpha"], a["act"]) for a in layers] == [
        (2, 2, "layer", "bipolar"), (3, 1, "channel", "unipolar")]
    assert all("kernel_impl" in a and a["name"] for a in layers)
    float_ops = {f["op"] for f in report["float_ops"]}
    assert "Conv" not in float_ops
    # x86 fuses the BatchNorm/ReLU after each block into its kernel: listed there, not as float
    fused = [n for a in layers for n in a["fused_ops"]]
    assert any("BatchNormalization" in n or "bn" in n.lower() for n in fused), fused
    assert not set(fused) & {f["name"] for f in report["float_ops"]}


def test_run_matches_onnxruntime(compiled, small_model, tmp_path):
    so, _ = compiled
    x = np.random.default_rng(1).uniform(-0.5, 1.5, (1, 6, 10, 10)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    proc = cli("run", str(so), "--input", str(tmp_path / "x.npy"),
               "--output", str(tmp_path / "y.npy"))
    assert proc.returncode == 0, proc.stderr
    y = np.load(tmp_path / "y.npy")
    ref = ort.InferenceSession(str(small_model)).run(None, {"input": x})[0]
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    summary = cli("run", str(so), "--input", str(tmp_path / "x.npy"))
    assert summary.returncode == 0 and "output shape [1, 8, 5, 5]" in summary.stdout


def test_run_refuses_tampered_so(compiled, tmp_path):
    so, _ = compiled
    bad = tmp_path / "bad.so"
    data = bytearray(so.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    Path(str(bad) + ".json").write_text(Path(str(so) + ".json").read_text())
    np.save(tmp_path / "x.npy", np.zeros((1, 6, 10, 10), np.float32))
    assert_user_error(cli("run", str(bad), "--input", str(tmp_path / "x.npy")), "run", "sha256")


def test_run_refuses_wrong_shape_and_dtype(compiled, tmp_path):
    so, _ = compiled
    np.save(tmp_path / "x.npy", np.zeros((1, 6, 9, 10), np.float32))
    assert_user_error(cli("run", str(so), "--input", str(tmp_path / "x.npy")), "run", "shape")
    np.save(tmp_path / "x64.npy", np.zeros((1, 6, 10, 10), np.float64))
    assert_user_error(cli("run", str(so), "--input", str(tmp_path / "x64.npy")), "run",
                      "float32")


def _bad_compile(tmp_path: Path, model: Path | str, *words: str, target: str = "x86",
                 env: dict | None = None) -> None:
    out = tmp_path / "out.so"
    proc = cli("compile", str(model), "--target", target, "-o", str(out), env=env)
    assert_user_error(proc, "compile", *words)
    assert not out.exists() and not Path(str(out) + ".json").exists()
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".so"], "partial output left"


def test_compile_rejects_garbage_and_truncated(tmp_path, small_model):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07 this is not a protobuf \xff\xff\xff")
    _bad_compile(tmp_path, garbage, "onnx")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(small_model.read_bytes()[: small_model.stat().st_size // 2])
    _bad_compile(tmp_path, truncated)
    _bad_compile(tmp_path, tmp_path / "missing.onnx", "no such")


def _tiny_graph(opset: int = 17, dim: int | str = 4, drop_init: bool = False) -> onnx.ModelProto:
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 3, 1, 1], np.ones(6, np.float32))
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, dim, 4])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 2, dim, 4])
    node = helper.make_node("Conv", ["input", "w"], ["output"])
    graph = helper.make_graph([node], "g", [x], [y], [] if drop_init else [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_compile_rejects_opset_dynamic_shape_missing_initializer(tmp_path):
    for name, model, words in [
        ("opset.onnx", _tiny_graph(opset=7), ("opset",)),
        ("dynamic.onnx", _tiny_graph(dim="H"), ("dynamic", "input")),
        ("noinit.onnx", _tiny_graph(drop_init=True), ("initializer",)),
    ]:
        onnx.save(model, tmp_path / name)
        _bad_compile(tmp_path, tmp_path / name, *words)


def test_compile_rejects_bases_not_pm1(tmp_path, small_model):
    model = onnx.load(small_model)
    for t in model.graph.initializer:
        if t.name.endswith(".bases"):
            arr = onnx.numpy_helper.to_array(t).copy()
            arr.reshape(-1)[0] = 0.5
            t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
            break
    onnx.save(model, tmp_path / "bad_bases.onnx")
    _bad_compile(tmp_path, tmp_path / "bad_bases.onnx", "±1")


def test_compile_rejects_unknown_target_and_missing_toolchains(tmp_path, small_model):
    _bad_compile(tmp_path, small_model, "unknown target", target="riscv")
    bare = {**os.environ, "PATH": str(tmp_path)}  # neither aarch64 g++ nor nvcc on PATH
    _bad_compile(tmp_path, small_model, "aarch64-linux-gnu-g++", target="arm", env=bare)
    _bad_compile(tmp_path, small_model, "nvcc", target="cuda", env=bare)


def test_version_names_package_tvm_and_this_cpus_popcount():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "abc_tvm.cli", "--version"], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out[0].startswith("abc-tvm 0.")
    assert out[1].startswith("apache-tvm 0.27") and "apache-tvm-ffi 0.1.14" in out[1]
    assert out[2].startswith("this CPU: ") and "popcount: " in out[2]


def test_host_cpu_reads_popcount_support(tmp_path):
    from abc_tvm.hostcpu import host_cpu

    info = tmp_path / "cpuinfo"
    info.write_text("model name\t: Some CPU\nflags\t\t: fpu sse2 avx2 popcnt\n")
    cpu = host_cpu(info)
    assert cpu.model in ("Some CPU", __import__("platform").processor())
    assert cpu.flags == frozenset({"fpu", "sse2", "avx2", "popcnt"})
    if cpu.machine == "x86_64":
        assert cpu.popcount.startswith("AVX2 without VPOPCNTDQ")
        info.write_text("flags\t: avx2 avx512f avx512_vpopcntdq\n")
        assert host_cpu(info).popcount == "fast: AVX-512 VPOPCNTDQ"


def test_internal_failure_is_a_bug_report_not_a_user_error(tmp_path, small_model, monkeypatch,
                                                           capsys):
    """TVM failing on a module abc-tvm built (as the Larq exports made it) is abc-tvm's bug:
    one line asking for a report, naming the stage and the blocks, exit 3."""
    import tvm

    from abc_tvm import cli as cli_mod
    from abc_tvm import compiler

    def broken(*_a, **_k):
        raise tvm.error.InternalError("Check failed: Invalid SLayout: can't find S in ABCDE")

    monkeypatch.setattr(compiler, "rewrite", broken)
    rc = cli_mod.main(["compile", str(small_model), "--target", "x86", "-o",
                       str(tmp_path / "m.so")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3 and len(err) == 1, err
    assert err[0].startswith("abc-tvm compile: internal error"), err
    for words in ("please report", "binary-block rewrite", "Invalid SLayout", "/0/Conv"):
        assert words in err[0], err
    assert not (tmp_path / "m.so").exists()


def test_binary_looking_layer_left_float_warns_and_require_binary_fails(tmp_path):
    """Binarised planes into a conv whose weight has no ±1 decomposition: a correct model
    that would silently run in float. compile warns with the count and the first reason;
    --require-binary makes it exit 2 naming the layer."""
    from onnx_builders import miss_random_weight

    model, _ = miss_random_weight()
    path = tmp_path / "float_bnn.onnx"
    onnx.save(model, path)
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]  # one per plane
    conv = convs[0]
    proc = cli("compile", str(path), "--target", "x86", "-o", str(tmp_path / "m.so"),
               "--report", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    warning = [ln for ln in proc.stderr.splitlines() if "WARNING" in ln]
    assert len(warning) == 1, proc.stderr
    assert (f"{len(convs)} of {len(convs)} layers that look binary stay float (none became "
            "binary kernels)") in warning[0], warning[0]
    assert conv in warning[0] and "no exact decomposition" in warning[0], warning[0]
    report = json.loads((tmp_path / "r.json").read_text())
    assert [f["layer"] for f in report["binary_looking_float"]] == convs
    strict = tmp_path / "strict.so"
    proc = cli("compile", str(path), "--target", "x86", "-o", str(strict), "--require-binary")
    assert_user_error(proc, "compile", "--require-binary", conv, "looks binary",
                      "no exact decomposition")
    assert not strict.exists()


def test_float_model_is_not_binary_looking(tmp_path):
    """A plain float conv net: nothing looks binary, so no warning beyond 'no ABC conv'."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    path = tmp_path / "float.onnx"
    torch.onnx.export(net, (torch.rand(1, 3, 8, 8),), str(path), dynamo=False, opset_version=17)
    proc = cli("compile", str(path), "--target", "x86", "-o", str(tmp_path / "f.so"),
               "--require-binary")
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" not in proc.stderr and "no ABC convolution" in proc.stderr, proc.stderr
