"""x86 targets other than this machine: psABI levels and LLVM CPU names, builds that carry
only their level's instructions (checked by disassembly) and compute what the host build
computes, manifests that record the CPU features a .so needs, and runtimes that refuse a CPU
without them in one line instead of dying with SIGILL."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_builders as ob
import pytest
from host import cpu_flags
from onnx import TensorProto, helper, numpy_helper

from abc_tvm import deploy, targets
from abc_tvm.compiler import compile_model
from abc_tvm.errors import UserError
from abc_tvm.runtime import load
from abc_tvm.tuning import find_databases

pytestmark = pytest.mark.skipif(
    not {"avx2", "avx512f"} <= cpu_flags(),
    reason="builds every level here and runs them: needs an AVX-512 host")

# AVX-512's footprint in a disassembly: zmm registers, opmask registers, registers 16-31,
# VPOPCNTQ/D (AVX-512 VPOPCNTDQ).
AVX512 = re.compile(r"%zmm|%k[1-7]\b|%[xy]mm(1[6-9]|2\d|3[01])\b|vpopcnt[dq]")
AVX = re.compile(r"%ymm|\bv[a-z0-9]+\s")  # any VEX/EVEX instruction


def _sign_conv_model() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """conv(sign(x), W) with ±1 W, 2 output words per pixel: integers, and NumPy's value."""
    rng = np.random.default_rng(15)
    w = np.where(rng.random((16, 130, 3, 3)) < 0.5, -1.0, 1.0).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Sign", ["x"], ["s"]),
         helper.make_node("Conv", ["s", "w"], ["y"], pads=[1, 1, 1, 1])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 130, 5, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16, 5, 6])],
        [numpy_helper.from_array(w, "w")])
    x = rng.uniform(-1, 1, (2, 130, 5, 6)).astype(np.float32)
    want = ob.conv2d(np.where(x >= 0, 1.0, -1.0), w, stride=(1, 1), pads=(1, 1, 1, 1))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), x, want


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("x86")
    model, _, _ = _sign_conv_model()
    out = {}
    for name in ("x86", "x86-64-v2", "x86-64-v3", "x86-64-v4", "x86:znver3"):
        out[name] = tmp / f"{name.replace(':', '_')}.so"
        report = compile_model(model, name, out[name], quiet=True)
        assert len(report.abc_layers) == 1
    return out


def _disassembly(so: Path) -> str:
    return subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(so)], check=True,
                          capture_output=True, text=True).stdout


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) missing")
def test_each_level_carries_only_its_instructions(builds):
    assert AVX512.search(_disassembly(builds["x86"]))  # this host's build uses AVX-512
    assert AVX512.search(_disassembly(builds["x86-64-v4"]))
    for name in ("x86-64-v3", "x86:znver3"):
        text = _disassembly(builds[name])
        assert not AVX512.search(text), AVX512.search(text).group(0)
        assert "%ymm" in text  # the AVX2 kernel, not a scalar one
    assert not AVX.search(_disassembly(builds["x86-64-v2"]))


def test_every_level_computes_the_host_builds_integers(builds):
    _, x, want = _sign_conv_model()
    for name, so in builds.items():
        np.testing.assert_array_equal(load(so, workers=1)(x), want, err_msg=name)


def test_resnet20_on_avx2_matches_the_host_build(tmp_path):
    """A whole model with float glue: outputs to float rounding, the same top class."""
    r = subprocess.run([sys.executable, "-m", "abc_tvm.cli", "zoo", "abc_resnet20", "-M", "2",
                        "-N", "2", "-o", str(tmp_path / "r20.onnx")], capture_output=True)
    assert r.returncode == 0
    x = np.random.default_rng(1).random((1, 3, 32, 32), np.float32)
    ys = {}
    for name in ("x86", "x86-64-v3"):
        compile_model(tmp_path / "r20.onnx", name, tmp_path / f"{name}.so", quiet=True)
        ys[name] = load(tmp_path / f"{name}.so", workers=1)(x)
    np.testing.assert_allclose(ys["x86-64-v3"], ys["x86"], rtol=1e-4,
                               atol=1e-4 * np.abs(ys["x86"]).max())


def test_manifest_records_the_features_a_build_needs(builds):
    import json

    def needs(name: str) -> set[str]:
        text = Path(str(builds[name]) + ".json").read_text()
        return set(json.loads(text)["target"]["cpu_features"])

    assert {"avx2", "fma", "bmi2"} <= needs("x86-64-v3")
    assert not any(f.startswith("avx512") for f in needs("x86-64-v3"))
    assert {"avx512f", "avx512bw", "avx512vl"} <= needs("x86-64-v4")
    assert "avx2" not in needs("x86-64-v2") and "popcnt" in needs("x86-64-v2")
    assert needs("x86") <= cpu_flags()


def _fake_cpu(tmp_path: Path, level: str) -> Path:
    """A /proc/cpuinfo of a CPU with exactly one psABI level's features."""
    flags = targets.cpu_features(targets.x86_target(level))
    path = tmp_path / f"cpuinfo_{level}"
    path.write_text(f"model name\t: Fake {level} CPU\nflags\t\t: fpu sse sse2 {' '.join(flags)}\n")
    return path


def test_runtime_refuses_a_cpu_without_the_features(builds, tmp_path, monkeypatch):
    monkeypatch.setenv("ABC_TVM_CPUINFO", str(_fake_cpu(tmp_path, "x86-64-v2")))
    with pytest.raises(UserError) as e:
        load(builds["x86-64-v3"])
    msg = str(e.value)
    assert "avx2" in msg and "Fake x86-64-v2 CPU" in msg and "--target x86-64-v2" in msg
    load(builds["x86-64-v2"])  # its own level loads
    monkeypatch.setenv("ABC_TVM_CPUINFO", str(_fake_cpu(tmp_path, "x86-64-v3")))
    load(builds["x86-64-v3"])
    with pytest.raises(UserError, match="avx512"):
        load(builds["x86"])


def test_run_and_serve_refuse_in_one_line(builds, tmp_path):
    env = {**__import__("os").environ, "ABC_TVM_CPUINFO": str(_fake_cpu(tmp_path, "x86-64-v2"))}
    _, x, _ = _sign_conv_model()
    np.save(tmp_path / "x.npy", x)
    for args in (["run", str(builds["x86-64-v4"]), "--input", str(tmp_path / "x.npy"),
                  "--output", str(tmp_path / "y.npy")],
                 ["serve", str(builds["x86-64-v4"]), "--port", "0"]):
        r = subprocess.run([sys.executable, "-m", "abc_tvm.cli", *args], capture_output=True,
                           text=True, env=env, timeout=120)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "avx512f" in lines[0] and "--target x86-64-v2" in lines[0]


def test_unknown_cpu_names_close_matches(tmp_path):
    with pytest.raises(UserError, match="did you mean znver4"):
        targets.resolve("x86:znver4x")
    model, _, _ = _sign_conv_model()
    onnx.save(model, tmp_path / "m.onnx")
    r = subprocess.run([sys.executable, "-m", "abc_tvm.cli", "compile", str(tmp_path / "m.onnx"),
                        "--target", "x86:icelake-servr", "-o", str(tmp_path / "m.so")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "icelake-server" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_shipped_tuning_is_taken_only_at_its_level():
    kernels = None
    v4 = find_databases(None, kernels, "x86-64-v4")
    v3 = find_databases(None, kernels, "x86-64-v3")
    assert v4 and all(d.name.endswith("_x86-64-v4") for d in v4)
    assert v3 and all(d.name.endswith("_x86-64-v3") for d in v3)
    assert find_databases(None, kernels, "x86-64-v2") == []
    assert find_databases(None, kernels, None) == []


def test_avx2_compile_of_the_zoo_model_takes_no_avx512_records(tmp_path):
    r = subprocess.run([sys.executable, "-m", "abc_tvm.cli", "zoo", "abc_resnet18", "-M", "1",
                        "-N", "1", "-o", str(tmp_path / "r18.onnx")], capture_output=True)
    assert r.returncode == 0
    v3 = compile_model(tmp_path / "r18.onnx", "x86-64-v3", tmp_path / "v3.so", quiet=True)
    assert v3.tuning == [] and v3.tuned_kernels == []
    v4 = compile_model(tmp_path / "r18.onnx", "x86-64-v4", tmp_path / "v4.so", quiet=True)
    assert [Path(d).name for d in v4.tuning] == ["abc_resnet18_m1n1_x86-64-v4"]


needs_qemu = pytest.mark.skipif(
    shutil.which("aarch64-linux-gnu-g++") is None or deploy.emulator() is None,
    reason="qemu-aarch64 or g++-aarch64-linux-gnu missing: `make setup` installs them")


@needs_qemu
def test_bundle_runner_refuses_a_board_without_the_features(tmp_path, monkeypatch):
    """rpi5 (Cortex-A76) code may use the dot-product and LSE instructions: a board that has
    only fp and asimd (a Cortex-A53, told to the runner) is refused in one line."""
    model, x, want = _sign_conv_model()
    compile_model(model, "rpi5", tmp_path / "m.so", quiet=True)
    bundle = deploy.make_bundle(tmp_path / "m.so", tmp_path / "b", check=False, quiet=True)
    np.testing.assert_array_equal(deploy.run_bundle(bundle, x), want)  # qemu's CPU has them
    monkeypatch.setenv("ABC_RUN_CPU_FEATURES", "fp asimd")
    with pytest.raises(UserError, match="needs CPU features this CPU lacks: .*asimddp"):
        deploy.run_bundle(bundle, x)
