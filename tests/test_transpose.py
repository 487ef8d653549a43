"""`push_transposes` on its own: tf2onnx's NHWC <-> NCHW pairs move and cancel, every value
bit for bit as before, and what does not commute with a transpose stays as it is."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from abc_tvm.canonical.graph import Graph
from abc_tvm.canonical.transpose import push_transposes

TO_NHWC, TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]


def _model(nodes, x_shape, out_shape, inits=(), opset=13) -> onnx.ModelProto:
    vi = helper.make_tensor_value_info
    g = helper.make_graph(nodes, "g", [vi("x", TensorProto.FLOAT, x_shape)],
                          [vi("y", TensorProto.FLOAT, out_shape)],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _run(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def _pushed(m: onnx.ModelProto) -> tuple[onnx.ModelProto, list]:
    g = Graph(m)
    notes = push_transposes(g)
    out = g.to_model()
    onnx.checker.check_model(out, full_check=True)
    return out, notes


def _ops(m: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in m.graph.node]


def _same(m: onnx.ModelProto, out: onnx.ModelProto, shape, seed: int = 0) -> None:
    x = np.random.default_rng(seed).normal(0, 1, shape).astype(np.float32)
    x.reshape(-1)[::7] = 0.0  # sign(0) paths too
    np.testing.assert_array_equal(_run(out, x), _run(m, x))


def _t(src: str, dst: str, perm: list[int]) -> onnx.NodeProto:
    return helper.make_node("Transpose", [src], [dst], perm=perm)


W = np.where(np.random.default_rng(1).random((6, 4, 3, 3)) < 0.5, -1, 1).astype(np.float32)


def test_ste_sign_between_transposes_reaches_its_conv_in_nchw():
    """tf2onnx's form of a Larq block: the pair around Sign(Add(Sign(x), 0.1)) cancels and
    the conv reads the binarizer directly."""
    m = _model([_t("x", "h", TO_NHWC), helper.make_node("Sign", ["h"], ["s"]),
                helper.make_node("Add", ["s", "c"], ["a"]), helper.make_node("Sign", ["a"], ["b"]),
                _t("b", "bt", TO_NCHW), helper.make_node("Conv", ["bt", "w"], ["y"], pads=[1] * 4)],
               [1, 4, 5, 5], [1, 6, 5, 5], [("c", np.float32(0.1)), ("w", W)])
    out, notes = _pushed(m)
    assert _ops(out) == ["Sign", "Add", "Sign", "Conv"]
    assert [n.rule for n in notes] == ["push_transposes"]
    _same(m, out, [1, 4, 5, 5])


def test_constants_are_permuted_and_pads_follow_the_layout():
    """A per-channel NHWC constant ([C]) becomes [1, C, 1, 1]; Pad(value=1)'s NHWC pads
    become NCHW pads; Clip's scalar bounds stay."""
    scale = np.linspace(0.5, 1.5, 4).astype(np.float32)
    pads = np.array([0, 1, 2, 0, 0, 2, 1, 0], np.int64)
    m = _model([_t("x", "h", TO_NHWC), helper.make_node("Mul", ["h", "s"], ["m"]),
                helper.make_node("Clip", ["m", "lo", "hi"], ["c"]),
                helper.make_node("Pad", ["c", "p", "one"], ["pd"]),
                _t("pd", "y", TO_NCHW)],
               [2, 4, 5, 5], [2, 4, 8, 8],
               [("s", scale), ("lo", np.float32(-1)), ("hi", np.float32(1)), ("p", pads),
                ("one", np.float32(1.0))])
    out, _ = _pushed(m)
    assert _ops(out) == ["Mul", "Clip", "Pad", "Identity"]  # y keeps its name
    g = Graph(out)
    mul, _, pad, _ = g.nodes
    assert g.const(mul.input[1]).shape == (1, 4, 1, 1)
    assert g.const(pad.input[1]).tolist() == [0, 0, 1, 2, 0, 0, 2, 1]
    _same(m, out, [2, 4, 5, 5])


def test_residual_add_of_two_transposed_values_moves_as_one():
    """Add(T(a), T(b)) is T(Add(a, b)); the shortcut's fan-out gets its own copy."""
    m = _model([_t("x", "h", TO_NHWC), helper.make_node("Relu", ["h"], ["r"]),
                helper.make_node("Add", ["r", "h"], ["a"]), helper.make_node("Sign", ["a"], ["s"]),
                _t("s", "y", TO_NCHW)], [1, 3, 4, 4], [1, 3, 4, 4])
    out, _ = _pushed(m)
    assert _ops(out) == ["Relu", "Add", "Sign", "Identity"]
    _same(m, out, [1, 3, 4, 4])


def test_concat_and_reduce_axes_follow_the_layout():
    m = _model([_t("x", "h", TO_NHWC), helper.make_node("Relu", ["h"], ["r"]),
                helper.make_node("Concat", ["h", "r"], ["c"], axis=3),
                helper.make_node("ReduceMax", ["c"], ["y"], axes=[1, 2], keepdims=0)],
               [2, 3, 4, 5], [2, 6])
    out, _ = _pushed(m)
    assert "Transpose" not in _ops(out)
    _same(m, out, [2, 3, 4, 5])


def test_reshape_of_a_1x1_map_reads_the_untransposed_value():
    """On a 1x1 map the NHWC<->NCHW transpose keeps the element order: the Reshape before an
    FC layer (AlexNet/XNOR-Net) reads the NCHW value."""
    m = _model([_t("x", "h", TO_NHWC), helper.make_node("Sign", ["h"], ["s"]),
                helper.make_node("Reshape", ["s", "shape"], ["y"])],
               [2, 8, 1, 1], [2, 8], [("shape", np.array([-1, 8], np.int64))])
    out, _ = _pushed(m)
    assert "Transpose" not in _ops(out)
    _same(m, out, [2, 8, 1, 1])


def test_reshape_pair_around_a_binarizer_cancels():
    """XNOR-Net's FC-like conv on a 1x1 map through tf2onnx: Reshape(NCHW -> [1,1,1,C]) ->
    ste_sign -> Reshape([1,C,1,1]) -> Conv: the second Reshape moves up through the sign
    and cancels the first; the conv reads the binarizer."""
    w = np.where(np.random.default_rng(2).random((5, 8, 1, 1)) < 0.5, -1, 1).astype(np.float32)
    m = _model([helper.make_node("Reshape", ["x", "s1"], ["r"]),
                helper.make_node("Sign", ["r"], ["a"]), helper.make_node("Add", ["a", "c"], ["b"]),
                helper.make_node("Sign", ["b"], ["s"]),
                helper.make_node("Reshape", ["s", "s2"], ["r2"]),
                helper.make_node("Conv", ["r2", "w"], ["y"])],
               [1, 8, 1, 1], [1, 5, 1, 1],
               [("s1", np.array([1, 1, 1, 8], np.int64)), ("s2", np.array([1, 8, 1, 1], np.int64)),
                ("c", np.float32(0.1)), ("w", w)])
    out, notes = _pushed(_with_transpose(m))
    assert [o for o in _ops(out) if o != "Transpose"] == ["Sign", "Add", "Sign", "Conv"]
    assert "Reshape pair cancelled" in [n.detail for n in notes]
    _same(m, out, [1, 8, 1, 1])


def test_a_real_flatten_stays_before_the_binarizer():
    """BinaryAlexNet's flatten of a 6x6 map is an NHWC flatten (Transpose then Reshape): it
    stays, but the Reshape to [1, C, 1, 1] joins it above the sign, so the FC-like conv reads
    its binarizer."""
    w = np.where(np.random.default_rng(3).random((5, 18, 1, 1)) < 0.5, -1, 1).astype(np.float32)
    m = _model([_t("x", "h", TO_NHWC), helper.make_node("Reshape", ["h", "s1"], ["r"]),
                helper.make_node("Sign", ["r"], ["s"]),
                helper.make_node("Reshape", ["s", "s2"], ["r2"]),
                helper.make_node("Conv", ["r2", "w"], ["y"])],
               [1, 2, 3, 3], [1, 5, 1, 1],
               [("s1", np.array([1, 1, 1, 18], np.int64)),
                ("s2", np.array([1, 18, 1, 1], np.int64)), ("w", w)])
    out, _ = _pushed(m)
    assert _ops(out) == ["Transpose", "Reshape", "Sign", "Conv"]
    _same(m, out, [1, 2, 3, 3])


def _with_transpose(m: onnx.ModelProto) -> onnx.ModelProto:
    """The model with an input Transpose pair in front (the rule runs where tf2onnx left
    transposes, as every tf2onnx export has at its input)."""
    m = onnx.ModelProto.FromString(m.SerializeToString())
    first = m.graph.node[0]
    first.input[0] = "xt2"
    m.graph.node.insert(0, _t("xt1", "xt2", TO_NCHW))
    m.graph.node.insert(0, _t("x", "xt1", TO_NHWC))
    return m


def test_a_small_computed_scale_is_brought_into_the_layout():
    """RealToBinaryNet's gate: Mul(T(conv), s[1, 1, 1, C]) with s computed: s is reshaped to
    [1, C, 1, 1] (the transpose moves only size-1 axes) and the pair cancels."""
    m = _model([helper.make_node("ReduceMean", ["x"], ["g"], axes=[2, 3], keepdims=1),
                helper.make_node("Sigmoid", ["g"], ["sg"]),
                helper.make_node("Reshape", ["sg", "shape"], ["s"]),
                _t("x", "h", TO_NHWC), helper.make_node("Mul", ["h", "s"], ["m"]),
                _t("m", "y", TO_NCHW)],
               [1, 4, 6, 6], [1, 4, 6, 6], [("shape", np.array([1, 1, 1, 4], np.int64))])
    out, _ = _pushed(m)
    assert _ops(out).count("Transpose") == 0
    _same(m, out, [1, 4, 6, 6])


def test_what_does_not_commute_stays():
    """A MaxPool reads its layout: the transpose before it stays, and so does a Reshape of a
    transpose that reorders elements (a map larger than 1x1), and a mean (another layout
    sums in another order)."""
    m = _model([_t("x", "h", TO_NHWC),
                helper.make_node("ReduceMean", ["h"], ["y"], axes=[1, 2], keepdims=0)],
               [2, 3, 4, 5], [2, 3])
    out, notes = _pushed(m)
    assert _ops(out) == ["Transpose", "ReduceMean"] and not notes
    m = _model([_t("x", "h", TO_NHWC), helper.make_node("Reshape", ["h", "shape"], ["y"])],
               [1, 2, 3, 3], [1, 18], [("shape", np.array([1, 18], np.int64))])
    out, notes = _pushed(m)
    assert _ops(out) == ["Transpose", "Reshape"] and not notes
    _same(m, out, [1, 2, 3, 3])
    m = _model([_t("x", "h", TO_NHWC), helper.make_node("MaxPool", ["h"], ["y"],
                                                        kernel_shape=[2, 2])],
               [1, 3, 4, 4], [1, 4, 3, 2])
    out, notes = _pushed(m)
    assert _ops(out) == ["Transpose", "MaxPool"] and not notes


def test_a_transpose_that_is_a_graph_output_is_kept():
    m = _model([_t("x", "y", TO_NHWC)], [1, 2, 3, 4], [1, 3, 4, 2])
    out, notes = _pushed(m)
    assert _ops(out) == ["Transpose"] and not notes
