"""Small helpers shared by the per-target schedules."""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import s_tir


@dataclass(frozen=True)
class SIMD:
    """A target's vector register file: what the register tiles of the schedules are sized by
    (a tile of more accumulators than registers spills, 1.1-3x slower)."""

    name: str
    bits: int  # width of one vector register
    registers: int

    @property
    def fp32_lanes(self) -> int:
        return self.bits // 32


AVX512 = SIMD("avx512", 512, 32)
AVX2 = SIMD("avx2", 256, 16)
NEON_A64 = SIMD("neon-aarch64", 128, 32)
NEON_A32 = SIMD("neon-armv7", 128, 16)


def simd_of(target: tvm.target.Target | None = None) -> SIMD:
    """The register file of an LLVM target: the one in scope, else the host's."""
    from tvm.target import codegen

    target = target or tvm.target.Target.current(allow_none=True) \
        or tvm.target.Target.from_device("cpu")
    triple = str(target.attrs.get("mtriple", ""))
    if triple.startswith("aarch64"):
        return NEON_A64
    if triple.startswith("arm"):
        return NEON_A32
    return AVX512 if codegen.target_has_features("avx512f", target) else AVX2


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
