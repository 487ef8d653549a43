"""The ABC pattern matcher against hand-built ONNX graphs of every contract variant.

Each builder of tests/onnx_builders.py knows the true bases, α, v, β and geometry of its
graph; the matcher must find exactly one block with those numbers, and must leave every near
miss in float with a reason. Every graph is also checked to be valid ONNX that ONNX Runtime
runs, with the output the builder's numbers predict.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_builders as ob
import pytest

from abc_tvm import pattern

# Shapes and ABC options, rotated over the variants: every (M, N) below appears, and both
# α kinds, both strides, pads 0 and 1 and kernels 1 and 3 appear several times each.
CONFIGS = [
    dict(M=1, N=1, channelwise=False, stride=1, pads=1, kernel=3),
    dict(M=2, N=3, channelwise=True, stride=2, pads=0, kernel=3),
    dict(M=3, N=2, channelwise=False, stride=2, pads=1, kernel=1, height=7, width=9),
    dict(M=5, N=5, channelwise=True, stride=1, pads=(1, 0, 0, 1), kernel=3, in_channels=5),
    dict(M=8, N=4, channelwise=False, stride=(1, 2), pads=0, kernel=(1, 3), out_channels=3),
]


def _config(variant: str, cfg: dict, seed: int) -> dict:
    cfg = {**cfg, "seed": seed}
    if variant == "single_base":
        cfg["M"] = 1
    if variant == "single_plane":
        cfg["N"] = 1
    if variant == "folded_weight":  # ≤ 8 levels for a decomposable folded weight
        cfg["M"] = min(cfg["M"], 3)
    if variant not in ("sign_bipolar", "unipolar") and seed % 2:
        cfg["act"] = "unipolar"
    if variant in ("sign_bipolar", "beta_before", "folded_weight") and seed % 3 == 2:
        cfg["clip"] = False  # Clip is optional in every form
    return cfg


CASES = [
    pytest.param(name, _config(name, cfg, seed=10 * i + j), id=f"{name}-{j}")
    for i, name in enumerate(ob.VARIANTS)
    for j, cfg in enumerate(CONFIGS)
]


def _only_block(model: onnx.ModelProto) -> pattern.ABCBlock:
    blocks, misses = pattern.find_abc_blocks(pattern.from_onnx(model))
    assert misses == [], [m.reason for m in misses]
    assert len(blocks) == 1
    return blocks[0]


def _reconstruct(bases: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return ob.fold(bases, alpha)


@pytest.mark.parametrize("variant,cfg", CASES)
def test_variant_found_with_its_numbers(variant, cfg):
    model, e = ob.VARIANTS[variant](**cfg)
    b = _only_block(model)
    assert (b.input, b.output) == (ob.INPUT, ob.OUTPUT)
    assert b.N == e.N
    assert b.act == e.act
    assert b.act_form == e.act_form
    assert b.clip == e.clip
    assert b.beta_position == e.beta_position
    assert b.weight_form == e.weight_form
    assert b.strides == e.stride
    assert b.pads == e.pads
    np.testing.assert_array_equal(b.shift, e.shift)
    np.testing.assert_array_equal(b.beta, e.beta)
    assert b.shift.dtype == b.beta.dtype == np.float32
    assert set(np.unique(b.bases)) <= {-1.0, 1.0}
    assert b.bases.shape[1:] == e.weight.shape and b.alpha.shape == (b.M, e.weight.shape[0])
    # Σ α_m B_m is the graph's weight bit for bit, whatever the form
    recon = _reconstruct(b.bases, b.alpha)
    assert np.array_equal(recon.view(np.uint32), e.weight.view(np.uint32))
    if e.weights == "folded" or (e.weights == "scaled" and e.channelwise):
        return  # a decomposition of a folded weight need not be the builder's (see below)
    assert b.M == e.M
    assert b.alpha_kind == e.alpha_kind
    np.testing.assert_array_equal(b.bases, e.bases)
    np.testing.assert_array_equal(b.alpha, e.alpha)


@pytest.mark.parametrize("options", [
    dict(M=1, channelwise=False),
    dict(M=1, channelwise=True),
    dict(M=2, channelwise=False, weights="folded"),
])
def test_folded_weight_decomposes_into_as_few_bases(options):
    """A folded weight made of M bases should come back as M bases (not more binary work):
    the builder's, up to their order (a folded weight does not record which came first)."""
    options = dict(options)
    weights = options.pop("weights", "scaled")
    model, e = ob.abc_conv(weights=weights, seed=3, **options)
    b = _only_block(model)
    assert b.M == e.M
    assert b.alpha_kind == e.alpha_kind
    got = sorted(zip(b.alpha.tolist(), b.bases.tolist(), strict=True), reverse=True)
    want = sorted(zip(e.alpha.tolist(), e.bases.tolist(), strict=True), reverse=True)
    assert got == want


def test_stacked_negative_alpha_keeps_the_graph_bases():
    alpha = np.array([[0.75] * 4, [-0.25] * 4], np.float32)
    model, e = ob.canonical(M=2, N=2, alpha=alpha, seed=5)
    b = _only_block(model)
    assert np.array_equal(ob.fold(b.bases, b.alpha), e.weight)  # holds
    np.testing.assert_array_equal(b.bases, e.bases)
    np.testing.assert_array_equal(b.alpha, e.alpha)


@pytest.mark.parametrize("name", list(ob.NEAR_MISSES))
@pytest.mark.parametrize("cfg", [dict(M=2, N=3, seed=1),
                                 dict(M=3, N=1, channelwise=True, stride=2, pads=0, seed=2)],
                         ids=["m2n3", "m3n1"])
def test_near_miss_stays_float(name, cfg):
    model, e = ob.NEAR_MISSES[name](**cfg)
    blocks, misses = pattern.find_abc_blocks(pattern.from_onnx(model))
    assert blocks == []
    assert len(misses) == e.n_convs  # every conv of the would-be block, none twice
    assert len({m.name for m in misses}) == e.n_convs
    for m in misses:
        assert m.op == "Conv"
        assert e.miss in m.reason, m.reason
        assert not m.error
    with pytest.raises(ValueError, match="no ABC convolution found"):
        pattern.check_canonical(model)


def test_non_pm1_bases_are_an_error_miss():
    """Mul(α, B) with B not ±1 is a malformed ABC export, reported as an error."""
    bases = np.ones((2, 4, 3, 3, 3), np.float32)
    bases[0, 0, 0, 0, 0] = 0.5
    model, _ = ob.abc_conv(M=2, N=2, bases=bases, seed=4)
    blocks, misses = pattern.find_abc_blocks(pattern.from_onnx(model))
    assert blocks == [] and len(misses) == 2
    assert all(m.error and "±1" in m.reason for m in misses)


@pytest.mark.parametrize("variant", [v for v in ob.VARIANTS if v != "canonical"])
def test_check_canonical_rejects_other_forms(variant):
    model, _ = ob.VARIANTS[variant](seed=6)
    if variant in ("unipolar", "single_plane"):  # these are canonical forms too
        assert len(pattern.check_canonical(model)) == 1
        return
    with pytest.raises(ValueError, match="not canonical"):
        pattern.check_canonical(model)


def test_two_blocks_in_one_graph_and_float_convs_between():
    """Two ABC blocks in sequence with a float conv between: two blocks, one miss."""
    m1, e1 = ob.canonical(M=2, N=2, in_channels=3, out_channels=4, seed=7)
    m2, e2 = ob.sign_bipolar(M=3, N=2, in_channels=4, out_channels=4, seed=8, pads=1)
    g = onnx.helper
    # rename the second graph's values and chain: input -> block1 -> float conv -> block2
    rename = {ob.INPUT: "mid", ob.OUTPUT: ob.OUTPUT}
    nodes2 = []
    for n in m2.graph.node:
        n2 = onnx.NodeProto()
        n2.CopyFrom(n)
        n2.name = "b2." + n.name
        for k, i in enumerate(n2.input):
            n2.input[k] = rename.get(i, "b2." + i if i else i)
        for k, o in enumerate(n2.output):
            n2.output[k] = rename.get(o, "b2." + o)
        nodes2.append(n2)
    inits2 = []
    for t in m2.graph.initializer:
        t2 = onnx.TensorProto()
        t2.CopyFrom(t)
        t2.name = "b2." + t.name
        inits2.append(t2)
    nodes1 = list(m1.graph.node)
    nodes1[-1].output[0] = "y1"
    float_w = onnx.numpy_helper.from_array(
        np.random.default_rng(0).normal(size=(4, 4, 3, 3)).astype(np.float32), "float.w")
    float_conv = g.make_node("Conv", ["y1", "float.w"], ["mid"], name="float.conv",
                             pads=[1, 1, 1, 1])
    graph = g.make_graph(nodes1 + [float_conv] + nodes2, "two", list(m1.graph.input),
                         list(m2.graph.output),
                         list(m1.graph.initializer) + [float_w] + inits2)
    model = g.make_model(graph, opset_imports=[g.make_opsetid("", ob.OPSET)],
                         ir_version=ob.IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    blocks, misses = pattern.find_abc_blocks(pattern.from_onnx(model))
    assert [m.name for m in misses] == ["float.conv"]
    assert "not a binarised activation" in misses[0].reason
    assert [(b.M, b.N, b.act_form, b.input, b.output) for b in blocks] == [
        (2, 2, "canonical", ob.INPUT, "y1"), (3, 2, "sign", "mid", ob.OUTPUT)]
    np.testing.assert_array_equal(blocks[0].bases, e1.bases)
    np.testing.assert_array_equal(blocks[1].bases, e2.bases)
    np.testing.assert_array_equal(blocks[1].shift, e2.shift)


# -- the builders themselves ------------------------------------------------------------------

BUILDER_CASES = [pytest.param(name, _config(name, cfg, seed=j), id=f"{name}-{j}")
                 for name in ob.VARIANTS for j, cfg in enumerate(CONFIGS[:3])] + [
    pytest.param(name, dict(M=2, N=3, seed=j, channelwise=bool(j)), id=f"{name}-{j}")
    for name in ob.NEAR_MISSES for j in range(2)]


@pytest.mark.parametrize("name,cfg", BUILDER_CASES)
def test_builder_graph_is_valid_and_runs(name, cfg, ort_run, max_rel_err):
    """onnx.checker (full check), ONNX Runtime runs it, and agrees with the builder's numbers."""
    model, e = {**ob.VARIANTS, **ob.NEAR_MISSES}[name](**cfg)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == ob.OPSET
    assert [i.name for i in model.graph.input] == [ob.INPUT]
    assert [o.name for o in model.graph.output] == [ob.OUTPUT]
    x = ob.random_input(e.input_shape, seed=cfg["seed"] + 100)
    y = ort_run(model, x)
    assert y.shape == e.output_shape and y.dtype == np.float32
    assert max_rel_err(y, ob.reference_output(e, x)) <= 1e-5
    if e.binarised and e.threshold == 0.5 and e.clip_range == (0.0, 1.0):
        for a in ob.planes(e, x):  # v_n chosen so every plane has both bit values
            assert len(np.unique(a)) == 2
    if e.bases is not None:
        assert e.bases.dtype == np.float32 and set(np.unique(e.bases)) <= {-1.0, 1.0}
        assert e.alpha.shape == (e.M, e.weight.shape[0])
        np.testing.assert_array_equal(ob.fold(e.bases, e.alpha), e.weight)


def test_builders_are_deterministic_and_seeded():
    a, ea = ob.canonical(seed=11)
    b, eb = ob.canonical(seed=11)
    c, ec = ob.canonical(seed=12)
    assert a.SerializeToString() == b.SerializeToString()
    np.testing.assert_array_equal(ea.bases, eb.bases)
    assert not np.array_equal(ea.bases, ec.bases)


def test_builder_rejects_contradicting_options():
    with pytest.raises(TypeError, match="fixes"):
        ob.unipolar(act="bipolar")
    with pytest.raises(ValueError):
        ob.abc_conv(act_form="sign", act="unipolar")
    with pytest.raises(ValueError):
        ob.abc_conv(weights="scaled", M=2)


def test_other_threshold_is_binary_at_its_exact_threshold():
    """GreaterOrEqual(Clip(X + v), 0.4): a binary block whose planes switch at the least
    float32 x with fl(clip(x + v)) >= 0.4, which NumPy confirms on the ulps around it."""
    model, e = ob.other_threshold(M=2, N=3, seed=1)
    b = _only_block(model)
    assert (b.act_form, b.N, b.shift) == ("compare", 3, None)
    for v, t in zip(e.shift, b.thresholds, strict=True):
        def on(x, v=v):
            return np.clip(np.float32(x) + np.float32(v), np.float32(0), np.float32(1)) \
                >= np.float32(0.4)
        assert on(t) and not on(np.nextafter(t, np.float32(-np.inf)))


def test_sign_of_per_channel_bias_gives_per_channel_thresholds():
    """ReActNet's RSign, Sign(x + b[c]): one exact threshold per input channel, the least
    float32 x with fl(x + b[c]) >= 0."""
    from onnx import TensorProto, helper, numpy_helper

    b = np.array([0.3, -0.7, 1e-8], np.float32).reshape(1, 3, 1, 1)
    w = np.ones((2, 3, 1, 1), np.float32)
    g = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["h"]), helper.make_node("Sign", ["h"], ["s"]),
         helper.make_node("Conv", ["s", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2])],
        [numpy_helper.from_array(b, "b"), numpy_helper.from_array(w, "w")])
    (blk,), _ = pattern.find_abc_blocks(pattern.from_onnx(helper.make_model(g)))
    assert blk.input == "x" and blk.thresholds.shape == (1, 3)
    for c, t in enumerate(blk.thresholds[0]):
        assert np.float32(t + b.flat[c]) >= 0
        assert np.float32(np.nextafter(t, np.float32(-np.inf)) + b.flat[c]) < 0
    assert blk.summary()["thresholds"] == "per channel"


def _sign_bn_conv(gamma: np.ndarray, unipolar: bool = False):
    from onnx import TensorProto, helper, numpy_helper

    c = gamma.size
    rng = np.random.default_rng(2)
    stats = {"g": gamma, "b": rng.normal(0, 0.3, c), "m": rng.normal(0, 0.3, c),
             "v": rng.uniform(0.5, 1.5, c)}
    w = np.where(rng.random((4, c, 3, 3)) < 0.5, -1, 1).astype(np.float32)
    act = ([helper.make_node("GreaterOrEqual", ["h", "zero"], ["p"]),
            helper.make_node("Cast", ["p"], ["s"], to=TensorProto.FLOAT)] if unipolar
           else [helper.make_node("Sign", ["h"], ["s"])])
    g = helper.make_graph(
        [helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["h"]), *act,
         helper.make_node("Conv", ["s", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in stats.items()]
        + [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.float32(0), "zero")])
    return helper.make_model(g), stats, w


def test_sign_of_batch_norm_is_per_channel_thresholds_and_flips_negative_scales():
    """XNOR-Net's Sign(BatchNorm(x)): the BatchNorm is absorbed into per-channel thresholds;
    a channel with a negative scale has its bit complemented, which the bipolar block
    absorbs by negating the weight on that input channel."""
    gamma = np.array([0.8, -1.2, 0.5, -0.3, 1.1], np.float32)
    model, st, w = _sign_bn_conv(gamma)
    (blk,), _ = pattern.find_abc_blocks(pattern.from_onnx(model))
    assert blk.input == "x" and blk.thresholds.shape == (1, 5)
    flip = gamma < 0
    np.testing.assert_array_equal(blk.bases[0], np.where(flip[None, :, None, None], -w, w))
    scale, shift = pattern.bn_affine(st["g"], st["b"], st["m"], st["v"], 1e-5)
    xs = np.random.default_rng(3).normal(0, 2, (1000, 5)).astype(np.float32)
    xs[0] = blk.thresholds[0]  # the edges themselves
    truth = np.where(xs * scale + shift >= 0, 1, -1)  # sign, sign(0) = +1
    kernel = np.where(xs >= blk.thresholds[0], 1, -1) * np.where(flip, -1, 1)
    np.testing.assert_array_equal(kernel, truth)


def test_negative_batch_norm_scale_before_a_unipolar_bit_stays_float():
    model, _, _ = _sign_bn_conv(np.array([0.8, -1.2], np.float32), unipolar=True)
    blocks, misses = pattern.find_abc_blocks(pattern.from_onnx(model))
    assert blocks == [] and "negative scale" in misses[0].reason
