"""MetaSchedule's view of the float register tile: a rule that searches the tile per CPU.

The default tile (`float_default.default_knobs`) is one choice per register file, measured
on one CPU of each class; the best tile per layer differs by CPU and shape. `mark_tunable`
(run with the legalize passes, so `tune` and `compile` see the same workloads) gives every
function the tile applies to the `schedule_rule` below on its reduction and "None" on the
other blocks, so MetaSchedule's generic rules leave them to it. The rule's design spaces
draw the tile and also hold the default fixed (see `float_tile_rule`).
"""

from __future__ import annotations

from dataclasses import replace

import tvm
from tvm import s_tir, tirx

from . import float_default as fd
from . import float_depthwise
from ._util import SIMD, simd_of

RULE = "abc_float_tile"
UNROLL_CANDIDATES = [0, 16, 64]
CHUNK_CANDIDATES = [1, 2, 4, 8]  # input channels per chunk, where the default chunks
MAX_VECTORS = 4  # weight vectors per tile the search draws from
MAX_PIXELS = 16  # output pixels per tile the search draws from


def _draw(sch: s_tir.Schedule, candidates: list[int]) -> s_tir.schedule.ExprRV:
    return sch.sample_categorical(candidates, [1.0 / len(candidates)] * len(candidates))


def tile_candidates(channels: int, pixels: int, simd: SIMD) -> tuple[list[int], list[int]]:
    """The vectors and pixels a tile may take: divisors, so no tile needs a predicate. They
    are drawn independently; a pair that spills measures slow and the cost model learns it."""
    vectors = channels // fd.vector_width(channels, simd)
    return ([r for r in range(1, min(vectors, MAX_VECTORS) + 1) if vectors % r == 0],
            [p for p in range(1, min(pixels, MAX_PIXELS) + 1) if pixels % p == 0])


def float_tile_rule(sch: s_tir.Schedule, _block: s_tir.SBlockRV) -> list[s_tir.Schedule]:
    """`s_tir.meta_schedule.cpu.abc_float_tile`: the design spaces of a tiled function.

    The tile's vectors, pixels, unroll (and chunk, where the default chunks) drawn; the
    default tile fixed (no draw, so it is among the first candidates measured and a tuned
    record cannot be slower than it beyond noise); and for a conv, the default with the
    padding placed the other way and with the input channels chunked the other way.
    """
    simd = simd_of()
    default = fd.default_knobs(sch, simd)
    if default is None:
        return [sch]
    red, channels, pixels, weighted = fd.tile_site(sch)
    padded = weighted and bool(sch.get_producers(red))
    spatial, reduce_ = fd._spatial_reduce(sch, red)
    channels_in = int(sch.get(reduce_[-1]).extent)
    is_conv = weighted and len(spatial) == 4  # [n, y, x, o], not a dense layer
    fixed, drawn = sch.copy(), sch.copy()
    spaces = [(fixed, default)]
    vectors, pixel_counts = tile_candidates(channels, pixels, simd)
    chunk = default.chunk and _draw(drawn, [c for c in CHUNK_CANDIDATES
                                            if c == default.chunk or channels_in % c == 0])
    spaces.append((drawn, replace(default, vectors=_draw(drawn, vectors),
                                  pixels=_draw(drawn, pixel_counts),
                                  unroll=_draw(drawn, UNROLL_CANDIDATES), chunk=chunk)))
    if padded:
        spaces.append((sch.copy(), replace(default, pad_apart=not default.pad_apart)))
    if is_conv and channels_in % fd.CHUNK == 0:
        spaces.append((sch.copy(), replace(default, chunk=0 if default.chunk else fd.CHUNK)))
    return [space for space, knobs in spaces if fd._tiled_reduction(space, simd, knobs)] or [sch]


def _mark(func: tirx.PrimFunc) -> tirx.PrimFunc:
    if float_depthwise.is_depthwise(func):  # its own schedule (not searched yet)
        return func
    sch = s_tir.Schedule(func)
    try:
        site = fd.tile_site(sch)
    except Exception:  # noqa: BLE001 - no root block, or an unusual nest: not ours
        return func
    if site is None:
        return func
    red = site[0]
    root = sch.get_sblock("root")
    for block in [root, *sch.get_child_blocks(root)]:
        rule = RULE if sch.get(block).same_as(sch.get(red)) else "None"
        sch.annotate(block, "schedule_rule", rule)
    return sch.mod["main"]


@tvm.transform.module_pass(opt_level=0, name="ABCMarkFloatTiles")
def mark_tunable(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Hand every unscheduled function the register tile applies to to `float_tile_rule`."""
    updates = {gv: _mark(f) for gv, f in mod.functions.items()
               if isinstance(f, tirx.PrimFunc) and not fd._is_scheduled(f)}
    for gv, func in updates.items():
        mod[gv] = func
    return mod


if tvm.get_global_func(f"s_tir.meta_schedule.cpu.{RULE}", allow_missing=True) is None:
    tvm.register_global_func(f"s_tir.meta_schedule.cpu.{RULE}", float_tile_rule)
