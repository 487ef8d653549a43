"""Small helpers shared by the per-target schedules."""

from __future__ import annotations

from tvm import s_tir


def has_block(sch: s_tir.Schedule, name: str) -> bool:
    """Whether a named block exists (the bipolar border-sum stages are absent in unipolar)."""
    try:
        sch.get_sblock(name)
    except s_tir.schedule.ScheduleError:
        return False
    return True


def divisor_at_most(extent: int, limit: int) -> int:
    """Largest divisor of extent not above limit (splits that divide need no predicate)."""
    for d in range(min(extent, limit), 0, -1):
        if extent % d == 0:
            return d
    return 1
