"""First CPU schedules (LLVM: x86 and aarch64 NEON) for the ABC-Net kernels.

Conv: parallel over (batch, output row, block of output channels); a block of output
channels is the vector (weights are re-laid out so that it is contiguous, and one
activation word is broadcast against it); a few output pixels and all N planes are
unrolled so their accumulators stay in registers; one weight base m at a time, so the
float epilogue accumulates alpha[m,o]*beta[n]*dot in registers too and the int32
intermediate never reaches memory.
"""

from __future__ import annotations

from tvm import s_tir, tirx

from . import compute as C
from ._util import divisor_at_most, has_block

# Register budget: accumulators N * pixels vectors (AVX-512 has 32 registers, NEON 32).
_ACC_REGISTERS = 24
_MAX_PIXELS = 8


def _channel_block(out_channels: int, word_bits: int) -> int:
    """Output channels per vector: 8 words = one 512-bit register of uint64 popcounts."""
    return divisor_at_most(out_channels, 16 if word_bits <= 32 else 8)


def _pixel_block(out_width: int, planes: int) -> int:
    """Output pixels per register tile, so that planes * pixels accumulators fit."""
    limit = max(1, min(_MAX_PIXELS, _ACC_REGISTERS // planes))
    best = divisor_at_most(out_width, limit)
    # A poor divisor (e.g. a prime width) costs more than a predicate on the last tile.
    return best if 2 * best > limit else min(limit, out_width)


def _parallel_outer(sch: s_tir.Schedule, block: s_tir.SBlockRV, count: int) -> None:
    """Fuse the outer `count` loops of a root stage and run them in parallel."""
    loops = sch.get_loops(block)
    sch.parallel(sch.fuse(*loops[:count]) if count > 1 else loops[0])


def schedule_bitpack(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Parallel over (plane, batch, row); the reduction over bits is serial, pixels vectorised.

    x is NCHW, so for one channel the pixels of a row are contiguous: vectorising over w
    reads whole rows, and the 64 compares of one word are a serial loop of vector ORs.
    """
    sch = s_tir.Schedule(func)
    pack = sch.get_sblock(C.PACK)
    local = sch.cache_write(pack, 0, "local")
    n, b, h, w, k, j = sch.get_loops(pack)
    vec = divisor_at_most(int(sch.get(w).extent), 16)
    wo, wi = sch.split(w, [None, vec])
    sch.reorder(n, b, h, wo, k, j, wi)
    sch.parallel(sch.fuse(n, b, h))
    sch.reverse_compute_at(local, k)
    if vec > 1:
        sch.vectorize(wi)
    sch.decompose_reduction(pack, j)
    return sch.mod["main"]


def schedule_conv(func: tirx.PrimFunc, geo: C.ConvGeometry, fused: bool) -> tirx.PrimFunc:
    """Schedule the ABC conv: fused (float NCHW out) or the int32 dot stage alone.

    Vectorise/unroll are applied before decompose_reduction: s_tir refuses to vectorise
    an update block that has lost its init, while decompose copies the loop kinds over.
    """
    sch = s_tir.Schedule(func)
    ob = _channel_block(geo.out_channels, geo.word_bits)
    xb = _pixel_block(geo.out_width, geo.planes)
    conv = sch.get_sblock(C.CONV)

    # Weights to [M, O/ob, KH, KW, K, ob]: a vector over ob is one contiguous load.
    wt = sch.cache_read(conv, 1, "global")
    sch.transform_layout(wt, ("write", 0), lambda m, o, ky, kx, k: (m, o // ob, ky, kx, k, o % ob))

    if fused:
        sch.compute_inline(C.DOT)
        driver = sch.get_sblock(C.EPILOGUE)
        out_local = sch.cache_write(driver, 0, "local")
        b, o, y, x, rm, rn = sch.get_loops(driver)
        oo, oi = sch.split(o, [None, ob])
        xo, xi = sch.split(x, [None, xb])
        sch.reorder(b, y, oo, xo, rm, rn, xi, oi)
        sch.parallel(sch.fuse(b, y, oo))
        # One base m at a time: its int32 tile is consumed at once by the float epilogue.
        sch.compute_at(conv, rm, preserve_unit_loops=True)
        _valid_wsum_at(sch, xo)
        sch.reverse_compute_at(out_local, xo)
        # Output channels innermost in the register tile, so the vector is contiguous.
        sch.transform_layout(driver, ("write", 0), lambda b, o, y, x: (b, y, x, o))
        _vectorize_inner(sch, driver, unroll=2)
    else:
        driver = sch.get_sblock(C.DOT)
        m, n, b, o, y, x = sch.get_loops(driver)
        oo, oi = sch.split(o, [None, ob])
        xo, xi = sch.split(x, [None, xb])
        sch.reorder(b, y, oo, xo, m, n, xi, oi)
        sch.parallel(sch.fuse(b, y, oo))
        sch.compute_at(conv, m, preserve_unit_loops=True)
        _valid_wsum_at(sch, xo)
        _vectorize_inner(sch, driver, unroll=1)

    # The hot loop: reduction (ry, rx, rk) outside, planes x pixels x channel-vector inside.
    m_, n_, b_, o_, y_, x_, ry, rx, rk = sch.get_loops(conv)[-9:]
    sch.reorder(m_, b_, y_, ry, rx, rk, n_, x_, o_)
    sch.set_scope(conv, 0, "local")
    # Accumulator tile with output channels innermost: one register per (n, pixel).
    sch.transform_layout(conv, ("write", 0), lambda m, n, b, o, y, x: (m, n, b, y, x, o))
    _vectorize_inner(sch, conv, unroll=2)
    sch.decompose_reduction(conv, ry)
    if fused:
        sch.decompose_reduction(driver, sch.get_loops(driver)[-4])

    for name, count in ((C.PAD, 3), (C.ACT_POPCOUNT, 3), (C.VALID_WSUM_COLS, 2)):
        if has_block(sch, name):
            _parallel_outer(sch, sch.get_sblock(name), count)
    _parallel_outer(sch, wt, 2)
    return sch.mod["main"]


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
