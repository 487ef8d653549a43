"""16-bit lane accumulation: the NEON form of AND/XOR + popcount (shared by the plain NEON
conv of `arm.py` and the fused block kernel of `cpu.py`).

A vector popcount of 64-bit lanes costs NEON four instructions (`cnt` on bytes, then three
pairwise widening adds) before the accumulate. Kept as 16-bit lanes, the accumulate is
`cnt v.16b` + `uadalp v.8h` (pairwise widening add-accumulate of the byte counts), and the
lanes are summed to one int32 per output channel once per register tile, not per step.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.script import tirx as T

LANE_BITS = 16
VECTOR_BITS = 128
MAX_STEPS = 65535 // LANE_BITS  # reduction steps before a uint16 lane could overflow


def lanes_per_word(word_bits: int) -> int:
    """q: 16-bit lanes per packing word."""
    return word_bits // LANE_BITS


def words_per_register(word_bits: int) -> int:
    """og: packing words (= output channels) per 128-bit register."""
    return VECTOR_BITS // word_bits


def lane(word: tirx.PrimExpr, index: tirx.PrimExpr, dtype: str) -> tirx.PrimExpr:
    """16-bit lane `index` of a word, as uint16."""
    shift = (index * LANE_BITS).astype(dtype)
    return ((word >> shift) & tirx.const(0xFFFF, dtype)).astype("uint16")


def lane_sum_intrin(og: int, q: int) -> str:
    """Tensor intrinsic: og int32 += the sums of q uint16 lanes, from one 128-bit register.

    Written with reinterprets, masks and shifts (no target intrinsic), so it lowers on any
    LLVM target: on NEON to `usra`/`and` pairs on 32- then 64-bit lanes and a narrow.
    """
    name = f"abc_neon_lane_sum_{og}x{q}"
    if s_tir.TensorIntrin.get(name, allow_missing=True) is not None:
        return name
    lanes = og * q
    steps = {2: 1, 4: 2}[q]

    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((og, q), "uint16", offset_factor=1, scope="local"),
             c: T.Buffer((og,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0:og], a[0:og, 0:q])
            T.writes(c[0:og])
            for i, j in T.grid(og, q):
                with T.sblock("update"):
                    vi, vj = T.axis.remap("SR", [i, j])
                    c[vi] = c[vi] + T.cast(a[vi, vj], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((og, q), "uint16", offset_factor=1, scope="local"),
             c: T.Buffer((og,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0:og], a[0:og, 0:q])
            T.writes(c[0:og])
            w32 = T.reinterpret(a.vload([0, 0], f"uint16x{lanes}"), dtype=f"uint32x{lanes // 2}")
            s32 = (w32 & T.broadcast(T.uint32(0xFFFF), lanes // 2)) + (
                w32 >> T.broadcast(T.uint32(16), lanes // 2))
            if steps == 2:
                w64 = T.reinterpret(s32, dtype=f"uint64x{lanes // 4}")
                s64 = (w64 & T.broadcast(T.uint64(0xFFFFFFFF), lanes // 4)) + (
                    w64 >> T.broadcast(T.uint64(32), lanes // 4))
                c[T.ramp(0, 1, og)] = c[T.ramp(0, 1, og)] + T.cast(s64, f"int32x{og}")
            else:
                c[T.ramp(0, 1, og)] = c[T.ramp(0, 1, og)] + T.reinterpret(
                    s32, dtype=f"int32x{og}")

    s_tir.TensorIntrin.register(name, desc, impl)
    return name


# Registered at import, so a tuning record's trace (which names them) replays at compile time.
for _og, _q in ((2, 4), (4, 2)):
    lane_sum_intrin(_og, _q)


# Lanes of up to 1023 steps (4 lanes of 16 x 1023 bits < 2^16) reduce in uint16 arithmetic.
PAIRWISE_STEPS = 65535 // (4 * LANE_BITS)


def _pairwise(x: tirx.PrimExpr, y: tirx.PrimExpr, lanes: int) -> tirx.PrimExpr:
    """Lane i of the result: (x ++ y)[2i] + (x ++ y)[2i+1], x and y of `lanes` uint16 lanes
    (NEON `addp`)."""
    even = tirx.Shuffle([x, y], [tirx.const(2 * i, "int32") for i in range(lanes)])
    odd = tirx.Shuffle([x, y], [tirx.const(2 * i + 1, "int32") for i in range(lanes)])
    return even + odd


def lane_reduce_intrin(words: int, q: int) -> str:
    """Tensor intrinsic: `words` int32 += the sums of their q uint16 lanes, for the words of
    one pixel held by words*q/8 registers: log2(q) pairwise adds across registers (NEON
    `addp`, three per four registers for 64-bit words) and one widening, instead of a
    reduction per register. Exact while a word's lanes sum below 2^16 (`PAIRWISE_STEPS`).
    """
    name = f"abc_neon_lane_reduce_{words}x{q}"
    if s_tir.TensorIntrin.get(name, allow_missing=True) is not None:
        return name
    lanes = words * q

    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((words, q), "uint16", offset_factor=1, scope="local"),
             c: T.Buffer((words,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0:words], a[0:words, 0:q])
            T.writes(c[0:words])
            for i, j in T.grid(words, q):
                with T.sblock("update"):
                    vi, vj = T.axis.remap("SR", [i, j])
                    c[vi] = c[vi] + T.cast(a[vi, vj], "int32")

    per = VECTOR_BITS // LANE_BITS  # uint16 lanes per register

    def _sum(a: tirx.Buffer) -> tirx.PrimExpr:
        """Pairwise adds over the registers in order, two at a time, then halves: each
        level pairs neighbouring lanes, so after log2(q) levels lane i is word i's sum."""
        regs = [a.vload([r * per // q, 0], f"uint16x{per}") for r in range(lanes // per)]
        total, width = lanes, per
        while total > words:
            if len(regs) > 1:
                regs = [_pairwise(regs[i], regs[i + 1], width) for i in range(0, len(regs), 2)]
            else:  # one register left: pair its lanes in place, keep the low half
                width //= 2
                regs = [tirx.Shuffle([_pairwise(regs[0], regs[0], width * 2)],
                                     [tirx.const(i, "int32") for i in range(width)])]
            total //= 2
        if len(regs) == 1:
            return regs[0]
        return tirx.Shuffle(regs, [tirx.const(i, "int32") for i in range(total)])

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((words, q), "uint16", offset_factor=1, scope="local"),
             c: T.Buffer((words,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0:words], a[0:words, 0:q])
            T.writes(c[0:words])
            c[T.ramp(0, 1, words)] = c[T.ramp(0, 1, words)] + T.cast(
                _sum(a), f"int32x{words}")

    s_tir.TensorIntrin.register(name, desc, impl)
    return name


for _words in (2, 4, 8, 16):
    lane_reduce_intrin(_words, 4)
