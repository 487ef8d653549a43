"""CPU schedules (LLVM: x86, and aarch64 where the NEON kernel does not apply) for ABC kernels.

Conv: parallel over (batch, output row, block of output channels); a vector of output
channels is the SIMD register (weights are re-laid out so that it is contiguous, and one
activation word is broadcast against it); a few output pixels, a few channel vectors and
all N planes are unrolled so their accumulators stay in registers; one weight base m at a
time, so the float epilogue accumulates alpha[m,o]*beta[n]*dot in registers too and the
int32 intermediate never reaches memory.

Every schedule here is written once, as `apply_*(sch, ..., knobs)`, where a knob is an int or
a MetaSchedule random variable: `schedule_*` applies the default knobs; the MetaSchedule
rules registered at the bottom (`s_tir.meta_schedule.cpu.abc_conv2d`, `.abc_bitpack`) draw
each knob with `sample_categorical` from candidates that include the default, so the tuner
explores them (its initial population re-samples every draw).
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import s_tir, tirx
from tvm.script import tirx as T

from . import compute as C
from ._util import NEON_A64, SIMD, divisor_at_most, has_block, simd_of
from .lanes import (
    BYTE_CHANNELS,
    BYTE_FORM,
    PAIRWISE_STEPS,
    byte_popcount_intrin,
    lane_reduce_intrin,
    lane_sum_intrin,
    lanes_per_word,
    pack_desc,
    pack_neon_intrin,
    words_per_register,
)

_MAX_PIXELS = 8
Knob = int | s_tir.schedule.ExprRV


def _channel_vector(out_channels: int, word_bits: int) -> int:
    """Output channels per vector: 8 words = one 512-bit register of uint64 popcounts."""
    return divisor_at_most(out_channels, 16 if word_bits <= 32 else 8)


def conv_accumulators(simd: SIMD) -> int:
    """Register budget of the conv tile, in accumulators N * pixels of 8-word vectors.

    24 where there are 32 registers (AVX-512, aarch64); 12 on AVX2, where a vector is two
    ymm registers: measured on Zen 3, 64->64 56x56 M=N=3, 8 pixels (24 vectors) 5.2 ms,
    1-4 pixels 4.7-4.8 ms; every tile of M=N=1 and M=N=5 layers within 3% of the others.
    """
    return 24 if simd.registers >= 32 else 12


def _pixel_block(out_width: int, planes: int, simd: SIMD) -> int:
    """Output pixels per register tile, so that planes * pixels accumulators fit."""
    limit = max(1, min(_MAX_PIXELS, conv_accumulators(simd) // planes))
    best = divisor_at_most(out_width, limit)
    # A poor divisor (e.g. a prime width) costs more than a predicate on the last tile.
    return best if 2 * best > limit else min(limit, out_width)


@dataclass(frozen=True)
class ConvKnobs:
    """The tunable choices of the conv schedule (ints, or MetaSchedule ExprRVs)."""

    vectors: Knob  # output-channel vectors per register tile (tile = vectors * vector width)
    pixels: Knob  # output pixels per register tile
    unroll: Knob  # auto-unroll budget for the (ky, kx, k) reduction loops (0: none)


def conv_candidates(geo: C.ConvGeometry, simd: SIMD | None = None) -> dict[str, list[int]]:
    """Candidate values of each conv knob, the default first (`simd`: the target in scope's
    register file, else the host's)."""
    vec = _channel_vector(geo.out_channels, geo.word_bits)
    blocks = geo.out_channels // vec
    vectors = [r for r in (1, 2, 4) if blocks % r == 0]
    default_px = _pixel_block(geo.out_width, geo.planes, simd or simd_of())
    pixels = [default_px] + [
        p for p in (1, 2, 4, 7, 8) if p != default_px and p <= geo.out_width
        and p * geo.planes <= 32]
    return {"vectors": vectors, "pixels": pixels, "unroll": [0, 16, 64]}


def default_conv_knobs(geo: C.ConvGeometry) -> ConvKnobs:
    return ConvKnobs(**{k: v[0] for k, v in conv_candidates(geo).items()})


def _parallel_outer(sch: s_tir.Schedule, block: s_tir.SBlockRV, count: int) -> None:
    """Fuse the outer `count` loops of a root stage and run them in parallel."""
    loops = sch.get_loops(block)
    sch.parallel(sch.fuse(*loops[:count]) if count > 1 else loops[0])


# ------------------------------------------------------------------------------- bitpack


def bitpack_candidates(width: int) -> list[int]:
    """Pixels per vector of the bit-pack loop (divisors of the width), the default first."""
    default = divisor_at_most(width, 16)
    return [default] + [v for v in (4, 8, 16, 32) if v != default and width % v == 0]


def apply_bitpack(sch: s_tir.Schedule, vec: Knob) -> None:
    """Parallel over (plane, batch, row); the reduction over bits is serial, pixels vectorised.

    x is NCHW, so for one channel the pixels of a row are contiguous: vectorising over w
    reads whole rows, and the 64 compares of one word are a serial loop of vector ORs.
    """
    pack = sch.get_sblock(C.PACK)
    local = sch.cache_write(pack, 0, "local")
    n, b, h, w, k, j = sch.get_loops(pack)
    wo, wi = sch.split(w, [None, vec])
    sch.reorder(n, b, h, wo, k, j, wi)
    sch.parallel(sch.fuse(n, b, h))
    sch.reverse_compute_at(local, k)
    sch.vectorize(wi)
    sch.decompose_reduction(pack, j)


def apply_bitpack_nhwc(sch: s_tir.Schedule, rows: Knob) -> None:
    """NHWC source: parallel over (plane, batch, row blocks); each word from vector compares."""
    pack = sch.get_sblock(C.PACK)
    n, b, h, w, k, j = sch.get_loops(pack)
    ho, _ = sch.split(h, [None, rows])
    sch.parallel(sch.fuse(n, b, ho))
    func = sch.mod["main"]
    x, thr, out = func.params[0], func.params[1], func.params[-1]
    _schedule_pack(sch, pack, int(x.shape[3]), int(out.dtype.bits), "global",
                   per_channel=len(thr.shape) == 2)


def schedule_bitpack_nhwc(func: tirx.PrimFunc) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    apply_bitpack_nhwc(sch, 1)
    return sch.mod["main"]


def schedule_bitpack(func: tirx.PrimFunc) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    width = int(func.params[0].shape[3])
    apply_bitpack(sch, bitpack_candidates(width)[0])
    return sch.mod["main"]


# ---------------------------------------------------------------------------------- conv


def schedule_conv(func: tirx.PrimFunc, geo: C.ConvGeometry, fused: bool) -> tirx.PrimFunc:
    """Schedule the ABC conv with the default knobs: fused (float NCHW out) or the dot alone."""
    sch = s_tir.Schedule(func)
    apply_conv(sch, geo, fused, default_conv_knobs(geo))
    return sch.mod["main"]


def apply_conv(sch: s_tir.Schedule, geo: C.ConvGeometry, fused: bool, knobs: ConvKnobs) -> None:
    """Schedule an unscheduled ABC conv in place.

    Vectorise/unroll are applied before decompose_reduction: s_tir refuses to vectorise
    an update block that has lost its init, while decompose copies the loop kinds over.
    """
    vec = _channel_vector(geo.out_channels, geo.word_bits)
    conv = sch.get_sblock(C.CONV)

    # Weights to [M, O/vec, KH, KW, K, vec]: a vector over vec is one contiguous load.
    wt = sch.cache_read(conv, 1, "global")
    sch.transform_layout(wt, ("write", 0),
                         lambda m, o, ky, kx, k: (m, o // vec, ky, kx, k, o % vec))

    if fused:
        sch.compute_inline(C.DOT)
        driver = sch.get_sblock(C.EPILOGUE)
        out_local = sch.cache_write(driver, 0, "local")
        b, o, y, x, rm, rn = sch.get_loops(driver)
        oo, ov, oi = sch.split(o, [None, knobs.vectors, vec])
        xo, xi = sch.split(x, [None, knobs.pixels])
        sch.reorder(b, y, oo, xo, rm, rn, xi, ov, oi)
        sch.parallel(sch.fuse(b, y, oo))
        # One base m at a time: its int32 tile is consumed at once by the float epilogue.
        sch.compute_at(conv, rm, preserve_unit_loops=True)
        _valid_wsum_at(sch, xo)
        sch.reverse_compute_at(out_local, xo)
        # Output channels innermost in the register tile, so the vector is contiguous.
        sch.transform_layout(driver, ("write", 0), lambda b, o, y, x: (b, y, x, o))
        _vectorize_inner(sch, driver, unroll=3)
    else:
        driver = sch.get_sblock(C.DOT)
        m, n, b, o, y, x = sch.get_loops(driver)
        oo, ov, oi = sch.split(o, [None, knobs.vectors, vec])
        xo, xi = sch.split(x, [None, knobs.pixels])
        sch.reorder(b, y, oo, xo, m, n, xi, ov, oi)
        sch.parallel(sch.fuse(b, y, oo))
        sch.compute_at(conv, m, preserve_unit_loops=True)
        _valid_wsum_at(sch, xo)
        _vectorize_inner(sch, driver, unroll=2)

    # The hot loop: reduction (ry, rx, rk) outside, planes x pixels x channel vectors inside.
    m_, n_, b_, o_, y_, x_, ry, rx, rk = sch.get_loops(conv)[-9:]
    ov_, oi_ = sch.split(o_, [None, vec])
    sch.reorder(m_, b_, y_, ry, rx, rk, n_, x_, ov_, oi_)
    sch.set_scope(conv, 0, "local")
    # Accumulator tile with output channels innermost: one register per (n, pixel, vector).
    sch.transform_layout(conv, ("write", 0), lambda m, n, b, o, y, x: (m, n, b, y, x, o))
    _vectorize_inner(sch, conv, unroll=3)
    sch.annotate(ry, "pragma_auto_unroll_max_step", knobs.unroll)
    sch.annotate(ry, "pragma_unroll_explicit", 1)
    sch.decompose_reduction(conv, ry)
    if fused:
        sch.decompose_reduction(driver, sch.get_loops(driver)[-5])

    for name, count in ((C.PAD, 3), (C.ACT_POPCOUNT, 3), (C.VALID_WSUM_COLS, 2)):
        if has_block(sch, name):
            _parallel_outer(sch, sch.get_sblock(name), count)
    _parallel_outer(sch, wt, 2)


def _valid_wsum_at(sch: s_tir.Schedule, loop: s_tir.LoopRV) -> None:
    """Bipolar border sums for one register tile, before the bases loop that reuses them."""
    if not has_block(sch, C.VALID_WSUM):
        return
    block = sch.get_sblock(C.VALID_WSUM)
    sch.compute_at(block, loop, preserve_unit_loops=True)
    m, y, x, o, ry = sch.get_loops(block)[-5:]
    sch.reorder(m, y, x, ry, o)
    sch.set_scope(block, 0, "local")
    sch.vectorize(o)
    sch.decompose_reduction(block, ry)


def _vectorize_inner(sch: s_tir.Schedule, block: s_tir.SBlockRV, unroll: int) -> None:
    """Vectorise the innermost loop of a block and unroll the `unroll` loops just outside."""
    loops = sch.get_loops(block)
    sch.vectorize(loops[-1])
    for loop in loops[-1 - unroll : -1]:
        sch.unroll(loop)


# ------------------------------------------------------------------- fused block kernel


@dataclass(frozen=True)
class BlockKnobs:
    """Tunable choices of the fused block schedule (ints, or MetaSchedule ExprRVs)."""

    vectors: Knob  # channel vectors per register tile
    pixels: Knob  # output pixels per register tile
    unroll: Knob  # auto-unroll budget of the (ky, kx, k) reduction loops


def block_vector(out_channels: int, word_bits: int) -> int:
    """Channels per weight vector (the weight layout the Relax pass writes): 512 bits."""
    return _channel_vector(out_channels, word_bits)


def block_candidates(spec: C.BlockSpec) -> dict[str, list[int]]:
    """Candidate knob values, the default first.

    Pixel tiles divide the output width (a predicated tile cannot use the packing
    intrinsic and unrolls badly); registers: N*pixels*vectors int64 accumulators plus the
    vectors of weights within the 32 vector registers.
    """
    geo = spec.geo
    if spec.lane_bits == BYTE_FORM:
        return _byte_candidates(spec)
    per_tile = spec.word_block // spec.vec
    vectors = [r for r in (1, 2, 4, 8) if per_tile % r == 0]
    ow, n = geo.out_width, geo.planes
    divisors = [p for p in range(1, min(ow, 16) + 1) if ow % p == 0]
    # Measured on Zen 5 (ResNet-18 layers): about 12 accumulators where the reduction is
    # short (one word per tap), up to 21 otherwise; at most two channel vectors. Counted in
    # 512-bit registers: a NEON accumulator of 8 words is four q registers, so a quarter
    # there (more spilled: 20 stores and 28 reloads per step on the Pi 4 model). x86 keeps
    # its measured limits.
    simd = simd_of()
    per_acc = max(1, spec.vec * geo.word_bits // simd.bits) if simd.name.startswith("neon") \
        else 1
    limit = max(1, (12 if geo.words <= 2 else 21) // per_acc)
    best = None
    for r in [v for v in vectors if v <= 2]:
        for px in divisors:
            regs = n * px * r
            if regs > limit and (px, r) != (1, 1):
                continue
            score = (regs, r)
            if best is None or score > best[0]:
                best = (score, r, px)
    _, r0, px0 = best if best else (None, 1, 1)
    unroll = [0, 16, 64]
    if geo.words == 1 and n == 1:  # 9 one-word taps, one plane: the glue weighs most
        r0, px0, unroll = 1, divisor_at_most(ow, 4), [64, 0, 16]
    pixels = [px0] + [p for p in divisors if p != px0 and n * p * per_acc <= 28]
    return {"vectors": [r0] + [r for r in vectors if r != r0], "pixels": pixels,
            "unroll": unroll}


# uint16x8 accumulators of a byte-form tile: with the 4 weight registers of a step, its
# activation broadcasts and the count/pairwise temporaries, within aarch64's 32 registers.
BYTE_ACCUMULATORS = 16


def byte_groups(out_channels: int, word_bits: int = 64) -> int:
    """8-channel groups of a byte-form tile: the channels of one packed word (all of them
    where they are not whole words, as `BlockSpec.word_block`)."""
    wb = word_bits if out_channels % word_bits == 0 else out_channels
    return wb // BYTE_CHANNELS


def _byte_candidates(spec: C.BlockSpec) -> dict[str, list[int]]:
    """Byte form: a tile is whole words of channels x `pixels`; pixels so that the
    accumulators (bases x planes x pixels x groups) stay within BYTE_ACCUMULATORS."""
    geo = spec.geo
    per_px = geo.bases * geo.planes * (direct_channels(spec) if C.direct_fold(spec)
                                       else spec.word_block) // BYTE_CHANNELS
    limit = max(1, BYTE_ACCUMULATORS // per_px)
    px0 = divisor_at_most(geo.out_width, limit)
    pixels = [px0] + [p for p in range(1, min(geo.out_width, 8) + 1)
                      if p != px0 and geo.out_width % p == 0 and p * per_px <= 24]
    return {"vectors": [1], "pixels": pixels, "unroll": [64, 0, 16]}


def default_block_knobs(spec: C.BlockSpec) -> BlockKnobs:
    return BlockKnobs(**{k: v[0] for k, v in block_candidates(spec).items()})


def schedule_block(func: tirx.PrimFunc, spec: C.BlockSpec,
                   knobs: BlockKnobs | None = None) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    apply_block(sch, spec, knobs or default_block_knobs(spec))
    return sch.mod["main"]


def apply_block(sch: s_tir.Schedule, spec: C.BlockSpec, knobs: BlockKnobs) -> None:
    """The fused block: parallel over (batch, word of output channels, row), then pixel tiles.

    Per tile and channel sub-block: for each base m, the N x pixels x vectors int64
    accumulators live in registers over the whole (ky, kx, k) reduction (one broadcast
    activation word against `vectors` weight vectors), then fold into the float tile
    c += ab * (Q - 2t). When all sub-blocks of a word are done, the glue (scale, shift,
    residual, ReLU) and the next layer's bit-packing run on the tile in L1.
    """
    if spec.lane_bits == BYTE_FORM:
        _apply_byte_block(sch, spec, knobs)
        return
    geo = spec.geo
    vec, wb = spec.vec, spec.word_block
    conv = sch.get_sblock(C.CONV)
    acc = sch.get_sblock(C.ACCUMULATE)
    glue = sch.get_sblock(C.GLUE)
    b, y, x, o, rm, rn = sch.get_loops(acc)
    oo, sub, ov, oi = sch.split(o, [geo.out_channels // wb, None, knobs.vectors, vec])
    xo, xi = sch.split(x, [None, knobs.pixels])
    # Channel blocks outside rows: consecutive tasks reuse one block's weights from L2
    # (M x 64 channels x KH x KW x K words; all of a layer's weights need not fit).
    sch.reorder(b, oo, y, xo, sub, rm, rn, xi, ov, oi)
    sch.parallel(sch.fuse(b, oo, y))
    sch.set_scope(acc, 0, "local")
    if not spec.lane_bits:  # the lane form places its two stages itself
        sch.compute_at(conv, rm, preserve_unit_loops=True)
    pack, out = _place_epilogue(sch, spec, glue, xo)

    # The hot loop: (ky, kx, k) outside; planes x pixels x channel vectors unrolled inside.
    if spec.lane_bits:
        ry = _lane_hot_loop(sch, spec, conv, rm, fixed=isinstance(knobs.vectors, int))
    else:
        n_, b_, y_, x_, o_, ry, rx, rk = sch.get_loops(conv)[-8:]
        o_v, o_i = sch.split(o_, [None, vec])
        sch.reorder(ry, rx, rk, n_, b_, y_, x_, o_v, o_i)
        sch.set_scope(conv, 0, "local")
        sch.vectorize(o_i)
        for loop in (n_, x_, o_v):
            sch.unroll(loop)
    sch.annotate(ry, "pragma_auto_unroll_max_step", knobs.unroll)
    sch.annotate(ry, "pragma_unroll_explicit", 1)
    sch.decompose_reduction(conv, ry)

    # Fold each base into the float tile: ab * (Q - 2t), all in registers.
    sch.vectorize(oi)
    for loop in (rn, xi, ov):
        sch.unroll(loop)
    sch.decompose_reduction(acc, rm)

    # Glue over the whole word of channels of the tile. Where it feeds the packing, vectors
    # of 8 floats, the width the packing compares (mixed widths make LLVM shuffle lanes).
    width = 8 if pack is not None else 16
    for block in (glue, out):
        if block is None:
            continue
        gl = sch.get_loops(block)
        _, g_oi = sch.split(gl[-1], [None, divisor_at_most(int(sch.get(gl[-1]).extent), width)])
        sch.vectorize(g_oi)
    if pack is not None:
        _schedule_pack(sch, pack, geo.out_channels, geo.word_bits, "local",
                       spec.next_per_channel)

    _parallel_producers(sch)


def _place_epilogue(sch: s_tir.Schedule, spec: C.BlockSpec, glue: s_tir.SBlockRV,
                    loop: s_tir.LoopRV) -> tuple[s_tir.SBlockRV | None, s_tir.SBlockRV | None]:
    """The glue, and where the block packs for the next layer its packing (and its float
    output), computed under `loop`, so they run on the tile while it is in registers or L1.
    Returns (pack, float out), None where the block has none."""
    sch.reverse_compute_at(glue, loop, preserve_unit_loops=True)
    pack = out = None
    if spec.next_planes:
        sch.set_scope(glue, 0, "local")
        pack = sch.get_sblock(C.PACK_OUT)
        sch.reverse_compute_at(pack, loop, preserve_unit_loops=True)
        if spec.float_out:
            out = sch.get_sblock(C.GLUE_OUT)
            sch.reverse_compute_at(out, loop, preserve_unit_loops=True)
    return pack, out


def _parallel_producers(sch: s_tir.Schedule) -> None:
    """The block kernel's stages before the hot loop (padding, activation lanes, activation
    popcounts), each parallel over its outer three loops where the kernel has it."""
    for name in (C.PAD, C.ACT_LANES, C.ACT_POPCOUNT):
        if has_block(sch, name):
            _parallel_outer(sch, sch.get_sblock(name), 3)


def _apply_byte_block(sch: s_tir.Schedule, spec: C.BlockSpec, knobs: BlockKnobs) -> None:
    """The byte form (aarch64 NEON, `lanes.byte_popcount_intrin`): parallel over (batch,
    word of output channels, row), then tiles of `pixels` pixels x the word's channels.

    A tile's uint16 accumulators (one register per 8 channels, pixel, base and plane) live
    over the whole (ky, kx, k) reduction; then, pixel by pixel and in registers, the fold
    c = sum ab * (Q - 2t), the glue and the next layer's packing (one word, `pack_neon_intrin`).
    """
    geo = spec.geo
    wb = spec.word_block
    conv = sch.get_sblock(C.CONV)
    acc = sch.get_sblock(C.ACCUMULATE)
    glue = sch.get_sblock(C.GLUE)
    if C.direct_fold(spec):
        _apply_byte_direct(sch, spec, knobs, conv, acc, glue)
        return
    b, y, x, o, rm, rn = sch.get_loops(acc)
    oo, ov = sch.split(o, [geo.out_channels // wb, wb])
    xo, xi = sch.split(x, [None, knobs.pixels])
    sch.reorder(b, oo, y, xo, xi, rm, rn, ov)
    sch.parallel(sch.fuse(b, oo, y))
    sch.set_scope(acc, 0, "local")
    sch.compute_at(conv, xo, preserve_unit_loops=True)
    pack, out = _place_epilogue(sch, spec, glue, xi)

    # The hot loop: (ky, kx, k) outside; bases x 8-channel groups x planes x pixels unrolled
    # inside, each one update of the intrinsic (its lanes reduction innermost). A group's
    # weights serve all its pixels at once (pixels outside, LLVM keeps every group's weights
    # of a step live to reuse them: spills).
    _byte_hot_loop(sch, spec, knobs, conv)

    # Per pixel (unrolled: the accumulators are indexed by it), the fold over 16 lanes.
    sch.unroll(xi)
    ov_o, ov_i = sch.split(ov, [None, 16])
    sch.unroll(ov_o)
    sch.vectorize(ov_i)
    for loop in (rm, rn):
        sch.unroll(loop)
    sch.decompose_reduction(acc, rm)
    for block in (glue, out):
        if block is None:
            continue
        gl = sch.get_loops(block)
        g_o, g_i = sch.split(gl[-1], [None, divisor_at_most(int(sch.get(gl[-1]).extent), 16)])
        sch.unroll(g_o)
        sch.vectorize(g_i)
    if pack is not None:
        _schedule_pack(sch, pack, geo.out_channels, geo.word_bits, "local",
                       spec.next_per_channel)
    _parallel_producers(sch)


def _byte_hot_loop(sch: s_tir.Schedule, spec: C.BlockSpec, knobs: BlockKnobs,
                   conv: s_tir.SBlockRV) -> None:
    """The byte form's hot loop, its init and the intrinsic (`_apply_byte_block`)."""
    m_, n_, b_, y_, x_, o_, ry, rx, rk, rj = sch.get_loops(conv)[-10:]
    o_g, o_i = sch.split(o_, [None, BYTE_CHANNELS])
    sch.reorder(ry, rx, rk, m_, o_g, n_, b_, y_, x_, o_i, rj)
    sch.set_scope(conv, 0, "local")
    init = sch.decompose_reduction(conv, ry)
    sch.vectorize(sch.get_loops(init)[-1])
    for loop in sch.get_loops(init)[-6:-1]:
        sch.unroll(loop)
    sch.tensorize(o_i, byte_popcount_intrin(spec.bipolar, spec.geo.word_bits))
    for loop in (m_, n_, x_, o_g):
        sch.unroll(loop)
    sch.annotate(ry, "pragma_auto_unroll_max_step", knobs.unroll)
    sch.annotate(ry, "pragma_unroll_explicit", 1)


GLUE_LANES = 4  # floats per glue vector of the direct fold: one q register


def direct_channels(spec: C.BlockSpec) -> int:
    """Output channels per sub-tile of the direct fold. 1x1 kernels (the glue weighs as much
    as the popcounts): 16 (two 8-channel groups), so that 8 pixels share a sub-tile's weights
    and per-channel operands (Pi 4 model, ReActNet-A 128->128 1x1 @56: 2.60 -> 2.19 M
    cycles). Larger kernels: the whole word (sub-tiles cost them 1-4%)."""
    if spec.geo.kernel != (1, 1):
        return spec.word_block
    return 16 if spec.word_block % 16 == 0 else BYTE_CHANNELS


def _apply_byte_direct(sch: s_tir.Schedule, spec: C.BlockSpec, knobs: BlockKnobs,
                       conv: s_tir.SBlockRV, acc: s_tir.SBlockRV,
                       glue: s_tir.SBlockRV) -> None:
    """The byte form where the fold is one term (`compute.direct_fold`): the fold inlined
    into the glue, and the glue over a tile with its channel vectors outside its pixels, so
    a vector's per-channel operands (Q, ab, scale, shift, biases, slope) are loaded once per
    tile and serve all its pixels, not once per pixel (where they were also hoisted out of
    the tile loop and spilled: the A72's one load pipe bound the glue)."""
    geo = spec.geo
    wb = spec.word_block
    sch.compute_inline(acc)
    b, y, x, o = sch.get_loops(glue)
    oo, ov = sch.split(o, [geo.out_channels // wb, wb])
    xo, xi = sch.split(x, [None, knobs.pixels])
    # A serial loop over sub-tiles of channels inside the pixel tile: what a sub-tile loads
    # (weights, the glue's operands) varies with it, so LLVM cannot hoist all of a word's
    # out of the tile loop (and spill them).
    sub, oc = sch.split(ov, [None, direct_channels(spec)])
    ovo, ovi = sch.split(oc, [None, GLUE_LANES])
    sch.reorder(b, oo, y, xo, sub, ovo, xi, ovi)
    sch.parallel(sch.fuse(b, oo, y))
    sch.compute_at(conv, sub, preserve_unit_loops=True)
    _byte_hot_loop(sch, spec, knobs, conv)
    sch.vectorize(ovi)
    sch.unroll(xi)
    sch.unroll(ovo)
    _parallel_producers(sch)


def _lane_hot_loop(sch: s_tir.Schedule, spec: C.BlockSpec, conv: s_tir.SBlockRV,
                   rm: s_tir.LoopRV, fixed: bool = True) -> s_tir.LoopRV:
    """The 16-bit lane form of the hot loop (`compute._lane_conv`): one 128-bit register
    (og words x q lanes) vectorised, the tile's registers unrolled; the lanes are summed to
    int32 once per tile and base (`lanes.lane_sum_intrin`), before the float fold. Returns
    the outermost reduction loop."""
    og = words_per_register(spec.geo.word_bits)
    q = lanes_per_word(spec.geo.word_bits)
    csum = sch.get_sblock(C.CONV_SUM)
    sch.compute_at(csum, rm, preserve_unit_loops=True)
    sch.compute_at(conv, rm, preserve_unit_loops=True)
    n_, b_, y_, x_, o_, j_, ry, rx, rk = sch.get_loops(conv)[-9:]
    o_reg, o_lane = sch.split(o_, [None, og])
    sch.reorder(ry, rx, rk, n_, b_, y_, x_, o_reg, o_lane, j_)
    sch.set_scope(conv, 0, "local")
    sch.vectorize(sch.fuse(o_lane, j_))
    for loop in (n_, x_, o_reg):
        sch.unroll(loop)

    n_, b_, y_, x_, o_, j_ = sch.get_loops(csum)[-6:]
    sch.set_scope(csum, 0, "local")
    geo = spec.geo
    words = int(sch.get(o_).extent)
    # The pairwise intrinsic is named by the tile's word count: only where the tile is fixed
    # (a sampled `vectors` knob would replay a trace naming another tile's intrinsic).
    if fixed and geo.kernel[0] * geo.kernel[1] * geo.words <= PAIRWISE_STEPS \
            and words in (2, 4, 8, 16):
        # A pixel's words reduce together: pairwise adds across its registers (`addp`).
        init = sch.decompose_reduction(csum, o_)
        sch.vectorize(sch.get_loops(init)[-1])
        sch.tensorize(o_, lane_reduce_intrin(words, q))
        for loop in (n_, x_):
            sch.unroll(loop)
        return ry
    o_reg, o_lane = sch.split(o_, [None, og])
    sch.reorder(n_, b_, y_, x_, o_reg, o_lane, j_)
    init = sch.decompose_reduction(csum, o_reg)
    sch.vectorize(sch.fuse(*sch.get_loops(init)[-2:]))
    sch.tensorize(o_lane, lane_sum_intrin(og, q))
    for loop in (n_, x_, o_reg):
        sch.unroll(loop)
    return ry


def _schedule_pack(sch: s_tir.Schedule, pack: s_tir.SBlockRV, channels: int, word_bits: int,
                   scope: str, per_channel: bool = False) -> None:
    """Bit-pack words of an NHWC float tile: compare + movmsk per 8 channels where possible."""
    j = sch.get_loops(pack)[-1]
    bits = int(sch.get(j).extent)
    init = sch.decompose_reduction(pack, j)
    if _neon_pack_ok(channels, word_bits, bits):
        name = pack_neon_intrin(bits, scope, per_channel, word_bits)
    else:
        ok = _movmsk_ok(channels, word_bits, bits)
        name = pack_intrin(bits, scope, per_channel) if ok else None
    if name is not None:
        sch.tensorize(j, name)
    del init


def _neon_pack_ok(channels: int, word_bits: int, bits: int) -> bool:
    """Whether a word packs with NEON compares and pairwise byte adds (`pack_neon_intrin`):
    an aarch64 target in scope, whole groups of 16 channels (64-bit words, or the 32-bit
    words of narrow layers: `block_word_bits`)."""
    target = tvm.target.Target.current(allow_none=True)
    if target is None or simd_of(target) is not NEON_A64:
        return False
    return word_bits in (32, 64) and bits in (16, 32, 64) and bits <= word_bits \
        and (channels % word_bits == 0 or channels < word_bits)


def _movmsk_ok(channels: int, word_bits: int, bits: int) -> bool:
    """Whether a word packs with compare + movmsk (x86 AVX, whole groups of 8 channels).

    Without a target in scope (MetaSchedule's rule, tests on this host) x86 is assumed: the
    fused kernels are only emitted for x86 targets.
    """
    target = tvm.target.Target.current(allow_none=True)
    if target is not None:
        triple = str(target.attrs.get("mtriple", "x86_64"))
        if str(target.kind.name) != "llvm" or not triple.startswith(("x86_64", "i686")):
            return False
    return word_bits == 64 and bits % 8 == 0 and (channels % word_bits == 0 or channels < 64)


def pack_intrin(bits: int, scope: str, per_channel: bool = False) -> str:
    """Tensor intrinsic: one packed word from `bits` floats: (z >= thr) via vcmpps + movmsk.

    `llvm.x86.avx.movmsk.ps.256` takes the sign bits of 8 float lanes; the lanes are the
    all-ones / zero int32 result of the float32 compare, so NaN packs to 0 as in ONNX.
    `per_channel`: one threshold per channel (a vector load) instead of one per word.
    """
    name = f"abc_pack_movmsk_thr{'pc' if per_channel else ''}_{bits}_{scope}"
    if s_tir.TensorIntrin.get(name, allow_missing=True) is not None:
        return name
    groups = bits // 8
    movmsk = "llvm.x86.avx.movmsk.ps.256"
    # The threshold of bit j, and of the 8 lanes of group g: v[j] or the word's one v[0].
    n_thr = bits if per_channel else 1

    def thr8(v, g):
        return v[T.ramp(g * 8, 1, 8)] if per_channel else T.broadcast(v[0], 8)

    @T.prim_func(s_tir=True)
    def impl(z: T.Buffer((bits,), "float32", offset_factor=1, scope=scope),
             v: T.Buffer((n_thr,), "float32", offset_factor=1),
             w: T.Buffer((1,), "uint64", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(w[0], v[0:n_thr], z[0:bits])
            T.writes(w[0])
            for g in T.unroll(groups):
                mask = T.Select(z[T.ramp(g * 8, 1, 8)] >= thr8(v, g),
                                T.broadcast(T.int32(-1), 8), T.broadcast(T.int32(0), 8))
                lanes = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(movmsk),
                    T.reinterpret(mask, dtype="float32x8"), dtype="int32")
                w[0] = w[0] | T.shift_left(T.Cast("uint64", lanes), T.Cast("uint64", g * 8))

    s_tir.TensorIntrin.register(name, pack_desc(bits, scope, per_channel), impl)
    return name


# -------------------------------------------------------------------- MetaSchedule rules


def _draw(sch: s_tir.Schedule, candidates: list[int]) -> s_tir.schedule.ExprRV:
    return sch.sample_categorical(candidates, [1.0 / len(candidates)] * len(candidates))


def conv_rule(sch: s_tir.Schedule, block: s_tir.SBlockRV) -> list[s_tir.Schedule]:
    """`s_tir.meta_schedule.cpu.abc_conv2d`: the hand-written schedule, knobs drawn.

    Two design spaces: the knobs drawn, and the hand-written defaults fixed, so the untuned
    schedule is always among the first candidates measured and a tuned database can only
    be slower than the default by measurement noise.
    Serves both conv kernels: the fused block kernel (`abc_block_spec` annotation) and the
    plain ABC conv / dot (`abc_conv_geometry`).
    """
    annotations = sch.get(block).annotations
    fixed = sch.copy()
    if C.BLOCK_KEY in annotations:
        spec = C.BlockSpec.from_json(str(annotations[C.BLOCK_KEY]))
        apply_block(sch, spec, BlockKnobs(**{k: _draw(sch, v)
                                             for k, v in block_candidates(spec).items()}))
        apply_block(fixed, spec, default_block_knobs(spec))
        return [sch, fixed]
    geo = C.ConvGeometry.from_json(str(annotations[C.GEOMETRY_KEY]))
    fused = has_block(sch, C.EPILOGUE)
    apply_conv(sch, geo, fused, ConvKnobs(**{k: _draw(sch, v)
                                             for k, v in conv_candidates(geo).items()}))
    apply_conv(fixed, geo, fused, default_conv_knobs(geo))
    return [sch, fixed]


def bitpack_rule(sch: s_tir.Schedule, block: s_tir.SBlockRV) -> list[s_tir.Schedule]:
    """`s_tir.meta_schedule.cpu.abc_bitpack`: the bit-pack schedule, its knob drawn, and the
    default (as in `conv_rule`)."""
    fixed = sch.copy()
    if C.PACK_KEY in sch.get(block).annotations:  # from NHWC floats: rows per parallel task
        height = int(sch.get(sch.get_loops(block)[2]).extent)
        rows = [r for r in (1, 2, 4, 8) if height % r == 0]
        apply_bitpack_nhwc(sch, _draw(sch, rows))
        apply_bitpack_nhwc(fixed, rows[0])
        return [sch, fixed]
    candidates = bitpack_candidates(int(sch.get(sch.get_loops(block)[3]).extent))
    apply_bitpack(sch, _draw(sch, candidates))
    apply_bitpack(fixed, candidates[0])
    return [sch, fixed]


# Registered at import, so a tuning record's trace (which names them) loads and replays.
for _bits in range(8, 65, 8):  # every word width `_movmsk_ok` packs (channels < 64 too)
    for _scope in ("local", "global"):
        for _per_channel in (False, True):
            pack_intrin(_bits, _scope, _per_channel)

RULES = {C.SCHEDULE_RULE: conv_rule, C.BITPACK_RULE: bitpack_rule}
for _name, _rule in RULES.items():
    if tvm.get_global_func(f"s_tir.meta_schedule.cpu.{_name}", allow_missing=True) is None:
        tvm.register_global_func(f"s_tir.meta_schedule.cpu.{_name}", _rule)
