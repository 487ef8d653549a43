"""A default CPU schedule for the float ops left in the graph (stem, BN, ReLU, pooling, FC).

TVM's CPU Relax pipeline builds legalized ops as plain serial loops. Without a tuning
database this pass gives every unscheduled PrimFunc a simple, safe schedule: spatial loops
fused and parallelised, reductions moved outside the innermost spatial loop, and that loop
vectorised. MetaSchedule tuning (`abc-tvm tune`) replaces it where a record exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import tvm
from tvm import s_tir, tirx

from . import float_depthwise
from ._util import SIMD, simd_of

VECTOR_MAX = 16  # innermost extent above which we split before vectorising


def _is_scheduled(func: tirx.PrimFunc) -> bool:
    attrs = func.attrs
    return attrs is not None and any(
        k in attrs and bool(attrs[k]) for k in ("tirx.is_scheduled", "tir.is_scheduled"))


def _schedule_block(sch: s_tir.Schedule, block: s_tir.SBlockRV) -> None:
    loops = sch.get_loops(block)
    iters = sch.get(block).iter_vars
    if len(loops) != len(iters) or not loops:
        return  # not a simple loop nest (already transformed): leave it
    spatial = [lp for lp, iv in zip(loops, iters, strict=True) if iv.iter_type == 0]
    reduce_ = [lp for lp, iv in zip(loops, iters, strict=True) if iv.iter_type == 2]
    if len(spatial) + len(reduce_) != len(loops) or not spatial:
        return
    inner = spatial[-1] if len(spatial) > 1 else None
    if reduce_ and inner is not None:
        sch.reorder(*spatial[:-1], *reduce_, inner)
    outer = spatial[:-1] if inner is not None else spatial
    if len(outer) > 1:
        fused = sch.fuse(*outer)
    else:
        fused = outer[0]
    sch.parallel(fused)
    if inner is not None:
        extent = sch.get(inner).extent
        if isinstance(extent, tirx.IntImm) and extent.value > VECTOR_MAX:
            _, inner = sch.split(inner, [None, VECTOR_MAX])
        sch.vectorize(inner)  # before decompose_reduction: s_tir refuses it after
        if reduce_:
            sch.decompose_reduction(block, reduce_[0])


# ------------------------------------------------------------- register-tiled reductions
#
# Convolutions (NHWC with HWIO weights, as the ABC pass lays the float convs out) and dense
# layers are reductions whose innermost output axis (the output channel) reads the weight
# contiguously. The tile: `vectors` vector registers of output channels x `pixels` output
# pixels of float accumulators in registers over the whole reduction, one input value
# broadcast against each weight vector; the elementwise epilogue (bias, ReLU) runs on the tile.
# The tile is sized to the target's register file: a tile that spills is 2-3x slower.

PREFERRED_VECTORS = 2  # among tiles of as many accumulators, the one nearest 2 weight vectors
MAX_VECTORS = 8
UNROLL = 16  # auto-unroll budget of the reduction: unrolls a short channel loop (stem: 3)


def accumulators(simd: SIMD) -> int:
    """Accumulator registers of the tile; the rest hold weights, the broadcast input and
    addresses. 32 registers: 14, measured on Zen 5 (2 x 7 zmm beats wider tiles); 16: 8,
    measured on Zen 3 (ABC-ResNet-18 stem: 2 x 4 ymm 3.5 ms, 2 x 7 ymm 5.8 ms)."""
    return 14 if simd.registers >= 32 else 8


def _spatial_reduce(sch: s_tir.Schedule, block: s_tir.SBlockRV):
    loops = sch.get_loops(block)
    iters = sch.get(block).iter_vars
    if len(loops) != len(iters):
        return None
    spatial = [lp for lp, iv in zip(loops, iters, strict=True) if iv.iter_type == 0]
    reduce_ = [lp for lp, iv in zip(loops, iters, strict=True) if iv.iter_type == 2]
    if len(spatial) + len(reduce_) != len(loops) or not reduce_ or len(spatial) < 2:
        return None
    return spatial, reduce_


def _extent(sch: s_tir.Schedule, loop: s_tir.LoopRV) -> int:
    return int(sch.get(loop).extent)


def _divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def vector_width(channels: int, simd: SIMD) -> int:
    """Lanes of the tile's output-channel vector: the widest that divides the channels."""
    lanes = simd.fp32_lanes
    return next((v for v in (lanes, 8, 4) if v <= lanes and channels % v == 0), 1)


def _tile_shape(channels: int, pixels: int, simd: SIMD) -> tuple[int, int, int]:
    """(vector lanes, vectors, pixels) of the accumulator tile: as many accumulators as
    `accumulators(simd)` allows; among equals, PREFERRED_VECTORS weight vectors (the AVX2
    stem: 2 x 4 ymm 3.5 ms, 4 x 2 5.5 ms, 8 x 1 5.5 ms, 1 x 8 5.7 ms). One output pixel
    (a dense layer at batch 1) takes as many vectors as fit."""
    budget = accumulators(simd)
    vec = vector_width(channels, simd)
    vectors_max = channels // vec

    def score(tile: tuple[int, int]) -> tuple[int, int, int]:
        r, px = tile
        return r * px, -abs(r - PREFERRED_VECTORS), r

    tiles = [(r, _divisor(pixels, max(1, budget // r)))
             for r in range(1, min(vectors_max, MAX_VECTORS, budget) + 1) if vectors_max % r == 0]
    r, px = max(tiles, key=score)
    return vec, r, px


def conv_block(out_channels: int, out_width: int, simd: SIMD) -> int:
    """Output channels of the float conv's register tile: the weight's block
    (`float_conv.block_weight`), so a tile reads its weights contiguously."""
    vec, r, _ = _tile_shape(out_channels, out_width, simd)
    return vec * r


@dataclass(frozen=True)
class TileKnobs:
    """What the register tile leaves open: the default picks each from the register file;
    `float_tune`'s MetaSchedule rule offers the others (an int, or a drawn `unroll`)."""

    vectors: int  # weight vectors (of the SIMD width) per tile
    pixels: int  # output pixels per tile
    pad_apart: bool  # a conv's padding as a stage of its own rather than inlined
    unroll: int | s_tir.schedule.ExprRV = UNROLL
    chunk: int | s_tir.schedule.ExprRV = 0  # input channels per chunk (`_chunked`); 0: none


def tile_site(sch: s_tir.Schedule) -> tuple[s_tir.SBlockRV, int, int, bool] | None:
    """(the reduction, its output channels, its output pixels per row, whether it reads a
    weight: a conv or dense layer, not a pool) of a function the register tile applies to:
    one reduction block, an innermost output axis of at least 8 channels; None otherwise."""
    root = sch.get_sblock("root")
    reductions = [b for b in sch.get_child_blocks(root) if _spatial_reduce(sch, b) is not None]
    if len(reductions) != 1:
        return None
    red = reductions[0]
    spatial, _ = _spatial_reduce(sch, red)
    channels = _extent(sch, spatial[-1])
    if channels < 8 or len(sch.get_consumers(red)) > 1:
        return None
    weighted = len(sch.get(red).reads) > 1  # input and weight (a pool reads one buffer)
    return red, channels, _extent(sch, spatial[-2]), weighted


def default_knobs(sch: s_tir.Schedule, simd: SIMD) -> TileKnobs | None:
    """The untuned tile of a function (None where `tile_site` refuses it).

    A conv's padding is inlined into the reduction only where its channels are fewer than a
    vector: the stem's 3-channel padding copies badly (3-wide rows), and its unrolled
    3-channel reduction hides the bounds test. Elsewhere the test, per multiply, costs more
    than the copy (float ResNet-18, 512-channel 7x7 conv: 2.5 ms inlined, 1.6 ms padded
    apart; 56x56x64: even). A pool (one input, no weight) keeps it inlined: its copy would
    cost as much as the pool (the stem's 3x3 max pool: 0.31 vs 0.75 ms).
    """
    site = tile_site(sch)
    return None if site is None else _knobs_at(sch, site, simd)


def _knobs_at(sch: s_tir.Schedule, site: tuple, simd: SIMD) -> TileKnobs:
    red, channels, pixels, weighted = site
    vec, r, px = _tile_shape(channels, pixels, simd)
    wide = any(_channels_in(sch, p) >= simd.fp32_lanes for p in sch.get_producers(red))
    return TileKnobs(r, px, weighted and wide, chunk=_default_chunk(sch, red, vec * r)
                     if weighted else 0)


CHUNK = 2  # input channels per chunk (7x7x512, cold weights: 2 and 4 best, 1 and 8+ slower)
# Output pixels per block at most, and bytes of a block's weights at least: float ResNet-18,
# 1 thread, in the model: 7x7x512 2.55 -> 1.72 ms, 14x14x256 1.58 -> 1.38 ms; the 28x28 and
# 56x56 layers gain nothing (more rows amortise the first), their 1x1 convs lose 3x.
CHUNK_MAX_PIXELS = 256
CHUNK_MIN_WEIGHTS = 64 * 1024


def _default_chunk(sch: s_tir.Schedule, red: s_tir.SBlockRV, block_channels: int) -> int:
    """`CHUNK` for a conv of few output pixels and a large weight per block; else 0."""
    spatial, reduce_ = _spatial_reduce(sch, red)
    if len(spatial) != 4:
        return 0
    pixels = _extent(sch, spatial[1]) * _extent(sch, spatial[2])
    taps = math.prod(_extent(sch, lp) for lp in reduce_)
    channels = _extent(sch, reduce_[-1])
    big = taps * block_channels * 4 >= CHUNK_MIN_WEIGHTS
    return CHUNK if pixels <= CHUNK_MAX_PIXELS and big and channels % CHUNK == 0 else 0


def _tiled_reduction(sch: s_tir.Schedule, simd: SIMD, knobs: TileKnobs | None = None) -> bool:
    """Register-tile the one heavy reduction block of a function (conv, dense); False if the
    function does not have that shape (the caller then uses the simple schedule)."""
    site = tile_site(sch)
    if site is None:
        return False
    knobs = knobs or _knobs_at(sch, site, simd)
    red, channels, _, weighted = site
    for producer in sch.get_producers(red):
        if knobs.pad_apart:
            _parallel_simple(sch, producer)
            continue
        try:
            sch.compute_inline(producer)
        except Exception:  # noqa: BLE001 - a producer that cannot inline stays a stage
            _parallel_simple(sch, producer)
    # fold the elementwise epilogue into one block that reads the accumulators
    consumers = sch.get_consumers(red)
    chain = []
    while consumers:
        chain.append(consumers[0])
        nxt = sch.get_consumers(consumers[0])
        consumers = nxt if len(nxt) == 1 else []
    for block in reversed(chain[1:]):
        try:
            sch.reverse_compute_inline(block)
        except Exception:  # noqa: BLE001
            return False
    spatial, reduce_ = _spatial_reduce(sch, red)
    vec = vector_width(channels, simd)
    r, px = knobs.vectors, knobs.pixels
    co, cr, ci = sch.split(spatial[-1], [None, r, vec])
    xo, xi = sch.split(spatial[-2], [None, px])
    outer = spatial[:-2]
    chunked = not isinstance(knobs.chunk, int) or knobs.chunk > 0  # an int, or a draw
    if chunked and len(outer) == 2:  # a conv's [n, y]
        _chunked(sch, red, chain, knobs, (co, cr, ci, xo, xi), outer, reduce_, vec)
        return True
    # Output-channel blocks outermost: one block's weights (KH*KW*C*tile floats; 590 KB for a
    # 512-channel 3x3) stay in L2 over all its rows, instead of every row streaming the whole
    # weight from memory (float ResNet-18, 512-channel 7x7 layers: 16 -> 10 ms, 1 thread).
    # A pool has no weight: its rows go outermost, so each input row is read whole, once.
    tasks = [co, *outer] if weighted else [*outer, co]
    sch.reorder(*tasks, xo, *reduce_, xi, cr, ci)
    sch.parallel(sch.fuse(*tasks) if outer else co)
    if chain:
        sch.set_scope(red, 0, "local")
        epilogue = chain[0]
    else:
        epilogue = sch.cache_write(red, 0, "local")
    sch.reverse_compute_at(epilogue, xo, preserve_unit_loops=True)  # a fixed loop count
    _vectorize_tail(sch, epilogue, vec)
    # The tile's loops in the epilogue unrolled: every read of the accumulator buffer is at a
    # constant index, so LLVM keeps the tile in registers. A rolled loop reads it at a
    # variable index, which pins the buffer to the stack, and then every FMA of the
    # reduction also stored its accumulator (12 stores per 14 FMAs: half the MAC rate).
    loops = sch.get_loops(epilogue)
    at = next(i for i, lp in enumerate(loops) if sch.get(lp).same_as(sch.get(xo)))
    for loop in loops[at + 1:-1]:
        sch.unroll(loop)
    _register_tile(sch, reduce_[0], knobs.unroll, (ci, cr, xi))
    sch.decompose_reduction(red, reduce_[0])
    return True


def _vectorize_tail(sch: s_tir.Schedule, block: s_tir.SBlockRV, vec: int) -> None:
    """The epilogue's innermost (channel) loop in vectors of the tile's width."""
    _, tv = sch.split(sch.get_loops(block)[-1], [None, vec])
    sch.vectorize(tv)


def _register_tile(sch: s_tir.Schedule, reduction: s_tir.LoopRV, unroll, tile: tuple) -> None:
    """The reduction's unroll budget; the tile's lanes vectorised, its vectors and pixels
    unrolled (their accumulators in registers)."""
    ci, cr, xi = tile
    sch.annotate(reduction, "pragma_auto_unroll_max_step", unroll)
    sch.annotate(reduction, "pragma_unroll_explicit", 1)
    sch.vectorize(ci)
    sch.unroll(cr)
    sch.unroll(xi)


def _chunked(sch: s_tir.Schedule, red: s_tir.SBlockRV, chain: list, knobs: TileKnobs,
             tile: tuple, outer: list, reduce_: list, vec: int) -> None:
    """The tile with the input channels in chunks outside the output rows: each chunk of a
    block's weights is used by every row while it is in L1, so reading the weights from
    memory spreads over the whole block instead of stalling its first row. For few output
    pixels per block and large weights (512-channel 7x7 convs, cold weights: 3.4 -> 2.4 ms,
    1 thread). The accumulators go through L1 between chunks (the conv's own buffer), and
    the epilogue runs once per block after the last chunk."""
    co, cr, ci, xo, xi = tile
    n, y = outer
    rco, rci = sch.split(reduce_[-1], [None, knobs.chunk])
    sch.reorder(co, n, rco, y, xo, *reduce_[:-1], rci, xi, cr, ci)
    block = sch.fuse(co, n)
    sch.parallel(block)
    if chain:
        sch.reverse_compute_at(chain[0], block, preserve_unit_loops=True)
        _vectorize_tail(sch, chain[0], vec)
    _register_tile(sch, reduce_[0], knobs.unroll, (ci, cr, xi))
    sch.decompose_reduction(red, rco)


def _channels_in(sch: s_tir.Schedule, block: s_tir.SBlockRV) -> int:
    """The innermost extent a block writes (channels, for an NHWC padding)."""
    loops = sch.get_loops(block)
    return _extent(sch, loops[-1]) if loops else 0


def _parallel_simple(sch: s_tir.Schedule, block: s_tir.SBlockRV) -> None:
    try:
        _schedule_block(sch, block)
    except Exception:  # noqa: BLE001
        pass


def schedule_func(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc:
    """Parallel + vectorised schedule for one legalized PrimFunc (best effort per block)."""
    if float_depthwise.is_depthwise(func):
        try:
            return float_depthwise.schedule(func, simd_of(target))
        except Exception:  # noqa: BLE001 - an unusual fusion: the schedules below
            pass
    if _has_root(s_tir.Schedule(func)):
        trial = s_tir.Schedule(func)
        try:
            if _tiled_reduction(trial, simd_of(target)):
                return trial.mod["main"].with_attr("tirx.is_scheduled", True)
        except Exception:  # noqa: BLE001 - fall back to the simple schedule below
            pass
    sch = s_tir.Schedule(func)
    root = sch.get_sblock("root") if _has_root(sch) else None
    if root is not None:
        _inline_elementwise(sch, root)
    blocks = sch.get_child_blocks(root) if root is not None else []
    for block in blocks:
        try:
            trial = sch.copy()
            _schedule_block(trial, block)
            sch = trial
        except Exception:  # noqa: BLE001 - an unusual block keeps its serial loops
            continue
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _spatial_only(sch: s_tir.Schedule, block: s_tir.SBlockRV) -> bool:
    return all(iv.iter_type == 0 for iv in sch.get(block).iter_vars)


def _selects(sch: s_tir.Schedule, block: s_tir.SBlockRV) -> bool:
    """A block that picks between sources per element (concat, pad): inlined, every use
    repeats the pick across the vector's lanes (ReActNet's concat + RPReLU: 1.38 ms
    inlined, 0.79 ms with the concat apart and the rest inlined)."""
    return "if_then_else" in str(sch.get(block).body)


def _inline_elementwise(sch: s_tir.Schedule, root: s_tir.SBlockRV) -> None:
    """Inline each spatial block whose consumers are all spatial into them: a fused chain
    (concat, bias, PReLU, residual add) then makes one pass over memory instead of one per
    op (ReActNet's concat + RPReLU at 112x112x64: four passes, 1.06 ms against ORT's 0.24
    ms concat). A reduction (pool, mean) keeps its producers as stages."""
    for block in sch.get_child_blocks(root)[:-1]:
        consumers = sch.get_consumers(block)
        if not consumers or not _spatial_only(sch, block) \
                or not all(_spatial_only(sch, c) for c in consumers) or _selects(sch, block):
            continue
        try:
            sch.compute_inline(block)
        except Exception:  # noqa: BLE001 - e.g. it writes a function output: stays a stage
            continue


def _has_root(sch: s_tir.Schedule) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001
        return False


@tvm.transform.module_pass(opt_level=0, name="ABCDefaultCPUSchedule")
def default_cpu_schedule(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Schedule every PrimFunc of `mod` that nothing has scheduled yet."""
    target = tvm.target.Target.current(allow_none=True)
    updates = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc) and not _is_scheduled(func):
            updates[gv] = schedule_func(func, target)
    for gv, func in updates.items():
        mod[gv] = func
    return mod
