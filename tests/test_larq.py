"""Larq-style networks in tf2onnx's form (tests/larq_nets.py) compile with every binary conv
and dense layer as a binary kernel and match ONNX Runtime.

The nets have non-trivial BatchNorm statistics and folded BatchNorms (±α weights, biases);
outputs are compared relative to their scale (TOL, float32 rounding of float layers and the
α sums); a binary dense output (a sum of ±1) is compared exactly.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tvm
from larq_nets import TO_NCHW, TO_NHWC, LarqNet
from tvm import relax

from abc_tvm import compiler, pattern, targets
from abc_tvm.blocks import front, match
from abc_tvm.compiler import compile_model
from abc_tvm.relay_passes.abc_rewrite import rewrite
from abc_tvm.runtime import load

TOL = 1e-4


def _compile(net: LarqNet, model: onnx.ModelProto, tmp_path, ort_run) -> tuple[list, np.ndarray,
                                                                              np.ndarray]:
    so = tmp_path / "m.so"
    report = compile_model(model, "x86", so, quiet=True, require_binary=True)
    assert len(report.abc_layers) == net.binary, [
        (f["name"], f["reason"]) for f in report.float_ops if f["op"] in ("Conv", "MatMul")]
    x = net.input()
    return report.abc_layers, load(so, workers=1)(x), ort_run(model, x)


def test_birealnet_style_net_is_binary_and_matches_ort(tmp_path, ort_run, max_rel_err):
    """Stem, two Bi-Real blocks, MaxPool, a strided binary conv, QuantDense: the transposes
    around every ste_sign cancel, and no transpose is left between two binary kernels."""
    net = LarqNet(batch=2, size=16, channels=3, seed=1)
    y = net.conv(net.x, 32)
    y = net.birealnet_block(net.birealnet_block(y))
    y = net.maxpool(y)
    y = net.quant_conv(y, 64, stride=2)
    out = net.quant_dense(y, 10)
    model = net.model(out)
    canonical, notes, blocks, _ = match(model)
    assert "Transpose" not in [n.op_type for n in canonical.graph.node[1:]]
    assert sum(n.rule == "push_transposes" for n in notes) == 3  # one pair per quant_conv
    layers, got, ref = _compile(net, model, tmp_path, ort_run)
    assert [a["act_form"] for a in layers] == ["sign"] * 4
    assert [a["alpha"] for a in layers] == ["channel"] * 3 + ["layer"]
    np.testing.assert_array_equal(got, ref)  # a binary dense: integer sums, exactly


def test_zoo_families_dense_melius_quicknet_are_binary_and_match_ort(tmp_path, ort_run,
                                                                   max_rel_err):
    """The Larq Zoo's other block kinds in one net: QuickNet's stem (float conv, depthwise,
    1x1) and transition (ReLU, MaxPool, depthwise, 1x1), BinaryDenseNet's concatenating
    blocks, MeliusNet's improvement block (a binary conv added into a channel slice) and a
    QuickNet block with its +1 border: every binary conv and the dense layer binary, the
    float depthwise convs on the float path."""
    net = LarqNet(batch=1, size=32, channels=3, seed=8)
    y = net.quicknet_stem(net.x, 32)
    y = net.densenet_block(net.densenet_block(y, 16), 16)
    y = net.melius_improvement(y, 16)
    y = net.quicknet_transition(y, 64)
    y = net.quicknet_block(y)
    model = net.model(net.quant_dense(y, 10))
    layers, got, ref = _compile(net, model, tmp_path, ort_run)
    assert len(layers) == 5
    assert max_rel_err(got, ref) <= TOL


def test_quicknet_pad_one_is_a_plus_one_border(tmp_path, ort_run, max_rel_err):
    """QuickNet pads the ±1 plane with +1 (Pad(value=1.0) after the sign, a conv without
    padding): the block keeps the border as +1 in its padding correction."""
    net = LarqNet(batch=1, size=12, channels=3, seed=2)
    y = net.conv(net.x, 32, stride=2)
    y = net.quicknet_block(net.quicknet_block(y))
    model = net.model(y)
    layers, got, ref = _compile(net, model, tmp_path, ort_run)
    assert [(a["pad_value"], a["pads"]) for a in layers] == [(1.0, [1, 1, 1, 1])] * 2
    assert max_rel_err(got, ref) <= TOL


def test_pad_one_on_the_unfused_path_runs_as_float_and_matches(ort_run, max_rel_err):
    """Where the kernels have no fused glue (32-bit ARM, CUDA) a +1 border stays float, with
    the reason, and computes the same."""
    net = LarqNet(batch=1, size=8, channels=3, seed=3)
    model = net.model(net.quicknet_block(net.conv(net.x, 16)))
    fr = front(model)
    spec = targets.resolve("x86")
    mod, done, misses = rewrite(fr.mod, spec.target, spec.word_bits, fuse_glue=False,
                                blocks=fr.blocks)
    assert not done and [m.reason for m in misses] == [
        "a ±1 border (Pad(value=±1)) runs on the fused x86/aarch64 kernels only"]
    with tvm.transform.PassContext(opt_level=3):
        ex = tvm.compile(mod, target=spec.target, relax_pipeline=compiler.pipeline(spec))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    x = net.input()
    got = vm["main"](tvm.runtime.tensor(x, tvm.cpu())).numpy()
    assert max_rel_err(got, ort_run(model, x)) <= TOL


def test_fc_like_convs_between_reshapes_are_binary(tmp_path, ort_run, max_rel_err):
    """AlexNet's NHWC flatten before its first FC-like conv, XNOR-Net's Reshape pair around
    the sign on a 1x1 map, then QuantDense: three binary layers."""
    net = LarqNet(batch=1, size=4, channels=3, seed=4)
    y = net.maxpool(net.conv(net.x, 16))
    y = net.bn(net.flatten_fc_conv(y, 64))
    y = net.bn(net.fc_conv(y, 64))
    out = net.quant_dense(y, 10)
    layers, got, ref = _compile(net, net.model(out), tmp_path, ort_run)
    assert [a["in_channels"] for a in layers] == [64, 64, 64]
    np.testing.assert_array_equal(got, ref)


def test_dorefa_two_bit_activation_is_bounded_by_its_clip(tmp_path, ort_run, max_rel_err):
    """DoReFaNet's Min -> Max -> Mul -> Round -> Mul: Min/Max are read as the clip that
    bounds the quantizer, so each 2-bit layer is 3 thermometer planes (it was 'levels
    -inf..inf', and TVM's layout conversion crashed on the Min/Max stack)."""
    net = LarqNet(batch=1, size=8, channels=3, seed=5)
    y = net.dorefa_conv(net.dorefa_conv(net.conv(net.x, 16), 32), 32)
    model = net.model(net.maxpool(y))
    layers, got, ref = _compile(net, model, tmp_path, ort_run)
    assert [(a["N"], a["act"], a["act_form"]) for a in layers] == [(3, "unipolar", "uniform")] * 2
    assert max_rel_err(got, ref) <= TOL


def test_gated_block_keeps_its_computed_scale_in_nchw(tmp_path, ort_run, max_rel_err):
    """RealToBinaryNet's gate: the binary conv's NHWC output times a computed [B, 1, 1, C]
    scale. The scale is reshaped to NCHW, so the transposes cancel around the gate too."""
    net = LarqNet(batch=1, size=8, channels=3, seed=6)
    x = net.conv(net.x, 32)
    b, c = net.shapes[x][:2]
    gate = net.node("Sigmoid", [net.node("GlobalAveragePool", [x], (b, c, 1, 1))])
    gate = net.node("Reshape", [gate, net.const(np.array([b, 1, 1, c], np.int64), "shape")],
                    (b, 1, 1, c))
    y = net.node("Mul", [net._t(net.quant_conv(x, 32), TO_NHWC), gate])
    y = net.add(net._t(y, TO_NCHW), x)
    y = net.birealnet_block(y)
    model = net.model(y)
    canonical, _, _, _ = match(model)
    assert [n.op_type for n in canonical.graph.node].count("Transpose") == 2  # in and out
    _, got, ref = _compile(net, model, tmp_path, ort_run)
    assert max_rel_err(got, ref) <= TOL


# -- borders the kernels do not keep: float, with the reason ---------------------------------

def _pad_before_conv(value: float, act: str, conv_pads: int) -> onnx.ModelProto:
    """Sign or a unipolar compare, Pad(value) in NCHW, a binary conv."""
    net = LarqNet(batch=1, size=6, channels=4, seed=7)
    if act == "bipolar":
        a = net.ste_sign(net.x)
    else:
        bit = net.node("GreaterOrEqual", [net.x, net.const(np.float32(0.0))])
        a = net.node("Cast", [bit], to=onnx.TensorProto.FLOAT)
    pads = np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)
    a = net.node("Pad", [a, net.const(pads), net.const(np.float32(value))], (1, 4, 8, 8))
    w = np.where(np.random.default_rng(0).random((8, 4, 3, 3)) < 0.5, -1, 1).astype(np.float32)
    out = net.node("Conv", [a, net.const(w)], (1, 8, 6 + 2 * conv_pads, 6 + 2 * conv_pads),
                   kernel_shape=[3, 3], pads=[conv_pads] * 4)
    return net.model(out)


@pytest.mark.parametrize(("value", "act", "conv_pads", "reason"), [
    (1.0, "unipolar", 0, "Pad(value=1) before a unipolar binary conv"),
    (0.5, "bipolar", 0, "Pad(value=0.5) before a bipolar binary conv"),
    (1.0, "bipolar", 1, "two borders"),
])
def test_borders_the_kernels_do_not_keep_stay_float(value, act, conv_pads, reason):
    _, _, blocks, misses = match(_pad_before_conv(value, act, conv_pads))
    assert not blocks and len(misses) == 1 and reason in misses[0].reason


@pytest.mark.parametrize("act", ["bipolar", "unipolar"])
def test_a_zero_pad_joins_the_convs_padding(act):
    _, _, (block,), _ = match(_pad_before_conv(0.0, act, 0))
    assert (block.pads, block.pad_value, block.act) == ((1, 1, 1, 1), 0.0, act)
    assert "pad_value" not in block.summary()


def test_pad_value_is_in_the_block_summary():
    _, _, (block,), _ = match(_pad_before_conv(1.0, "bipolar", 0))
    assert isinstance(block, pattern.ABCBlock) and block.summary()["pad_value"] == 1.0


def test_a_minus_one_border_matches_ort(tmp_path, ort_run, max_rel_err):
    """Pad(value=-1) of the ±1 plane: a -1 border (its padding correction adds nothing)."""
    model = _pad_before_conv(-1.0, "bipolar", 0)
    so = tmp_path / "m.so"
    report = compile_model(model, "x86", so, quiet=True, require_binary=True)
    assert [a["pad_value"] for a in report.abc_layers] == [-1.0]
    x = LarqNet(batch=1, size=6, channels=4, seed=8).input()
    assert max_rel_err(load(so, workers=1)(x), ort_run(model, x)) <= TOL
