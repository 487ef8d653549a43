"""NEON schedules (aarch64, and armv7 NEON) for the ABC-Net kernels.

Why not the x86 schedule: its vector is one uint64 word per output channel, and a vector
popcount of 64-bit lanes costs NEON four instructions (`cnt` on bytes, then three
pairwise widening adds) before the accumulate. The fast NEON form keeps the accumulators
as 16-bit lanes: `and`, `cnt v.16b`, `uadalp v.8h` (pairwise widening add-accumulate of
the byte counts) — three instructions per 128 bits of AND/popcount — and reduces the
16-bit lanes to one int32 per output channel once per register tile.

So the integer stage is rewritten on 16-bit lanes (same result, bit for bit):
- `abc_act_lanes`  A16[n,b,y,x,k,l] = 16-bit lane (l mod q) of the padded activation word,
  repeated for the `og` output channels of one 128-bit register (q = w/16 lanes per word,
  og = 128/w words per register), so the activation operand is one contiguous load;
- `abc_weight_lanes` W16[m,o,ky,kx,k,j] = lane j of the weight word, re-laid out as
  [M, O/ob, KH, KW, K, ob, q] so a tile's weights are contiguous registers;
- `abc_conv` (tagged for MetaSchedule) acc[m,n,b,o,y,x,j] = Σ popcount(A16 & W16), uint16;
- `abc_conv_sum` t = Σ_j acc (int32), then the shared stages of `compute.py` (popcount(A),
  bipolar border sums, 4t − 2p − S, float epilogue).

Register tile (tunable, `Config`): `channels` output channels (channels/og registers of
weights) × `pixels` output pixels × all N planes of one weight base m; the accumulators
stay in registers over the whole (ky, kx, k) reduction, and the float epilogue folds
α[m,o]·β[n]·dot into float registers before the next base, as on x86.

uint16 lanes hold at most 65535, and each step adds at most 16 per lane, so the path is
taken when KH·KW·K ≤ 4095 (29 000+ channels at 3×3) and O is a multiple of og; otherwise the
generic LLVM schedule of `cpu.py` is used (still NEON `cnt`, with the 64-bit lane chain).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import tvm
from tvm import s_tir, te, tirx

from . import compute as C
from . import cpu
from ._util import has_block
from .lanes import MAX_STEPS, lane, lane_sum_intrin, lanes_per_word, words_per_register

ACT_LANES = "abc_act_lanes"
WEIGHT_LANES = "abc_weight_lanes"
CONV_SUM = "abc_conv_sum"
GEOMETRY_ATTR = "abc_geometry"  # JSON geometry on the conv block, for the MetaSchedule rule

# 32 NEON registers: accumulators + weight registers within ACC_REGISTERS leave room for
# the activation operand and the and/cnt temporaries; tuning tries up to SPILL_REGISTERS.
ACC_REGISTERS = 24
SPILL_REGISTERS = 28


@dataclass(frozen=True)
class Config:
    """A register tile: output channels (a multiple of og) × output pixels."""

    channels: int
    pixels: int

    def __str__(self) -> str:
        return f"o{self.channels}x{self.pixels}"


def supported(geo: C.ConvGeometry) -> bool:
    """Whether the uint16-lane NEON kernel applies (else the generic CPU schedule runs)."""
    if geo.word_bits not in (32, 64):  # the packing widths the project uses
        return False
    kh, kw = geo.kernel
    steps = kh * kw * geo.words
    return steps <= MAX_STEPS and geo.out_channels % words_per_register(geo.word_bits) == 0


def _registers(config: Config, geo: C.ConvGeometry) -> tuple[int, int]:
    """(accumulator registers, weight registers) a tile keeps live in the hot loop."""
    weights = config.channels // words_per_register(geo.word_bits)
    return weights * config.pixels * geo.planes, weights


def configs(geo: C.ConvGeometry) -> list[Config]:
    """Every register tile worth measuring: what a tuner (MetaSchedule or a sweep) tries.

    Pixel counts divide the output width: the last tile of a poor divisor would run under
    a predicate, a branch per pixel in the hot loop (and no whole register to sum).
    """
    og = words_per_register(geo.word_bits)
    regs = geo.out_channels // og
    out: list[Config] = []
    for r in (1, 2, 3, 4, 6, 8):
        for px in (1, 2, 3, 4, 6, 8):
            config = Config(r * og, px)
            if regs % r or geo.out_width % px or sum(_registers(config, geo)) > SPILL_REGISTERS:
                continue
            out.append(config)
    return out or [Config(og, 1)]


def default_config(geo: C.ConvGeometry) -> Config:
    """The untuned tile: most accumulators that fit without spills, then fewest loads.

    Per (ky, kx, k) step a tile loads `weights + planes*pixels` registers and does
    `weights*planes*pixels` and/cnt/uadalp triples.
    """

    def score(config: Config) -> tuple:
        acc, weights = _registers(config, geo)
        loads = weights + geo.planes * config.pixels
        return acc + weights <= ACC_REGISTERS, acc, acc / loads

    return max(configs(geo), key=score)


# --------------------------------------------------------------------------- compute


def neon_tensors(geo: C.ConvGeometry, bipolar: bool, fused: bool) -> C.ConvTensors:
    """The ABC conv on uint16 lanes; same placeholders and result as `compute.abc_conv`."""
    dtype = C.word_dtype(geo.word_bits)
    q, og = lanes_per_word(geo.word_bits), words_per_register(geo.word_bits)
    kh, kw = geo.kernel
    sh, sw = geo.stride
    m, n, k = geo.bases, geo.planes, geo.words
    packed = te.placeholder((n, geo.batch, geo.height, geo.width, k), dtype, name="packed")
    wbits = te.placeholder((m, geo.out_channels, kh, kw, k), dtype, name="wbits")
    wsum = te.placeholder((m, geo.out_channels, kh, kw), "int32", name="wsum")
    padded = C.pad_packed(packed, geo)
    p = C.act_popcount(padded, geo)
    s = C.valid_wsum(wsum, geo) if bipolar else None

    a16 = te.compute(
        (n, geo.batch, geo.padded_height, geo.padded_width, k, og * q),
        lambda n_, b, h, w, k_, l: lane(padded[n_, b, h, w, k_], tirx.floormod(l, q), dtype),
        name=ACT_LANES,
    )
    w16 = te.compute(
        (m, geo.out_channels, kh, kw, k, q),
        lambda m_, o, ky, kx, k_, j: lane(wbits[m_, o, ky, kx, k_], j, dtype),
        name=WEIGHT_LANES,
    )
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    rk = te.reduce_axis((0, k), name="rk")

    def _acc(m_, n_, b, o, y, x, j):
        act = a16[n_, b, y * sh + ry, x * sw + rx, rk, tirx.floormod(o, og) * q + j]
        return te.sum(tirx.popcount(act & w16[m_, o, ry, rx, rk, j]), axis=[ry, rx, rk])

    shape = (m, n, geo.batch, geo.out_channels, geo.out_height, geo.out_width)
    geometry = json.dumps({**geo.__dict__, "bipolar": bool(bipolar), "fused": bool(fused)})
    acc = te.compute((*shape, q), _acc, name=C.CONV,
                     attrs={"schedule_rule": C.SCHEDULE_RULE, GEOMETRY_ATTR: geometry})
    rj = te.reduce_axis((0, q), name="rj")
    t = te.compute(shape, lambda *i: te.sum(acc[(*i, rj)].astype("int32"), axis=rj),
                   name=CONV_SUM)
    dot = C.combine_dot(t, p, s, bipolar)
    if not fused:
        return C.ConvTensors(packed, wbits, wsum, dot)
    alpha = te.placeholder((m, geo.out_channels), "float32", name="alpha")
    beta = te.placeholder((n,), "float32", name="beta")
    out = C.epilogue(dot, alpha, beta)
    return C.ConvTensors(packed, wbits, wsum, dot, alpha, beta, out)


def neon_conv_func(geo: C.ConvGeometry, bipolar: bool, fused: bool) -> tirx.PrimFunc:
    """The unscheduled NEON PrimFunc: what MetaSchedule tunes with the `abc_conv2d` rule.

    Every other block, the root included, is marked `schedule_rule = "None"`: the rule
    schedules the whole function, and MetaSchedule's generic rules there (auto-inline,
    parallel/vectorize/unroll annotations on the root) would undo it.
    """
    tensors = neon_tensors(geo, bipolar, fused)
    sch = s_tir.Schedule(te.create_prim_func(tensors.conv_args if fused else tensors.dot_args))
    root = sch.get_sblock("root")
    for block in [root, *sch.get_child_blocks(root)]:
        if sch.get(block).name_hint != C.CONV:
            sch.annotate(block, "schedule_rule", "None")
    return sch.mod["main"]


# -------------------------------------------------------------------------- schedule


def schedule_bitpack(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Bit-packing is compares and ORs: the CPU schedule vectorises it over pixels already."""
    return cpu.schedule_bitpack(func)


def schedule_conv(func: tirx.PrimFunc, geo: C.ConvGeometry, fused: bool,
                  config: Config | None = None) -> tirx.PrimFunc:
    """Schedule the ABC conv for NEON; `func` (the generic compute) fixes bipolar or not.

    The generic compute is rebuilt on uint16 lanes (see the module doc); where that form
    does not apply, `func` gets the generic CPU schedule.
    """
    if not supported(geo):
        return cpu.schedule_conv(func, geo, fused=fused)
    bipolar = has_block(s_tir.Schedule(func), C.VALID_WSUM)
    sch = s_tir.Schedule(neon_conv_func(geo, bipolar, fused))
    apply(sch, geo, fused, config or default_config(geo))
    return sch.mod["main"]


def apply(sch: s_tir.Schedule, geo: C.ConvGeometry, fused: bool, config: Config) -> None:
    """Apply one register tile to an unscheduled `neon_conv_func` (in place)."""
    og = words_per_register(geo.word_bits)
    ob, xb = config.channels, config.pixels
    if ob % og or geo.out_channels % ob or geo.out_width % xb:
        raise ValueError(f"tile {config} does not divide {geo.out_channels} output channels "
                         f"in registers of {og}, or {geo.out_width} output pixels")
    conv = sch.get_sblock(C.CONV)
    csum = sch.get_sblock(CONV_SUM)
    w16 = sch.get_sblock(WEIGHT_LANES)
    sch.transform_layout(w16, ("write", 0), lambda m, o, ky, kx, k, j: (
        m, o // ob, ky, kx, k, o % ob, j))

    if fused:
        sch.compute_inline(C.DOT)
        driver = sch.get_sblock(C.EPILOGUE)
        out_local = sch.cache_write(driver, 0, "local")
        b, o, y, x, rm, rn = sch.get_loops(driver)
        oo, oi = sch.split(o, [None, ob])
        xo, xi = sch.split(x, [None, xb])
        sch.reorder(b, y, oo, xo, rm, rn, xi, oi)
        sch.parallel(sch.fuse(b, y, oo))
        anchor = rm  # one base m at a time: its tile is consumed at once by the epilogue
    else:
        driver = sch.get_sblock(C.DOT)
        m, n, b, o, y, x = sch.get_loops(driver)
        oo, oi = sch.split(o, [None, ob])
        xo, xi = sch.split(x, [None, xb])
        sch.reorder(b, y, oo, xo, m, n, xi, oi)
        sch.parallel(sch.fuse(b, y, oo))
        anchor = m
    sch.compute_at(csum, anchor, preserve_unit_loops=True)
    sch.compute_at(conv, anchor, preserve_unit_loops=True)
    cpu._valid_wsum_at(sch, xo)
    if fused:
        sch.reverse_compute_at(out_local, xo)
        sch.transform_layout(driver, ("write", 0), lambda b, o, y, x: (b, y, x, o))
    cpu._vectorize_inner(sch, driver, unroll=2 if fused else 1)

    # The hot loop: (ky, kx, k) outside; planes x pixels x weight registers unrolled inside;
    # the 128-bit register (og words x q lanes) vectorised.
    m_, n_, b_, o_, y_, x_, j_, ry, rx, rk = sch.get_loops(conv)[-10:]
    o_reg, o_lane = sch.split(o_, [None, og])
    sch.reorder(m_, b_, y_, ry, rx, rk, n_, x_, o_reg, o_lane, j_)
    sch.set_scope(conv, 0, "local")
    sch.transform_layout(conv, ("write", 0), lambda m, n, b, o, y, x, j: (m, n, b, y, x, o, j))
    sch.vectorize(sch.fuse(o_lane, j_))
    for loop in (n_, x_, o_reg):
        sch.unroll(loop)
    sch.decompose_reduction(conv, ry)

    # Lanes to int32, one 128-bit register (og channels x q lanes) at a time: contiguous
    # loads and in-register pairwise adds (`_lane_sum_intrin`), not per-lane gathers.
    m_, n_, b_, o_, y_, x_, j_ = sch.get_loops(csum)[-7:]
    o_reg, o_lane = sch.split(o_, [None, og])
    sch.reorder(m_, b_, y_, n_, x_, o_reg, o_lane, j_)
    sch.set_scope(csum, 0, "local")
    sch.transform_layout(csum, ("write", 0), lambda m, n, b, o, y, x: (m, n, b, y, x, o))
    init = sch.decompose_reduction(csum, o_reg)
    sch.vectorize(sch.fuse(*sch.get_loops(init)[-2:]))
    sch.tensorize(o_lane, lane_sum_intrin(og, lanes_per_word(geo.word_bits)))
    for loop in (n_, x_, o_reg):
        sch.unroll(loop)
    if fused:
        sch.decompose_reduction(driver, sch.get_loops(driver)[-4])

    for name, count in ((C.PAD, 3), (ACT_LANES, 3), (C.ACT_POPCOUNT, 3),
                        (C.VALID_WSUM_COLS, 2)):
        if has_block(sch, name):
            cpu._parallel_outer(sch, sch.get_sblock(name), count)
    cpu._parallel_outer(sch, w16, 2)


# ------------------------------------------------------------------- MetaSchedule rule


def _rule(sch: s_tir.Schedule, block: s_tir.SBlockRV) -> list[s_tir.Schedule]:
    """MetaSchedule: one design per register tile of `configs`, measured by the tuner.

    A block of the generic compute (no geometry annotation) goes to the generic CPU rule
    where one is registered, else stays as it is for MetaSchedule's default rules.
    """
    annotations = sch.get(block).annotations
    if GEOMETRY_ATTR not in annotations:
        generic = tvm.get_global_func(f"s_tir.meta_schedule.cpu.{C.SCHEDULE_RULE}",
                                      allow_missing=True)
        return list(generic(sch, block)) if generic is not None else [sch]
    info = json.loads(str(annotations[GEOMETRY_ATTR]))
    fused = bool(info.pop("fused"))
    info.pop("bipolar")
    geo = C.ConvGeometry(**{k: tuple(v) if isinstance(v, list) else v
                            for k, v in info.items()})
    designs = []
    for config in configs(geo):
        s = sch.copy()
        apply(s, geo, fused, config)
        designs.append(s)
    return designs


def unscheduled_conv(geo: C.ConvGeometry, bipolar: bool,
                     fused: bool) -> tirx.PrimFunc | None:
    """What `abc-tvm tune` hands MetaSchedule for an ARM target: the NEON compute, whose
    `abc_conv2d` rule then tries every `configs` tile; None where NEON does not apply (the
    generic compute of `compute.py` is tuned then)."""
    return neon_conv_func(geo, bipolar, fused) if supported(geo) else None


_RULE_NAME = f"s_tir.meta_schedule.arm_cpu.{C.SCHEDULE_RULE}"
if tvm.get_global_func(_RULE_NAME, allow_missing=True) is None:
    tvm.register_global_func(_RULE_NAME, _rule)
