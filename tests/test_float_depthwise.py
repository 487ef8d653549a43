"""The depthwise / narrow-group conv (`schedules/float_depthwise.py`) and the choice of kernel
for grouped convs (`float_layout._lower_conv`).

The default pass falls back to the generic schedules if `float_depthwise.schedule` raises,
so here the schedule is applied directly, on the conv with the bias + ReLU that FuseOps
fuses after it, for every target's register file, and checked against NumPy; what the
whole compile computes is checked against ONNX Runtime in test_float_ops.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from numpy.lib.stride_tricks import sliding_window_view
from tvm import te, topi

from abc_tvm.schedules import _util as simd
from abc_tvm.schedules import float_default as fd
from abc_tvm.schedules import float_depthwise as fdw


@pytest.mark.parametrize(("isa", "group_in", "groups", "out", "kernel"), [
    (simd.AVX512, 1, 32, 32, "float_depthwise_nhwc_b1h9w11c32g1k"),  # depthwise: banded
    (simd.AVX512, 4, 8, 32, "float_depthwise_nhwc_b1h9w11c32g4k"),  # 4k <= 16 lanes: banded
    (simd.AVX512, 8, 4, 32, "float_conv_nhwc_b1h9w11c32o32k3x3s1x1p1_1_1_1g2"),  # merged by 2
    (simd.AVX512, 16, 2, 32, "float_conv_nhwc_b1h9w11c32o32k3x3s1x1p1_1_1_1g2"),  # blocked
    (simd.AVX2, 4, 8, 32, "float_conv_nhwc_b1h9w11c32o32k3x3s1x1p1_1_1_1g4"),  # 4k > 8 lanes
    (simd.AVX2, 2, 16, 32, "float_depthwise_nhwc_b1h9w11c32g2k"),
    (simd.AVX512, 1, 32, 64, "float_conv_nhwc_b1h9w11c32o64k3x3s1x1p1_1_1_1g4"),  # multiplier
    (simd.AVX512, 13, 5, 65, "float_depthwise_nhwc_b1h9w11c65g13k"),  # no merge: banded
    (simd.AVX512, 1, 13, 26, None),  # multiplier of 13 groups: TOPI's conv
], ids=lambda v: getattr(v, "name", None))
def test_grouped_conv_kernel_choice(isa, group_in, groups, out, kernel):
    from abc_tvm.relay_passes import float_layout

    w = np.ones((3, 3, group_in, out), np.float32)
    x_shape = (1, 9, 11, group_in * groups)
    lowered = float_layout._lower_conv(w, groups, (x_shape, (1, 1), (1, 1, 1, 1), (9, 11)), isa)
    if kernel is None:
        assert lowered is None
        return
    func, weight = lowered
    assert str(func.attrs["global_symbol"]).startswith(kernel)
    assert weight.size >= w.size  # banded or merged weights only add zeros


def test_band_weight_places_each_group_on_its_diagonal():
    k, c = 3, 6
    w = np.arange(2 * 2 * k * c, dtype=np.float32).reshape(2, 2, k, c) + 1
    band = fdw.band_weight(w)
    for o in range(c):
        for d in range(2 * k - 1):
            j = o + d - (k - 1)  # the input channel tap d of o reads
            same_group = 0 <= j < c and j // k == o // k
            assert band[:, :, d, o].tolist() == (w[:, :, j % k, o] if same_group
                                                 else np.zeros((2, 2))).tolist()


def _grouped_conv(x, w, groups, stride, pads):
    """NHWC x, HWIO w: the grouped conv in float64, group by group."""
    top, left, bottom, right = pads
    xp = np.pad(x.astype(np.float64), ((0, 0), (top, bottom), (left, right), (0, 0)))
    kh, kw, cin, out = w.shape
    win = sliding_window_view(xp, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]
    per = out // groups
    parts = [np.einsum("nhwcij,ijco->nhwo", win[..., g * cin:(g + 1) * cin, :, :],
                       w[..., g * per:(g + 1) * per]) for g in range(groups)]
    return np.concatenate(parts, axis=-1)


def _fused(x_shape, band_shape, stride, pads, out_hw, epilogue: bool):
    x = te.placeholder(x_shape, "float32", name="x")
    w = te.placeholder(band_shape, "float32", name="w")
    b = te.placeholder((1, 1, 1, x_shape[3]), "float32", name="b")
    y = fdw.depthwise_nhwc(x, w, stride, pads, out_hw)
    if epilogue:  # what FuseOps puts after the kOutEWiseFusable conv
        return te.create_prim_func([x, w, b, topi.nn.relu(y + b)])
    return te.create_prim_func([x, w, y])


@pytest.mark.parametrize(("isa", "batch", "channels", "k", "kernel", "stride", "pads"), [
    (simd.AVX512, 1, 32, 1, 3, 1, (1, 1, 1, 1)),  # depthwise, padding inlined
    (simd.AVX512, 3, 13, 1, 3, 2, (1, 0, 1, 2)),  # 13 lanes, asymmetric padding
    (simd.AVX512, 1, 32, 4, 3, 1, (1, 1, 1, 1)),  # banded: the padding a stage
    (simd.AVX2, 1, 24, 2, 5, 2, (2, 2, 2, 2)),
    (simd.NEON_A64, 2, 16, 1, 3, 1, (0, 0, 0, 0)),  # no padding: no producer
], ids=lambda v: getattr(v, "name", None))
@pytest.mark.parametrize("epilogue", [True, False], ids=["bias_relu", "plain"])
def test_schedule_matches_numpy(isa, batch, channels, k, kernel, stride, pads, epilogue):
    rng = np.random.default_rng(0)
    h, w = 9, 11
    oh = (h + pads[0] + pads[2] - kernel) // stride + 1
    ow = (w + pads[1] + pads[3] - kernel) // stride + 1
    x = rng.normal(0, 1, (batch, h, w, channels)).astype(np.float32)
    hwio = rng.normal(0, 1, (kernel, kernel, k, channels)).astype(np.float32)
    band = fdw.band_weight(hwio)
    func = _fused(x.shape, band.shape, (stride, stride), pads, (oh, ow), epilogue)
    sch = fdw.schedule(func, isa)  # raises where the schedule does not apply
    lib = tvm.compile(tvm.IRModule({"main": sch}), target=tvm.target.Target.from_device("cpu"))
    dev = tvm.cpu()
    b = rng.normal(0, 1, (1, 1, 1, channels)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((batch, oh, ow, channels), np.float32), dev)
    args = (x, band, b) if epilogue else (x, band)
    lib["main"](*(tvm.runtime.tensor(a, dev) for a in args), out)
    ref = _grouped_conv(x, hwio, channels // k, stride, pads)
    ref = np.maximum(ref + b, 0) if epilogue else ref
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_default_pass_hands_the_conv_to_float_depthwise(monkeypatch):
    func = _fused((1, 9, 11, 32), (3, 3, 1, 32), (1, 1), (1, 1, 1, 1), (9, 11), True)
    seen = []
    monkeypatch.setattr(fdw, "schedule", lambda f, isa: seen.append(isa) or f)
    fd.schedule_func(func, tvm.target.Target({"kind": "llvm", "mcpu": "znver3"}))
    assert seen == [simd.AVX2]
    assert not fdw.is_depthwise(_stem_like())


def _stem_like():
    x = te.placeholder((1, 9, 11, 3), "float32", name="x")
    w = te.placeholder((3, 3, 3, 16), "float32", name="w")
    return te.create_prim_func([x, w, topi.nn.conv2d_nhwc(x, w, 1, 1, 1)])
