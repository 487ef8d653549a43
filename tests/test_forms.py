"""The ABC form space swept, not listed: every documented way of writing an ABC conv, in
every context a block sits in, compiles to binary kernels and matches ONNX Runtime.

The sweep runs a fixed, derandomised set of examples in CI (profile "ci"); set
ABC_TVM_HYPOTHESIS=local for a longer run. The two N = 1 regressions of issue 21 are
pinned as plain tests first.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import torch
from abc_nets import BINARIZERS, WEIGHTS, BlockForm, Net
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from abc_tvm import pattern
from abc_tvm.compiler import compile_model
from abc_tvm.export import to_onnx
from abc_tvm.nn import ABCConv2d
from abc_tvm.runtime import load

TOL = 1e-4  # float32 rounding of the α·β sums; a flipped bit would be far above it


def _compile_and_check(net: Net, model: onnx.ModelProto, tmp_path, ort_run, max_rel_err,
                       x: np.ndarray | None = None) -> list[dict]:
    so = tmp_path / "m.so"
    report = compile_model(model, "x86", so, quiet=True, require_binary=True)
    assert len(report.abc_layers) == net.abc_blocks, (report.abc_layers, report.float_ops)
    assert sum(a["N"] for a in report.abc_layers) == net.abc_convs
    x = net.input() if x is None else x
    ref = ort_run(model, x)
    assert max_rel_err(load(so, workers=1)(x), ref) <= TOL
    return report.abc_layers


# -- the two regressions ------------------------------------------------------------------

def test_export_accepts_batchnorm_before_an_n1_block(tmp_path, ort_run, max_rel_err):
    """The BatchNorm before an N = 1 block folds into its threshold; the block is still the
    canonical contract (it was read as 'compare' and refused)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(5, 24, 3), nn.BatchNorm2d(24), ABCConv2d(24, 40, 1, M=5, N=1))
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
        m[1].weight.uniform_(0.5, 1.5)
    m.eval()
    x = torch.rand(2, 5, 9, 9)
    proto = to_onnx(m, x)
    (block,) = pattern.check_canonical(proto)
    assert (block.M, block.N, block.act_form, block.thresholds.shape) == (5, 1, "canonical",
                                                                          (1, 24))
    report = compile_model(proto, "x86", tmp_path / "m.so", quiet=True)
    assert [(a["M"], a["N"]) for a in report.abc_layers] == [(5, 1)]
    y = load(tmp_path / "m.so", workers=1)(x.numpy())
    assert max_rel_err(y, ort_run(proto, x.numpy())) <= TOL
    assert max_rel_err(y, m(x).detach().numpy()) <= TOL


def test_folded_stacked_resnet_n1_keeps_every_block(tmp_path, ort_run, max_rel_err):
    """M = 2, N = 1, channel-wise α, Sign(Clip(x + v, 0, 1) − 0.5), two residual blocks of two
    ABC convs (one with a strided 1×1 float shortcut), batch 2, 17²: the second conv's
    binarizer chain walked through the BatchNorm into the first block's β Mul, and the block
    list lost two blocks on the way to Relax ('4 blocks given, 2 explicit block calls')."""
    f = BlockForm(M=2, N=1, channelwise=True, binarizer="sign", weights="folded-stacked")
    net = Net(batch=2, channels=8, size=17)
    y = net.residual(net.x, 8, f)
    y = net.residual(y, 16, f, stride=2)
    layers = _compile_and_check(net, net.model(y), tmp_path, ort_run, max_rel_err)
    assert [(a["M"], a["alpha"], a["act_form"]) for a in layers] == [(2, "channel", "sign")] * 4


# -- the sweep ----------------------------------------------------------------------------

PRECEDES = ("input", "float-conv", "bn", "binary", "residual")


@st.composite
def forms(draw) -> BlockForm:
    act = draw(st.sampled_from(("bipolar", "unipolar")))
    binarizers = BINARIZERS if act == "bipolar" else tuple(b for b in BINARIZERS if b != "sign")
    k = draw(st.sampled_from((1, 3, 5)))
    return BlockForm(
        M=draw(st.integers(1, 5)), N=draw(st.integers(1, 5)), channelwise=draw(st.booleans()),
        act=act, binarizer=draw(st.sampled_from(binarizers)),
        weights=draw(st.sampled_from(WEIGHTS)), beta=draw(st.sampled_from(("after", "before"))),
        kernel=k, stride=draw(st.sampled_from((1, 2))), pad=draw(st.sampled_from((0, k // 2))))


@given(form=forms(), precede=st.sampled_from(PRECEDES), batch=st.integers(1, 2),
       cin=st.sampled_from((3, 8, 20)), cout=st.sampled_from((4, 8)),
       size=st.integers(6, 11), seed=st.integers(0, 2**16))
def test_every_form_in_every_context_is_binary_and_matches_ort(
        form, precede, batch, cin, cout, size, seed, tmp_path_factory, ort_run, max_rel_err):
    if form.weights == "folded":  # the contract's folded weight holds every sign pattern
        form = dataclasses.replace(form, M=min(form.M, Net.max_folded_m(
            cin, cout, form.kernel, form.channelwise)))
    net = Net(batch=batch, channels=cin, size=size, seed=seed)
    x = net.x
    if precede == "float-conv":
        x = net.conv(x, cin)
    elif precede == "bn":
        x = net.bn(x)
    elif precede == "binary":
        x = net.bn(net.abc(x, cin, BlockForm(N=form.N)))
    elif precede == "residual":
        x = net.residual(x, cin, BlockForm(N=form.N, act=form.act))
    y = net.abc(x, cout, form)
    layers = _compile_and_check(net, net.model(y), tmp_path_factory.mktemp("form"), ort_run,
                                max_rel_err)
    last = layers[-1]
    assert (last["N"], last["kernel"], last["strides"]) == (form.N, [form.kernel] * 2,
                                                           [form.stride] * 2)


@given(M=st.integers(1, 5), N=st.integers(1, 5), channelwise=st.booleans(),
       act=st.sampled_from(("bipolar", "unipolar")), k=st.sampled_from((1, 3, 5)),
       stride=st.sampled_from((1, 2)), padding=st.sampled_from((0, 1, 2)),
       bn_before=st.booleans(), seed=st.integers(0, 2**16))
def test_exporter_round_trips_every_abcconv2d(M, N, channelwise, act, k, stride, padding,
                                              bn_before, seed):
    """Every ABCConv2d configuration exports as one canonical block whose bases, α and
    thresholds are the layer's own."""
    torch.manual_seed(seed)
    layer = ABCConv2d(6, 5, k, stride=stride, padding=padding, M=M, N=N,
                      channelwise=channelwise, act=act)
    m = nn.Sequential(nn.BatchNorm2d(6), layer) if bn_before else layer
    m.eval()
    (block,) = pattern.check_canonical(to_onnx(m, torch.rand(1, 6, 7, 7)))
    fz = layer.frozen()
    assert (block.N, block.act, block.strides, block.pads) == (
        N, act, (stride, stride), (padding,) * 4)
    np.testing.assert_array_equal(block.bases, fz.bases.numpy())
    alpha = fz.alpha.numpy()
    np.testing.assert_array_equal(block.alpha, np.broadcast_to(
        alpha.reshape(M, -1), (M, 5)))
    if not bn_before or N > 1:
        np.testing.assert_array_equal(block.shift, [np.float32(v) for v in fz.shift])
