"""Depthwise and narrow-group float convolutions of the CPU path: NHWC, channels vectorised.

TOPI's grouped NHWC conv reads input channel (o // out_per_group) * in_per_group + rc for
output channel o: where a group is narrower than a vector, that index is not contiguous
within a vector of output channels, and every multiply gathered its inputs lane by lane (a
3x3 conv of 32 groups of 4 channels, 28x28x128: 1.9 ms, 5x ONNX Runtime). Here a conv whose
groups have k input and k output channels (depthwise: k = 1) is a *banded* channel conv:

    y[n, oy, ox, o] = Σ_{ry, rx, d < 2k-1} x_pad[n, oy*sh + ry, ox*sw + rx, o + d] · w[ry, rx, d, o]

w[.., d, o] being the weight of input channel o + d - (k - 1) where that channel is in o's
group, else 0 (`band_weight`), and x_pad the input with k - 1 zero channels each side. A
vector of output channels reads one contiguous vector of inputs per tap: 2k - 1 taps for k
useful ones, one load per multiply (wider groups, 4k > lanes, are cheaper merged into
vector-wide groups of `float_conv`'s blocked conv: `float_layout._lower_conv`). `schedule`
tiles it: one vector of channels times a few output
pixels of accumulators, the taps unrolled (neighbouring pixels share their input loads),
rows in parallel. The PrimFunc is kOutEWiseFusable: the bias / ReLU after it run on the tile.
"""

from __future__ import annotations

import numpy as np
from tvm import s_tir, te, tirx

from ._util import SIMD, divisor_at_most, has_block
from .float_conv import OUT_EWISE_FUSABLE, _i64, zero_pad_nhwc

BLOCK = "depthwise"  # the reduction block's name: what `is_depthwise` finds in a fused function
# Output pixels per tile (one accumulator each). Measured 1 thread, Xeon AVX-512: depthwise
# 3x3 112x112x32 0.12-0.13 ms with 4 or 8 (16: 0.15-0.21); 32 groups of 4, 28x28x128 (63
# taps): 4 pixels 0.13 ms, 8 pixels 0.19 ms.
PIXELS = 8
BAND_PIXELS = 4


def band_weight(hwio: np.ndarray) -> np.ndarray:
    """HWIO [KH, KW, k, C] of a conv with k in and k out channels per group ->
    [KH, KW, 2k - 1, C]: tap d of output channel o weighs input channel o + d - (k - 1)."""
    kh, kw, k, c = hwio.shape
    band = np.zeros((kh, kw, 2 * k - 1, c), hwio.dtype)
    o = np.arange(c)
    for rc in range(k):  # o's group reads input channel (o // k) * k + rc = o + rc - o % k
        band[:, :, rc - o % k + k - 1, o] = hwio[:, :, rc, o]
    return band


def depthwise_nhwc(x: te.Tensor, w: te.Tensor, stride: tuple[int, int],
                   pads: tuple[int, int, int, int], out_hw: tuple[int, int]) -> te.Tensor:
    """y[n, oy, ox, o] = Σ x_pad[n, oy*sh + ry, ox*sw + rx, o + d] · w[ry, rx, d, o]."""
    batch, channels = int(x.shape[0]), int(x.shape[3])
    kh, kw, taps, _ = (int(d) for d in w.shape)
    edge = taps // 2  # k - 1 zero channels each side
    src = zero_pad_nhwc(x, pads, edge)
    ry = te.reduce_axis(_i64(0, kh), name="ry")
    rx = te.reduce_axis(_i64(0, kw), name="rx")
    rd = te.reduce_axis(_i64(0, taps), name="rd")
    sh, sw = stride
    return te.compute(
        _i64(batch, *out_hw, channels),
        lambda n, y, xx, o: te.sum(src[n, y * sh + ry, xx * sw + rx, o + rd] * w[ry, rx, rd, o],
                                   axis=[ry, rx, rd]),
        name=BLOCK)


def depthwise_func(x_shape: tuple[int, ...], w_shape: tuple[int, ...], stride: tuple[int, int],
                   pads: tuple[int, int, int, int], out_hw: tuple[int, int]) -> tirx.PrimFunc:
    """The unscheduled PrimFunc (x, w_band) -> y, fusable with the elementwise ops after."""
    x = te.placeholder(_i64(*x_shape), "float32", name="x")
    w = te.placeholder(_i64(*w_shape), "float32", name="w")
    y = depthwise_nhwc(x, w, stride, pads, out_hw)
    func = te.create_prim_func([x, w, y])
    name = (f"float_depthwise_nhwc_b{x_shape[0]}h{x_shape[1]}w{x_shape[2]}c{x_shape[3]}"
            f"g{w_shape[2] // 2 + 1}k{w_shape[0]}x{w_shape[1]}s{stride[0]}x{stride[1]}"
            f"p{'_'.join(map(str, pads))}")
    return func.with_attr("global_symbol", name).with_attr("op_pattern", OUT_EWISE_FUSABLE)


def is_depthwise(func: tirx.PrimFunc) -> bool:
    """Whether a (fused) PrimFunc computes this module's conv."""
    try:
        return has_block(s_tir.Schedule(func), BLOCK)
    except Exception:  # noqa: BLE001 - a function no schedule takes: not ours
        return False


def schedule(func: tirx.PrimFunc, simd: SIMD) -> tirx.PrimFunc:
    """The register-tiled schedule of `depthwise_func` and the elementwise ops fused after."""
    sch = s_tir.Schedule(func)
    red = sch.get_sblock(BLOCK)
    epilogue = _fold_epilogue(sch, red)
    n, oy, ox, c, ry, rx, rd = sch.get_loops(red)
    banded = int(sch.get(rd).extent) > 1
    for producer in sch.get_producers(red):
        _pad(sch, producer, banded, simd)
    vec = divisor_at_most(int(sch.get(c).extent), simd.fp32_lanes)  # no tail to predicate
    co, ci = sch.split(c, [None, vec])
    px = divisor_at_most(int(sch.get(ox).extent), BAND_PIXELS if banded else PIXELS)
    xo, xi = sch.split(ox, [None, px])
    # channel vectors inside a run of pixels: the tile's input rows are read whole at once
    sch.reorder(xo, co, ry, rx, rd, xi, ci)
    sch.parallel(sch.fuse(n, oy))
    if epilogue is None:
        epilogue = sch.cache_write(red, 0, "local")
    else:
        sch.set_scope(red, 0, "local")
    sch.reverse_compute_at(epilogue, co)
    _, lanes = sch.split(sch.get_loops(epilogue)[-1], [None, vec])
    sch.vectorize(lanes)
    loops = sch.get_loops(epilogue)
    at = next(i for i, lp in enumerate(loops) if sch.get(lp).same_as(sch.get(co)))
    for loop in loops[at + 1:-1]:  # the tile read at constant indices: it stays in registers
        sch.unroll(loop)
    for loop in (ry, rx, rd, xi):
        sch.unroll(loop)
    sch.vectorize(ci)
    sch.decompose_reduction(red, ry)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _pad(sch: s_tir.Schedule, block: s_tir.SBlockRV, banded: bool, simd: SIMD) -> None:
    """Depthwise: the spatial padding inlined (its test is one per pixel, alike for every
    lane; 112x112x32 3x3: 0.13 ms against 0.25 ms copied apart, 56x56x128 stride 2: 0.05
    against 0.19). Banded: the channel padding's test differs per lane, so it is a
    parallel stage of its own (inlined: 3.4 ms against 0.2 ms)."""
    if not banded:
        sch.compute_inline(block)
        return
    *outer, inner = sch.get_loops(block)
    sch.parallel(sch.fuse(*outer))
    _, lanes = sch.split(inner, [None, divisor_at_most(int(sch.get(inner).extent),
                                                       simd.fp32_lanes)])
    sch.vectorize(lanes)


def _fold_epilogue(sch: s_tir.Schedule, red: s_tir.SBlockRV) -> s_tir.SBlockRV | None:
    """The elementwise consumers after the conv inlined into the first (None if none)."""
    chain = []
    consumers = sch.get_consumers(red)
    while len(consumers) == 1:
        chain.append(consumers[0])
        consumers = sch.get_consumers(consumers[0])
    for block in reversed(chain[1:]):
        sch.reverse_compute_inline(block)
    return chain[0] if chain else None
