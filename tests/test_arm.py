"""aarch64: NEON kernels, target presets, the deploy bundle and its C++ runner under qemu.

The NEON schedule (schedules/arm.py) is target-independent TIR, so it is first checked bit
for bit on this host; then the aarch64 build is checked where it runs: a bundle executed by
`qemu-aarch64` against the NumPy reference (integer stage bit-exact) and against the x86
build of the same model. Models whose only op is one ABC block with α = β = 1 output the
integer dot sums themselves, so "bit-exact on the integer part" is checked end to end.
Tests that need the cross compiler or qemu skip with the reason (`make setup` installs
both); the rest run anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax, te

from abc_tvm import deploy, schedules, targets
from abc_tvm import reference as ref
from abc_tvm.compiler import pipeline, sha256
from abc_tvm.errors import UserError
from abc_tvm.runtime import MANIFEST_DIGEST_KEY, manifest_digest
from abc_tvm.schedules import arm
from abc_tvm.schedules import compute as C

HOST = tvm.target.Target.from_device("cpu")
ARM = targets.ARM_PRESETS["arm"].target()
CROSS = shutil.which(targets.AARCH64_CXX) is not None
QEMU = deploy.emulator() is not None
SH = shutil.which("sh") or "/bin/sh"

needs_cross = pytest.mark.skipif(
    not CROSS, reason="aarch64-linux-gnu-g++ missing: `make setup` installs g++-aarch64-linux-gnu")
needs_qemu = pytest.mark.skipif(
    not (CROSS and QEMU),
    reason="qemu-aarch64 or the aarch64 sysroot missing: `make setup` installs qemu-user and "
           "g++-aarch64-linux-gnu")


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "abc_tvm.cli", *args], capture_output=True,
                          text=True, env=env, timeout=600)


def one_error_line(proc: subprocess.CompletedProcess, prefix: str, *words: str) -> str:
    """A failure is exactly one stderr line with the prefix, a non-zero exit, no traceback."""
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(prefix), lines[0]
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]
    return lines[0]


# ------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    batch: int
    channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]
    M: int  # noqa: N815 - the paper's names
    N: int  # noqa: N815
    bipolar: bool
    word_bits: int = 64

    @property
    def act(self) -> str:
        return "bipolar" if self.bipolar else "unipolar"

    @property
    def geo(self) -> C.ConvGeometry:
        return schedules._geometry(self.batch, self.channels, self.height, self.width,
                                   self.out_channels, self.kernel, self.stride, self.padding,
                                   self.M, self.N, self.word_bits)

    def func(self, fused: bool, target: tvm.target.Target) -> tvm.tirx.PrimFunc:
        make = schedules.abc_conv_func if fused else schedules.abc_dot_func
        return make(self.batch, self.channels, self.height, self.width, self.out_channels,
                    self.kernel, self.stride, self.padding, self.M, self.N, self.bipolar,
                    self.word_bits, target)

    def __str__(self) -> str:
        pads = ",".join(map(str, self.padding))
        return (f"b{self.batch}c{self.channels}_{self.height}x{self.width}o{self.out_channels}"
                f"_k{self.kernel[0]}x{self.kernel[1]}s{self.stride[0]}x{self.stride[1]}p{pads}"
                f"_m{self.M}n{self.N}_{self.act}_u{self.word_bits}")


CASES = [
    # ResNet-like 3x3, one word, 64 bits: the uint16-lane NEON path with a 2-pixel tile.
    Case(1, 64, 6, 6, 8, (3, 3), (1, 1), (1, 1, 1, 1), 3, 3, True),
    # Two words per pixel, stride 2, asymmetric padding, prime output width.
    Case(2, 70, 5, 13, 16, (3, 3), (2, 1), (0, 1, 2, 1), 2, 2, False),
    # 32-bit words (4 channels per register), 1x1 kernel, padding past the kernel reach.
    Case(1, 33, 4, 5, 12, (1, 1), (1, 1), (2, 2, 2, 2), 2, 3, True, 32),
    # M = N = 8 (few accumulators per tile), non-square kernel.
    Case(1, 63, 4, 8, 4, (1, 3), (1, 2), (0, 1, 0, 1), 8, 8, False),
    # 5x5, input smaller than the kernel, 130 channels (3 words).
    Case(1, 130, 3, 4, 6, (5, 5), (1, 1), (2, 2, 2, 2), 1, 2, True),
    # Odd output channels: no whole register, the generic CPU schedule (still NEON cnt).
    Case(2, 3, 5, 7, 3, (3, 3), (2, 2), (0, 1, 2, 1), 2, 1, True),
]


@dataclass
class Layer:
    x: np.ndarray
    v: np.ndarray
    beta: np.ndarray
    bases: np.ndarray
    alpha: np.ndarray
    packed: np.ndarray
    wbits: np.ndarray
    wsum: np.ndarray


def make_layer(case: Case, seed: int) -> Layer:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 2.0, (case.batch, case.channels, case.height, case.width))
    x = x.astype(np.float32)
    v = rng.uniform(-0.6, 0.6, case.N).astype(np.float32)
    beta = rng.normal(0.0, 1.0, case.N).astype(np.float32)
    bases = np.where(rng.random((case.M, case.out_channels, case.channels, *case.kernel)) < 0.5,
                     -1, 1).astype(np.int8)
    alpha = rng.normal(0.0, 1.0, (case.M, case.out_channels)).astype(np.float32)
    wbits, wsum = ref.pack_weights(bases, case.word_bits)
    return Layer(x, v, beta, bases, alpha, ref.pack_activations(x, v, case.word_bits), wbits,
                 wsum)


def expected_dot(case: Case, layer: Layer) -> np.ndarray:
    return ref.abc_conv_dot(layer.x, layer.v, layer.bases, case.stride, case.padding, case.act,
                            case.word_bits)


def expected_conv(case: Case, layer: Layer) -> np.ndarray:
    return ref.abc_conv2d(layer.x, layer.v, layer.beta, layer.bases, layer.alpha, case.stride,
                          case.padding, case.act, case.word_bits)


def run_host(func: tvm.tirx.PrimFunc, *arrays: np.ndarray, out: np.ndarray) -> np.ndarray:
    mod = tvm.compile(func, target=HOST).mod
    dev = tvm.cpu(0)
    result = tvm.runtime.tensor(out, dev)
    mod(*[tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in arrays], result)
    return result.numpy()


# ------------------------------------------------------------------- presets


def test_board_presets_resolve():
    for name, mcpu in (("rpi4", "cortex-a72"), ("rpi5", "cortex-a76"),
                       ("jetson-orin", "cortex-a78ae")):
        target = targets.ARM_PRESETS[name].target()
        assert str(target.attrs["mcpu"]) == mcpu
        assert str(target.attrs["mtriple"]) == "aarch64-linux-gnu"
        assert "arm_cpu" in target.keys
    v7 = targets.ARM_PRESETS["armv7"]
    assert v7.arch == "armv7" and "armv7" in str(v7.target().attrs["mtriple"])
    assert targets.arch_of("rpi5") == "aarch64" and targets.arch_of("armv7") == "armv7"
    assert targets.arch_of("mine", '{"mtriple":"aarch64-linux-gnu"}') == "aarch64"
    with pytest.raises(UserError, match="rpi4"):
        targets.resolve("raspberry")


def test_missing_cross_compiler_is_one_line(tmp_path):
    """No cross compiler on PATH: `compile --target rpi4` says which package to install."""
    env = {**os.environ, "PATH": str(tmp_path)}
    proc = cli("compile", "nothing.onnx", "--target", "rpi4", "-o", str(tmp_path / "m.so"),
               env=env)
    one_error_line(proc, "abc-tvm compile: error:", "aarch64-linux-gnu-g++",
                   "g++-aarch64-linux-gnu")


# ----------------------------------------------------------------- NEON code


def _hot_loops(asm: str) -> list[list[str]]:
    """Innermost loops (a label and a backward branch to it) whose body has a `cnt`."""
    lines = asm.splitlines()
    labels = {m.group(1): i for i, ln in enumerate(lines)
              if (m := re.match(r"^(\.?\w+):", ln))}
    loops = []
    for i, ln in enumerate(lines):
        m = re.match(r"^\s+(?:b\.\w+|b|cbnz|cbz|tbnz|tbz)\s+(?:\w+,\s*)*(?:#\d+,\s*)?(\.\w+)$", ln)
        if m and labels.get(m.group(1), i) < i:
            loops.append((labels[m.group(1)], i))
    inner = [(a, b) for a, b in loops
             if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    bodies = [[x.split()[0] for x in lines[a:b + 1] if x.startswith("\t")
               and not x.strip().startswith(".")] for a, b in inner]
    return [b for b in bodies if "cnt" in b]


@pytest.mark.parametrize("preset", ["arm", "rpi4", "rpi5"])
def test_neon_hot_loop_is_and_cnt_uadalp(preset):
    """The conv's inner loop: and + cnt.16b + uadalp.8h per 128 bits, no 64-bit popcount chain."""
    target = targets.ARM_PRESETS[preset].target()
    case = Case(1, 128, 8, 8, 64, (3, 3), (1, 1), (1, 1, 1, 1), 3, 3, True)
    asm = tvm.compile(case.func(True, target), target=target).mod.inspect_source("asm")
    assert re.search(r"\tcnt\tv\d+\.16b", asm) and re.search(r"\tuadalp\tv\d+\.8h", asm)
    conv = max(_hot_loops(asm), key=lambda body: body.count("uadalp"))
    cnt, uadalp, and_ = conv.count("cnt"), conv.count("uadalp"), conv.count("and")
    assert cnt == uadalp == and_ > 0, conv
    assert "uaddlp" not in conv, "a 64-bit lane popcount chain is in the hot loop"
    # Per 128-bit update: the triple plus at most one load/address op on average (no spills).
    assert len(conv) <= 4.2 * cnt, (len(conv), cnt)
    assert not {"str", "stp", "st1"} & set(conv), "accumulators spilled in the hot loop"


@pytest.mark.parametrize("bipolar", [True, False], ids=["xor", "and"])
def test_fused_block_hot_loop_is_cnt_uadalp(bipolar):
    """aarch64's fused block kernel with several bases x planes accumulates 16-bit lanes: per
    128 bits eor/and + cnt.16b + uadalp.8h in the hot loop, no 64-bit popcount chain there,
    no spills."""
    target = targets.ARM_PRESETS["rpi4"].target()
    geo = C.ConvGeometry(1, 128, 14, 14, 128, (3, 3), (1, 1), (1, 1, 1, 1), 2, 2, 64)
    vec = schedules.block_vector(128, 64, target)
    assert schedules.block_lane_bits(geo, vec, target) == 16
    spec = C.BlockSpec(geo, bipolar, vec, True, False, True, False, 1, lane_bits=16)
    asm = tvm.compile(schedules.abc_block_func(spec, target),
                      target=target).mod.inspect_source("asm")
    conv = max(_hot_loops(asm), key=lambda body: body.count("uadalp"))
    op = "eor" if bipolar else "and"
    assert conv.count("cnt") == conv.count("uadalp") == conv.count(op) > 0, conv
    assert "uaddlp" not in conv, "a 64-bit lane popcount chain is in the hot loop"
    assert not {"str", "stp", "st1"} & set(conv), "accumulators spilled in the hot loop"


@pytest.mark.parametrize("bipolar", [True, False], ids=["xor", "and"])
@pytest.mark.parametrize("channels", [64, 128])
def test_fused_block_byte_form_hot_loop(bipolar, channels):
    """M = N = 1 on aarch64: the byte form, one uint16 per output channel. Per 8 channels and
    step: 4 x (eor/and + cnt.16b), 3 addp.16b, 1 uadalp.8h (the lane form's triple per 128
    bits), weights loaded, activations broadcast (ld1r), nothing stored in the hot loop."""
    target = targets.ARM_PRESETS["rpi4"].target()
    geo = C.ConvGeometry(1, channels, 14, 14, 128, (3, 3), (1, 1), (1, 1, 1, 1), 1, 1, 64)
    vec = schedules.block_vector(128, 64, target)
    assert schedules.block_lane_bits(geo, vec, target) == C.BYTE_FORM
    spec = C.BlockSpec(geo, bipolar, vec, True, False, True, False, 1,
                       lane_bits=C.BYTE_FORM)
    asm = tvm.compile(schedules.abc_block_func(spec, target),
                      target=target).mod.inspect_source("asm")
    conv = max(_hot_loops(asm), key=lambda body: body.count("uadalp"))
    op = "eor" if bipolar else "and"
    updates = conv.count("uadalp")
    assert updates > 0 and conv.count("cnt") == conv.count(op) == 4 * updates, conv
    assert conv.count("addp") == 3 * updates, conv
    assert "uaddlp" not in conv and "ld1r" in conv, conv
    assert not {"str", "stp", "st1"} & set(conv), "accumulators spilled in the hot loop"
    # Per 128 bits the triple plus at most one load / address op on average.
    assert len(conv) <= 4 * conv.count("cnt"), (len(conv), conv.count("cnt"))


@pytest.mark.parametrize("bipolar", [True, False], ids=["xor", "and"])
def test_fused_block_byte_form_32bit_words(bipolar):
    """At most 32 channels on aarch64: the block's input packs in 32-bit words (x86 keeps
    64), and the byte form's update is 2 x (eor/and + cnt.16b), 1 addp.16b, 1 uadalp.8h per
    8 channels against a broadcast 32-bit word (ld1r .4s): no half-empty 64-bit words."""
    target = targets.ARM_PRESETS["rpi4"].target()
    geo = C.ConvGeometry(1, 32, 14, 14, 32, (3, 3), (1, 1), (1, 1, 1, 1), 1, 1, 64)
    assert schedules.block_word_bits(geo, target) == 32
    assert schedules.block_word_bits(geo, targets.resolve("x86").target) == 64
    assert schedules.block_word_bits(dataclasses.replace(geo, channels=64), target) == 64
    geo = dataclasses.replace(geo, word_bits=32)
    vec = schedules.block_vector(32, 32, target)
    assert schedules.block_lane_bits(geo, vec, target) == C.BYTE_FORM
    spec = C.BlockSpec(geo, bipolar, vec, True, False, True, False, 1, lane_bits=C.BYTE_FORM)
    asm = tvm.compile(schedules.abc_block_func(spec, target),
                      target=target).mod.inspect_source("asm")
    conv = max(_hot_loops(asm), key=lambda body: body.count("uadalp") + body.count("uaddlp"))
    op = "eor" if bipolar else "and"
    updates = conv.count("uadalp") + conv.count("uaddlp")
    assert updates > 0 and conv.count("cnt") == conv.count(op) == 2 * updates, conv
    assert conv.count("addp") == updates, conv
    assert re.search(r"ld1r\t\{ v\d+\.4s \}", "\n".join(asm.splitlines())), "no 32-bit broadcast"
    assert not {"str", "stp", "st1"} & set(conv), "accumulators spilled in the hot loop"


def test_armv7_kernel_uses_neon_vcnt():
    target = targets.ARM_PRESETS["armv7"].target()
    case = Case(1, 64, 6, 6, 8, (3, 3), (1, 1), (1, 1, 1, 1), 2, 2, True)
    asm = tvm.compile(case.func(True, target), target=target).mod.inspect_source("asm")
    assert "vcnt.8" in asm


@pytest.mark.parametrize("case", CASES, ids=str)
def test_neon_schedule_bit_exact_on_host(case: Case):
    """schedules/arm.py is plain TIR: built for this CPU it must equal the reference."""
    layer = make_layer(case, seed=len(str(case)))
    geo = case.geo
    generic_dot = te.create_prim_func(C.abc_conv(geo, case.bipolar, fused=False).dot_args)
    dot = run_host(arm.schedule_conv(generic_dot, geo, fused=False), layer.packed, layer.wbits,
                   layer.wsum, out=np.zeros(expected_dot(case, layer).shape, np.int32))
    np.testing.assert_array_equal(dot, expected_dot(case, layer))
    generic = te.create_prim_func(C.abc_conv(geo, case.bipolar, fused=True).conv_args)
    want = expected_conv(case, layer)
    got = run_host(arm.schedule_conv(generic, geo, fused=True), layer.packed, layer.wbits,
                   layer.wsum, layer.alpha, layer.beta, out=np.zeros(want.shape, np.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_every_tuning_config_is_bit_exact():
    """Each register tile a tuner may pick computes the same integers."""
    case = Case(1, 64, 4, 6, 8, (3, 3), (1, 1), (1, 1, 1, 1), 2, 2, True)
    layer = make_layer(case, seed=5)
    geo, want = case.geo, expected_dot(case, layer)
    configs = arm.configs(geo)
    assert len(configs) >= 4 and arm.default_config(geo) in configs
    for config in configs:
        sch = tvm.s_tir.Schedule(arm.neon_conv_func(geo, case.bipolar, fused=False))
        arm.apply(sch, geo, fused=False, config=config)
        got = run_host(sch.mod["main"], layer.packed, layer.wbits, layer.wsum,
                       out=np.zeros(want.shape, np.int32))
        np.testing.assert_array_equal(got, want, err_msg=str(config))


def test_metaschedule_rule_gives_one_design_per_config():
    case = CASES[0]
    rule = tvm.get_global_func(f"s_tir.meta_schedule.arm_cpu.{C.SCHEDULE_RULE}")
    sch = tvm.s_tir.Schedule(arm.neon_conv_func(case.geo, case.bipolar, fused=True))
    designs = rule(sch, sch.get_sblock(C.CONV))
    assert len(designs) == len(arm.configs(case.geo))


# ------------------------------------------------------------- aarch64 under qemu


def _manifest(so: Path, name: str, shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
    Path(str(so) + ".json").write_text(json.dumps({
        "format": "abc-tvm/1",
        "inputs": [{"name": name, "shape": list(shape), "dtype": "float32"}],
        "outputs": [{"name": "out", "shape": list(out_shape), "dtype": "float32"}],
        "target": {"name": "arm", "tvm": str(ARM), "word_bits": 64},
        "tvm_version": tvm.__version__, "sha256": sha256(so), "abc_layers": []}))


def _kernel_battery(cases: list[Case], layers: list[Layer]) -> tuple[tvm.IRModule, int, int]:
    """One Relax module running bitpack + dot + fused conv of every case on slices of one input.

    Output: all integer dot stages (as float32, exact) then all fused outputs, flattened.
    """
    total = sum(layer.x.size for layer in layers)
    x = relax.Var("x", relax.TensorType((total,), "float32"))
    bb = relax.BlockBuilder()
    dots, convs, start = [], [], 0
    with bb.function("main", [x]):
        with bb.dataflow():
            for case, layer in zip(cases, layers, strict=True):
                size = layer.x.size
                part = bb.emit(relax.op.strided_slice(x, [0], [start], [start + size]))
                xi = bb.emit(relax.op.reshape(part, layer.x.shape))
                start += size
                pack = schedules.bitpack_func(case.batch, case.channels, case.height,
                                              case.width, case.N, case.word_bits, ARM)
                pack_gv = bb.add_func(pack, str(pack.attrs["global_symbol"]))
                packed = bb.emit(relax.call_tir(
                    pack_gv, [xi, relax.const(schedules.compute.exact_thresholds(layer.v))],
                    relax.TensorType(layer.packed.shape, str(layer.packed.dtype))))
                weights = [relax.const(layer.wbits), relax.const(layer.wsum.astype(np.int32))]
                dot_f, conv_f = case.func(False, ARM), case.func(True, ARM)
                dot_gv = bb.add_func(dot_f, str(dot_f.attrs["global_symbol"]))
                conv_gv = bb.add_func(conv_f, str(conv_f.attrs["global_symbol"]))
                dshape = expected_dot(case, layer).shape
                dot = bb.emit(relax.call_tir(dot_gv, [packed, *weights],
                                             relax.TensorType(dshape, "int32")))
                dot = bb.emit(relax.op.astype(dot, "float32"))
                dots.append(bb.emit(relax.op.reshape(dot, (-1,))))
                oshape = (case.batch, case.out_channels, *dshape[-2:])
                conv = bb.emit(relax.call_tir(
                    conv_gv, [packed, *weights, relax.const(layer.alpha),
                              relax.const(layer.beta)], relax.TensorType(oshape, "float32")))
                convs.append(bb.emit(relax.op.reshape(conv, (-1,))))
            out = bb.emit_output(relax.op.concat(dots + convs, axis=0))
        bb.emit_func_output(out)
    size = sum(int(np.prod(expected_dot(c, la).shape)) for c, la in zip(cases, layers,
                                                                          strict=True))
    return bb.get(), total, size


@needs_qemu
def test_neon_kernels_bit_exact_under_qemu(tmp_path):
    """The aarch64 build of bitpack + the dot stage equals the reference bit for bit."""
    layers = [make_layer(c, seed=i + 11) for i, c in enumerate(CASES)]
    mod, total, dot_size = _kernel_battery(CASES, layers)
    with tvm.transform.PassContext(opt_level=3):
        ex = tvm.compile(mod, target=ARM, relax_pipeline=pipeline(targets.resolve("arm")))
    so = tmp_path / "kernels.so"
    ex.export_library(str(so), fcompile=tvm.support.cc.cross_compiler(targets.AARCH64_CXX))
    conv_size = sum(int(np.prod(expected_conv(c, la).shape)) for c, la in zip(CASES, layers,
                                                                               strict=True))
    _manifest(so, "x", (total,), (dot_size + conv_size,))
    bundle = deploy.make_bundle(so, tmp_path / "bundle", check=False, quiet=True)
    x = np.concatenate([layer.x.ravel() for layer in layers])
    got = deploy.run_bundle(bundle, x)
    dots, convs = got[:dot_size], got[dot_size:]
    start = 0
    for case, layer in zip(CASES, layers, strict=True):
        want = expected_dot(case, layer)
        np.testing.assert_array_equal(dots[start:start + want.size].reshape(want.shape),
                                      want.astype(np.float32), err_msg=str(case))
        start += want.size
    start = 0
    for case, layer in zip(CASES, layers, strict=True):
        want = expected_conv(case, layer)
        np.testing.assert_allclose(convs[start:start + want.size].reshape(want.shape), want,
                                   rtol=1e-5, atol=1e-4, err_msg=str(case))
        start += want.size


def abc_block_model(C_in: int, O: int, H: int, W: int, M: int, N: int, act: str,  # noqa: N803
                    stride: int, pad: int, seed: int, k: int = 3
                    ) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """One ABC block in the canonical ONNX pattern with α = β = 1: output = Σ_m Σ_n dot."""
    rng = np.random.default_rng(seed)
    bases = np.where(rng.random((M, O, C_in, k, k)) < 0.5, -1, 1).astype(np.float32)
    shifts = rng.uniform(-0.4, 0.4, N).astype(np.float32)
    inits = [numpy_helper.from_array(bases, "bases"),
             numpy_helper.from_array(np.ones((M, 1, 1, 1, 1), np.float32), "alpha"),
             numpy_helper.from_array(np.array([0], np.int64), "axes"),
             numpy_helper.from_array(np.float32(0), "zero"),
             numpy_helper.from_array(np.float32(1), "one"),
             numpy_helper.from_array(np.float32(0.5), "half"),
             numpy_helper.from_array(np.float32(2), "two")]
    nodes = [helper.make_node("Mul", ["alpha", "bases"], ["scaled"]),
             helper.make_node("ReduceSum", ["scaled", "axes"], ["W"], keepdims=0)]
    outs = []
    for n in range(N):
        inits += [numpy_helper.from_array(shifts[n], f"v{n}"),
                  numpy_helper.from_array(np.float32(1), f"beta{n}")]
        p = f"b{n}_"
        nodes += [helper.make_node("Add", ["input", f"v{n}"], [p + "s"]),
                  helper.make_node("Clip", [p + "s", "zero", "one"], [p + "h"]),
                  helper.make_node("GreaterOrEqual", [p + "h", "half"], [p + "p"]),
                  helper.make_node("Cast", [p + "p"], [p + "i"], to=TensorProto.FLOAT)]
        a = p + "i"
        if act == "bipolar":
            nodes += [helper.make_node("Mul", [p + "i", "two"], [p + "m"]),
                      helper.make_node("Sub", [p + "m", "one"], [p + "a"])]
            a = p + "a"
        nodes += [helper.make_node("Conv", [a, "W"], [p + "y"], strides=[stride, stride],
                                   pads=[pad] * 4, kernel_shape=[k, k]),
                  helper.make_node("Mul", [p + "y", f"beta{n}"], [p + "z"])]
        outs.append(p + "z")
    total = outs[0]
    for i, o in enumerate(outs[1:]):
        nodes.append(helper.make_node("Add", [total, o], [f"sum{i}"]))
        total = f"sum{i}"
    nodes.append(helper.make_node("Identity", [total], ["output"]))
    oh = (H + 2 * pad - k) // stride + 1
    ow = (W + 2 * pad - k) // stride + 1
    graph = helper.make_graph(
        nodes, "abc_block",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, C_in, H, W])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, O, oh, ow])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    x = rng.uniform(-1.0, 2.0, (1, C_in, H, W)).astype(np.float32)
    want = ref.abc_conv_dot(x, shifts, bases.astype(np.int8), (stride, stride), (pad,) * 4, act,
                            64).sum(axis=(0, 1)).astype(np.float32)
    return model, x, want


def _compile(model: onnx.ModelProto | Path, tmp: Path, target: str,
             bundle: Path | None = None) -> Path:
    src = model if isinstance(model, Path) else tmp / "model.onnx"
    if not isinstance(model, Path):
        onnx.save(model, src)
    so = tmp / f"model_{target}.so"
    args = ["compile", str(src), "--target", target, "-o", str(so)]
    proc = cli(*args, *(["--bundle", str(bundle)] if bundle else []))
    assert proc.returncode == 0, proc.stderr
    return so


def _x86_output(so: Path, x: np.ndarray) -> np.ndarray:
    from abc_tvm.runtime import load

    return load(so)(x)


@needs_qemu
@pytest.mark.parametrize(
    ("C_in", "O", "M", "N", "act", "stride"),
    [(70, 16, 2, 3, "bipolar", 1),    # NEON uint16-lane path, two words per pixel
     (64, 64, 1, 1, "bipolar", 1),    # NEON byte form (M = N = 1), one word per pixel
     (70, 16, 1, 1, "unipolar", 2),   # byte form: two words, two channel groups, stride 2
     (20, 5, 3, 1, "unipolar", 2),    # odd O: the generic CPU schedule on aarch64
     (32, 32, 1, 1, "bipolar", 1),    # <= 32 channels: the byte form on 32-bit words
     (24, 16, 1, 1, "unipolar", 2)],  # 32-bit words, a partial word, stride 2
    ids=["bipolar_neon", "bipolar_byte", "unipolar_byte", "unipolar_generic", "bipolar_byte32",
         "unipolar_byte32"])
def test_bundle_integer_model_bit_exact_under_qemu(tmp_path, C_in, O, M, N, act, stride):  # noqa: N803
    """α = β = 1: the bundle's output is the integer dot sum, equal to NumPy and x86 exactly."""
    model, x, want = abc_block_model(C_in, O, 7, 9, M, N, act, stride, 1, seed=C_in)
    bundle = tmp_path / "bundle"
    _compile(model, tmp_path, "arm", bundle)
    got = deploy.run_bundle(bundle, x)
    np.testing.assert_array_equal(got, want)
    assert np.all(got == np.round(got)) and np.abs(got).max() > 10
    np.testing.assert_array_equal(got, _x86_output(_compile(model, tmp_path, "x86"), x))
    readme = (bundle / "README.md").read_text()
    assert "qemu" in readme and f"[1, {C_in}, 7, 9]" in readme


@needs_qemu
@pytest.mark.parametrize(("C_in", "O", "act"), [(128, 48, "bipolar"), (32, 24, "unipolar")],
                         ids=["bipolar_64bit", "unipolar_32bit"])
def test_bundle_1x1_byte_form_bit_exact_under_qemu(tmp_path, C_in, O, act):  # noqa: N803
    """M = N = 1 1x1 convs: the byte form's direct fold, sub-tiles of 16 (or 8) channels x
    the pixels (`cpu.direct_channels`), 64- and 32-bit words: exact under qemu and as x86."""
    model, x, want = abc_block_model(C_in, O, 5, 16, 1, 1, act, 1, 0, seed=O, k=1)
    bundle = tmp_path / "bundle"
    _compile(model, tmp_path, "arm", bundle)
    got = deploy.run_bundle(bundle, x)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, _x86_output(_compile(model, tmp_path, "x86"), x))


@pytest.fixture(scope="module")
def resnet20_bundle(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    """ABC-ResNet-20 (CIFAR, M = N = 3) compiled for rpi4 with a bundle, and for x86."""
    if not (CROSS and QEMU):
        pytest.skip("qemu-aarch64 or g++-aarch64-linux-gnu missing: `make setup` installs them")
    tmp = tmp_path_factory.mktemp("r20")
    onnx_path = tmp / "r20.onnx"
    proc = cli("zoo", "abc_resnet20", "-M", "3", "-N", "3", "-o", str(onnx_path))
    assert proc.returncode == 0, proc.stderr
    bundle = tmp / "bundle"
    _compile(onnx_path, tmp, "rpi4", bundle)
    x86 = _compile(onnx_path, tmp, "x86")
    x = np.random.default_rng(3).random((1, 3, 32, 32), dtype=np.float32)
    return bundle, x86, x


def test_resnet20_bundle_matches_x86(resnet20_bundle):
    bundle, x86, x = resnet20_bundle
    got = deploy.run_bundle(bundle, x)
    want = _x86_output(x86, x)
    assert got.shape == want.shape == (1, 10)
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
    info = json.loads((bundle / "bundle.json").read_text())
    assert info["target"] == "rpi4" and info["tvm_version"] == tvm.__version__
    assert deploy.elf_machine(bundle / "bin" / "abc-run") == deploy.EM_AARCH64
    assert all(deploy.elf_machine(bundle / "lib" / lib) == deploy.EM_AARCH64
               for lib in deploy.RUNTIME_LIBS)


@needs_qemu
def test_resnet20_m1n1_bundle_matches_x86(tmp_path):
    """M = N = 1: aarch64's block kernels take the byte form, with the glue (BatchNorm,
    residual, ReLU), float outputs and the next layer's NEON packing fused."""
    onnx_path = tmp_path / "r20.onnx"
    proc = cli("zoo", "abc_resnet20", "-M", "1", "-N", "1", "-o", str(onnx_path))
    assert proc.returncode == 0, proc.stderr
    bundle = tmp_path / "bundle"
    _compile(onnx_path, tmp_path, "rpi4", bundle)
    x = np.random.default_rng(5).random((1, 3, 32, 32), dtype=np.float32)
    got = deploy.run_bundle(bundle, x)
    want = _x86_output(_compile(onnx_path, tmp_path, "x86"), x)
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))


def _runner(bundle: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([SH, str(bundle / "run.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_runner_refuses_bad_input(resnet20_bundle, tmp_path):
    """Bad .npy files and a wrong-architecture model: one line each, exit 2."""
    bundle, x86, x = resnet20_bundle
    out = str(tmp_path / "y.npy")
    cases = {
        "float64": (x.astype(np.float64), "float32"),
        "fortran": (np.asfortranarray(np.ones((1, 3, 32, 32, 1), np.float32)[..., 0]),
                    "Fortran"),
        "shape": (x[:, :, :16], "[1, 3, 32, 32]"),
    }
    for name, (arr, word) in cases.items():
        path = tmp_path / f"{name}.npy"
        np.save(path, arr)
        proc = _runner(bundle, str(path), out)
        assert proc.returncode == 2, proc.stderr
        one_error_line(proc, "abc-run: error:", word)
    (tmp_path / "text.npy").write_text("not numpy")
    one_error_line(_runner(bundle, str(tmp_path / "text.npy"), out), "abc-run: error:", "npy")
    good = tmp_path / "x.npy"
    np.save(good, x)
    timed = _runner(bundle, str(good), out, "--repeat", "2")
    assert timed.returncode == 0 and "2 runs: mean" in timed.stderr, timed.stderr
    # The runner itself, given the x86 build of the same model.
    proc = subprocess.run([*deploy.emulator(), str(bundle / "bin" / "abc-run"), str(x86),
                           str(good), out], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    one_error_line(proc, "abc-run: error:", "x86_64", "--target arm")
    one_error_line(_runner(bundle, str(good)), "abc-run: error:", "usage")


def test_bundle_without_libs_or_qemu_says_so(resnet20_bundle, tmp_path):
    bundle, _, x = resnet20_bundle
    good = tmp_path / "x.npy"
    np.save(good, x)
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy, ignore=shutil.ignore_patterns("lib"))
    proc = _runner(copy, str(good), str(tmp_path / "y.npy"))
    assert proc.returncode == 2
    one_error_line(proc, "abc-run: error:", "libtvm_runtime.so", "copy the whole bundle")
    # An x86 machine without qemu: PATH holds only the tools run.sh needs, not qemu.
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("dirname", "uname", "sed", "head", "cut", "sha256sum"):
        if shutil.which(tool):
            os.symlink(shutil.which(tool), tools / tool)
    proc = _runner(bundle, str(good), str(tmp_path / "y.npy"),
                   env={**os.environ, "PATH": str(tools)})
    if deploy.emulator() == []:
        pytest.skip("this machine is aarch64: run.sh needs no emulator")
    assert proc.returncode == 2
    one_error_line(proc, "abc-run: error:", "qemu-user", "aarch64")


def test_make_bundle_refuses_other_targets(tmp_path):
    model, _, _ = abc_block_model(8, 4, 5, 5, 1, 1, "bipolar", 1, 1, seed=1)
    so = _compile(model, tmp_path, "x86")
    with pytest.raises(UserError, match="--target arm"):
        deploy.make_bundle(so, tmp_path / "b")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep")
    manifest = json.loads(Path(str(so) + ".json").read_text())
    manifest["target"]["name"] = "armv7"
    manifest[MANIFEST_DIGEST_KEY] = manifest_digest(manifest)  # an armv7 manifest, sealed
    Path(str(so) + ".json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="armv7"):
        deploy.make_bundle(so, tmp_path / "busy")
    assert (tmp_path / "busy" / "mine.txt").read_text() == "keep"


@needs_qemu
def test_compile_bundle_without_output_writes_the_model_into_the_bundle(tmp_path):
    model, x, want = abc_block_model(20, 8, 5, 5, 1, 1, "bipolar", 1, 1, seed=4)
    src = tmp_path / "blk.onnx"
    onnx.save(model, src)
    bundle = tmp_path / "bundle"
    proc = cli("compile", str(src), "--target", "arm", "--bundle", str(bundle))
    assert proc.returncode == 0, proc.stderr
    assert (bundle / "blk.so").is_file() and (bundle / "blk.so.json").is_file()
    assert not list(tmp_path.glob("*.so"))  # nothing beside the model: the bundle holds it
    np.testing.assert_array_equal(deploy.run_bundle(bundle, x), want)
    one_error_line(cli("compile", str(src), "--target", "arm"), "abc-tvm compile: error:",
                   "-o", "--bundle")


def _float_net() -> onnx.ModelProto:
    """Float only, on every NEON-sized float schedule: a 3-channel stem (padding inlined),
    BN folded, a max pool, a 3x3 conv of 256 channels on 4x4 (input channels chunked: 72 KB
    of weights per 8-channel NEON block), a depthwise conv (banded), a residual add, global
    pooling and a Gemm."""
    rng = np.random.default_rng(5)

    def const(name: str, *shape: int, scale: float = 0.2) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(0, scale, shape).astype(np.float32), name)

    c = 256
    inits = [const("w0", c, 3, 3, 3), const("w1", c, c, 3, 3, scale=0.03),
             const("wd", c, 1, 3, 3), const("fc", c, 10), const("fb", 10),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), "s"),
             const("b", c), const("m", c),
             numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "v")]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c0", "s", "b", "m", "v"], ["n0"]),
             helper.make_node("Relu", ["n0"], ["r0"]),
             helper.make_node("MaxPool", ["r0"], ["p0"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p0", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c1", "wd"], ["d1"], pads=[1, 1, 1, 1], group=c),
             helper.make_node("Add", ["d1", "p0"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["r1"]),
             helper.make_node("GlobalAveragePool", ["r1"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fc", "fb"], ["y"])]
    g = helper.make_graph(nodes, "float_net",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_float_net_under_qemu_matches_ort(tmp_path, ort_run, max_rel_err):
    """The float path's NEON schedules (register tile sized for 32 q registers, chunked
    conv, banded depthwise) run on aarch64 and give ONNX Runtime's answer."""
    if not (CROSS and QEMU):
        pytest.skip("qemu-aarch64 or g++-aarch64-linux-gnu missing: `make setup` installs them")
    from abc_tvm.schedules import float_conv
    from abc_tvm.schedules import float_default as fd
    from abc_tvm.schedules._util import NEON_A64

    block = fd.conv_block(256, 4, NEON_A64)  # the 3x3 256-channel conv chunks on NEON
    conv = float_conv.conv_func((1, 4, 4, 256), (256 // block, 3, 3, 256, block), (1, 1),
                                (1, 1, 1, 1), (4, 4))
    assert fd.default_knobs(tvm.s_tir.Schedule(conv), NEON_A64).chunk == fd.CHUNK
    model = _float_net()
    bundle = tmp_path / "bundle"
    _compile(model, tmp_path, "arm", bundle)
    x = np.random.default_rng(6).normal(0, 1, (1, 3, 8, 8)).astype(np.float32)
    assert max_rel_err(deploy.run_bundle(bundle, x), ort_run(model, x)) < 1e-5


# ------------------------------------------------------------- the ARM cycle model

def test_cycle_model_loops_join_a_split_body_and_leave_straight_code():
    from abc_tvm.bench.cycle_model import Block, loops

    blocks = {1: Block(1, (0,), 1, {2: 1}),  # entry
              2: Block(2, (0, 0), 100, {3: 100}), 3: Block(3, (0,), 100, {2: 99, 4: 1}),
              4: Block(4, (0,), 1, {})}
    assert loops(blocks) == [[2, 3]]
    blocks[3].succ = {2: 50, 4: 50}  # not a dominant back edge: no loop
    assert loops(blocks) == []


def test_cycle_model_of_a_bundle_counts_what_qemu_executes(resnet20_bundle):
    """The plugin's block counts agree with qemu's own execution log (an independent
    count), the model .so is found and every executed kernel is one the manifest lists."""
    if shutil.which("llvm-mca-19") is None:
        pytest.skip("llvm-mca-19 missing: `make setup` installs llvm-19")
    from abc_tvm.bench import cycle_model as cm

    bundle, _, x = resnet20_bundle
    est = cm.estimate(bundle, x, "rpi4")
    assert est.notes == []
    assert abs(est.instructions - deploy.count_instructions(bundle, x)) \
        <= 0.002 * est.instructions
    manifest = json.loads(next(bundle.glob("*.so.json")).read_text())["kernels"]
    kinds = {k.name: k.kind for k in est.kernels}
    assert {n for n, k in kinds.items() if k == "binary"} == {
        n for n in manifest if n.startswith("abc_block")}
    assert kinds.keys() <= manifest.keys() | {n for n, k in kinds.items() if k == "runtime"}
    for k in est.kernels:
        if k.pct_peak is not None:
            assert 0 < k.pct_peak <= 100, k
    # ResNet-20 repeats each stage's block shape: one kernel, several calls, work x calls
    assert max(k.calls for k in est.kernels if k.kind == "binary") >= 2
    assert 0 < est.peaks["fmas_per_cycle"] < est.peaks["bitmacs_per_cycle"]
    assert est.outside_cycles < 0.2 * est.cycles
    from abc_tvm.bench import arm_model

    r = {"model": "abc_resnet20", "target": "rpi4", **est.as_dict()}
    assert 0 < arm_model.bound_cycles(r) < est.cycles


def test_cycle_model_bound_is_work_at_the_peaks_and_names_an_unreachable_target():
    from abc_tvm.bench import arm_model

    r = {"model": "abc_resnet18:1x1", "target": "rpi4", "ghz": 1.0,
         "peaks": {"bitmacs_per_cycle": 80.0, "fmas_per_cycle": 4.0},
         "kernels": [{"kind": "binary", "work": 8e6}, {"kind": "float-conv", "work": 4e6},
                     {"kind": "dense", "work": 4e5}, {"kind": "other", "work": 5e6}]}
    assert arm_model.bound_cycles(r) == pytest.approx(1e5 + 1e6 + 1e5)
    r["ms"] = 30.0  # bound 1.2 ms: the 25 ms target is reachable, just not reached
    assert arm_model.verdict(r) == "≤ 25 ms: not met"
    r["ghz"] = 0.04  # bound 30 ms: above the target
    assert arm_model.verdict(r) == "≤ 25 ms: not met (below this model's bound)"
    r["ms"] = 20.0
    assert arm_model.verdict(r) == "≤ 25 ms: met"
    r["target"] = "rpi5"
    assert arm_model.verdict(r) == "-"
