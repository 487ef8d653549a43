"""The float convolution of the CPU path: NHWC activations, weights blocked by output channel.

TVM's legalized NHWC conv reads an HWIO weight: one tile of output channels reads its
weights at a stride of O floats per reduction step (2 KB for 512 channels), so a 3x3x512
reduction touches thousands of pages per tile and the deep layers of a ResNet ran 5x slower
per MAC than the shallow ones. Here the weight is laid out [O / B, KH, KW, C, B] with B the
tile's output channels (`float_default.conv_block`), so a tile reads one contiguous run.
The compute is plain TE and unscheduled: FuseOps fuses the bias / residual / ReLU after it
(the PrimFunc is kOutEWiseFusable), and `float_default` register-tiles the fused function.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import te

OUT_EWISE_FUSABLE = 4  # relax.OpPatternKind.kOutEWiseFusable


def _i64(*dims: int) -> tuple[tvm.tirx.IntImm, ...]:
    """Relax's shapes are int64: the buffers of a function FuseTIR fuses must agree."""
    return tuple(tvm.tirx.IntImm("int64", int(d)) for d in dims)


def block_weight(hwio: np.ndarray, block: int) -> np.ndarray:
    """HWIO [KH, KW, C, O] -> [O / block, KH, KW, C, block] (a tile's weights contiguous)."""
    kh, kw, c, o = hwio.shape
    return np.ascontiguousarray(hwio.reshape(kh, kw, c, o // block, block).transpose(3, 0, 1, 2, 4))


def merge_groups(hwio: np.ndarray, groups: int, merge: int) -> np.ndarray:
    """HWIO [KH, KW, C/groups, O] of a grouped conv -> that of `merge` times fewer groups:
    each new group's weight is block-diagonal (zero between the groups merged into it)."""
    kh, kw, group_in, o = hwio.shape
    merged = np.zeros((kh, kw, merge, group_in, o), hwio.dtype)
    out_group = np.arange(o) // (o // groups)  # each output channel's group
    merged[:, :, out_group % merge, :, np.arange(o)] = hwio.transpose(3, 0, 1, 2)
    return merged.reshape(kh, kw, merge * group_in, o)


def zero_pad_nhwc(x: te.Tensor, pads: tuple[int, int, int, int], edge: int = 0) -> te.Tensor:
    """x zero-padded by (top, left, bottom, right) rows and columns and `edge` channels each
    side (the banded depthwise conv's); x itself where nothing pads."""
    batch, height, width, channels = (int(d) for d in x.shape)
    top, left, bottom, right = pads
    if not any(pads) and not edge:
        return x

    def _pad(n, h, ww, c):
        bounds = [h >= top, h < height + top, ww >= left, ww < width + left]
        if edge:  # only then: a conv's expression (its tuning records' hash) stays as it was
            bounds += [c >= edge, c < channels + edge]
        return tvm.tirx.if_then_else(tvm.tirx.all(*bounds),
                                     x[n, h - top, ww - left, c - edge if edge else c],
                                     tvm.tirx.const(0.0, x.dtype))

    return te.compute(_i64(batch, height + top + bottom, width + left + right,
                           channels + 2 * edge), _pad, name="pad")


def conv_nhwc_blocked(x: te.Tensor, w: te.Tensor, stride: tuple[int, int],
                      pads: tuple[int, int, int, int], out_hw: tuple[int, int],
                      groups: int = 1) -> te.Tensor:
    """y[n, oy, ox, o] = Σ x_padded[n, oy*sh + ry, ox*sw + rx, c] · w[o / B, ry, rx, c, o % B];
    grouped: c runs over the group's input channels, and a block of B output channels lies
    in one group, so a tile's input is one broadcast value per step, as in the dense conv."""
    batch = int(x.shape[0])
    blocks, kh, kw, group_channels, blk = (int(d) for d in w.shape)
    src = zero_pad_nhwc(x, pads)
    ry = te.reduce_axis(_i64(0, kh), name="ry")
    rx = te.reduce_axis(_i64(0, kw), name="rx")
    rc = te.reduce_axis(_i64(0, group_channels), name="rc")
    sh, sw = stride
    per_group = blocks // groups  # blocks of one group's output channels

    def channel(o):  # groups == 1 keeps the expression (and tuning records' hashes) as it was
        return rc if groups == 1 else o // blk // per_group * group_channels + rc

    return te.compute(
        _i64(batch, *out_hw, blocks * blk),
        lambda n, y, xx, o: te.sum(src[n, y * sh + ry, xx * sw + rx, channel(o)]
                                   * w[o // blk, ry, rx, rc, o % blk], axis=[ry, rx, rc]),
        name="conv")


def conv_func(x_shape: tuple[int, ...], w_shape: tuple[int, ...], stride: tuple[int, int],
              pads: tuple[int, int, int, int], out_hw: tuple[int, int],
              groups: int = 1) -> tvm.tirx.PrimFunc:
    """The unscheduled PrimFunc (x, w_blocked) -> y, fusable with the elementwise ops after."""
    x = te.placeholder(_i64(*x_shape), "float32", name="x")
    w = te.placeholder(_i64(*w_shape), "float32", name="w")
    y = conv_nhwc_blocked(x, w, stride, pads, out_hw, groups)
    func = te.create_prim_func([x, w, y])
    name = (f"float_conv_nhwc_b{x_shape[0]}h{x_shape[1]}w{x_shape[2]}c{x_shape[3]}"
            f"o{w_shape[0] * w_shape[4]}k{w_shape[1]}x{w_shape[2]}s{stride[0]}x{stride[1]}"
            f"p{'_'.join(map(str, pads))}" + (f"g{groups}" if groups > 1 else ""))
    return func.with_attr("global_symbol", name).with_attr("op_pattern", OUT_EWISE_FUSABLE)
