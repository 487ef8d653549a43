"""Pure TE compute for ABC-Net kernels: bit-packing and the bitserial ABC convolution.

No schedule here (as in TVM's topi): every stage is a named `te.compute` so the per-target
schedules in `cpu.py` and `cuda.py` can find blocks by name. The integer stage is split so
that popcount(A), shared by every output channel and every weight base, is computed once.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te

from abc_tvm.floats import least_true_array

from .lanes import BYTE_FORM, MAX_STEPS, PAIRWISE_STEPS, lane, lanes_per_word, words_per_register

# Block names, shared with the schedules (and with the MetaSchedule rule registered later).
PACK = "abc_bitpack"
OR_POOL = "abc_or_pool"  # MaxPool on bit-planes
PAD = "abc_pad"
ACT_POPCOUNT = "abc_act_popcount"
VALID_WSUM = "abc_valid_wsum"
VALID_WSUM_COLS = "abc_valid_wsum_cols"
CONV = "abc_conv"
DOT = "abc_dot"
EPILOGUE = "abc_epilogue"
SCHEDULE_RULE = "abc_conv2d"
BITPACK_RULE = "abc_bitpack"
# JSON of the ConvGeometry on the conv block, so a MetaSchedule rule (which sees only the
# PrimFunc) can rebuild the schedule's static facts (stride and padding are not in the shapes).
GEOMETRY_KEY = "abc_conv_geometry"


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

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ConvGeometry:
        info = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in info.items()})

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


def _threshold_at(v: te.Tensor, n, c):
    """Plane n's threshold for channel c: thresholds are [N] (per plane) or [N, C]."""
    return v[n] if len(v.shape) == 1 else v[n, c]


def bitpack(x: te.Tensor, v: te.Tensor, word_bits: int) -> te.Tensor:
    """Pack NCHW float x into N bit-planes of NHWC words: bit j of word k is x[c] >= v[n].

    v holds exact thresholds (`exact_thresholds` of the ABC shifts, or the block's own), so
    the compare is bit for bit the float graph's binarizer. Sum of disjoint bits is their OR.
    """
    batch, channels, height, width = (int(d) for d in x.shape)
    planes = int(v.shape[0])
    words = num_words(channels, word_bits)
    dtype = word_dtype(word_bits)
    j = te.reduce_axis((0, word_bits), name="j")

    def _pack(n, b, h, w, k):
        c = k * word_bits + j
        # Clamp keeps the (discarded) load in bounds for the pad channels of the last word.
        cc = tvm.tirx.min(c, channels - 1)
        on = tvm.tirx.all(c < channels, x[b, cc, h, w] >= _threshold_at(v, n, cc))
        bit = tvm.tirx.const(1, dtype) << j.astype(dtype)
        return te.sum(tvm.tirx.Select(on, bit, tvm.tirx.const(0, dtype)), axis=j)

    return te.compute((planes, batch, height, width, words), _pack, name=PACK,
                      attrs={"schedule_rule": BITPACK_RULE})


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
    attrs = {"schedule_rule": SCHEDULE_RULE, GEOMETRY_KEY: geo.to_json()}
    return te.compute(shape, _conv, name=CONV, attrs=attrs)


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


# ------------------------------------------------------------------ fused ABC block (glue)
#
# One kernel per ABC convolution plus the float ops that follow it ("glue"), so that float
# activations between binary layers are not materialised:
#
#   t[m,n,b,y,x,o] = sum popcount(A_n XOR/AND B_m)       int64, in registers (`abc_conv`)
#   c[b,y,x,o]     = sum_m sum_n ab[m,n,o] * dot_mn        float, dot exact (`abc_accumulate`)
#   z[b,y,x,o]     = relu?(c * scale[o] + shift[o] + res[b,y,x,o])           (`abc_glue`)
#   out            = z (NHWC float), and/or the next ABC layer's bit-planes of z  (`abc_pack`)
#                    (z >= T_n with T_n the exact float32 threshold of z + v_n >= 0.5)
#
# Bipolar dots use XOR: on a valid tap sum_c A*B = C - 2 popcount(I ^ Bbits); a padded tap
# (zero word) adds popcount(Bbits) instead, so dot = Q - 2t with
# Q = C*KH*KW + sum_{padded taps} wsum, a compile-time table indexed by how many taps the
# window loses at each border (interior pixels: all zero). No popcount(A) pass is needed.
# Unipolar keeps dot = 2t - p with t over AND and p = popcount(A) under the window
# (`abc_act_popcount`).

ACCUMULATE = "abc_accumulate"
ACT_LANES = "abc_act_lanes"  # 16-bit lanes of the padded activation words (lane kernels)
CONV_SUM = "abc_conv_sum"  # lanes summed to one int32 per output channel
GLUE = "abc_glue"
GLUE_OUT = "abc_glue_out"
PACK_OUT = "abc_pack"
BLOCK_KEY = "abc_block_spec"
PACK_KEY = "abc_pack_spec"


@dataclass(frozen=True)
class BlockSpec:
    """Static facts of one fused ABC block kernel (its shapes and which glue it carries)."""

    geo: ConvGeometry
    bipolar: bool
    vec: int  # output channels per weight vector: weights come as [M, O/vec, KH, KW, K, vec]
    affine: bool  # per-channel z = c * scale + shift (BatchNorm and bias folded)
    residual: bool  # + res[B, OH, OW, O] (NHWC float)
    relu: bool
    float_out: bool  # write z as NHWC float [B, OH, OW, O]
    next_planes: int  # > 0: write the next layer's bit-planes [N', B, OH, OW, ceil(O/w)]
    # After the residual (ReActNet's RPReLU: bias, PReLU, bias): + pre[o], then PReLU with
    # slope[o] (instead of ReLU), then + post[o]. Off by default, and left out of the JSON
    # and the name when off, so kernels without them keep their tuning records.
    pre_bias: bool = False
    prelu: bool = False
    post_bias: bool = False
    hardtanh: tuple[float, float] | None = None  # Clip(lo, hi) as the activation (IR-Net)
    # The next layer's thresholds per channel ([N', O], ReActNet's RSign) rather than [N'].
    next_per_channel: bool = False
    # 16: accumulate AND/XOR popcounts in 16-bit lanes, summed once per tile (NEON's
    # cnt + uadalp, `lanes.py`); the weights then come as uint16 lanes. 8 (`BYTE_FORM`): one
    # uint16 per output channel over the whole depth, a word's byte counts summed in the hot
    # loop by pairwise adds (`lanes.byte_popcount_intrin`); uint16 lane weights too.
    # 0: one int64 per word.
    lane_bits: int = 0

    def __post_init__(self) -> None:
        if self.geo.out_channels % self.vec:
            raise ValueError(f"vec {self.vec} does not divide {self.geo.out_channels} channels")
        if self.relu + self.prelu + (self.hardtanh is not None) > 1:
            raise ValueError("a block kernel applies one of ReLU, PReLU and Clip")
        if not self.float_out and self.next_planes < 1:
            raise ValueError("a block kernel must write z, packed planes, or both")
        if self.next_per_channel and not self.next_planes:
            raise ValueError("per-channel next thresholds need next planes")
        if self.next_planes and not packs_whole_words(self.geo.out_channels,
                                                      self.geo.word_bits):
            raise ValueError(f"{self.geo.out_channels} channels end in a partial word past "
                             "the first: pack them with bitpack_nhwc_func instead")
        if self.lane_bits == BYTE_FORM and not byte_accumulation_fits(self.geo, self.vec):
            raise ValueError(f"the byte form needs 32- or 64-bit words, vectors of 8 channels "
                             f"and at most {PAIRWISE_STEPS} reduction steps")
        if self.lane_bits not in (0, BYTE_FORM, 16):
            raise ValueError(f"lane_bits is 0, {BYTE_FORM} or 16, not {self.lane_bits}")
        if self.lane_bits == 16 and not lane_accumulation_fits(self.geo, self.vec):
            raise ValueError(f"16-bit lanes need 64-bit words, vectors of whole 128-bit "
                             f"registers and at most {MAX_STEPS} reduction steps")

    @property
    def word_block(self) -> int:
        """Output channels per parallel tile: one packed word (64) where planes are written."""
        o, w = self.geo.out_channels, self.geo.word_bits
        if o % w == 0:
            return w
        if self.next_planes and o > w:
            return o  # a partial last word: one tile holds every channel
        return o

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        for key in ("pre_bias", "prelu", "post_bias", "hardtanh", "next_per_channel",
                    "lane_bits"):
            if not d[key]:
                del d[key]
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> BlockSpec:
        info = json.loads(text)
        geo = info.pop("geo")
        geo = ConvGeometry(**{k: tuple(v) if isinstance(v, list) else v for k, v in geo.items()})
        if info.get("hardtanh") is not None:
            info["hardtanh"] = tuple(info["hardtanh"])
        return cls(geo=geo, **info)

    def name(self) -> str:
        g = self.geo
        pads = "_".join(str(p) for p in g.padding)
        glue = "".join(flag for flag, on in (("a", self.affine), ("r", self.residual),
                                             ("b", self.pre_bias), ("l", self.relu),
                                             ("e", self.prelu), ("c", self.post_bias),
                                             ("f", self.float_out)) if on)
        if self.hardtanh is not None:  # bounds in the name: kernels differ by them
            glue += "h" + "_".join(f"{v:g}" for v in self.hardtanh).replace("-", "m")
        return (f"abc_block_b{g.batch}c{g.channels}h{g.height}w{g.width}o{g.out_channels}"
                f"_k{g.kernel[0]}x{g.kernel[1]}s{g.stride[0]}x{g.stride[1]}p{pads}"
                f"_m{g.bases}n{g.planes}_{'bi' if self.bipolar else 'uni'}u{g.word_bits}"
                f"v{self.vec}_{glue}p{self.next_planes}{'c' if self.next_per_channel else ''}"
                f"{f'_l{self.lane_bits}' if self.lane_bits else ''}")


def direct_fold(spec: BlockSpec) -> bool:
    """Whether the block's fold c = ab * (Q - 2t) is one term (M = N = 1, the byte form, no
    packing in the kernel): written without a reduction, the schedule inlines it into the
    glue (`cpu._apply_byte_block`), channel vectors outside the tile's pixels."""
    return (spec.lane_bits == BYTE_FORM and spec.geo.bases == spec.geo.planes == 1
            and not spec.next_planes)


def lane_accumulation_fits(geo: ConvGeometry, vec: int) -> bool:
    """Whether a block kernel can accumulate in 16-bit lanes: 64-bit words (4 lanes, 2 words
    per 128-bit register), whole registers per weight vector, no lane overflow."""
    return (geo.word_bits == 64 and vec % words_per_register(64) == 0
            and geo.kernel[0] * geo.kernel[1] * geo.words <= MAX_STEPS)


def byte_accumulation_fits(geo: ConvGeometry, vec: int) -> bool:
    """Whether a block kernel can keep one uint16 per output channel over the whole depth
    (`BYTE_FORM`): 64-bit words (or 32-bit: `lanes.byte_popcount_intrin`), whole vectors of
    8 channels, no overflow (at most 64 bits a step)."""
    return (geo.word_bits in (32, 64) and vec % 8 == 0
            and geo.kernel[0] * geo.kernel[1] * geo.words <= PAIRWISE_STEPS)


def exact_thresholds(shift: np.ndarray) -> np.ndarray:
    """Per plane, the least float32 T with float32(T + v) >= 0.5: then x >= T <=> x + v >= 0.5.

    float32 addition rounds monotonically, so {x : fl(x + v) >= 0.5} is exactly [T, inf)
    (NaN compares false either way). The packing kernels compare against T: one compare per
    value instead of an add and a compare, bit for bit the ONNX semantics (not the rounded
    0.5 - v, which differs near the edge).
    """
    v = np.asarray(shift, np.float32).reshape(-1)
    if not np.all(np.isfinite(v)):
        raise ValueError(f"activation shift {v[~np.isfinite(v)][0]} is not finite")
    return least_true_array(lambda x: (x + v) >= np.float32(0.5), v.size)


def packs_whole_words(channels: int, word_bits: int) -> bool:
    """Whether a block kernel can pack its output itself: whole words, or one partial word."""
    return channels % word_bits == 0 or channels < word_bits


def _clips(size: int, out: int, kernel: int, stride: int, before: int) -> tuple[int, int]:
    """Largest number of taps an output index loses to the padding before and after."""
    first = min(before, kernel)
    last = min(max((out - 1) * stride + kernel - before - size, 0), kernel)
    return first, last


def border_clips(geo: ConvGeometry) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) maxima of the clipped taps: the Q table's extents - 1."""
    top, left, _, _ = geo.padding
    t, b = _clips(geo.height, geo.out_height, geo.kernel[0], geo.stride[0], top)
    lf, r = _clips(geo.width, geo.out_width, geo.kernel[1], geo.stride[1], left)
    return t, b, lf, r


def bipolar_table(wsum: np.ndarray, geo: ConvGeometry, border: int = 0) -> np.ndarray:
    """Q[m, tc, bc, lc, rc, o] = C*KH*KW + (1 + border) * sum of wsum over the padded taps.

    An output pixel loses tc taps at the top of its window (tc = clip(top - y*sh, 0, KH)),
    bc at the bottom, lc and rc left and right; its valid taps are ky in [tc, KH - bc) x
    kx in [lc, KW - rc). With t = sum popcount(I ^ Bbits) over every tap (padded taps read
    zero words), the bipolar dot is exactly Q[tc, bc, lc, rc] - 2t. The kernel computes the
    four clips from the pixel position (no index tensor to read out of bounds).

    `border` is the activation's value in the padding: 0 (a conv's zero padding), or ±1 (a
    `Pad(value=±1)` of the ±1 plane, Larq's `pad_values=1.0`): a padded tap then adds
    border * wsum to the dot where its zero word gives -wsum, so Q takes (1 + border) * wsum.
    """
    kh, kw = geo.kernel
    t, b, lf, r = border_clips(geo)
    ky, kx = np.arange(kh), np.arange(kw)
    rows = np.array([[(ky >= tc) & (ky < kh - bc) for bc in range(b + 1)] for tc in range(t + 1)])
    cols = np.array([[(kx >= lc) & (kx < kw - rc) for rc in range(r + 1)] for lc in range(lf + 1)])
    valid = rows[:, :, None, None, :, None] & cols[None, None, :, :, None, :]  # t,b,l,r,ky,kx
    w = wsum.astype(np.int64)  # [M, O, KH, KW]
    padded_sum = np.einsum("moij,tblrij->mtblro", w, (~valid).astype(np.int64))
    if border not in (-1, 0, 1):
        raise ValueError(f"a bipolar border is -1, 0 or +1, not {border}")
    return (geo.channels * kh * kw + (1 + border) * padded_sum).astype(np.float32)


def block_weights(wbits: np.ndarray, vec: int, lane_bits: int = 0) -> np.ndarray:
    """[M, O, KH, KW, K] weight words -> [M, O/vec, KH, KW, K, vec] (a vector is contiguous);
    with `lane_bits` 16, the same bytes as uint16 [..., vec * lanes] (little-endian: lane j
    of word i at i * lanes + j)."""
    m, o, kh, kw, k = wbits.shape
    out = np.ascontiguousarray(
        wbits.reshape(m, o // vec, vec, kh, kw, k).transpose(0, 1, 3, 4, 5, 2))
    return out.view("<u2") if lane_bits else out


def pack_nhwc(src: te.Tensor, thr: te.Tensor, word_bits: int, name: str = PACK_OUT,
              attrs: dict | None = None) -> te.Tensor:
    """Bit-planes [N, B, H, W, ceil(C/w)] of an NHWC float tensor: bit j is src >= thr[n]
    (thr [N]) or src >= thr[n, c] (thr [N, C], per-channel thresholds).

    `thr` holds `exact_thresholds(v)`, so the bit is float32(src + v) >= 0.5 exactly. A
    word of one pixel reads w contiguous channels, so a word packs from vector compares (the
    x86 schedule turns the reduction over j into compare + movmsk). Words wholly inside the
    channels carry no bound check.
    """
    v = thr
    batch, height, width, channels = (int(d) for d in src.shape)
    planes = int(v.shape[0])
    words = num_words(channels, word_bits)
    dtype = word_dtype(word_bits)
    bits = min(word_bits, channels)
    j = te.reduce_axis((0, bits), name="j")
    exact = channels % word_bits == 0 or channels < word_bits

    def _pack(n, b, h, w, k):
        c = k * word_bits + j
        if exact:
            on = src[b, h, w, c] >= _threshold_at(v, n, c)
        else:
            cc = tvm.tirx.min(c, channels - 1)
            on = tvm.tirx.all(c < channels, src[b, h, w, cc] >= _threshold_at(v, n, cc))
        bit = tvm.tirx.shift_left(tvm.tirx.const(1, dtype), j.astype(dtype))
        return te.sum(tvm.tirx.Select(on, bit, tvm.tirx.const(0, dtype)), axis=j)

    return te.compute((planes, batch, height, width, words), _pack, name=name, attrs=attrs)


def pack_words(zw: te.Tensor, v: te.Tensor, channels: int, word_bits: int) -> te.Tensor:
    """Bit-planes [N', B, H, W, ceil(C/w)] of z held by words zw[B, H, W, words, bits]:
    bit j is z >= v[n] (or v[n, c] for per-channel thresholds [N', C]), v the next layer's
    exact thresholds.

    zw's last axis is one word's channels (all C when C is not a multiple of w), so every
    word reads a whole row of zw; channels past C (a partial last word) are 0 bits.
    """
    batch, height, width, words, bits = (int(d) for d in zw.shape)
    planes = int(v.shape[0])
    dtype = word_dtype(word_bits)
    out_words = num_words(channels, word_bits)
    per = word_bits if bits > word_bits else bits
    j = te.reduce_axis((0, per), name="j")

    def _pack(n, b, h, w, k):
        if bits == per:
            src, c = zw[b, h, w, k, j], k * bits + j
        else:  # one zw row holds every channel: word k is its slice [k*w, k*w + w)
            c = tvm.tirx.min(k * word_bits + j, channels - 1)
            src = zw[b, h, w, 0, c]
        bit_j = j
        on = src >= _threshold_at(v, n, c)
        if bits != per:
            on = tvm.tirx.all(k * word_bits + j < channels, on)
        bit = tvm.tirx.shift_left(tvm.tirx.const(1, dtype), bit_j.astype(dtype))
        return te.sum(tvm.tirx.Select(on, bit, tvm.tirx.const(0, dtype)), axis=j)

    return te.compute((planes, batch, height, width, out_words), _pack, name=PACK_OUT)


def or_pool(packed: te.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
            pads: tuple[int, int, int, int], out_hw: tuple[int, int]) -> te.Tensor:
    """MaxPool on bit-planes [N, B, H, W, K]: the OR of the window's words.

    A plane's bit is a non-decreasing function of its value (x >= t), so the bit of the max
    is the OR of the bits; windows reach into the padding, which MaxPool ignores (OR with 0).
    """
    planes, batch, height, width, words = (int(d) for d in packed.shape)
    kh, kw = kernel
    top, left = pads[0], pads[1]
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    dtype = packed.dtype
    bit_or = te.comm_reducer(lambda a, b: a | b, lambda t: tvm.tirx.const(0, t), name="bit_or")

    def _pool(n, b, y, x, k):
        h = y * stride[0] + ry - top
        w = x * stride[1] + rx - left
        inside = tvm.tirx.all(h >= 0, h < height, w >= 0, w < width)
        word = packed[n, b, tvm.tirx.min(tvm.tirx.max(h, 0), height - 1),
                      tvm.tirx.min(tvm.tirx.max(w, 0), width - 1), k]
        return bit_or(tvm.tirx.Select(inside, word, tvm.tirx.const(0, dtype)), axis=[ry, rx])

    return te.compute((planes, batch, *out_hw, words), _pool, name=OR_POOL)


def _reduce_axes(geo: ConvGeometry) -> list[tvm.tirx.IterVar]:
    kh, kw = geo.kernel
    return [te.reduce_axis((0, kh), name="ry"), te.reduce_axis((0, kw), name="rx"),
            te.reduce_axis((0, geo.words), name="rk")]


def _word_conv(spec: BlockSpec, padded: te.Tensor, wv: te.Tensor, attrs: dict) -> te.Tensor:
    """t[m, n, b, y, x, o]: AND (unipolar) or XOR (bipolar) popcounts, one int64 per word."""
    geo, vec = spec.geo, spec.vec
    sh, sw = geo.stride
    ry, rx, rk = _reduce_axes(geo)

    def _conv(m_, n_, b, y, x, o_):
        a = padded[n_, b, y * sh + ry, x * sw + rx, rk]
        w = wv[m_, o_ // vec, ry, rx, rk, o_ % vec]
        word = (a ^ w) if spec.bipolar else (a & w)
        return te.sum(tvm.tirx.popcount(word).astype("int64"), axis=[ry, rx, rk])

    shape = (geo.bases, geo.planes, geo.batch, geo.out_height, geo.out_width, geo.out_channels)
    return te.compute(shape, _conv, name=CONV, attrs=attrs)


def _lane_conv(spec: BlockSpec, padded: te.Tensor, wv: te.Tensor, attrs: dict) -> te.Tensor:
    """The same t on 16-bit lanes: acc[m, n, b, y, x, o, j] = popcounts of lane j (uint16),
    then t = Σ_j acc as int32 (`CONV_SUM`). The activation lanes repeat for the og words of
    one 128-bit register, so a register's activation operand is one contiguous load."""
    geo, vec = spec.geo, spec.vec
    sh, sw = geo.stride
    q, og = lanes_per_word(geo.word_bits), words_per_register(geo.word_bits)
    dtype = word_dtype(geo.word_bits)
    a16 = te.compute((*padded.shape, og * q),
                     lambda n_, b, h, w, k_, j: lane(padded[n_, b, h, w, k_], j % q, dtype),
                     name=ACT_LANES)
    ry, rx, rk = _reduce_axes(geo)

    def _acc(m_, n_, b, y, x, o_, j):
        a = a16[n_, b, y * sh + ry, x * sw + rx, rk, (o_ % og) * q + j]
        w = wv[m_, o_ // vec, ry, rx, rk, (o_ % vec) * q + j]
        word = (a ^ w) if spec.bipolar else (a & w)
        return te.sum(tvm.tirx.popcount(word), axis=[ry, rx, rk])

    shape = (geo.bases, geo.planes, geo.batch, geo.out_height, geo.out_width, geo.out_channels)
    acc = te.compute((*shape, q), _acc, name=CONV, attrs=attrs)
    rj = te.reduce_axis((0, q), name="rj")
    return te.compute(shape, lambda *i: te.sum(acc[(*i, rj)].astype("int32"), axis=rj),
                      name=CONV_SUM)


def _byte_conv(spec: BlockSpec, padded: te.Tensor, wv: te.Tensor, attrs: dict) -> te.Tensor:
    """t[m, n, b, y, x, o] as one uint16 per output channel: the popcounts of a word's four
    16-bit lanes and of every tap summed (exact: at most 64 * PAIRWISE_STEPS). The weights
    are the uint16 lanes of the lane form; the activation word is read whole (broadcast)."""
    geo, vec = spec.geo, spec.vec
    sh, sw = geo.stride
    q = lanes_per_word(geo.word_bits)
    dtype = word_dtype(geo.word_bits)
    ry, rx, rk = _reduce_axes(geo)
    rj = te.reduce_axis((0, q), name="rj")

    def _conv(m_, n_, b, y, x, o_):
        a = lane(padded[n_, b, y * sh + ry, x * sw + rx, rk], rj, dtype)
        w = wv[m_, o_ // vec, ry, rx, rk, (o_ % vec) * q + rj]
        word = (a ^ w) if spec.bipolar else (a & w)
        return te.sum(tvm.tirx.popcount(word), axis=[ry, rx, rk, rj])

    shape = (geo.bases, geo.planes, geo.batch, geo.out_height, geo.out_width, geo.out_channels)
    return te.compute(shape, _conv, name=CONV, attrs=attrs)


@dataclass(frozen=True)
class BlockTensors:
    inputs: list[te.Tensor]
    outputs: list[te.Tensor]

    @property
    def args(self) -> list[te.Tensor]:
        return self.inputs + self.outputs


def abc_block(spec: BlockSpec) -> BlockTensors:
    """The fused block kernel's TE: inputs (in order) packed, weights, ab, [Q],
    [scale, shift], [res], [thr_next] (`exact_thresholds` of the next layer's shifts);
    outputs [z], [packed_next]."""
    geo = spec.geo
    dtype = word_dtype(geo.word_bits)
    kh, kw = geo.kernel
    sh, sw = geo.stride
    m, n, k, o = geo.bases, geo.planes, geo.words, geo.out_channels
    vec = spec.vec
    oh, ow = geo.out_height, geo.out_width
    packed = te.placeholder((n, geo.batch, geo.height, geo.width, k), dtype, name="packed")
    q = lanes_per_word(geo.word_bits) if spec.lane_bits else 1
    wv = te.placeholder((m, o // vec, kh, kw, k, vec * q), "uint16" if spec.lane_bits else dtype,
                        name="wbits")
    ab = te.placeholder((m, n, o), "float32", name="ab")
    inputs = [packed, wv, ab]
    padded = pad_packed(packed, geo)
    attrs = {"schedule_rule": SCHEDULE_RULE, BLOCK_KEY: spec.to_json()}
    conv = {0: _word_conv, BYTE_FORM: _byte_conv, 16: _lane_conv}[spec.lane_bits]
    t = conv(spec, padded, wv, attrs)
    byte = spec.lane_bits == BYTE_FORM
    two = tvm.tirx.const(2.0, "float32")

    def _twice(t_: tvm.tirx.PrimExpr) -> tvm.tirx.PrimExpr:
        """2t as float32 (exact either way; the byte form doubles in int32: `ushll #1`)."""
        if byte:
            return (t_.astype("int32") * 2).astype("float32")
        return t_.astype("float32") * two

    rm = te.reduce_axis((0, m), name="rm")
    rn = te.reduce_axis((0, n), name="rn")
    if spec.bipolar:
        tc, bc, lc, rc = border_clips(geo)
        q = te.placeholder((m, tc + 1, bc + 1, lc + 1, rc + 1, o), "float32", name="q")
        inputs.append(q)
        top, left, _, _ = geo.padding

        def _clip(e, hi):
            return tvm.tirx.min(tvm.tirx.max(e, 0), hi)

        def _term(m_, n_, b, y, x, o_):
            qv = q[m_, _clip(top - y * sh, tc), _clip(y * sh + kh - top - geo.height, bc),
                   _clip(left - x * sw, lc), _clip(x * sw + kw - left - geo.width, rc), o_]
            return ab[m_, n_, o_] * (qv - _twice(t[m_, n_, b, y, x, o_]))
    else:
        p = act_popcount(padded, geo)

        def _term(m_, n_, b, y, x, o_):
            d = _twice(t[m_, n_, b, y, x, o_]) - p[n_, b, y, x].astype("float32")
            return ab[m_, n_, o_] * d

    if direct_fold(spec):  # one term: no reduction, so the schedule can inline it
        c = te.compute((geo.batch, oh, ow, o), lambda *i: _term(0, 0, *i), name=ACCUMULATE)
    else:
        c = te.compute((geo.batch, oh, ow, o),
                       lambda *i: te.sum(_term(rm, rn, *i), axis=[rm, rn]), name=ACCUMULATE)
    if spec.affine:
        scale = te.placeholder((o,), "float32", name="scale")
        shift = te.placeholder((o,), "float32", name="shift")
        inputs += [scale, shift]
    if spec.residual:
        res = te.placeholder((geo.batch, oh, ow, o), "float32", name="res")
        inputs.append(res)
    late = {name: te.placeholder((o,), "float32", name=name)
            for name, on in (("pre", spec.pre_bias), ("slope", spec.prelu),
                             ("post", spec.post_bias)) if on}
    inputs += list(late.values())
    zero = tvm.tirx.const(0.0, "float32")

    def _glue_value(b, y, x, o_):
        z = c[b, y, x, o_]
        if spec.affine:
            z = z * scale[o_] + shift[o_]
        if spec.residual:
            z = z + res[b, y, x, o_]
        if spec.pre_bias:
            z = z + late["pre"][o_]
        if spec.relu:
            z = tvm.tirx.max(z, zero)
        if spec.prelu:  # as ONNX PRelu: z where z >= 0, else slope * z
            z = tvm.tirx.Select(z < zero, late["slope"][o_] * z, z)
        if spec.hardtanh is not None:  # as ONNX Clip: min(max(z, lo), hi)
            lo, hi = (tvm.tirx.const(v, "float32") for v in spec.hardtanh)
            z = tvm.tirx.min(tvm.tirx.max(z, lo), hi)
        if spec.post_bias:
            z = z + late["post"][o_]
        return z

    outputs = []
    if not spec.next_planes:
        outputs.append(te.compute((geo.batch, oh, ow, o), _glue_value, name=GLUE))
        return BlockTensors(inputs, outputs)
    # Packing: z by words [B, OH, OW, K', bits], so the pack reads whole words of one tile.
    wb = min(o, geo.word_bits) if o % geo.word_bits == 0 or o < geo.word_bits else o
    words = o // wb
    zw = te.compute((geo.batch, oh, ow, words, wb),
                    lambda b, y, x, kq, j: _glue_value(b, y, x, kq * wb + j), name=GLUE)
    if spec.float_out:
        outputs.append(te.compute((geo.batch, oh, ow, o),
                                  lambda b, y, x, o_: zw[b, y, x, o_ // wb, o_ % wb],
                                  name=GLUE_OUT))
    v = te.placeholder((spec.next_planes, o) if spec.next_per_channel else (spec.next_planes,),
                       "float32", name="thr_next")
    inputs.append(v)
    outputs.append(pack_words(zw, v, o, geo.word_bits))
    return BlockTensors(inputs, outputs)
