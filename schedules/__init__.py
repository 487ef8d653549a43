"""Kernels: TE compute for bit-packing and bitserial ABC convolution, and per-target schedules."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from types import ModuleType

import tvm
from tvm import s_tir, te

from . import compute
from . import cpu as _cpu  # noqa: F401 - registers the MetaSchedule rules at import
from .compute import ConvGeometry, num_words, word_dtype

__all__ = [
    "ConvGeometry",
    "abc_block_func",
    "packed_maxpool_func",
    "abc_conv_func",
    "abc_dot_func",
    "bitpack_func",
    "bitpack_nhwc_func",
    "block_lane_bits",
    "block_word_bits",
    "block_vector",
    "compute",
    "num_words",
    "popcount_peak_func",
    "word_dtype",
]


def _schedules(target: tvm.target.Target) -> ModuleType:
    """The schedule module for a target kind: the one place that dispatches on it."""
    kind = str(target.kind.name)
    triple = str(target.attrs.get("mtriple", ""))
    if kind == "llvm" and triple.startswith(("aarch64", "arm")):
        from . import arm  # NEON: uint16-lane cnt/uadalp kernels

        return arm
    if kind == "llvm":
        from . import cpu

        return cpu
    if kind == "cuda":
        from . import cuda

        return cuda
    raise ValueError(f"no ABC kernel schedule for target kind {kind!r} (llvm and cuda only)")


def _finish(func: tvm.tirx.PrimFunc, name: str, scheduled: bool = True) -> tvm.tirx.PrimFunc:
    """Name the kernel and mark it scheduled, so Relax's DLight/default passes leave it be.

    TVM 0.27 spells the attributes "tirx.*"; "tir.is_scheduled" is set as well for readers
    that still look for the old name. An unscheduled kernel (for MetaSchedule) gets the name
    and no-alias only.
    """
    attrs: dict = {"global_symbol": name, "tirx.noalias": True}
    if scheduled:
        # opaque (kOpaque = 8): FuseOps must not fuse float ops into a hand-scheduled kernel
        attrs.update({"tirx.is_scheduled": True, "tir.is_scheduled": True, "op_pattern": 8})
    for key, value in attrs.items():
        func = func.with_attr(key, value)
    return func


def _tunable(func: tvm.tirx.PrimFunc, rule_block: str) -> tvm.tirx.PrimFunc:
    """The unscheduled kernel as MetaSchedule should see it.

    `rule_block` keeps its `schedule_rule` annotation (its custom rule schedules the whole
    function); every other block, the root included, is marked `schedule_rule = "None"`, so
    MetaSchedule's generic rules (auto-inline, multi-level tiling, parallel/vectorize/unroll
    on the root) leave them to the custom rule.
    """
    sch = s_tir.Schedule(func)
    root = sch.get_sblock("root")
    for block in [root, *sch.get_child_blocks(root)]:
        if sch.get(block).name_hint != rule_block:
            sch.annotate(block, "schedule_rule", "None")
    return sch.mod["main"]


def _check_word_bits(word_bits: int, target: tvm.target.Target) -> None:
    """Refuse 64-bit words on CUDA: __popcll exists, but the project packs 32 there."""
    compute.word_dtype(word_bits)
    if str(target.kind.name) == "cuda" and word_bits != 32:
        raise ValueError(f"CUDA kernels pack 32-bit words, got word_bits={word_bits}")


def bitpack_func(
    batch: int,
    channels: int,
    height: int,
    width: int,
    planes: int,
    word_bits: int,
    target: tvm.target.Target,
    scheduled: bool = True,
    per_channel: bool = False,
) -> tvm.tirx.PrimFunc:
    """Scheduled PrimFunc (x f32[B,C,H,W], thr f32[N] or [N,C]) -> uint{w}[N,B,H,W,ceil(C/w)].

    `scheduled=False`: the unscheduled TE PrimFunc whose pack block carries
    `schedule_rule = "abc_bitpack"` (the MetaSchedule rule registered by this package).
    """
    _check_word_bits(word_bits, target)
    x = te.placeholder((batch, channels, height, width), "float32", name="x")
    v = te.placeholder((planes, channels) if per_channel else (planes,), "float32", name="v")
    packed = compute.bitpack(x, v, word_bits)
    func = te.create_prim_func([x, v, packed])
    name = (f"abc_bitpack_b{batch}c{channels}h{height}w{width}n{planes}u{word_bits}"
            f"{'pc' if per_channel else ''}")
    if not scheduled:
        return _finish(_tunable(func, compute.PACK), name, scheduled=False)
    func = _schedules(target).schedule_bitpack(func)
    return _finish(func, name)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    """int or (h, w) -> (h, w)."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2:
        raise ValueError(f"expected an int or a pair, got {value!r}")
    return int(pair[0]), int(pair[1])


def _pads(value: int | Sequence[int]) -> tuple[int, int, int, int]:
    """int, (ph, pw) or ONNX-order (top, left, bottom, right) -> (top, left, bottom, right)."""
    pads = (value,) * 4 if isinstance(value, int) else tuple(value)
    if len(pads) == 2:
        pads = pads * 2
    if len(pads) != 4:
        raise ValueError(f"padding must be an int, (ph, pw) or (t, l, b, r), got {value!r}")
    return int(pads[0]), int(pads[1]), int(pads[2]), int(pads[3])


def _geometry(
    batch: int,
    channels: int,
    height: int,
    width: int,
    out_channels: int,
    kernel: int | Sequence[int],
    stride: int | Sequence[int],
    padding: int | Sequence[int],
    M: int,  # noqa: N803 - the paper's name
    N: int,  # noqa: N803
    word_bits: int,
) -> ConvGeometry:
    return ConvGeometry(
        batch=int(batch),
        channels=int(channels),
        height=int(height),
        width=int(width),
        out_channels=int(out_channels),
        kernel=_pair(kernel),
        stride=_pair(stride),
        padding=_pads(padding),
        bases=int(M),
        planes=int(N),
        word_bits=int(word_bits),
    )


def _conv_name(prefix: str, geo: ConvGeometry, bipolar: bool) -> str:
    """A global symbol that is unique per static shape, so several fit in one IRModule."""
    kh, kw = geo.kernel
    sh, sw = geo.stride
    pads = "_".join(str(p) for p in geo.padding)
    act = "bi" if bipolar else "uni"
    return (
        f"{prefix}_b{geo.batch}c{geo.channels}h{geo.height}w{geo.width}o{geo.out_channels}"
        f"_k{kh}x{kw}s{sh}x{sw}p{pads}_m{geo.bases}n{geo.planes}_{act}u{geo.word_bits}"
    )


def _conv_func(
    fused: bool, target: tvm.target.Target, geo: ConvGeometry, bipolar: bool,
    scheduled: bool = True,
) -> tvm.tirx.PrimFunc:
    _check_word_bits(geo.word_bits, target)
    tensors = compute.abc_conv(geo, bipolar=bipolar, fused=fused)
    args = tensors.conv_args if fused else tensors.dot_args
    func = te.create_prim_func(args)
    name = _conv_name("abc_conv" if fused else "abc_dot", geo, bipolar)
    if not scheduled:
        # A target may tune its own compute (NEON's uint16 lanes); else the generic one.
        own = getattr(_schedules(target), "unscheduled_conv", lambda *_: None)
        special = own(geo, bipolar, fused)
        tunable = special if special is not None else _tunable(func, compute.CONV)
        return _finish(tunable, name, scheduled=False)
    with target:  # the schedule sizes its register tile to the target's registers
        func = _schedules(target).schedule_conv(func, geo, fused=fused)
    return _finish(func, name)


def abc_conv_func(
    batch: int,
    channels: int,
    height: int,
    width: int,
    out_channels: int,
    kernel: int | Sequence[int],
    stride: int | Sequence[int],
    padding: int | Sequence[int],
    M: int,  # noqa: N803 - the paper's name
    N: int,  # noqa: N803
    bipolar: bool,
    word_bits: int,
    target: tvm.target.Target,
    scheduled: bool = True,
) -> tvm.tirx.PrimFunc:
    """Scheduled fused ABC conv: (packed, wbits, wsum, alpha[M,O], beta[N]) -> f32[B,O,OH,OW].

    packed uint{w}[N,B,H,W,K], wbits uint{w}[M,O,KH,KW,K], wsum int32[M,O,KH,KW].
    out = sum_m sum_n alpha[m,o] * beta[n] * dot(A_n, B_m), integer dot exact.
    `scheduled=False`: the unscheduled TE PrimFunc, its conv block tagged
    `schedule_rule = "abc_conv2d"` for MetaSchedule (same name and signature).
    """
    geo = _geometry(
        batch, channels, height, width, out_channels, kernel, stride, padding, M, N, word_bits
    )
    return _conv_func(True, target, geo, bool(bipolar), scheduled)


def abc_dot_func(
    batch: int,
    channels: int,
    height: int,
    width: int,
    out_channels: int,
    kernel: int | Sequence[int],
    stride: int | Sequence[int],
    padding: int | Sequence[int],
    M: int,  # noqa: N803 - the paper's name
    N: int,  # noqa: N803
    bipolar: bool,
    word_bits: int,
    target: tvm.target.Target,
    scheduled: bool = True,
) -> tvm.tirx.PrimFunc:
    """Scheduled integer stage alone: (packed, wbits, wsum) -> int32[M,N,B,O,OH,OW]."""
    geo = _geometry(
        batch, channels, height, width, out_channels, kernel, stride, padding, M, N, word_bits
    )
    return _conv_func(False, target, geo, bool(bipolar), scheduled)


def block_vector(out_channels: int, word_bits: int, target: tvm.target.Target) -> int:
    """Weight vector width (channels) of the fused block kernel for a target."""
    del target
    return _cpu.block_vector(out_channels, word_bits)


def _neon_a64(target: tvm.target.Target) -> bool:
    """An LLVM target for aarch64 (NEON): where the lane, byte and 32-bit-word forms apply."""
    return str(target.kind.name) == "llvm" and \
        str(target.attrs.get("mtriple", "")).startswith("aarch64")


def block_lane_bits(geo: compute.ConvGeometry, vec: int, target: tvm.target.Target) -> int:
    """16 where the block kernel accumulates in 16-bit lanes (aarch64 NEON: cnt + uadalp,
    `lanes.py`), else 0 (one int64 per word: x86's vpopcntq, or where lanes do not fit)."""
    if not _neon_a64(target):
        return 0
    # The byte form where a pixel's accumulators (bases x planes x 8-channel groups) fit the
    # register tile: one uint16 per channel, no lane reduction, the glue in registers.
    if compute.byte_accumulation_fits(geo, vec) and geo.bases * geo.planes * \
            _cpu.byte_groups(geo.out_channels, geo.word_bits) <= _cpu.BYTE_ACCUMULATORS:
        return compute.BYTE_FORM
    return 16 if compute.lane_accumulation_fits(geo, vec) else 0


def block_word_bits(geo: compute.ConvGeometry, target: tvm.target.Target) -> int:
    """The packing word of a fused block's input (`geo` in the target's word, 64 on CPUs):
    on aarch64 NEON, 32 for layers of at most 32 channels whose kernel takes the byte form
    in 32-bit words (`lanes.byte_popcount_intrin`): a 64-bit word would be half zeros, and
    the popcount work half wasted. Else `geo.word_bits`. The one place this is decided:
    the rewrite packs the block's input (and lets a producer pack for it) in this word."""
    if not _neon_a64(target) or geo.word_bits != 64 or geo.channels > 32:
        return geo.word_bits
    narrow = dataclasses.replace(geo, word_bits=32)
    vec = block_vector(geo.out_channels, 32, target)
    return 32 if block_lane_bits(narrow, vec, target) == compute.BYTE_FORM else geo.word_bits


def abc_block_func(spec: compute.BlockSpec, target: tvm.target.Target,
                   scheduled: bool = True) -> tvm.tirx.PrimFunc:
    """The fused ABC block kernel (conv + scale/shift + residual + ReLU + next bit-pack).

    Arguments in order: packed uint{w}[N,B,H,W,K], weights [M,O/vec,KH,KW,K,vec] (see
    `compute.block_weights`), ab f32[M,N,O] (alpha*beta), bipolar: Q f32[M,T,B,L,R,O]
    (`compute.bipolar_table`); affine: scale, shift f32[O]; residual:
    res f32[B,OH,OW,O]; pre, slope, post f32[O] where the spec has them; next planes:
    thr f32[N'] (the next layer's exact thresholds); then the outputs z f32[B,OH,OW,O] (NHWC) and/or
    packed_next uint{w}[N',B,OH,OW,ceil(O/w)]. LLVM CPU targets (x86, aarch64); on aarch64
    the weights come as uint16 lanes (`block_lane_bits`, `compute.block_weights`).
    """
    if str(target.kind.name) != "llvm":
        raise ValueError("the fused ABC block kernel is written for LLVM CPU targets")
    _check_word_bits(spec.geo.word_bits, target)
    func = te.create_prim_func(compute.abc_block(spec).args)
    if not scheduled:
        return _finish(_tunable(func, compute.CONV), spec.name(), scheduled=False)
    with target:
        return _finish(_cpu.schedule_block(func, spec), spec.name())


def bitpack_nhwc_func(batch: int, height: int, width: int, channels: int, planes: int,
                      word_bits: int, target: tvm.target.Target,
                      scheduled: bool = True, per_channel: bool = False) -> tvm.tirx.PrimFunc:
    """(x f32[B,H,W,C] NHWC, thr f32[N] or [N,C]) -> uint{w}[N,B,H,W,ceil(C/w)]: vector
    compares, bit = x >= thr[n] (or thr[n, c]): the block's exact thresholds.
    """
    _check_word_bits(word_bits, target)
    x = te.placeholder((batch, height, width, channels), "float32", name="x")
    v = te.placeholder((planes, channels) if per_channel else (planes,), "float32", name="thr")
    packed = compute.pack_nhwc(x, v, word_bits, name=compute.PACK,
                               attrs={"schedule_rule": compute.BITPACK_RULE,
                                      compute.PACK_KEY: "nhwc"})
    func = te.create_prim_func([x, v, packed])
    name = (f"abc_bitpack_nhwc_b{batch}h{height}w{width}c{channels}n{planes}u{word_bits}"
            f"{'pc' if per_channel else ''}")
    if not scheduled:
        return _finish(_tunable(func, compute.PACK), name, scheduled=False)
    with target:
        return _finish(_cpu.schedule_bitpack_nhwc(func), name)


def packed_maxpool_func(shape: tuple[int, int, int, int, int], kernel: tuple[int, int],
                        stride: tuple[int, int], pads: tuple[int, int, int, int],
                        out_hw: tuple[int, int], word_bits: int,
                        target: tvm.target.Target) -> tvm.tirx.PrimFunc:
    """(packed uint{w}[N,B,H,W,K]) -> uint{w}[N,B,OH,OW,K]: MaxPool on bit-planes, the OR
    of each window's words (`compute.or_pool`); parallel over planes, images and rows."""
    _check_word_bits(word_bits, target)
    packed = te.placeholder(shape, word_dtype(word_bits), name="packed")
    pooled = compute.or_pool(packed, kernel, stride, pads, out_hw)
    sch = s_tir.Schedule(te.create_prim_func([packed, pooled]))
    n, b, y, *_ = sch.get_loops(sch.get_sblock(compute.OR_POOL))
    sch.parallel(sch.fuse(n, b, y))
    n_, b_, h, w, k = shape
    name = (f"abc_maxpool_packed_n{n_}b{b_}h{h}w{w}k{k}u{word_bits}_p{kernel[0]}x{kernel[1]}"
            f"s{stride[0]}x{stride[1]}p{'_'.join(map(str, pads))}")
    return _finish(sch.mod["main"], name)


def popcount_peak_func(target: tvm.target.Target, words: int = 2048,
                       vectors: int = 12) -> tuple[tvm.tirx.PrimFunc, int]:
    """The AND + popcount + add roofline of one core, as a TVM kernel: (PrimFunc, bit-ops).

    acc[r, l] += popcount(a[k] & w[r, l]) over `words` L1-resident activation words a
    (broadcast) against `vectors` registers of 8 weight words, int64 lanes: the instruction
    mix of the ABC inner loop without its loads of weights or its epilogue. bit-ops per call
    = words * vectors * 8 * 64 (one bit-op = one AND'ed bit popcounted and added). Time it
    with `time_evaluator` under TVM_NUM_THREADS=1 to get this machine's peak.
    """
    a = te.placeholder((words,), "uint64", name="a")
    w = te.placeholder((vectors, 8), "uint64", name="w")
    k = te.reduce_axis((0, words), name="k")
    acc = te.compute(
        (vectors, 8),
        lambda r, lane: te.sum(tvm.tirx.popcount(a[k] & w[r, lane]).astype("int64"), axis=k),
        name="acc")
    sch = s_tir.Schedule(te.create_prim_func([a, w, acc]))
    block = sch.get_sblock("acc")
    sch.cache_write(block, 0, "local")
    r, lane, kk = sch.get_loops(block)
    sch.reorder(kk, r, lane)
    sch.vectorize(lane)
    sch.unroll(r)
    sch.decompose_reduction(block, kk)
    func = _finish(sch.mod["main"], f"abc_popcount_peak_k{words}r{vectors}")
    return func, words * vectors * 8 * 64
