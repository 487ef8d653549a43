"""Canonicalization rules, each on small graphs: what it must rewrite and the near misses it
must leave alone (as Larq Compute Engine's converter passes are tested)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from abc_tvm import pattern
from abc_tvm.canonical import canonicalize, rules
from abc_tvm.canonical.fold import fold_constants, needs_folding
from abc_tvm.canonical.graph import Graph


def model(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    vi = helper.make_tensor_value_info
    g = helper.make_graph(nodes, "g", [vi(n, TensorProto.FLOAT, s) for n, s in inputs],
                          [vi(n, TensorProto.FLOAT, s) for n, s in outputs],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def ops(m: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in m.graph.node]


def run(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


PM1 = np.where(np.random.default_rng(0).random((4, 3, 3, 3)) < 0.5, -1, 1).astype(np.float32)


# ------------------------------------------------------------------ straight_through

@pytest.mark.parametrize("order", ["sub_first", "p_first"])
def test_straight_through_residue_is_removed(order):
    add_in = ["d", "p"] if order == "sub_first" else ["p", "d"]
    m = model([helper.make_node("Sign", ["x"], ["s"]), helper.make_node("Tanh", ["x"], ["p"]),
               helper.make_node("Sub", ["s", "p"], ["d"]),
               helper.make_node("Add", add_in, ["y"])], [("x", [2, 3])], [("y", [2, 3])])
    g = Graph(m)
    notes = rules.straight_through(g)
    out = g.to_model()
    assert [n.rule for n in notes] == ["straight_through"]
    assert ops(out) == ["Sign", "Identity"]  # the output keeps its name
    x = np.array([[-2, -0.0, 0.5], [3, -1e-9, 0]], np.float32)
    np.testing.assert_array_equal(run(out, x), np.sign(x))


def test_straight_through_near_miss_other_operand():
    """a - p + q with q ≠ p is no residue."""
    m = model([helper.make_node("Sign", ["x"], ["s"]), helper.make_node("Tanh", ["x"], ["p"]),
               helper.make_node("Relu", ["x"], ["q"]), helper.make_node("Sub", ["s", "p"], ["d"]),
               helper.make_node("Add", ["d", "q"], ["y"])], [("x", [2, 3])], [("y", [2, 3])])
    g = Graph(m)
    assert rules.straight_through(g) == []
    assert sorted(ops(g.to_model())) == ["Add", "Relu", "Sign", "Sub", "Tanh"]


# ------------------------------------------------------------------ fold_constants

@pytest.mark.parametrize("op", ["Add", "Mul"])
def test_expand_as_reads_the_constant(op):
    """`x + b.expand_as(x)` (ReActNet's learnable bias): the op reads b [1, C, 1, 1], not a
    folded constant of x's full size; an Expand to another tensor's shape is left."""
    b = np.arange(1, 5, dtype=np.float32).reshape(1, 4, 1, 1)
    m = model([helper.make_node("Relu", ["x"], ["r"]),
               helper.make_node("Shape", ["r"], ["s"]),
               helper.make_node("Expand", ["b", "s"], ["e"]),
               helper.make_node(op, ["e", "r"], ["y"]),
               helper.make_node("Shape", ["x"], ["s2"]),
               helper.make_node("Expand", ["b", "s2"], ["e2"]),
               helper.make_node("Add", ["r", "e2"], ["z"])],
              [("x", [2, 4, 3, 5])], [("y", [2, 4, 3, 5]), ("z", [2, 4, 3, 5])],
              [("b", b)])
    out, notes = canonicalize(m)
    assert [n.rule for n in notes].count("expand_as_broadcast") == 1
    y_node = next(n for n in out.graph.node if n.output[0] == "y")
    assert list(y_node.input) == ["b", "r"]
    x = np.random.default_rng(0).normal(0, 1, (2, 4, 3, 5)).astype(np.float32)
    r = np.maximum(x, 0)
    import onnxruntime as ort

    sess = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    y, z = sess.run(["y", "z"], {"x": x})
    np.testing.assert_array_equal(y, r + b if op == "Add" else r * b)
    np.testing.assert_array_equal(z, r + b)


def _computed_weight_model() -> onnx.ModelProto:
    """conv(x, mean|W| * sign(W)) with the weight computed at run time, as Bi-Real writes it."""
    w = np.random.default_rng(1).standard_normal((4, 3, 3, 3)).astype(np.float32)
    return model([helper.make_node("Abs", ["w"], ["a"]),
                  helper.make_node("ReduceMean", ["a"], ["m"], axes=[1, 2, 3], keepdims=1),
                  helper.make_node("Sign", ["w"], ["sw"]), helper.make_node("Mul", ["m", "sw"],
                                                                           ["bw"]),
                  helper.make_node("Sign", ["x"], ["s"]),
                  helper.make_node("Conv", ["s", "bw"], ["y"], pads=[1, 1, 1, 1])],
                 [("x", [1, 3, 5, 5])], [("y", [1, 4, 5, 5])], [("w", w)])


def test_fold_computes_the_weight_and_the_matcher_then_finds_the_block():
    m = _computed_weight_model()
    assert needs_folding(m)
    assert pattern.find_abc_blocks(pattern.from_onnx(m))[0] == []
    folded = fold_constants(m)
    assert ops(folded) == ["Sign", "Conv"]
    (blk,), _ = pattern.find_abc_blocks(pattern.from_onnx(folded))
    assert (blk.M, blk.N, blk.alpha_kind, blk.act_form) == (1, 1, "channel", "sign")
    x = np.random.default_rng(2).standard_normal((1, 3, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(run(folded, x), run(m, x))


def test_fold_makes_computed_pads_constant():
    """F.pad's amounts as shape arithmetic (what TVM's importer refuses) become constants."""
    m = model([helper.make_node("Shape", ["x"], ["sh"]),
               helper.make_node("Gather", ["sh", "one"], ["c"], axis=0),
               helper.make_node("Div", ["c", "four"], ["q"]),
               helper.make_node("Concat", ["z", "q", "z", "z", "z", "q", "z", "z"], ["pads"],
                                axis=0),
               helper.make_node("Pad", ["x", "pads"], ["y"])],
              [("x", [1, 8, 2, 2])], [("y", [1, 12, 2, 2])],
              [("one", np.array(1, np.int64)), ("four", np.array([4], np.int64)),
               ("z", np.array([0], np.int64))])
    m.graph.node[1].input[1] = "one"
    folded = canonicalize(m)[0]
    assert ops(folded) == ["Pad"]
    assert {i.name for i in folded.graph.initializer} >= {folded.graph.node[0].input[1]}


def test_fold_is_skipped_when_nothing_computes_from_constants():
    m = model([helper.make_node("Sign", ["x"], ["s"]),
               helper.make_node("Conv", ["s", "w"], ["y"])], [("x", [1, 3, 3, 3])],
              [("y", [1, 4, 1, 1])], [("w", PM1)])
    assert not needs_folding(m)
    out, notes = canonicalize(m)
    assert notes == [] and out is m


# ------------------------------------------------------------------ snap_weights

def test_snap_weights_within_ulps_and_report():
    alpha = np.float32(0.0371)
    w = PM1 * alpha
    noisy = w.copy()
    noisy.flat[::5] = np.nextafter(noisy.flat[::5], np.float32(np.inf) * noisy.flat[::5])
    m = model([helper.make_node("Sign", ["x"], ["s"]), helper.make_node("Conv", ["s", "w"], ["y"])],
              [("x", [1, 3, 3, 3])], [("y", [1, 4, 1, 1])], [("w", noisy)])
    g = Graph(m)
    (note,) = rules.snap_weights(g)
    assert note.rule == "snap_weights" and "1 ulp" in note.detail
    out = g.to_model()
    np.testing.assert_array_equal(numpy_helper.to_array(out.graph.initializer[0]), w)


def test_snap_weights_leaves_float_weights_alone():
    w = np.random.default_rng(3).standard_normal((4, 3, 3, 3)).astype(np.float32)
    m = model([helper.make_node("Conv", ["x", "w"], ["y"])], [("x", [1, 3, 3, 3])],
              [("y", [1, 4, 1, 1])], [("w", w)])
    assert rules.snap_weights(Graph(m)) == []


# ------------------------------------------------------------------ split_conv_bias

def test_binary_conv_bias_becomes_glue():
    b = np.array([0.5, -1, 2, 0.25], np.float32)
    m = model([helper.make_node("Sign", ["x"], ["s"]),
               helper.make_node("Conv", ["s", "w", "b"], ["y"])],
              [("x", [1, 3, 4, 4])], [("y", [1, 4, 2, 2])], [("w", PM1 * 0.5), ("b", b)])
    g = Graph(m)
    assert [n.rule for n in rules.split_conv_bias(g)] == ["split_conv_bias"]
    out = g.to_model()
    assert ops(out) == ["Sign", "Conv", "Add"]
    x = np.random.default_rng(4).standard_normal((1, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(run(out, x), run(m, x), rtol=1e-6)
    (blk,), _ = pattern.find_abc_blocks(pattern.from_onnx(out))
    assert blk.M == 1


def test_float_conv_bias_is_split_too_and_computed_bias_kept():
    """Every constant bias is split (as TVM's importer does); a computed one stays."""
    w = np.random.default_rng(3).standard_normal((4, 3, 3, 3)).astype(np.float32)
    m = model([helper.make_node("Conv", ["x", "w", "b"], ["y"])], [("x", [1, 3, 3, 3])],
              [("y", [1, 4, 1, 1])], [("w", w), ("b", np.ones(4, np.float32))])
    (note,) = rules.split_conv_bias(Graph(m))
    assert "float conv" in note.detail
    m2 = model([helper.make_node("Relu", ["c"], ["b"]),
                helper.make_node("Conv", ["x", "w", "b"], ["y"])],
               [("x", [1, 3, 3, 3]), ("c", [4])], [("y", [1, 4, 1, 1])], [("w", w)])
    assert rules.split_conv_bias(Graph(m2)) == []


# ------------------------------------------------------------------ binary_fc_as_conv

@pytest.mark.parametrize("form", ["gemm_transB", "matmul"])
def test_binary_fc_becomes_1x1_conv(form):
    rng = np.random.default_rng(5)
    wo = np.where(rng.random((6, 10)) < 0.5, -0.25, 0.25).astype(np.float32)  # [O, C]
    if form == "gemm_transB":
        fc = helper.make_node("Gemm", ["s", "w", "b"], ["y"], transB=1)
        inits = [("w", wo), ("b", rng.standard_normal(6).astype(np.float32))]
    else:
        fc = helper.make_node("MatMul", ["s", "w"], ["y"])
        inits = [("w", np.ascontiguousarray(wo.T))]
    m = model([helper.make_node("Sign", ["x"], ["s"]), fc], [("x", [3, 10])], [("y", [3, 6])],
              inits)
    g = Graph(m)
    assert [n.rule for n in rules.binary_fc_as_conv(g)] == ["binary_fc_as_conv"]
    out = g.to_model()
    assert "Conv" in ops(out) and "Gemm" not in ops(out) and "MatMul" not in ops(out)
    x = rng.standard_normal((3, 10)).astype(np.float32)
    np.testing.assert_allclose(run(out, x), run(m, x), rtol=1e-6, atol=1e-6)
    (blk,), _ = pattern.find_abc_blocks(pattern.from_onnx(out))
    assert blk.act_form == "sign" and blk.bases.shape[1:] == (6, 10, 1, 1)


def test_float_fc_is_left_alone():
    w = np.random.default_rng(6).standard_normal((10, 6)).astype(np.float32)
    m = model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", [3, 10])], [("y", [3, 6])],
              [("w", w)])
    assert rules.binary_fc_as_conv(Graph(m)) == []


# ------------------------------------------------------------- pool_before_binarizer

def test_maxpool_after_sign_moves_before_it_and_the_conv_becomes_binary():
    m = model([helper.make_node("Sign", ["x"], ["s"]),
               helper.make_node("MaxPool", ["s"], ["p"], kernel_shape=[2, 2], strides=[2, 2],
                                pads=[1, 1, 0, 0]),
               helper.make_node("Conv", ["p", "w"], ["y"])],
              [("x", [1, 3, 7, 7])], [("y", [1, 4, 2, 2])], [("w", PM1)])
    assert pattern.find_abc_blocks(pattern.from_onnx(m))[0] == []
    g = Graph(m)
    assert [n.rule for n in rules.pool_before_binarizer(g)] == ["pool_before_binarizer"]
    out = g.to_model()
    assert ops(out) == ["MaxPool", "Sign", "Conv"]
    x = np.random.default_rng(7).standard_normal((1, 3, 7, 7)).astype(np.float32)
    np.testing.assert_array_equal(run(out, x), run(m, x))
    (blk,), _ = pattern.find_abc_blocks(pattern.from_onnx(out))
    assert blk.act_form == "sign"


def test_maxpool_of_a_sign_read_elsewhere_is_left():
    m = model([helper.make_node("Sign", ["x"], ["s"]),
               helper.make_node("MaxPool", ["s"], ["p"], kernel_shape=[2, 2]),
               helper.make_node("Relu", ["s"], ["r"])],
              [("x", [1, 3, 4, 4])], [("p", [1, 3, 3, 3]), ("r", [1, 3, 4, 4])])
    assert rules.pool_before_binarizer(Graph(m)) == []


def _bn(c: int, scale: np.ndarray) -> list:
    rng = np.random.default_rng(3)
    return [("bn.s", scale.astype(np.float32)),
            ("bn.b", rng.normal(0, 1, c).astype(np.float32)),
            ("bn.m", rng.normal(0, 1, c).astype(np.float32)),
            ("bn.v", rng.uniform(0.5, 2, c).astype(np.float32))]


def _pooled_chain(scale: np.ndarray, shift: np.ndarray) -> onnx.ModelProto:
    """BatchNorm -> QONNX's bipolar step Where(x >= 0, 1, -1) -> Mul(2) -> MaxPool -> Add."""
    return model([helper.make_node("BatchNormalization", ["x", "bn.s", "bn.b", "bn.m", "bn.v"],
                                   ["n"]),
                  helper.make_node("GreaterOrEqual", ["n", "zero"], ["ge"]),
                  helper.make_node("Where", ["ge", "one", "mone"], ["w"]),
                  helper.make_node("Mul", ["w", "two"], ["s"]),
                  helper.make_node("MaxPool", ["s"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
                  helper.make_node("Add", ["p", "shift"], ["y"])],
                 [("x", [1, 3, 6, 6])], [("y", [1, 3, 3, 3])],
                 _bn(3, scale) + [("zero", np.float32(0)), ("one", np.float32(1)),
                                  ("mone", np.float32(-1)), ("two", np.float32(2)),
                                  ("shift", shift)])


def test_maxpool_moves_above_a_bipolar_step_and_a_positive_batchnorm():
    m = _pooled_chain(np.array([0.5, 1.0, 2.0]), np.float32(0.25))
    g = Graph(m)
    (note,) = rules.pool_before_binarizer(g)
    assert "BatchNormalization" in note.detail
    out = g.to_model()
    assert ops(out) == ["MaxPool", "BatchNormalization", "GreaterOrEqual", "Where", "Mul", "Add"]
    x = np.random.default_rng(8).standard_normal((1, 3, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(run(out, x), run(m, x))


def test_maxpool_stops_below_a_batchnorm_with_a_negative_scale():
    """max of a decreasing function is the function of the min: the BN stays above."""
    m = _pooled_chain(np.array([0.5, -1.0, 2.0]), np.float32(0.25))
    g = Graph(m)
    rules.pool_before_binarizer(g)
    out = g.to_model()
    assert ops(out) == ["BatchNormalization", "MaxPool", "GreaterOrEqual", "Where", "Mul", "Add"]
    x = np.random.default_rng(9).standard_normal((1, 3, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(run(out, x), run(m, x))


def test_maxpool_stays_below_a_constant_that_varies_along_width():
    """A [W]-shaped constant differs between the pooled pixels: no commuting."""
    m = model([helper.make_node("Add", ["x", "c"], ["a"]),
               helper.make_node("Sign", ["a"], ["s"]),
               helper.make_node("MaxPool", ["a"], ["p"], kernel_shape=[2, 2])],
              [("x", [1, 3, 4, 4])], [("p", [1, 3, 3, 3]), ("s", [1, 3, 4, 4])],
              [("c", np.arange(4, dtype=np.float32))])
    assert rules.pool_before_binarizer(Graph(m)) == []
    m2 = model([helper.make_node("Add", ["x", "c"], ["a"]),
                helper.make_node("MaxPool", ["a"], ["p"], kernel_shape=[2, 2])],
               [("x", [1, 3, 4, 4])], [("p", [1, 3, 3, 3])],
               [("c", np.arange(4, dtype=np.float32))])
    assert rules.pool_before_binarizer(Graph(m2)) == []


def test_maxpool_after_a_relu_alone_stays():
    """Without a binarizer in the chain nothing is gained: conv + ReLU stays one fused kernel."""
    m = model([helper.make_node("Relu", ["x"], ["r"]),
               helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2])],
              [("x", [1, 3, 4, 4])], [("p", [1, 3, 3, 3])])
    assert rules.pool_before_binarizer(Graph(m)) == []


# ------------------------------------------------------------------ min_max_as_clip

def test_clip_by_value_becomes_clip():
    """tf.clip_by_value through tf2onnx (DoReFa's quantizer): Max(Min(x, 1), 0) with [1,1,1,1]
    constants is Clip(x, 0, 1), bit for bit; Min of two tensors stays."""
    one, zero = np.ones((1, 1, 1, 1), np.float32), np.zeros((1, 1, 1, 1), np.float32)
    m = model([helper.make_node("Min", ["x", "one"], ["a"]),
               helper.make_node("Max", ["a", "zero"], ["b"]),
               helper.make_node("Min", ["b", "x"], ["y"])],
              [("x", [2, 3, 4, 4])], [("y", [2, 3, 4, 4])], [("one", one), ("zero", zero)])
    g = Graph(m)
    notes = rules.min_max_as_clip(g)
    out = g.to_model()
    assert [n.rule for n in notes] == ["min_max_as_clip"] * 2
    assert ops(out) == ["Clip", "Clip", "Min"]
    x = np.random.default_rng(0).normal(0.5, 1, (2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(run(out, x), run(m, x))
