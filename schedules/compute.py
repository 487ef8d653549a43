"""Pure TE compute for ABC-Net kernels: bit-packing and the bitserial ABC convolution.

No schedule here (as in TVM's topi): every stage is a named `te.compute` so the per-target
schedules in `cpu.py` and `cuda.py` can find blocks by name. The integer stage is split so
that popcount(A), shared by every output channel and every weight base, is computed once.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import te

# Block names, shared with the schedules (and with the MetaSchedule rule registered later).
PACK = "abc_bitpack"
PAD = "abc_pad"
ACT_POPCOUNT = "abc_act_popcount"
VALID_WSUM = "abc_valid_wsum"
VALID_WSUM_COLS = "abc_valid_wsum_cols"
CONV = "abc_conv"
DOT = "abc_dot"
EPILOGUE = "abc_epilogue"
SCHEDULE_RULE = "abc_conv2d"


def word_dtype(word_bits: int) -> str:
    """The unsigned word type for a packing width (popcount lowers per width, so it matters)."""
    if word_bits not in (8, 16, 32, 64):
        raise ValueError(f"word_bits must be 8, 16, 32 or 64, got {word_bits}")
    return f"uint{word_bits}"


def num_words(channels: int, word_bits: int) -> int:
    """Words per pixel: ceil(C / w); the channels past C are 0 bits."""
    return -(-channels // word_bits)


@dataclass(frozen=True)
class ConvGeometry:
    """Static shape facts of one ABC convolution, computed once and shared by every stage."""

    batch: int
    channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, left, bottom, right
    bases: int  # M
    planes: int  # N
    word_bits: int

    def __post_init__(self) -> None:
        kh, kw = self.kernel
        sh, sw = self.stride
        if min(self.batch, self.channels, self.height, self.width, self.out_channels) < 1:
            raise ValueError(f"all sizes must be positive: {self}")
        if min(kh, kw, sh, sw, self.bases, self.planes) < 1 or min(self.padding) < 0:
            raise ValueError(f"bad kernel/stride/padding/M/N: {self}")
        if self.out_height < 1 or self.out_width < 1:
            raise ValueError(f"kernel larger than the padded input: {self}")
        word_dtype(self.word_bits)

    @property
    def words(self) -> int:
        return num_words(self.channels, self.word_bits)

    @property
    def out_height(self) -> int:
        top, _, bottom, _ = self.padding
        return (self.height + top + bottom - self.kernel[0]) // self.stride[0] + 1

    @property
    def out_width(self) -> int:
        _, left, _, right = self.padding
        return (self.width + left + right - self.kernel[1]) // self.stride[1] + 1

    @property
    def padded_height(self) -> int:
        """Only the rows some output reads: a bottom pad the stride skips is never stored."""
        return (self.out_height - 1) * self.stride[0] + self.kernel[0]

    @property
    def padded_width(self) -> int:
        return (self.out_width - 1) * self.stride[1] + self.kernel[1]


def bitpack(x: te.Tensor, v: te.Tensor, word_bits: int) -> te.Tensor:
    """Pack NCHW float x into N bit-planes of NHWC words: bit j of word k is x[c]+v[n] >= 0.5.

    The add is done in float32 before the compare, exactly as ONNX Add + GreaterOrEqual do;
    `x >= 0.5 - v` would round differently. Sum of disjoint bits is their OR.
    """
    batch, channels, height, width = (int(d) for d in x.shape)
    planes = int(v.shape[0])
    words = num_words(channels, word_bits)
    dtype = word_dtype(word_bits)
    j = te.reduce_axis((0, word_bits), name="j")

    def _pack(n, b, h, w, k):
        c = k * word_bits + j
        # Clamp keeps the (discarded) load in bounds for the pad channels of the last word.
        value = x[b, tvm.tirx.min(c, channels - 1), h, w] + v[n]
        on = tvm.tirx.all(c < channels, value >= tvm.tirx.const(0.5, x.dtype))
        bit = tvm.tirx.const(1, dtype) << j.astype(dtype)
        return te.sum(tvm.tirx.Select(on, bit, tvm.tirx.const(0, dtype)), axis=j)

    return te.compute((planes, batch, height, width, words), _pack, name=PACK)


def pad_packed(packed: te.Tensor, geo: ConvGeometry) -> te.Tensor:
    """Zero-pad packed activations spatially: zero words add nothing to either popcount."""
    top, left, _, _ = geo.padding
    height, width = geo.height, geo.width
    dtype = packed.dtype

    def _pad(n, b, h, w, k):
        inside = tvm.tirx.all(h >= top, h < top + height, w >= left, w < left + width)
        return tvm.tirx.if_then_else(
            inside, packed[n, b, h - top, w - left, k], tvm.tirx.const(0, dtype)
        )

    shape = (geo.planes, geo.batch, geo.padded_height, geo.padded_width, geo.words)
    return te.compute(shape, _pad, name=PAD)


def act_popcount(padded: te.Tensor, geo: ConvGeometry) -> te.Tensor:
    """p[n,b,y,x]: popcount of the activation bits under the window, once per pixel and plane."""
    kh, kw = geo.kernel
    sh, sw = geo.stride
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    rk = te.reduce_axis((0, geo.words), name="rk")

    def _count(n, b, y, x):
        word = padded[n, b, y * sh + ry, x * sw + rx, rk]
        return te.sum(tvm.tirx.popcount(word).astype("int32"), axis=[ry, rx, rk])

    shape = (geo.planes, geo.batch, geo.out_height, geo.out_width)
    return te.compute(shape, _count, name=ACT_POPCOUNT)


def valid_wsum(wsum: te.Tensor, geo: ConvGeometry) -> te.Tensor:
    """S[m,y,x,o]: sum of the ±1 base over the taps inside the image (bipolar zero-pad fix).

    Separable in two steps, columns then rows (KH+KW adds per output instead of KH*KW, the
    naive form cost more than the conv itself). Output channel innermost, so a vector over
    o reads it contiguously.
    """
    kh, kw = geo.kernel
    sh, sw = geo.stride
    top, left, _, _ = geo.padding
    rx = te.reduce_axis((0, kw), name="rx")

    def _cols(m, ky, x, o):
        ix = x * sw + rx - left
        inside = tvm.tirx.all(ix >= 0, ix < geo.width)
        zero = tvm.tirx.const(0, "int32")
        return te.sum(tvm.tirx.Select(inside, wsum[m, o, ky, rx], zero), axis=rx)

    cols = te.compute((geo.bases, kh, geo.out_width, geo.out_channels), _cols, name=VALID_WSUM_COLS)
    ry = te.reduce_axis((0, kh), name="ry")

    def _rows(m, y, x, o):
        iy = y * sh + ry - top
        inside = tvm.tirx.all(iy >= 0, iy < geo.height)
        zero = tvm.tirx.const(0, "int32")
        return te.sum(tvm.tirx.Select(inside, cols[m, ry, x, o], zero), axis=ry)

    shape = (geo.bases, geo.out_height, geo.out_width, geo.out_channels)
    return te.compute(shape, _rows, name=VALID_WSUM)


def and_popcount(padded: te.Tensor, wbits: te.Tensor, geo: ConvGeometry) -> te.Tensor:
    """t[m,n,b,o,y,x] = sum popcount(A & Bbits): the hot loop, tagged for MetaSchedule."""
    kh, kw = geo.kernel
    sh, sw = geo.stride
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    rk = te.reduce_axis((0, geo.words), name="rk")

    def _conv(m, n, b, o, y, x):
        word = padded[n, b, y * sh + ry, x * sw + rx, rk] & wbits[m, o, ry, rx, rk]
        return te.sum(tvm.tirx.popcount(word).astype("int32"), axis=[ry, rx, rk])

    shape = (geo.bases, geo.planes, geo.batch, geo.out_channels, geo.out_height, geo.out_width)
    return te.compute(shape, _conv, name=CONV, attrs={"schedule_rule": SCHEDULE_RULE})


def combine_dot(t: te.Tensor, p: te.Tensor, s: te.Tensor | None, bipolar: bool) -> te.Tensor:
    """dot = 2t - p (unipolar) or 4t - 2p - S (bipolar), exact in int32."""

    def _dot(m, n, b, o, y, x):
        if bipolar:
            assert s is not None
            return 4 * t[m, n, b, o, y, x] - 2 * p[n, b, y, x] - s[m, y, x, o]
        return 2 * t[m, n, b, o, y, x] - p[n, b, y, x]

    return te.compute(t.shape, _dot, name=DOT)


def epilogue(dot: te.Tensor, alpha: te.Tensor, beta: te.Tensor) -> te.Tensor:
    """out[b,o,y,x] = sum_m sum_n alpha[m,o] * beta[n] * float(dot): back to NCHW float."""
    bases, planes, batch, out_channels, out_height, out_width = (int(d) for d in dot.shape)
    rm = te.reduce_axis((0, bases), name="rm")
    rn = te.reduce_axis((0, planes), name="rn")

    def _out(b, o, y, x):
        scale = alpha[rm, o] * beta[rn]
        return te.sum(scale * dot[rm, rn, b, o, y, x].astype("float32"), axis=[rm, rn])

    return te.compute((batch, out_channels, out_height, out_width), _out, name=EPILOGUE)


@dataclass(frozen=True)
class ConvTensors:
    """The placeholders and stages of one ABC convolution (schedules look blocks up by name)."""

    packed: te.Tensor
    wbits: te.Tensor
    wsum: te.Tensor
    dot: te.Tensor
    alpha: te.Tensor | None = None
    beta: te.Tensor | None = None
    out: te.Tensor | None = None

    @property
    def dot_args(self) -> list[te.Tensor]:
        return [self.packed, self.wbits, self.wsum, self.dot]

    @property
    def conv_args(self) -> list[te.Tensor]:
        assert self.alpha is not None and self.beta is not None and self.out is not None
        return [self.packed, self.wbits, self.wsum, self.alpha, self.beta, self.out]


def abc_conv(geo: ConvGeometry, bipolar: bool, fused: bool) -> ConvTensors:
    """Build the whole ABC convolution: integer stage, and the float epilogue when fused.

    wsum is a parameter in unipolar too (unused there), so every variant has one signature.
    """
    dtype = word_dtype(geo.word_bits)
    kh, kw = geo.kernel
    m, n, k = geo.bases, geo.planes, geo.words
    packed = te.placeholder((n, geo.batch, geo.height, geo.width, k), dtype, name="packed")
    wbits = te.placeholder((m, geo.out_channels, kh, kw, k), dtype, name="wbits")
    wsum = te.placeholder((m, geo.out_channels, kh, kw), "int32", name="wsum")
    padded = pad_packed(packed, geo)
    t = and_popcount(padded, wbits, geo)
    p = act_popcount(padded, geo)
    s = valid_wsum(wsum, geo) if bipolar else None
    dot = combine_dot(t, p, s, bipolar)
    if not fused:
        return ConvTensors(packed, wbits, wsum, dot)
    alpha = te.placeholder((m, geo.out_channels), "float32", name="alpha")
    beta = te.placeholder((n,), "float32", name="beta")
    out = epilogue(dot, alpha, beta)
    return ConvTensors(packed, wbits, wsum, dot, alpha, beta, out)
