"""A default CPU schedule for the float ops left in the graph (stem, BN, ReLU, pooling, FC).

TVM's CPU Relax pipeline builds legalized ops as plain serial loops. Without a tuning
database this pass gives every unscheduled PrimFunc a simple, safe schedule: spatial loops
fused and parallelised, reductions moved outside the innermost spatial loop, and that loop
vectorised. MetaSchedule tuning (`abc-tvm tune`) replaces it where a record exists.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

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


def schedule_func(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc:
    """Parallel + vectorised schedule for one legalized PrimFunc (best effort per block)."""
    sch = s_tir.Schedule(func)
    root = sch.get_sblock("root") if _has_root(sch) else None
    blocks = sch.get_child_blocks(root) if root is not None else []
    for block in blocks:
        try:
            trial = sch.copy()
            _schedule_block(trial, block)
            sch = trial
        except Exception:  # noqa: BLE001 - an unusual block keeps its serial loops
            continue
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


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
