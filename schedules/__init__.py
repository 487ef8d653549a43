"""Kernels: TE compute for bit-packing and bitserial ABC convolution, and per-target schedules."""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import tvm
from tvm import te

from . import compute
from .compute import ConvGeometry, num_words, word_dtype

__all__ = [
    "ConvGeometry",
    "abc_conv_func",
    "abc_dot_func",
    "bitpack_func",
    "compute",
    "num_words",
    "word_dtype",
]


def _schedules(target: tvm.target.Target) -> ModuleType:
    """The schedule module for a target kind: the one place that dispatches on it."""
    kind = str(target.kind.name)
    if kind == "llvm":
        from . import cpu

        return cpu
    if kind == "cuda":
        from . import cuda

        return cuda
    raise ValueError(f"no ABC kernel schedule for target kind {kind!r} (llvm and cuda only)")


def _finish(func: tvm.tirx.PrimFunc, name: str) -> tvm.tirx.PrimFunc:
    """Name the kernel and mark it scheduled, so Relax's DLight/default passes leave it be.

    TVM 0.27 spells the attributes "tirx.*"; "tir.is_scheduled" is set as well for readers
    that still look for the old name.
    """
    attrs = {
        "global_symbol": name,
        "tirx.noalias": True,
        "tirx.is_scheduled": True,
        "tir.is_scheduled": True,
    }
    for key, value in attrs.items():
        func = func.with_attr(key, value)
    return func


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
) -> tvm.tirx.PrimFunc:
    """Scheduled PrimFunc (x f32[B,C,H,W], v f32[N]) -> uint{w}[N,B,H,W,ceil(C/w)]."""
    _check_word_bits(word_bits, target)
    x = te.placeholder((batch, channels, height, width), "float32", name="x")
    v = te.placeholder((planes,), "float32", name="v")
    packed = compute.bitpack(x, v, word_bits)
    func = te.create_prim_func([x, v, packed])
    func = _schedules(target).schedule_bitpack(func)
    name = f"abc_bitpack_b{batch}c{channels}h{height}w{width}n{planes}u{word_bits}"
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
    fused: bool, target: tvm.target.Target, geo: ConvGeometry, bipolar: bool
) -> tvm.tirx.PrimFunc:
    _check_word_bits(geo.word_bits, target)
    tensors = compute.abc_conv(geo, bipolar=bipolar, fused=fused)
    args = tensors.conv_args if fused else tensors.dot_args
    func = te.create_prim_func(args)
    func = _schedules(target).schedule_conv(func, geo, fused=fused)
    return _finish(func, _conv_name("abc_conv" if fused else "abc_dot", geo, bipolar))


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
) -> tvm.tirx.PrimFunc:
    """Scheduled fused ABC conv: (packed, wbits, wsum, alpha[M,O], beta[N]) -> f32[B,O,OH,OW].

    packed uint{w}[N,B,H,W,K], wbits uint{w}[M,O,KH,KW,K], wsum int32[M,O,KH,KW].
    out = sum_m sum_n alpha[m,o] * beta[n] * dot(A_n, B_m), integer dot exact.
    """
    geo = _geometry(
        batch, channels, height, width, out_channels, kernel, stride, padding, M, N, word_bits
    )
    return _conv_func(True, target, geo, bool(bipolar))


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
) -> tvm.tirx.PrimFunc:
    """Scheduled integer stage alone: (packed, wbits, wsum) -> int32[M,N,B,O,OH,OW]."""
    geo = _geometry(
        batch, channels, height, width, out_channels, kernel, stride, padding, M, N, word_bits
    )
    return _conv_func(False, target, geo, bool(bipolar))
