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

    s_tir.TensorIntrin.register(name, _lane_sum_desc(og, q), impl)
    return name


def _lane_sum_desc(words: int, q: int) -> tirx.PrimFunc:
    """What the lane-sum intrinsics compute: `words` int32 += the sums of their q uint16
    lanes (`lane_sum_intrin` from one register, `lane_reduce_intrin` across several)."""

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

    return desc


# Registered at import, so a tuning record's trace (which names them) replays at compile time.
for _og, _q in ((2, 4), (4, 2)):
    lane_sum_intrin(_og, _q)


# Lanes of up to 1023 steps (4 lanes of 16 x 1023 bits < 2^16) reduce in uint16 arithmetic.
PAIRWISE_STEPS = 65535 // (4 * LANE_BITS)
BYTE_FORM = 8  # BlockSpec.lane_bits of the byte form (`byte_popcount_intrin`)
BYTE_CHANNELS = 8  # output channels of one byte-form update: one uint16x8 accumulator


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

    s_tir.TensorIntrin.register(name, _lane_sum_desc(words, q), impl)
    return name


for _words in (2, 4, 8, 16):
    lane_reduce_intrin(_words, 4)


def pack_neon_intrin(bits: int, scope: str, per_channel: bool = False,
                     word_bits: int = 64) -> str:
    """Tensor intrinsic: one packed word from `bits` floats (z >= thr), for NEON.

    Per 16 channels: four `fcmge` masks narrowed to bytes (`uzp1`) and `and`ed with the bit
    of each channel in its byte (1, 2, ..., 128); then pairwise byte adds (`addp`) sum each
    run of 8 channels into one byte of the word (the bits are disjoint, so add = or). NaN
    compares false and packs to 0, as in ONNX. `bits`: 16, 32 or 64, at most `word_bits`
    (the packed word's type: 64, or 32 for narrow layers' 32-bit words).
    """
    name = f"abc_pack_neon_thr{'pc' if per_channel else ''}_{bits}_{scope}"
    if word_bits != 64:
        name += f"_u{word_bits}"
    if s_tir.TensorIntrin.get(name, allow_missing=True) is not None:
        return name
    wdt = f"uint{word_bits}"
    groups = bits // 16
    n_thr = bits if per_channel else 1
    out_dtype = f"uint{bits}"

    def thr16(v, g):
        return v[T.ramp(g * 16, 1, 16)] if per_channel else T.broadcast(v[0], 16)

    one_bit = tirx.Shuffle([tirx.const(1 << (i % 8), "uint8") for i in range(16)],
                           [tirx.const(i, "int32") for i in range(16)])

    def _word(z: tirx.Buffer, v: tirx.Buffer) -> tirx.PrimExpr:
        regs = [tirx.Select(z[T.ramp(g * 16, 1, 16)] >= thr16(v, g), one_bit,
                            tirx.Broadcast(tirx.const(0, "uint8"), 16)) for g in range(groups)]
        while len(regs) > 1:  # across registers: 16 bytes from each pair
            regs = [_addp_bytes(regs[i], regs[i + 1]) for i in range(0, len(regs), 2)]
        x = regs[0]  # 16 bytes, each the sum of 16 // (bits // 8) neighbouring channel bytes
        # Within the register: pairs of bytes, the low 8 kept (`addp .16b`, then `.8b`, whose
        # low half holds the sums), until a byte sums 8 channels; the word is the low bytes.
        x = tirx.Shuffle([_addp_bytes(x, x)], [tirx.const(i, "int32") for i in range(8)])
        for _ in range({64: 0, 32: 1, 16: 2}[bits]):
            x = _addp_bytes(x, x, 8)
        word = tirx.call_intrin("uint64", "tirx.reinterpret", x)
        return word if bits == 64 else word.astype(out_dtype)

    @T.prim_func(s_tir=True)
    def impl(z: T.Buffer((bits,), "float32", offset_factor=1, scope=scope),
             v: T.Buffer((n_thr,), "float32", offset_factor=1),
             w: T.Buffer((1,), wdt, offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(w[0], v[0:n_thr], z[0:bits])
            T.writes(w[0])
            w[0] = w[0] | T.Cast(wdt, _word(z, v))

    s_tir.TensorIntrin.register(name, pack_desc(bits, scope, per_channel, wdt), impl)
    return name


def pack_desc(bits: int, scope: str, per_channel: bool, wdt: str = "uint64") -> tirx.PrimFunc:
    """What every packing intrinsic computes (NEON's here, x86's movmsk one in `cpu.py`):
    bit j of the word w is z[j] >= its threshold (v[j] per channel, else the word's v[0])."""
    n_thr = bits if per_channel else 1

    def thr(v, j):
        return v[j] if per_channel else v[0]

    @T.prim_func(s_tir=True)
    def desc(z: T.Buffer((bits,), "float32", offset_factor=1, scope=scope),
             v: T.Buffer((n_thr,), "float32", offset_factor=1),
             w: T.Buffer((1,), wdt, offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(w[0], v[0:n_thr], z[0:bits])
            T.writes(w[0])
            for j in range(bits):
                with T.sblock("update"):
                    vj = T.axis.remap("R", [j])
                    w[0] = w[0] + T.Select(
                        thr(v, vj) <= z[vj],
                        T.shift_left(T.Cast(wdt, 1), T.Cast(wdt, vj)), T.Cast(wdt, 0))

    return desc


def _addp_bytes(x: tirx.PrimExpr, y: tirx.PrimExpr, lanes: int = 16) -> tirx.PrimExpr:
    """NEON `addp v.16b`: byte i of the result is (x ++ y)[2i] + (x ++ y)[2i+1] (wrapping;
    the callers' sums stay below 256). Named, as LLVM rewrites the shuffles of `_pairwise` on
    bytes it can prove disjoint into uzp1 + uzp2 + orr."""
    return tirx.call_llvm_pure_intrin(f"uint8x{lanes}", "llvm.aarch64.neon.addp", x, y)


def byte_popcount_intrin(bipolar: bool, word_bits: int = 64) -> str:
    """Tensor intrinsic: the byte form's update (`compute._byte_conv`), 8 output channels of
    one step: c[o] += popcount(a ^ w[o]) (AND when unipolar) over the word's four 16-bit
    lanes, c uint16.

    For NEON: the activation word broadcast (`ld1r .2d`), against four registers of two
    weight words each: `eor`/`and` + `cnt .16b` per register, then three pairwise byte adds
    (`addp .16b`, a byte then sums 8 byte counts: <= 64) leave the 8 channels' 8-byte sums in
    order, and one `uadalp .8h` adds each channel's two bytes to its uint16. Per 128 bits the
    triple of the lane form (two `addp` + one `uadalp` where it had four `uadalp`), and no
    lane reduction after the loop.

    `word_bits` 32 (layers of at most 32 channels, which a 64-bit word would half fill):
    the 32-bit activation word broadcast (`ld1r .4s`) against two registers of four weight
    words each, one `addp` and one `uadalp`: half the work of a half-empty 64-bit word.
    """
    name = f"abc_neon_byte_popcount_{'xor' if bipolar else 'and'}"
    if word_bits != 64:
        name += f"_u{word_bits}"
    if s_tir.TensorIntrin.get(name, allow_missing=True) is not None:
        return name
    if word_bits not in (32, 64):
        raise ValueError(f"the byte form packs 32- or 64-bit words, not {word_bits}")
    o, q = BYTE_CHANNELS, lanes_per_word(word_bits)
    wdt = f"uint{word_bits}"
    regs = o * q // 8  # uint16x8 weight registers of one update

    def op(x, y):
        return x ^ y if bipolar else x & y

    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((1,), wdt, offset_factor=1),
             w: T.Buffer((o * q,), "uint16", offset_factor=1),
             c: T.Buffer((o,), "uint16", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0:o], a[0:1], w[0:o * q])
            T.writes(c[0:o])
            for i, j in T.grid(o, q):
                with T.sblock("update"):
                    vi, vj = T.axis.remap("SR", [i, j])
                    c[vi] = c[vi] + T.popcount(op(lane(a[0], vj, wdt), w[vi * q + vj]))

    def _sum(a: tirx.Buffer, w: tirx.Buffer) -> tirx.PrimExpr:
        act = T.reinterpret(T.broadcast(a[0], 128 // word_bits), dtype="uint8x16")
        counts = [T.popcount(op(act, T.reinterpret(w.vload([r * 8], "uint16x8"),
                                                   dtype="uint8x16"))) for r in range(regs)]
        while len(counts) > 1:  # a channel's bytes end adjacent: 2 per channel
            counts = [_addp_bytes(counts[i], counts[i + 1]) for i in range(0, len(counts), 2)]
        return T.call_llvm_pure_intrin("uint16x8", "llvm.aarch64.neon.uaddlp", counts[0])

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((1,), wdt, offset_factor=1),
             w: T.Buffer((o * q,), "uint16", offset_factor=1),
             c: T.Buffer((o,), "uint16", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0:o], a[0:1], w[0:o * q])
            T.writes(c[0:o])
            c[T.ramp(0, 1, o)] = c[T.ramp(0, 1, o)] + _sum(a, w)

    s_tir.TensorIntrin.register(name, desc, impl)
    return name


for _bipolar in (True, False):
    for _bits in (32, 64):
        byte_popcount_intrin(_bipolar, _bits)


for _bits in (16, 32, 64):
    for _scope in ("local", "global"):
        for _per_channel in (False, True):
            pack_neon_intrin(_bits, _scope, _per_channel)
            if _bits <= 32:
                pack_neon_intrin(_bits, _scope, _per_channel, word_bits=32)
