"""Every float op of the x86 path, compiled by `compile_model`, against ONNX Runtime.

The convs at every kernel size, stride and padding at odd channel counts, depthwise and
grouped convs (each kernel `float_layout._lower_conv` picks), conv + BatchNorm + activation
and residual chains, Gemm and MatMul, and the pools. A model holds several ops side by side,
one graph output each, so that one compile checks them all and a failure names the op.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

MAX_REL_ERR = 1e-5  # float32, sums of at most 7x7x65 products


class _Graph:
    """A float ONNX graph (opset 17) on one input "x": ops added by name, outputs chosen."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.outputs: list[str] = []

    def const(self, value, dtype=np.float32) -> str:
        name = f"c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def op(self, op: str, inputs: list[str], **attrs) -> str:
        name = f"{op.lower()}{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, pads=None,
             groups: int = 1, bias: bool = False) -> str:
        w = self.rng.normal(0, (1 / (cin // groups * k * k)) ** 0.5, (cout, cin // groups, k, k))
        inputs = [x, self.const(w)] + ([self.const(self.rng.normal(0, 1, cout))] if bias else [])
        return self.op("Conv", inputs, kernel_shape=[k, k], strides=[stride] * 2,
                       pads=list(pads) if pads is not None else [k // 2] * 4, group=groups)

    def batch_norm(self, x: str, c: int) -> str:
        r = self.rng
        params = (r.uniform(0.5, 1.5, c), r.normal(0, 0.5, c), r.normal(0, 0.5, c),
                  r.uniform(0.5, 2, c))
        return self.op("BatchNormalization", [x, *(self.const(p) for p in params)])

    def output(self, name: str, label: str) -> None:
        """Graph output `label` (the name a failure reports) computed as `name`."""
        self.nodes.append(helper.make_node("Identity", [name], [label]))
        self.outputs.append(label)

    def model(self, x_shape: list[int]) -> onnx.ModelProto:
        g = helper.make_graph(
            self.nodes, "float_ops", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                    x_shape)],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in self.outputs],
            self.inits)
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def _ort_outputs(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def _check(tmp_path, graph: _Graph, x_shape: list[int], max_rel_err) -> None:
    """Compile, run, and compare every output with ONNX Runtime's; all failures at once."""
    from abc_tvm.compiler import compile_model
    from abc_tvm.runtime import load

    model = graph.model(x_shape)
    compile_model(model, "x86", tmp_path / "m.so", quiet=True)
    x = np.random.default_rng(1).normal(0, 1, x_shape).astype(np.float32)
    ours = load(tmp_path / "m.so", workers=1)(x)
    ours = ours if isinstance(ours, tuple) else (ours,)
    failed = []
    for name, y, ref in zip(graph.outputs, ours, _ort_outputs(model, x), strict=True):
        if y.shape != ref.shape:
            failed.append(f"{name}: shape {y.shape}, ORT {ref.shape}")
            continue
        err = max_rel_err(y, ref)
        if not err <= MAX_REL_ERR:
            failed.append(f"{name}: max rel err {err:.2e}")
    assert not failed, "; ".join(failed)


@pytest.mark.parametrize(("batch", "cin", "cout"), [(1, 3, 13), (3, 13, 65), (1, 65, 3),
                                                     (3, 16, 32)])
def test_conv_kernel_sizes_strides_and_padding(tmp_path, max_rel_err, batch, cin, cout):
    g = _Graph()
    for k in (1, 3, 5, 7):
        for stride in (1, 2):
            for pad in sorted({0, k // 2}):
                g.output(g.conv("x", cin, cout, k, stride, [pad] * 4, bias=stride == 2),
                         f"conv{k}x{k}_s{stride}_p{pad}")
    g.output(g.conv("x", cin, cout, 3, 1, [0, 1, 2, 1]), "conv3x3_pads_0_1_2_1")
    _check(tmp_path, g, [batch, cin, 9, 11], max_rel_err)


def _divisors(n: int) -> list[int]:
    return [d for d in range(2, n) if n % d == 0]


@pytest.mark.parametrize(("batch", "channels"), [(1, 32), (3, 48), (1, 65), (3, 13)])
def test_depthwise_and_grouped_convs(tmp_path, max_rel_err, batch, channels):
    """Depthwise (banded, k = 1), narrow groups (banded), groups merged into vector-wide
    ones, groups of a vector or more (blocked), a channel multiplier and unequal groups."""
    c = channels
    g = _Graph()
    for k, stride, pad in ((3, 1, 1), (3, 2, 1), (5, 1, 0), (7, 2, 3)):
        g.output(g.conv("x", c, c, k, stride, [pad] * 4, groups=c, bias=stride == 1),
                 f"depthwise{k}x{k}_s{stride}_p{pad}")
    for groups in _divisors(c)[:4]:
        g.output(g.conv("x", c, c, 3, groups=groups, bias=True), f"grouped3x3_g{groups}")
    g.output(g.conv("x", c, 2 * c, 3, 2, groups=c), "depthwise_multiplier2_s2")
    if c % 4 == 0:
        g.output(g.conv("x", c, 2 * c, 3, groups=c // 4), f"grouped_4in_8out_g{c // 4}")
    _check(tmp_path, g, [batch, c, 9, 11], max_rel_err)


@pytest.mark.parametrize("batch", [1, 3])
def test_conv_batch_norm_activation_chains(tmp_path, max_rel_err, batch):
    """BatchNorm folded into each conv; Relu, PRelu, Clip (ReLU6 and Hardtanh) and a
    residual Add fused after it, on dense and depthwise convs."""
    g = _Graph()
    a = g.op("Relu", [g.batch_norm(g.conv("x", 13, 32, 3, bias=True), 32)])
    slope = g.const(g.rng.uniform(0.05, 0.3, (32, 1, 1)))
    b = g.op("PRelu", [g.batch_norm(g.conv(a, 32, 32, 3, 2), 32), slope])
    relu6 = [g.const(np.float32(0)), g.const(np.float32(6))]
    c = g.op("Clip", [g.batch_norm(g.conv(b, 32, 32, 3, groups=32), 32), *relu6])
    d = g.batch_norm(g.conv(c, 32, 32, 1), 32)
    e = g.op("Relu", [g.op("Add", [d, b])])
    hardtanh = [g.const(np.float32(-1)), g.const(np.float32(1))]
    f = g.op("Clip", [g.batch_norm(g.conv(e, 32, 16, 3, groups=8), 16), *hardtanh])
    g.output(e, "conv_bn_relu_prelu_relu6_residual")
    g.output(f, "grouped_conv_bn_hardtanh")
    g.output(g.op("Relu", [g.op("Add", [g.conv("x", 13, 13, 3, groups=13), "x"])]),
             "depthwise_residual_relu")
    _check(tmp_path, g, [batch, 13, 9, 11], max_rel_err)


@pytest.mark.parametrize("batch", [1, 3])
def test_gemm_and_matmul(tmp_path, max_rel_err, batch):
    g = _Graph()
    flat = g.op("Flatten", ["x"])  # [batch, 13 * 3 * 3]
    r = g.rng
    h = g.op("Relu", [g.op("Gemm", [flat, g.const(r.normal(0, 0.1, (65, 117))),
                                    g.const(r.normal(0, 1, 65))], transB=1)])
    g.output(h, "gemm_transB_bias_relu")
    w, bias = g.const(r.normal(0, 0.1, (65, 10))), g.const(r.normal(0, 1, (1, 10)))
    g.output(g.op("Gemm", [h, w, bias], alpha=0.5, beta=2.0), "gemm_alpha_beta")
    g.output(g.op("Gemm", [flat, g.const(r.normal(0, 0.1, (117, 7)))]), "gemm_no_bias")
    g.output(g.op("Add", [g.op("MatMul", [flat, g.const(r.normal(0, 0.1, (117, 33)))]),
                          g.const(r.normal(0, 1, 33))]), "matmul_add")
    rows = g.op("Reshape", ["x", g.const([batch, 13, 9], np.int64)])
    rows = g.op("Transpose", [rows], perm=[0, 2, 1])  # [batch, 9, 13]
    g.output(g.op("MatMul", [rows, g.const(r.normal(0, 0.3, (13, 5)))]), "matmul_3d")
    _check(tmp_path, g, [batch, 13, 3, 3], max_rel_err)


@pytest.mark.parametrize(("batch", "after_conv"), [(1, False), (3, True)])
def test_pools(tmp_path, max_rel_err, batch, after_conv):
    """Pools on the NCHW input, and after a conv (where they follow it into NHWC)."""
    g = _Graph()
    x = g.op("Relu", [g.conv("x", 13, 13, 1, bias=True)]) if after_conv else "x"
    pools = {
        "maxpool3x3_s2_p1": ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2],
                                             pads=[1, 1, 1, 1])),
        "maxpool2x2_s2": ("MaxPool", dict(kernel_shape=[2, 2], strides=[2, 2])),
        "maxpool2x2_s2_ceil": ("MaxPool", dict(kernel_shape=[2, 2], strides=[2, 2],
                                               ceil_mode=1)),
        "avgpool3x3_s2_p1_exclude_pad": ("AveragePool", dict(
            kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=0)),
        "avgpool3x3_s2_p1_include_pad": ("AveragePool", dict(
            kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1)),
        "avgpool3x3_s1_p1_exclude_pad": ("AveragePool", dict(
            kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=0)),
        "avgpool2x2_s2": ("AveragePool", dict(kernel_shape=[2, 2], strides=[2, 2])),
        "global_avgpool": ("GlobalAveragePool", {}),
    }
    for label, (op, attrs) in pools.items():
        g.output(g.op(op, [x], **attrs), label)
    _check(tmp_path, g, [batch, 13, 9, 11], max_rel_err)
