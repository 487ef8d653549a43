"""First CUDA schedules for the ABC-Net kernels: one thread per output element.

32-bit words, so `popcount` lowers to `__popc`. Threads run over the flattened output
with the width axis fastest, so a warp reads neighbouring activation words (coalesced)
and mostly one output channel's weight words (a broadcast). Each thread keeps its N
per-plane accumulators in registers, loads every weight word once for all N planes, and
folds base m into the float epilogue before moving to m+1. Every other stage (padding,
popcount(A), border sums) is a small kernel of its own, one thread per element.
"""

from __future__ import annotations

from tvm import s_tir, tirx

from . import compute as C
from ._util import has_block

THREADS = 128


def _spatial_loops(sch: s_tir.Schedule, block: s_tir.SBlockRV) -> list[s_tir.LoopRV]:
    """The leading data-parallel loops of an unscheduled block (TE puts reductions last)."""
    loops = sch.get_loops(block)
    iters = sch.get(block).iter_vars
    spatial = sum(1 for iv in iters if iv.iter_type == tirx.IterVar.DataPar)
    return loops[:spatial]


def _bind_flat(sch: s_tir.Schedule, loops: list[s_tir.LoopRV]) -> s_tir.LoopRV:
    """Fuse loops, split by THREADS, bind blockIdx.x / threadIdx.x; return the thread loop."""
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    extent = int(sch.get(fused).extent)
    threads = min(THREADS, extent)
    bx, tx = sch.split(fused, [None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    return tx


def _bind_root(sch: s_tir.Schedule, name: str) -> None:
    """A root stage: one thread per output element, its reduction serial in a register."""
    block = sch.get_sblock(name)
    spatial = _spatial_loops(sch, block)
    reductions = sch.get_loops(block)[len(spatial) :]
    if not reductions:
        _bind_flat(sch, spatial)
        return
    local = sch.cache_write(block, 0, "local")
    tx = _bind_flat(sch, spatial)
    sch.reverse_compute_at(local, tx)
    sch.decompose_reduction(block, reductions[0])


def schedule_bitpack(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """One thread per output word; width fastest so x (NCHW) is read coalesced."""
    sch = s_tir.Schedule(func)
    pack = sch.get_sblock(C.PACK)
    local = sch.cache_write(pack, 0, "local")
    n, b, h, w, k, _ = sch.get_loops(pack)
    sch.reorder(n, b, h, k, w)
    tx = _bind_flat(sch, [n, b, h, k, w])
    sch.reverse_compute_at(local, tx)
    sch.decompose_reduction(pack, sch.get_loops(pack)[-1])
    return sch.mod["main"]


def schedule_conv(func: tirx.PrimFunc, geo: C.ConvGeometry, fused: bool) -> tirx.PrimFunc:
    """Schedule the ABC conv for CUDA: fused (float NCHW out) or the int32 dot stage alone."""
    sch = s_tir.Schedule(func)
    conv = sch.get_sblock(C.CONV)
    if fused:
        sch.compute_inline(C.DOT)
        driver = sch.get_sblock(C.EPILOGUE)
        out_local = sch.cache_write(driver, 0, "local")
        b, o, y, x, rm, _ = sch.get_loops(driver)
        tx = _bind_flat(sch, [b, o, y, x])
        sch.compute_at(conv, rm, preserve_unit_loops=True)
        sch.reverse_compute_at(out_local, tx)
        sch.decompose_reduction(driver, rm)
    else:
        driver = sch.get_sblock(C.DOT)
        m, n, b, o, y, x = sch.get_loops(driver)
        sch.reorder(b, o, y, x, m, n)
        _bind_flat(sch, [b, o, y, x])
        sch.compute_at(conv, m, preserve_unit_loops=True)

    # Per thread: the N accumulators of one base; each weight word serves all N planes.
    n_, ry, rx, rk = sch.get_loops(conv)[-8], *sch.get_loops(conv)[-3:]
    sch.reorder(ry, rx, rk, n_)
    sch.set_scope(conv, 0, "local")
    sch.unroll(n_)
    try:
        sch.decompose_reduction(conv, ry)
    except s_tir.schedule.ScheduleError:
        # When the flattened thread split divides exactly, the conv's bindings after
        # compute_at are not quasi-affine to s_tir and it refuses; the block keeps its
        # T.init (zeroed inside the reduction, correct, a little slower).
        pass

    for name in (C.PAD, C.ACT_POPCOUNT, C.VALID_WSUM_COLS, C.VALID_WSUM):
        if has_block(sch, name):
            _bind_root(sch, name)
    return sch.mod["main"]
