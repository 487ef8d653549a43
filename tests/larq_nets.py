"""Larq-style networks written with onnx.helper in the form tf2onnx (1.17, opset 13) writes
for Larq 0.14 / larq-zoo 2.4 models, so the suite needs no TensorFlow.

The form was read off real exports (docs/onnx-contract.md, "Larq through tf2onnx"): the
input is NHWC and one `Transpose(0,3,1,2)` brings it to NCHW; tf2onnx's own optimiser keeps
convs, BatchNorm, pooling and adds in NCHW but stops at `Sign`, so every binarizer sits
between `Transpose(0,2,3,1)` and `Transpose(0,3,1,2)`: `v -> T -> Sign -> Add(0.1) -> Sign
-> [Pad(value=1.0), NHWC pads] -> T -> Conv`. A BatchNorm right after a conv is folded into
it (weights ±α per output channel and a bias); after a ReLU (QuickNet) it stays a
BatchNormalization. FC-like convs on a 1x1 map sit between Reshapes (XNOR-Net), a flatten
of a larger map is `T -> Reshape` (AlexNet), `QuantDense` is `GlobalAveragePool -> Squeeze
-> ste_sign -> MatMul(±1)`, DoReFa's 2-bit activation is `Min(x, 1) -> Max(0) -> Mul(3) ->
Round -> Mul(1/3)` with the transposes around Round, and a 4-D output goes back to NHWC.

`LarqNet` tracks the NCHW shape of every value it builds and counts the binary layers it
wrote, so a test can assert that each became a binary kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13  # what tf2onnx.convert.from_keras(..., opset=13) writes
TO_NHWC, TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]


def same_pads(size: int, k: int, stride: int) -> tuple[int, int]:
    """TensorFlow's padding='same' along one axis: (before, after), the odd one after."""
    total = max((-(-size // stride) - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


def _conv_attrs(k: int, stride: int, pads: list[int]) -> dict:
    """A Conv's attributes as tf2onnx writes them (no pads attribute when they are all 0)."""
    attrs = {"dilations": [1, 1], "strides": [stride] * 2, "kernel_shape": [k, k]}
    if any(pads):
        attrs["pads"] = pads
    return {**attrs, "group": 1}


@dataclass
class LarqNet:
    """An ONNX graph under construction; `x` is the NCHW value after the input transpose."""

    batch: int = 1
    size: int = 16
    channels: int = 3
    seed: int = 0
    binary: int = 0  # binary convs and dense layers written
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    _nodes: list = field(default_factory=list)
    _inits: list = field(default_factory=list)
    _n: int = 0

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.input_shape = (self.batch, self.size, self.size, self.channels)
        self.shapes["input"] = self.input_shape
        self.x = self.node("Transpose", ["input"],
                           (self.batch, self.channels, self.size, self.size), perm=TO_NCHW)

    # -- plumbing ------------------------------------------------------------------------
    def _name(self, stem: str) -> str:
        self._n += 1
        return f"{stem}_{self._n}"

    def const(self, value: Any, stem: str = "c") -> str:
        name = self._name(stem)
        self._inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], shape: tuple[int, ...] | None = None,
             **attrs: Any) -> str:
        out = self._name(op.lower())
        self._nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        self.shapes[out] = shape if shape is not None else self.shapes[inputs[0]]
        return out

    def _t(self, x: str, perm: list[int]) -> str:
        s = self.shapes[x]
        return self.node("Transpose", [x], tuple(s[p] for p in perm), perm=perm)

    def model(self, out: str) -> onnx.ModelProto:
        """The ONNX model; a 4-D output goes back to NHWC, as Keras' output is."""
        if len(self.shapes[out]) == 4:
            out = self._t(out, TO_NHWC)
        g = helper.make_graph(
            self._nodes, "larq_net",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, self.input_shape)],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, self.shapes[out])],
            self._inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=8, producer_name="tf2onnx")
        onnx.checker.check_model(m, full_check=True)
        return m

    def input(self) -> np.ndarray:
        x = self.rng.normal(0, 1, self.input_shape).astype(np.float32)
        x.reshape(-1)[::11] = 0.0  # sign(0): ste_sign reads it as +1, like the kernels
        return x

    # -- weights -------------------------------------------------------------------------
    def _pm1(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.where(self.rng.random(shape) < 0.5, -1.0, 1.0).astype(np.float32)

    def _folded_bn(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A BatchNorm folded into the conv as tf2onnx folds it: W * s[o], bias t[o]."""
        o = w.shape[0]
        scale = self.rng.uniform(0.05, 0.3, o).astype(np.float32)
        bias = self.rng.normal(0, 0.5, o).astype(np.float32)
        return (w * scale.reshape(-1, 1, 1, 1)).astype(np.float32), bias

    # -- float layers (NCHW) -------------------------------------------------------------
    def conv(self, x: str, cout: int, k: int = 3, stride: int = 1) -> str:
        """A float conv with a folded BatchNorm (the stem), padding 'same'."""
        b, cin, h, w = self.shapes[x]
        weight = self.rng.normal(0, 1 / np.sqrt(cin * k * k), (cout, cin, k, k))
        weight, bias = self._folded_bn(weight.astype(np.float32))
        (t, bt), (lf, r) = same_pads(h, k, stride), same_pads(w, k, stride)
        oh, ow = -(-h // stride), -(-w // stride)
        return self.node("Conv", [x, self.const(weight, "w"), self.const(bias, "b")],
                         (b, cout, oh, ow), **_conv_attrs(k, stride, [t, lf, bt, r]))

    def depthwise(self, x: str, k: int = 3, stride: int = 1) -> str:
        """A float DepthwiseConv2D (group = channels) with its BatchNorm folded, 'same'."""
        b, c, h, w = self.shapes[x]
        weight, bias = self._folded_bn(self.rng.normal(0, 1 / k, (c, 1, k, k)).astype(np.float32))
        (t, bt), (lf, r) = same_pads(h, k, stride), same_pads(w, k, stride)
        return self.node("Conv", [x, self.const(weight, "w"), self.const(bias, "b")],
                         (b, c, -(-h // stride), -(-w // stride)),
                         **{**_conv_attrs(k, stride, [t, lf, bt, r]), "group": c})

    def concat(self, a: str, b: str) -> str:
        """Channel concatenation (NCHW, where tf2onnx's optimiser leaves it)."""
        sa, sb = self.shapes[a], self.shapes[b]
        return self.node("Concat", [a, b], (sa[0], sa[1] + sb[1], *sa[2:]), axis=1)

    def channel_slice(self, x: str, start: int, end: int) -> str:
        """x[:, start:end] as tf2onnx writes a Keras slice: Slice with constant starts/ends."""
        b, _, h, w = self.shapes[x]
        return self.node("Slice", [x, self.const(np.array([start], np.int64), "starts"),
                                   self.const(np.array([end], np.int64), "ends"),
                                   self.const(np.array([1], np.int64), "axes")],
                         (b, end - start, h, w))

    def bn(self, x: str) -> str:
        c = self.shapes[x][1]
        stats = [self.rng.uniform(0.5, 1.5, c), self.rng.normal(0, 0.3, c),
                 self.rng.normal(0, 0.3, c), self.rng.uniform(0.5, 2.0, c)]
        return self.node("BatchNormalization",
                         [x] + [self.const(s.astype(np.float32), "bn") for s in stats],
                         epsilon=1e-5)

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])

    def add(self, a: str, b: str) -> str:
        assert self.shapes[a] == self.shapes[b]
        return self.node("Add", [a, b])

    def maxpool(self, x: str, k: int = 2) -> str:
        b, c, h, w = self.shapes[x]
        return self.node("MaxPool", [x], (b, c, h // k, w // k), kernel_shape=[k, k],
                         strides=[k, k])

    # -- binarizers ----------------------------------------------------------------------
    def ste_sign(self, x: str) -> str:
        """Larq's ste_sign, sign(sign(x) + 0.1): sign(0) is +1."""
        s = self.node("Sign", [x])
        return self.node("Sign", [self.node("Add", [s, self.const(np.float32(0.1), "c")])])

    def dorefa(self, x: str) -> str:
        """DoReFa's 2-bit activation: round(clip(x, 0, 1) * 3) / 3, through tf.clip_by_value."""
        one, zero = (self.const(np.full((1, 1, 1, 1), v, np.float32), "clip") for v in (1, 0))
        h = self.node("Max", [self.node("Min", [x, one]), zero])
        h = self._t(self.node("Mul", [h, self.const(np.float32(3.0))]), TO_NHWC)
        r = self.node("Mul", [self.node("Round", [h]), self.const(np.float32(1 / 3))])
        return self._t(r, TO_NCHW)  # tf2onnx's optimiser stops at Round

    # -- binary layers -------------------------------------------------------------------
    def quant_conv(self, x: str, cout: int, k: int = 3, stride: int = 1,
                   pad_values: float = 0.0, folded_bn: bool = True) -> str:
        """QuantConv2D(input_quantizer=ste_sign, kernel_quantizer=ste_sign, padding='same'):
        the sign in NHWC between transposes; pad_values=1.0 writes an NHWC Pad(1.0) and a
        conv without padding (QuickNet). With `folded_bn` the following BatchNorm is folded
        into the conv (±α per channel and a bias), as tf2onnx does."""
        b, cin, h, w = self.shapes[x]
        a = self.ste_sign(self._t(x, TO_NHWC))
        (t, bt), (lf, r) = same_pads(h, k, stride), same_pads(w, k, stride)
        conv_pads = [t, lf, bt, r]
        if pad_values:
            nb, nh, nw, nc = self.shapes[a]
            pads = np.array([0, t, lf, 0, 0, bt, r, 0], np.int64)
            a = self.node("Pad", [a, self.const(pads, "pads"),
                                  self.const(np.float32(pad_values), "pad_value")],
                          (nb, nh + t + bt, nw + lf + r, nc))
            conv_pads = [0] * 4
        a = self._t(a, TO_NCHW)
        weight = self._pm1((cout, cin, k, k))
        inputs = [a]
        if folded_bn:
            weight, bias = self._folded_bn(weight)
            inputs += [self.const(weight, "w"), self.const(bias, "b")]
        else:
            inputs.append(self.const(weight, "w"))
        self.binary += 1
        return self.node("Conv", inputs, (b, cout, -(-h // stride), -(-w // stride)),
                         **_conv_attrs(k, stride, conv_pads))

    def dorefa_conv(self, x: str, cout: int, k: int = 3) -> str:
        """DoReFaNet's QuantConv2D: the 2-bit activation (Min, Max and Mul in NCHW, the
        transposes around Round), ±1 weights, the BatchNorm folded."""
        b, cin, h, w = self.shapes[x]
        weight, bias = self._folded_bn(self._pm1((cout, cin, k, k)))
        self.binary += 1
        return self.node("Conv", [self.dorefa(x), self.const(weight, "w"),
                                  self.const(bias, "b")], (b, cout, h, w),
                         **_conv_attrs(k, 1, [k // 2] * 4))

    def fc_conv(self, x: str, cout: int) -> str:
        """XNOR-Net's FC-like QuantConv2D on a 1x1 map: Reshape to NHWC, ste_sign, Reshape
        back, a 1x1 conv with magnitude_aware_sign weights (±α per channel, no bias: the
        BatchNorm after it is not folded through the Reshape tf2onnx writes after it)."""
        b, cin, h, w = self.shapes[x]
        assert (h, w) == (1, 1)
        r = self.node("Reshape", [x, self.const(np.array([b, 1, 1, cin], np.int64), "shape")],
                      (b, 1, 1, cin))
        a = self.node("Reshape", [self.ste_sign(r),
                                  self.const(np.array([b, cin, 1, 1], np.int64), "shape")],
                      (b, cin, 1, 1))
        weight, _ = self._folded_bn(self._pm1((cout, cin, 1, 1)))
        self.binary += 1
        y = self.node("Conv", [a, self.const(weight, "w")], (b, cout, 1, 1),
                      **_conv_attrs(1, 1, [0] * 4))
        return self.node("Reshape", [y, self.const(np.array([b, cout, 1, 1], np.int64), "shape")])

    def flatten_fc_conv(self, x: str, cout: int) -> str:
        """BinaryAlexNet's first FC-like conv: the NHWC flatten of an HxW map (Transpose,
        Reshape to [B,1,1,HWC]), ste_sign, Reshape to [B,HWC,1,1], a 1x1 conv with ±1
        weights and no bias, and the Reshape tf2onnx writes after it."""
        b, c, h, w = self.shapes[x]
        n = c * h * w
        r = self.node("Reshape", [self._t(x, TO_NHWC),  # Keras' Reshape((1, 1, -1))
                                  self.const(np.array([b, 1, 1, -1], np.int64), "shape")],
                      (b, 1, 1, n))
        a = self.node("Reshape", [self.ste_sign(r),
                                  self.const(np.array([b, n, 1, 1], np.int64), "shape")],
                      (b, n, 1, 1))
        self.binary += 1
        y = self.node("Conv", [a, self.const(self._pm1((cout, n, 1, 1)), "w")],
                      (b, cout, 1, 1), **_conv_attrs(1, 1, [0] * 4))
        return self.node("Reshape", [y, self.const(np.array([b, cout, 1, 1], np.int64), "shape")])

    def quant_dense(self, x: str, units: int) -> str:
        """GlobalAveragePooling2D then QuantDense(ste_sign, ste_sign, use_bias=False)."""
        b, c = self.shapes[x][:2]
        p = self.node("GlobalAveragePool", [x], (b, c, 1, 1))
        s = self.node("Squeeze", [p, self.const(np.array([2, 3], np.int64), "axes")], (b, c))
        self.binary += 1
        return self.node("MatMul", [self.ste_sign(s), self.const(self._pm1((c, units)), "w")],
                         (b, units))

    # -- blocks ----------------------------------------------------------------------------
    def birealnet_block(self, x: str) -> str:
        """Bi-Real Net: a binary conv (BatchNorm folded) plus the identity shortcut."""
        return self.add(self.quant_conv(x, self.shapes[x][1]), x)

    def densenet_block(self, x: str, growth: int) -> str:
        """BinaryDenseNet: BatchNorm, a binary conv of `growth` channels, concatenated to x."""
        return self.concat(x, self.quant_conv(self.bn(x), growth, folded_bn=False))

    def melius_improvement(self, x: str, width: int) -> str:
        """MeliusNet's improvement block: a binary conv of `width` channels added to the last
        `width` channels of x, the others passed through (Slice, Add, Concat)."""
        c = self.shapes[x][1]
        better = self.add(self.channel_slice(x, c - width, c),
                          self.bn(self.quant_conv(x, width, folded_bn=False)))
        return self.concat(self.channel_slice(x, 0, c - width), better)

    def quicknet_stem(self, x: str, width: int) -> str:
        """QuickNet's stem: a float 3x3 s2 conv and ReLU, a depthwise 3x3 s2, a 1x1 conv."""
        y = self.depthwise(self.relu(self.conv(x, width // 4, stride=2)), stride=2)
        return self.conv(y, width, k=1)

    def quicknet_transition(self, x: str, cout: int) -> str:
        """QuickNet's transition: ReLU, MaxPool 2, a float depthwise 3x3, a 1x1 float conv."""
        return self.conv(self.depthwise(self.maxpool(self.relu(x))), cout, k=1)

    def quicknet_block(self, x: str) -> str:
        """QuickNet: ste_sign, Pad(1.0), binary conv with ±1 weights, ReLU, BatchNorm, the
        shortcut added."""
        y = self.quant_conv(x, self.shapes[x][1], pad_values=1.0, folded_bn=False)
        return self.add(self.bn(self.relu(y)), x)
