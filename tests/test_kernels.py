"""The TVM kernels of `abc_tvm.schedules` against the NumPy oracle `abc_tvm.reference`.

Bit-pack and the integer dot stage must match bit for bit; the fused float output within
float32 summation error. Shapes are a seeded random draw over the ranges that break
kernels (channels around the word size, stride, asymmetric padding, kernel 1/3/5, M and N
up to 8), kept small so the file runs in well under a minute. Compiled kernels are cached
per shape. aarch64 and CUDA are checked by their generated code (`cnt`, `__popc`), and CUDA
runs only where a GPU exists.

Also here: the fused x86 block kernel (conv + BN/residual/ReLU glue + the next layer's
packing, NHWC), the NHWC bit-pack, and the MetaSchedule rules (`abc_conv2d`, `abc_bitpack`):
random knob draws replayed as MetaSchedule replays them must give the default schedule's
bits.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import shutil
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tvm
from design_spaces import sampled_and_fixed
from host import cpu_flags
from tvm import relax

from abc_tvm import reference as ref
from abc_tvm import schedules
from abc_tvm.bench import load_benchmark

HOST = tvm.target.Target.from_device("cpu")
ARM = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
CROSS_CXX = "aarch64-linux-gnu-g++"


def cuda_target() -> tvm.target.Target:
    return tvm.target.Target({"kind": "cuda", "arch": "sm_80"}, host=HOST)


# ------------------------------------------------------------------------------ cases


@dataclass(frozen=True)
class Case:
    """One convolution layer: everything that makes a kernel static."""

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
    def args(self) -> tuple:
        return (
            self.batch,
            self.channels,
            self.height,
            self.width,
            self.out_channels,
            self.kernel,
            self.stride,
            self.padding,
            self.M,
            self.N,
            self.bipolar,
            self.word_bits,
        )

    def __str__(self) -> str:
        pads = ",".join(map(str, self.padding))
        return (
            f"b{self.batch}c{self.channels}_{self.height}x{self.width}o{self.out_channels}"
            f"_k{self.kernel[0]}x{self.kernel[1]}s{self.stride[0]}x{self.stride[1]}p{pads}"
            f"_m{self.M}n{self.N}_{self.act}_u{self.word_bits}"
        )


def _fits(c: Case) -> bool:
    top, left, bottom, right = c.padding
    return c.height + top + bottom >= c.kernel[0] and c.width + left + right >= c.kernel[1]


def _draw_cases(seed: int, count: int) -> list[Case]:
    """A seeded random selection over the ranges that matter; fixed edge cases first."""
    fixed = [
        # Interior + border, one word, ResNet-like 3x3 pad 1.
        Case(1, 64, 6, 6, 8, (3, 3), (1, 1), (1, 1, 1, 1), 3, 3, True),
        # Channels 1 and one past a word; asymmetric padding; stride 2.
        Case(2, 1, 5, 7, 3, (3, 3), (2, 2), (0, 1, 2, 1), 2, 1, True),
        Case(1, 65, 5, 5, 16, (3, 3), (2, 1), (1, 0, 1, 2), 1, 2, False),
        # Padding larger than the kernel reach: whole output rows in the pad.
        Case(1, 70, 3, 4, 4, (1, 1), (1, 1), (2, 2, 2, 2), 2, 2, True),
        # Input smaller than the kernel; 5x5; prime output width (no divisor tile).
        Case(1, 3, 2, 11, 5, (5, 5), (1, 1), (2, 2, 2, 2), 1, 8, True),
        # M = N = 8, non-square kernel, width where the pixel tile needs a predicate.
        Case(2, 63, 4, 13, 12, (1, 3), (1, 2), (0, 1, 0, 1), 8, 8, False),
        # 32-bit words (the CUDA packing) on the CPU kernels.
        Case(1, 33, 5, 6, 8, (3, 3), (1, 1), (1, 1, 1, 1), 2, 3, True, 32),
        Case(2, 70, 4, 5, 3, (3, 3), (2, 2), (1, 2, 0, 1), 3, 2, False, 32),
    ]
    rng = random.Random(seed)
    drawn: list[Case] = []
    while len(drawn) < count:
        kh = rng.choice([1, 3, 5])
        kw = kh if rng.random() < 0.8 else rng.choice([1, 3, 5])
        if rng.random() < 0.6:
            padding = (rng.choice([0, 1, 2]),) * 4
        else:
            padding = tuple(rng.choice([0, 1, 2]) for _ in range(4))
        sh = rng.choice([1, 2])
        case = Case(
            batch=rng.choice([1, 2]),
            channels=rng.choice([1, 3, 63, 64, 65, 70, 130]),
            height=rng.randint(1, 8),
            width=rng.randint(1, 9),
            out_channels=rng.choice([1, 3, 4, 8, 12, 16]),
            kernel=(kh, kw),
            stride=(sh, sh if rng.random() < 0.8 else 3 - sh),
            padding=padding,  # type: ignore[arg-type]
            M=rng.randint(1, 8),
            N=rng.randint(1, 8),
            bipolar=rng.random() < 0.5,
            word_bits=64 if rng.random() < 0.85 else 32,
        )
        if _fits(case):
            drawn.append(case)
    return fixed + drawn


CASES = _draw_cases(seed=20240601, count=16)


# --------------------------------------------------------------------------- helpers


@functools.cache
def _compiled_dot(case: Case) -> tvm.runtime.Module:
    return tvm.compile(schedules.abc_dot_func(*case.args, target=HOST), target=HOST).mod


@functools.cache
def _compiled_conv(case: Case) -> tvm.runtime.Module:
    return tvm.compile(schedules.abc_conv_func(*case.args, target=HOST), target=HOST).mod


@functools.cache
def _compiled_pack(shape: tuple[int, int, int, int], planes: int, word_bits: int):
    return tvm.compile(schedules.bitpack_func(*shape, planes, word_bits, HOST), target=HOST).mod


def _run(mod: tvm.runtime.Module, *arrays: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Call a compiled kernel with NumPy inputs and a destination-passing output."""
    dev = tvm.cpu(0)
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in arrays]
    result = tvm.runtime.tensor(out, dev)
    mod(*args, result)
    return result.numpy()


@dataclass
class Layer:
    """Random inputs for one case, with their packed forms from the reference."""

    x: np.ndarray
    v: np.ndarray
    beta: np.ndarray
    bases: np.ndarray
    alpha: np.ndarray
    packed: np.ndarray
    wbits: np.ndarray
    wsum: np.ndarray


def _layer(case: Case, seed: int) -> Layer:
    rng = np.random.default_rng(seed)
    shape = (case.batch, case.channels, case.height, case.width)
    x = rng.uniform(-1.0, 2.0, shape).astype(np.float32)
    v = rng.uniform(-0.6, 0.6, case.N).astype(np.float32)
    beta = rng.normal(0.0, 1.0, case.N).astype(np.float32)
    bases_shape = (case.M, case.out_channels, case.channels, *case.kernel)
    bases = np.where(rng.random(bases_shape) < 0.5, -1, 1).astype(np.int8)
    alpha = rng.normal(0.0, 1.0, (case.M, case.out_channels)).astype(np.float32)
    packed = ref.pack_activations(x, v, case.word_bits)
    wbits, wsum = ref.pack_weights(bases, case.word_bits)
    return Layer(x, v, beta, bases, alpha, packed, wbits, wsum)


def _seed(case: Case) -> int:
    """A per-case seed stable across processes (hash() of a str is salted per run)."""
    return zlib.crc32(str(case).encode())


def _out_hw(case: Case) -> tuple[int, int]:
    top, left, bottom, right = case.padding
    oh = (case.height + top + bottom - case.kernel[0]) // case.stride[0] + 1
    ow = (case.width + left + right - case.kernel[1]) // case.stride[1] + 1
    return oh, ow


# ----------------------------------------------------------------------------- tests


def _near_threshold(shape: tuple[int, ...], v: np.ndarray, rng: np.random.Generator):
    """x within 3 ulps of 0.5 - v[n]: where any slip in the float32 add or compare flips a bit."""
    target = np.float32(0.5) - v[rng.integers(0, v.size, shape)]
    steps = rng.integers(-3, 4, shape)
    toward = np.where(steps >= 0, np.float32(np.inf), np.float32(-np.inf)).astype(np.float32)
    x = target.astype(np.float32)
    for _ in range(3):
        moved = np.nextafter(x, toward).astype(np.float32)
        x = np.where(np.abs(steps) > 0, moved, x)
        steps = steps - np.sign(steps)
    return x


@pytest.mark.parametrize(
    ("shape", "planes", "word_bits"),
    [
        ((1, 1, 3, 4), 1, 64),
        ((2, 3, 5, 7), 2, 64),
        ((1, 63, 4, 4), 3, 64),
        ((1, 64, 3, 17), 8, 64),
        ((2, 65, 2, 3), 4, 64),
        ((1, 70, 6, 5), 5, 64),
        ((1, 130, 2, 2), 2, 64),
        ((2, 33, 3, 5), 3, 32),
        ((1, 64, 4, 16), 2, 32),
    ],
)
def test_bitpack_bit_exact(shape: tuple[int, int, int, int], planes: int, word_bits: int):
    rng = np.random.default_rng(sum(shape) * 31 + planes)
    v = rng.uniform(-0.6, 0.6, planes).astype(np.float32)
    x = rng.uniform(-1.0, 2.0, shape).astype(np.float32)
    # A third of the entries sit on the float32 rounding edge of the threshold.
    edge = rng.random(shape) < 0.33
    x = np.where(edge, _near_threshold(shape, v, rng), x).astype(np.float32)
    x.flat[0] = np.nan  # NaN compares false: bit 0, as in ONNX GreaterOrEqual.
    expected = ref.pack_activations(x, v, word_bits)
    b, c, h, w = shape
    out = np.zeros((planes, b, h, w, schedules.num_words(c, word_bits)), f"uint{word_bits}")
    thr = schedules.compute.exact_thresholds(v)
    got = _run(_compiled_pack(shape, planes, word_bits), x, thr, out=out)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


def _ulps_around(center: np.float32, count: int) -> np.ndarray:
    """The 2*count+1 float32 values nearest to center, in order."""
    below, above = [center], [center]
    for _ in range(count):
        below.append(np.nextafter(below[-1], np.float32(-np.inf)))
        above.append(np.nextafter(above[-1], np.float32(np.inf)))
    return np.array(below[:0:-1] + above, dtype=np.float32)


def test_bitpack_threshold_uses_float32_sum():
    """Near 0.5 - v, float32(x + v) >= 0.5 and x >= float32(0.5 - v) disagree: use the first."""
    v = np.array([0.4819943, -0.6979347, 0.6398147], dtype=np.float32)
    x = np.concatenate([_ulps_around(np.float32(0.5) - vn, 6) for vn in v])
    xs = x.reshape(1, -1, 1, 1)
    expected = ref.pack_activations(xs, v, 64)
    rewritten = ref.pack_bits(
        (xs[None] >= (np.float32(0.5) - v)[:, None, None, None, None]).transpose(0, 1, 3, 4, 2), 64
    )
    assert not np.array_equal(expected, rewritten), "inputs do not separate the two forms"
    out = np.zeros(expected.shape, np.uint64)
    thr = schedules.compute.exact_thresholds(v)
    got = _run(_compiled_pack(xs.shape, v.size, 64), xs, thr, out=out)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_dot_bit_exact(case: Case):
    layer = _layer(case, seed=_seed(case))
    oh, ow = _out_hw(case)
    expected = ref.abc_conv_dot(
        layer.x, layer.v, layer.bases, case.stride, case.padding, case.act, case.word_bits
    )
    out = np.zeros((case.M, case.N, case.batch, case.out_channels, oh, ow), np.int32)
    got = _run(_compiled_dot(case), layer.packed, layer.wbits, layer.wsum, out=out)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fused_conv_matches_reference(case: Case):
    layer = _layer(case, seed=_seed(case))
    oh, ow = _out_hw(case)
    expected = ref.abc_conv2d(
        layer.x,
        layer.v,
        layer.beta,
        layer.bases,
        layer.alpha,
        case.stride,
        case.padding,
        case.act,
        case.word_bits,
    )
    out = np.zeros((case.batch, case.out_channels, oh, ow), np.float32)
    args = (layer.packed, layer.wbits, layer.wsum, layer.alpha, layer.beta)
    got = _run(_compiled_conv(case), *args, out=out)
    # rtol 1e-5, plus float32 summation error of the M*N terms where they cancel.
    dot = ref.abc_conv_dot(
        layer.x, layer.v, layer.bases, case.stride, case.padding, case.act, case.word_bits
    ).astype(np.float64)
    scale = np.einsum("mo,n,mnboyx->boyx", np.abs(layer.alpha), np.abs(layer.beta), np.abs(dot))
    err = np.abs(got.astype(np.float64) - expected)
    bound = 1e-5 * np.abs(expected) + 1e-6 * scale + 1e-30
    assert np.all(err <= bound), f"max excess {np.max(err - bound)} at {np.argmax(err - bound)}"


def test_primfunc_contract():
    """What the Relax pass relies on: a named, scheduled, no-alias PrimFunc, tagged block."""
    case = CASES[0]
    func = schedules.abc_conv_func(*case.args, target=HOST)
    assert func.attrs["global_symbol"].startswith("abc_conv_")
    assert bool(func.attrs["tirx.is_scheduled"])
    assert bool(func.attrs["tirx.noalias"])
    assert '"schedule_rule": "abc_conv2d"' in func.script()
    # TVM 0.27: params are the buffers themselves (no buffer_map).
    shapes = [tuple(int(d) for d in p.shape) for p in func.params]
    oh, ow = _out_hw(case)
    k = schedules.num_words(case.channels, case.word_bits)
    m, n, o = case.M, case.N, case.out_channels
    assert shapes == [
        (n, case.batch, case.height, case.width, k),
        (m, o, *case.kernel, k),
        (m, o, *case.kernel),
        (m, o),
        (n,),
        (case.batch, o, oh, ow),
    ]
    other = schedules.abc_conv_func(*CASES[1].args, target=HOST)
    assert other.attrs["global_symbol"] != func.attrs["global_symbol"]


def test_call_tir_through_relax():
    """Added to an IRModule and called with call_tir, the kernel runs in the Relax VM."""
    case = CASES[0]
    layer = _layer(case, seed=7)
    oh, ow = _out_hw(case)
    func = schedules.abc_conv_func(*case.args, target=HOST)
    bb = relax.BlockBuilder()
    inputs = [layer.packed, layer.wbits, layer.wsum, layer.alpha, layer.beta]
    params = [
        relax.Var(name, relax.TensorType(a.shape, str(a.dtype)))
        for name, a in zip(["packed", "wbits", "wsum", "alpha", "beta"], inputs, strict=True)
    ]
    with bb.function("main", params):
        gv = bb.add_func(func, func.attrs["global_symbol"])
        out_sinfo = relax.TensorType((case.batch, case.out_channels, oh, ow), "float32")
        with bb.dataflow():
            y = bb.emit_output(relax.call_tir(gv, params, out_sinfo))
        bb.emit_func_output(y)
    ex = tvm.compile(bb.get(), target=HOST)
    vm = relax.VirtualMachine(ex, tvm.cpu(0))
    got = vm["main"](*[tvm.runtime.tensor(a, tvm.cpu(0)) for a in inputs]).numpy()
    direct = _run(_compiled_conv(case), *inputs, out=np.zeros_like(got))
    np.testing.assert_array_equal(got, direct)


# ------------------------------------------------------------------ MetaSchedule rules

TUNE_HOST = tvm.target.Target({**HOST.export(), "num-cores": 2})


def _tuned_variants(func: tvm.tirx.PrimFunc, seeds: range,
                    distinct: bool = True) -> list[tvm.runtime.Module]:
    """What MetaSchedule measures: the rule's design space, replayed with fresh knob draws.

    The space comes from MetaSchedule's own post-order-apply generator (so the custom rule is
    found by its registered name); each seed replays its trace without decisions (as the
    evolutionary search seeds its population) and runs the CPU postprocessors.
    """
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    mod = tvm.IRModule({"main": func})
    ctx = ms.TuneContext(mod=mod, target=TUNE_HOST, space_generator="post-order-apply",
                         task_name="abc", num_threads=1)
    # One design draws the knobs; the other is the hand-written default: always a candidate.
    space, _ = sampled_and_fixed(ctx.generate_design_space())
    mods, seen = [], set()
    for seed in seeds:
        sch = s_tir.Schedule(mod, seed=seed)
        s_tir.schedule.Trace(space.trace.insts, {}).apply_to_schedule(sch, remove_postproc=True)
        assert all(p.apply(sch) for p in ctx.space_generator.postprocs)
        seen.add(tuple(int(d) for d in sch.trace.decisions.values()))
        mods.append(tvm.compile(sch.mod, target=HOST).mod)
    assert len(seen) > 1 or not distinct, "every draw chose the same knobs"
    return mods


def test_unscheduled_kernels_carry_their_rule():
    case = CASES[0]
    conv = schedules.abc_conv_func(*case.args, target=HOST, scheduled=False)
    pack = schedules.bitpack_func(1, 64, 6, 6, 3, 64, HOST, scheduled=False)
    for func, rule in ((conv, "abc_conv2d"), (pack, "abc_bitpack")):
        assert "tirx.is_scheduled" not in func.attrs
        assert f'"schedule_rule": "{rule}"' in func.script()
        assert tvm.get_global_func(f"s_tir.meta_schedule.cpu.{rule}", allow_missing=True)
    scheduled = schedules.abc_conv_func(*case.args, target=HOST)
    assert conv.attrs["global_symbol"] == scheduled.attrs["global_symbol"]


@pytest.mark.parametrize("case", [CASES[0], CASES[5], CASES[6], CASES[2]], ids=str)
def test_metaschedule_rule_bit_exact(case: Case):
    """Random knob draws of the conv rule: the dot bit-exact, the fused conv equal to default."""
    layer = _layer(case, seed=_seed(case))
    oh, ow = _out_hw(case)
    expected = ref.abc_conv_dot(
        layer.x, layer.v, layer.bases, case.stride, case.padding, case.act, case.word_bits
    )
    dot = schedules.abc_dot_func(*case.args, target=HOST, scheduled=False)
    for mod in _tuned_variants(dot, range(1, 5)):
        out = np.zeros((case.M, case.N, case.batch, case.out_channels, oh, ow), np.int32)
        got = _run(mod, layer.packed, layer.wbits, layer.wsum, out=out)
        np.testing.assert_array_equal(got, expected)
    args = (layer.packed, layer.wbits, layer.wsum, layer.alpha, layer.beta)
    out = np.zeros((case.batch, case.out_channels, oh, ow), np.float32)
    default = _run(_compiled_conv(case), *args, out=out)
    conv = schedules.abc_conv_func(*case.args, target=HOST, scheduled=False)
    for mod in _tuned_variants(conv, range(1, 5)):
        np.testing.assert_array_equal(_run(mod, *args, out=out), default)


def test_metaschedule_bitpack_rule_bit_exact():
    shape, planes = (1, 70, 3, 16), 3
    rng = np.random.default_rng(5)
    v = rng.uniform(-0.6, 0.6, planes).astype(np.float32)
    x = rng.uniform(-1.0, 2.0, shape).astype(np.float32)
    expected = ref.pack_activations(x, v, 64)
    pack = schedules.bitpack_func(*shape, planes, 64, HOST, scheduled=False)
    for mod in _tuned_variants(pack, range(1, 7)):
        thr = schedules.compute.exact_thresholds(v)
        got = _run(mod, x, thr, out=np.zeros(expected.shape, np.uint64))
        np.testing.assert_array_equal(got, expected)


# ------------------------------------------------------------------ fused block kernel


@dataclass(frozen=True)
class BlockCase:
    """One fused block kernel: a conv case plus its glue and outputs."""

    conv: Case
    affine: bool
    residual: bool
    relu: bool
    float_out: bool
    next_planes: int
    late: str = ""  # after the residual: "rprelu" (bias, PReLU, bias) or "hardtanh" (Clip)
    next_per_channel: bool = False  # the next layer's thresholds per channel (RSign)
    lane_bits: int = 0  # 16: the NEON form (16-bit lane accumulators), built for this host

    def spec(self):
        from abc_tvm.schedules import compute

        c = self.conv
        geo = compute.ConvGeometry(c.batch, c.channels, c.height, c.width, c.out_channels,
                                   c.kernel, c.stride, c.padding, c.M, c.N, c.word_bits)
        vec = schedules.block_vector(c.out_channels, c.word_bits, HOST)
        rp = self.late == "rprelu"
        return compute.BlockSpec(geo, c.bipolar, vec, self.affine, self.residual, self.relu,
                                 self.float_out, self.next_planes, pre_bias=rp, prelu=rp,
                                 post_bias=rp,
                                 hardtanh=(-1.0, 1.0) if self.late == "hardtanh" else None,
                                 next_per_channel=self.next_per_channel,
                                 lane_bits=self.lane_bits)

    def __str__(self) -> str:
        flags = "".join(f for f, on in (("a", self.affine), ("r", self.residual),
                                        ("l", self.relu), ("f", self.float_out)) if on)
        pc = "c" if self.next_per_channel else ""
        lanes = f"_l{self.lane_bits}" if self.lane_bits else ""
        return f"{self.conv}_{flags}p{self.next_planes}{pc}{self.late}{lanes}"


BLOCK_CASES = [
    # ResNet BasicBlock conv1 (BN + ReLU + pack) and conv2 (BN + residual + ReLU, both outputs)
    BlockCase(Case(1, 64, 6, 6, 64, (3, 3), (1, 1), (1, 1, 1, 1), 3, 3, True), True, False,
              True, False, 3),
    BlockCase(Case(1, 64, 6, 6, 64, (3, 3), (1, 1), (1, 1, 1, 1), 2, 2, True), True, True,
              True, True, 2),
    # two output words, stride 2, 130 input channels (3 words, the last partial)
    BlockCase(Case(1, 130, 4, 9, 128, (3, 3), (2, 2), (1, 1, 1, 1), 3, 2, False), True, False,
              True, True, 1),
    # fewer channels than a word (one 16-bit word), asymmetric padding, batch 2
    BlockCase(Case(2, 70, 5, 7, 16, (3, 3), (2, 1), (0, 1, 2, 1), 2, 1, True), False, True,
              False, True, 4),
    # channels that no vector divides evenly (12: scalar packing), unipolar, 5x5
    BlockCase(Case(1, 65, 5, 6, 12, (5, 5), (1, 1), (2, 2, 2, 2), 1, 2, False), True, True,
              True, True, 2),
    # float output only (the block before a float head), 1x1 kernel, prime width
    BlockCase(Case(1, 64, 3, 7, 8, (1, 1), (1, 1), (0, 0, 0, 0), 1, 1, True), False, False,
              True, True, 0),
    # input smaller than the kernel: windows clipped at the top and the bottom at once
    BlockCase(Case(1, 3, 2, 11, 8, (5, 5), (1, 1), (2, 2, 2, 2), 1, 3, True), False, False,
              False, True, 2),
    # 96 channels: float output only (a partial second word packs separately)
    BlockCase(Case(1, 33, 4, 4, 96, (3, 3), (1, 1), (1, 1, 1, 1), 2, 2, True), True, False,
              False, True, 0),
    # ReActNet: BN + residual + RPReLU (bias, PReLU, bias), both outputs; 1x1
    BlockCase(Case(1, 64, 5, 5, 64, (1, 1), (1, 1), (0, 0, 0, 0), 1, 1, True), True, True,
              False, True, 1, "rprelu"),
    # ReActNet's narrow 1x1 after a 3x3: RPReLU, then the next RSign's per-channel thresholds
    BlockCase(Case(1, 32, 6, 5, 32, (3, 3), (1, 1), (1, 1, 1, 1), 1, 1, True), True, True,
              False, True, 1, "rprelu", next_per_channel=True),
    BlockCase(Case(1, 64, 4, 4, 128, (1, 1), (2, 2), (0, 0, 0, 0), 1, 2, True), True, False,
              True, False, 2, next_per_channel=True),
    # IR-Net: BN + residual + hardtanh, float output
    BlockCase(Case(2, 16, 6, 6, 16, (3, 3), (2, 2), (1, 1, 1, 1), 1, 1, True), True, True,
              False, True, 0, "hardtanh"),
]
# The NEON form (16-bit lanes, what aarch64 builds) is plain TIR: the same cases on this host.
LANE_CASES = [dataclasses.replace(c, lane_bits=16) for c in BLOCK_CASES
              if c.conv.word_bits == 64 and c.spec().vec % 2 == 0]
BLOCK_CASES += LANE_CASES


@dataclass
class BlockData:
    inputs: list[np.ndarray]
    outputs: list[np.ndarray]
    conv: np.ndarray  # reference conv output, NHWC float64
    scale: np.ndarray
    shift: np.ndarray
    res: np.ndarray
    v_next: np.ndarray
    late: dict  # "pre", "slope", "post" [O] for rprelu


def _block_data(case: BlockCase, seed: int) -> BlockData:
    from abc_tvm.schedules import compute

    spec = case.spec()
    c = case.conv
    layer = _layer(c, seed)
    rng = np.random.default_rng(seed + 1)
    oh, ow = _out_hw(c)
    o = c.out_channels
    ab = (layer.alpha[:, None, :] * layer.beta[None, :, None]).astype(np.float32)
    wbits = compute.block_weights(layer.wbits, spec.vec, spec.lane_bits)
    inputs = [layer.packed, wbits, ab]
    if c.bipolar:
        inputs.append(compute.bipolar_table(layer.wsum, spec.geo))
    scale = rng.uniform(0.5, 1.5, o).astype(np.float32)
    shift = rng.normal(0.3, 1.0, o).astype(np.float32)
    res = rng.normal(0.0, 1.0, (c.batch, oh, ow, o)).astype(np.float32)
    v_shape = (max(case.next_planes, 1),) + ((o,) if case.next_per_channel else ())
    v_next = rng.uniform(-0.6, 0.6, v_shape).astype(np.float32)[: case.next_planes]
    if case.affine:
        inputs += [scale, shift]
    if case.residual:
        inputs.append(res)
    late = {}
    if case.late == "rprelu":
        late = {k: rng.normal(0, 0.3, o).astype(np.float32) for k in ("pre", "slope", "post")}
        inputs += [late["pre"], late["slope"], late["post"]]
    if case.next_planes:
        inputs.append(compute.exact_thresholds(v_next).reshape(v_next.shape))
    outputs = []
    if case.float_out:
        outputs.append(np.zeros((c.batch, oh, ow, o), np.float32))
    if case.next_planes:
        words = schedules.num_words(o, c.word_bits)
        outputs.append(np.zeros((case.next_planes, c.batch, oh, ow, words), np.uint64))
    conv = ref.abc_conv2d(layer.x, layer.v, layer.beta, layer.bases, layer.alpha, c.stride,
                          c.padding, c.act, c.word_bits).astype(np.float64).transpose(0, 2, 3, 1)
    return BlockData(inputs, outputs, conv, scale, shift, res, v_next, late)


def _run_multi(mod: tvm.runtime.Module, inputs: list[np.ndarray], outputs: list[np.ndarray]):
    dev = tvm.cpu(0)
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in inputs + outputs]
    mod(*args)
    return [a.numpy() for a in args[len(inputs):]]


@functools.cache
def _compiled_block(case: BlockCase) -> tvm.runtime.Module:
    return tvm.compile(schedules.abc_block_func(case.spec(), HOST), target=HOST).mod


def _expected_glue(case: BlockCase, data: BlockData) -> np.ndarray:
    z = data.conv
    if case.affine:
        z = z * data.scale + data.shift
    if case.residual:
        z = z + data.res
    if case.relu:
        z = np.maximum(z, 0.0)
    if case.late == "rprelu":
        z = z + data.late["pre"]
        z = np.where(z < 0, data.late["slope"] * z, z) + data.late["post"]
    if case.late == "hardtanh":
        z = np.clip(z, -1.0, 1.0)
    return z


@pytest.mark.parametrize("case", BLOCK_CASES, ids=str)
def test_block_kernel_matches_reference(case: BlockCase):
    """The fused kernel: float output close to the reference glue; packed planes bit-exact.

    The packed planes are the reference packing of the kernel's own float output (where it
    writes one) bit for bit; else of the reference float output, except within float32
    rounding of the threshold.
    """
    data = _block_data(case, _seed(case.conv))
    got = _run_multi(_compiled_block(case), data.inputs, data.outputs)
    expected = _expected_glue(case, data)
    tol = 1e-5 * np.abs(expected).max() + 1e-5
    if case.float_out:
        np.testing.assert_allclose(got[0], expected, rtol=1e-5, atol=tol)
    if case.next_planes:
        z = got[0] if case.float_out else expected.astype(np.float32)
        v = data.v_next if case.next_per_channel else data.v_next[:, None]  # [N', O or 1]
        packed = ref.pack_bits(z[None] + v[:, None, None, None, :] >= np.float32(0.5), 64)
        if case.float_out:
            np.testing.assert_array_equal(got[-1], packed)
        else:
            # bits of values within rounding of the threshold may differ
            near = np.abs(expected[None] + v[:, None, None, None, :] - 0.5) < tol
            differ = ref.pack_bits(near, 64)
            assert np.mean(near) < 0.01
            np.testing.assert_array_equal(got[-1] & ~differ, packed & ~differ)


@pytest.mark.parametrize("case", [BLOCK_CASES[1], BLOCK_CASES[3], BLOCK_CASES[4], LANE_CASES[1]],
                         ids=str)
def test_block_rule_bit_exact(case: BlockCase):
    """Random knob draws of the block kernel's rule give the default schedule's bits."""
    data = _block_data(case, _seed(case.conv))
    default = _run_multi(_compiled_block(case), data.inputs, data.outputs)
    func = schedules.abc_block_func(case.spec(), HOST, scheduled=False)
    assert "tirx.is_scheduled" not in func.attrs
    for mod in _tuned_variants(func, range(1, 4)):
        for got, want in zip(_run_multi(mod, data.inputs, data.outputs), default, strict=True):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(("shape", "planes"), [((1, 4, 5, 64), 3), ((2, 3, 2, 128), 1),
                                                ((1, 2, 3, 16), 2), ((1, 3, 3, 70), 2)])
def test_bitpack_nhwc_bit_exact(shape: tuple[int, int, int, int], planes: int):
    """NHWC packing (compare + movmsk): threshold edges and NaN as the reference."""
    rng = np.random.default_rng(sum(shape) + planes)
    v = rng.uniform(-0.6, 0.6, planes).astype(np.float32)
    x = rng.uniform(-1.0, 2.0, shape).astype(np.float32)
    edge = rng.random(shape) < 0.33
    x = np.where(edge, _near_threshold(shape, v, rng), x).astype(np.float32)
    x.flat[0] = np.nan
    expected = ref.pack_activations(x.transpose(0, 3, 1, 2), v, 64)
    thr = schedules.compute.exact_thresholds(v)
    func = schedules.bitpack_nhwc_func(*shape, planes, 64, HOST)
    got = _run(tvm.compile(func, target=HOST).mod, x, thr, out=np.zeros_like(expected))
    np.testing.assert_array_equal(got, expected)
    for mod in _tuned_variants(schedules.bitpack_nhwc_func(*shape, planes, 64, HOST,
                                                           scheduled=False), range(1, 3),
                               distinct=False):
        np.testing.assert_array_equal(_run(mod, x, thr, out=np.zeros_like(expected)), expected)


def test_exact_thresholds_match_float32_add():
    """x >= T(v) agrees with float32(x + v) >= 0.5 on every float32 near the edge."""
    rng = np.random.default_rng(11)
    v = np.concatenate([rng.uniform(-0.7, 0.7, 40), [0.0, 0.5, -0.5, 1e-8, 0.4819943,
                                                    -0.6979347, 0.6398147, 3.0, -3.0]])
    v = v.astype(np.float32)
    thr = schedules.compute.exact_thresholds(v)
    for vn, tn in zip(v, thr, strict=True):
        x = _ulps_around(np.float32(0.5) - vn, 40)
        x = np.concatenate([x, _ulps_around(tn, 40), [np.nan, np.inf, -np.inf, 0.0, -0.0]])
        x = x.astype(np.float32)
        np.testing.assert_array_equal(x >= tn, (x + vn).astype(np.float32) >= np.float32(0.5))


def test_popcount_peak_kernel_counts():
    """The roofline microbenchmark computes what it claims (its timing is not asserted)."""
    func, bitops = schedules.popcount_peak_func(HOST, words=64, vectors=3)
    assert bitops == 64 * 3 * 8 * 64
    rng = np.random.default_rng(9)
    a = rng.integers(0, 2**63, 64, dtype=np.uint64)
    w = rng.integers(0, 2**63, (3, 8), dtype=np.uint64)
    got = _run(tvm.compile(func, target=HOST).mod, a, w, out=np.zeros((3, 8), np.int64))
    np.testing.assert_array_equal(got, ref.popcount(a[None, None] & w[:, :, None]).sum(-1))


def test_x86_uses_hardware_popcount():
    """popcount must become vpopcntq where the CPU has AVX-512 VPOPCNTDQ; elsewhere popcnt or
    the AVX2 vector fallback (VPSHUFB nibble table + VPSADBW), never a shift-and-mask chain."""
    if "x86_64" not in str(HOST.attrs.get("mtriple", "")):
        pytest.skip(f"host target is not x86_64: {HOST}")
    ex = tvm.compile(schedules.abc_conv_func(*CASES[0].args, target=HOST), target=HOST)
    found = load_benchmark("popcount_peak").popcount_mnemonics(ex.mod.inspect_source("asm"))
    flags = cpu_flags()
    if "avx512_vpopcntdq" in flags:
        assert "vpopcntq" in found, found
    elif "avx2" in flags:
        assert found, "neither popcnt nor the VPSHUFB/VPSADBW nibble table in the asm"
    else:
        assert any("popcnt" in m for m in found), found


def test_unknown_target_and_word_size_refused():
    with pytest.raises(ValueError, match="target kind"):
        schedules.bitpack_func(1, 3, 2, 2, 1, 64, tvm.target.Target("c"))
    with pytest.raises(ValueError, match="32-bit"):
        schedules.abc_dot_func(*CASES[0].args[:-1], 64, target=cuda_target())
    with pytest.raises(ValueError, match="kernel larger"):
        schedules.abc_dot_func(1, 3, 2, 2, 1, (5, 5), (1, 1), (0, 0, 0, 0), 1, 1, True, 64, HOST)


def test_aarch64_export_uses_neon_cnt(tmp_path: Path):
    if shutil.which(CROSS_CXX) is None:
        pytest.skip(f"{CROSS_CXX} not installed (Debian: apt-get install g++-aarch64-linux-gnu)")
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if objdump is None:
        pytest.skip("aarch64-linux-gnu-objdump not installed (binutils-aarch64-linux-gnu)")
    from tvm.support import cc

    case = Case(1, 70, 6, 6, 8, (3, 3), (1, 1), (1, 1, 1, 1), 2, 2, True)
    ex = tvm.compile(schedules.abc_conv_func(*case.args, target=ARM), target=ARM)
    lib = tmp_path / "abc_conv_arm.so"
    ex.export_library(str(lib), fcompile=cc.cross_compiler(CROSS_CXX))
    disasm = subprocess.run(
        [objdump, "-d", str(lib)], capture_output=True, text=True, check=True
    ).stdout
    assert "aarch64" in disasm
    assert any(line.split("\t")[2:3] == ["cnt"] for line in disasm.splitlines()), "no NEON cnt"


def test_cuda_kernel_uses_popc():
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH: the CUDA toolkit is needed to compile CUDA kernels")
    case = Case(2, 70, 5, 6, 4, (3, 3), (2, 1), (1, 0, 2, 1), 2, 3, True, 32)
    target = cuda_target()
    conv = tvm.compile(schedules.abc_conv_func(*case.args, target=target), target=target)
    pack = tvm.compile(schedules.bitpack_func(2, 70, 5, 6, 3, 32, target), target=target)
    source = conv.mod.imports[0].inspect_source()
    assert "__popc(" in source and "__popcll" not in source
    assert "blockIdx.x" in source and "threadIdx.x" in source
    if not tvm.cuda(0).exist:
        pytest.skip("compiled and checked the CUDA source; no GPU here to run it")
    layer = _layer(case, seed=3)
    dev = tvm.cuda(0)
    oh, ow = _out_hw(case)

    def on_gpu(mod: tvm.runtime.Module, arrays: list[np.ndarray], out: np.ndarray):
        args = [tvm.runtime.tensor(a, dev) for a in arrays]
        result = tvm.runtime.tensor(out, dev)
        mod(*args, result)
        return result.numpy()

    thr = schedules.compute.exact_thresholds(layer.v)
    packed = on_gpu(pack.mod, [layer.x, thr], np.zeros(layer.packed.shape, np.uint32))
    np.testing.assert_array_equal(packed, layer.packed)
    args = [layer.packed, layer.wbits, layer.wsum, layer.alpha, layer.beta]
    got = on_gpu(conv.mod, args, np.zeros((case.batch, case.out_channels, oh, ow), np.float32))
    expected = ref.abc_conv2d(
        layer.x,
        layer.v,
        layer.beta,
        layer.bases,
        layer.alpha,
        case.stride,
        case.padding,
        case.act,
        32,
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("nhwc", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("channels", [64, 70, 24])
def test_bitpack_per_channel_thresholds_bit_exact(nhwc: bool, channels: int):
    """thr [N, C]: bit = x >= thr[n, c] (RSign's per-channel bias folded into thresholds),
    including values exactly at and one ulp under each threshold."""
    rng = np.random.default_rng(channels)
    planes, shape = 2, (2, channels, 3, 5)
    thr = rng.uniform(-0.5, 0.5, (planes, channels)).astype(np.float32)
    x = rng.uniform(-1, 1, shape).astype(np.float32)
    x[0, :, 0, 0] = thr[0]
    x[0, :, 0, 1] = np.nextafter(thr[0], np.float32(-np.inf))
    bits = x[None] >= thr[:, None, :, None, None]  # [N, B, C, H, W]
    expected = ref.pack_bits(bits.transpose(0, 1, 3, 4, 2), 64)
    b, c, h, w = shape
    if nhwc:
        func = schedules.bitpack_nhwc_func(b, h, w, c, planes, 64, HOST, per_channel=True)
        src = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    else:
        func = schedules.bitpack_func(b, c, h, w, planes, 64, HOST, per_channel=True)
        src = x
    got = _run(tvm.compile(func, target=HOST).mod, src, thr, out=np.zeros_like(expected))
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("pool", [((2, 2), (2, 2), (0, 0, 0, 0)), ((3, 3), (2, 2), (1, 1, 1, 1)),
                                  ((3, 2), (1, 2), (0, 1, 2, 0))], ids=str)
def test_packed_maxpool_is_the_or_of_the_window(pool):
    """MaxPool on bit-planes: bit for bit the planes of the float MaxPool (ONNX semantics:
    padding ignored), for monotone threshold bits."""
    kernel, stride, pads = pool
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (2, 70, 7, 9)).astype(np.float32)
    v = np.array([0.5, 0.1, 0.9], np.float32)  # three planes: bit = x + v >= 0.5
    packed = ref.pack_activations(x, v, 64)
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])),
                constant_values=-np.inf)
    oh = (xp.shape[2] - kernel[0]) // stride[0] + 1
    ow = (xp.shape[3] - kernel[1]) // stride[1] + 1
    pooled = np.full((2, 70, oh, ow), -np.inf, np.float32)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            pooled = np.maximum(pooled, xp[:, :, i:i + stride[0] * oh:stride[0],
                                           j:j + stride[1] * ow:stride[1]])
    want = ref.pack_activations(pooled, v, 64)
    func = schedules.packed_maxpool_func(packed.shape, kernel, stride, pads, (oh, ow), 64, HOST)
    got = _run_multi(tvm.compile(func, target=HOST).mod, [packed], [np.zeros_like(want)])[0]
    np.testing.assert_array_equal(got, want)
