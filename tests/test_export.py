"""Export: PyTorch eval ≡ the exported ONNX graph under ONNX Runtime, in the canonical pattern.

Every (M, N) in {1, 2, 3, 5}² is exported twice; act, α kind, stride, padding and kernel are
rotated over the 32 cases so that each of their 32 combinations appears exactly once.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from abc_tvm import pattern
from abc_tvm.export import OPSET, to_onnx
from abc_tvm.models import abc_resnet18, abc_resnet20
from abc_tvm.nn import ABCConv2d, ABCLinear, abc_layers

MN = [1, 2, 3, 5]
OPTIONS = list(itertools.product(["bipolar", "unipolar"], [False, True], [1, 2], [0, 1], [1, 3]))


def _cases():
    for j in range(32):
        M, N = MN[(j % 16) // 4], MN[j % 4]
        act, channelwise, stride, padding, k = OPTIONS[(13 * j) % 32]  # 13 odd: a bijection
        yield pytest.param(M, N, act, channelwise, stride, padding, k, j,
                           id=f"M{M}N{N}-{act[:3]}-{'ch' if channelwise else 'ly'}"
                              f"-s{stride}p{padding}k{k}")


def _abc_conv(M, N, act, channelwise, stride, padding, k, seed, cin=3, cout=5):
    torch.manual_seed(seed)
    m = ABCConv2d(cin, cout, k, stride=stride, padding=padding, M=M, N=N, act=act,
                  channelwise=channelwise)
    with torch.no_grad():  # distinct shifts and betas, all planes with both bit values
        m.shift.copy_(torch.linspace(-0.6, 0.6, N) + 0.1 * torch.rand(N) if N > 1
                      else 0.1 * torch.rand(1))
        m.beta.copy_(torch.rand(N) + 0.2)
    return m


def _inputs(shape, seeds=(0, 1)):
    return [torch.rand(*shape, generator=torch.Generator().manual_seed(s)) * 3 - 1 for s in seeds]


def _check_block(block: pattern.ABCBlock, layer: ABCConv2d) -> None:
    """The block has the layer's M, N, act, α kind, geometry, and its report()'s numbers."""
    r = layer.report()
    assert (block.M, block.N, block.act) == (layer.M, layer.N, layer.act)
    assert block.alpha_kind == ("channel" if layer.channelwise else "layer")
    assert (block.act_form, block.clip, block.beta_position, block.weight_form) == (
        "canonical", True, "after", "stacked")
    assert block.strides == (layer.stride,) * 2
    assert block.pads == (layer.padding,) * 4
    np.testing.assert_array_equal(block.shift, r["shift"])
    np.testing.assert_array_equal(block.beta, r["beta"])
    alpha = np.broadcast_to(r["alpha"].reshape(layer.M, -1), block.alpha.shape)
    np.testing.assert_array_equal(block.bases, r["bases"])  # the module's, even if α_m < 0
    np.testing.assert_array_equal(block.alpha, alpha)


@pytest.mark.parametrize("M,N,act,channelwise,stride,padding,k,seed", list(_cases()))
def test_export_matches_pytorch_and_ort(M, N, act, channelwise, stride, padding, k, seed,
                                        ort_run, max_rel_err):
    m = _abc_conv(M, N, act, channelwise, stride, padding, k, seed)
    xs = _inputs((2, 3, 9, 9), seeds=(seed, seed + 100))
    proto = to_onnx(m, xs[0])
    assert isinstance(proto, onnx.ModelProto)
    assert m.training  # the exporter restores the mode it found
    assert {o.domain: o.version for o in proto.opset_import}[""] == OPSET == 17
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["output"]
    onnx.checker.check_model(proto, full_check=True)
    blocks = pattern.check_canonical(proto)
    assert len(blocks) == 1
    _check_block(blocks[0], m)
    m.eval()
    for x in xs:
        with torch.no_grad():
            y = m(x).numpy()
        assert max_rel_err(ort_run(proto, x.numpy()), y) <= 1e-5


def test_every_option_is_exercised():
    """The rotation covers each (M, N) pair twice and each option value 16 times."""
    cases = [p.values for p in _cases()]
    assert sorted({(c[0], c[1]) for c in cases}) == sorted(itertools.product(MN, MN))
    for i in range(2, 7):
        counts = {}
        for c in cases:
            counts[c[i]] = counts.get(c[i], 0) + 1
        assert sorted(counts.values()) == [16, 16], (i, counts)
    for M in MN:  # every M sees both activations and both α kinds
        assert {c[2] for c in cases if c[0] == M} == {"bipolar", "unipolar"}
        assert {c[3] for c in cases if c[0] == M} == {False, True}


def test_export_writes_path(tmp_path):
    m = _abc_conv(2, 2, "bipolar", False, 1, 1, 3, seed=0)
    path = tmp_path / "m.onnx"
    proto = to_onnx(m, torch.rand(1, 3, 8, 8), path)
    assert path.is_file()
    assert onnx.load(os.fspath(path)).SerializeToString() == proto.SerializeToString()
    to_onnx(m, torch.rand(1, 3, 8, 8), str(tmp_path / "s.onnx"))
    assert (tmp_path / "s.onnx").is_file()


def test_two_layer_net_one_block_per_layer(ort_run, max_rel_err):
    torch.manual_seed(3)
    net = nn.Sequential(
        ABCConv2d(3, 8, 3, padding=1, M=3, N=2), nn.BatchNorm2d(8), nn.ReLU(),
        ABCConv2d(8, 8, 3, stride=2, padding=1, M=2, N=3, act="unipolar", channelwise=True),
        nn.Conv2d(8, 4, 1), nn.ReLU(),
    ).eval()
    x = torch.rand(2, 3, 12, 12)
    proto = to_onnx(net, x)
    blocks = pattern.check_canonical(proto)
    layers = [m for _, m in abc_layers(net)]
    assert len(blocks) == len(layers) == 2
    for b, layer in zip(blocks, layers, strict=True):
        _check_block(b, layer)
    _, misses = pattern.find_abc_blocks(pattern.from_onnx(proto))
    assert len(misses) == 1  # the float 1×1 conv
    assert not net.training
    with torch.no_grad():
        assert max_rel_err(ort_run(proto, x.numpy()), net(x).numpy()) <= 1e-5


def test_layers_with_identical_weights_export_as_two_blocks(ort_run, max_rel_err):
    torch.manual_seed(5)
    a = ABCConv2d(4, 4, 3, padding=1, M=2, N=2)
    b = ABCConv2d(4, 4, 3, padding=1, M=2, N=2)
    b.load_state_dict(a.state_dict())
    net = nn.Sequential(a, nn.ReLU(), b).eval()
    x = torch.rand(1, 4, 6, 6)
    proto = to_onnx(net, x)
    blocks = pattern.check_canonical(proto)
    assert len(blocks) == 2 and blocks[0].input != blocks[1].input
    with torch.no_grad():
        assert max_rel_err(ort_run(proto, x.numpy()), net(x).numpy()) <= 1e-5


def test_negative_alpha_bases_survive_export():
    # W = (−3, −3, 1): bases (−,−,+), (+,+,+) and least-squares α = (2, −1) exactly
    m = ABCConv2d(3, 1, 1, M=2, N=1)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([-3.0, -3.0, 1.0]).view(1, 3, 1, 1))
    m.eval()
    np.testing.assert_allclose(m.report()["alpha"], [2.0, -1.0], atol=1e-5)
    block = pattern.check_canonical(to_onnx(m, torch.rand(1, 3, 4, 4)))[0]
    np.testing.assert_array_equal(block.bases, m.report()["bases"])


# -- the bundled models -----------------------------------------------------------------------

@pytest.mark.parametrize("build,M,N,size,kw", [
    (abc_resnet20, 2, 2, 32, {}),
    (abc_resnet20, 3, 1, 32, {"act": "unipolar", "channelwise": True}),
    (abc_resnet18, 1, 1, 64, {}),
], ids=["resnet20-M2N2", "resnet20-M3N1-uni-ch", "resnet18-M1N1-64"])
def test_bundled_models_export_and_agree_with_ort(build, M, N, size, kw, ort_run, max_rel_err):
    model = build(M, N, seed=1, **kw)
    xs = [torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(s))
          for s in (0, 1)]
    proto = to_onnx(model, xs[0])
    onnx.checker.check_model(proto, full_check=True)
    blocks = pattern.check_canonical(proto)
    layers = [m for _, m in abc_layers(model)]
    assert len(blocks) == len(layers) == {abc_resnet20: 18, abc_resnet18: 16}[build]
    for b, layer in zip(blocks, layers, strict=True):
        _check_block(b, layer)
    for x in xs:
        with torch.no_grad():
            y = model(x).numpy()
        assert max_rel_err(ort_run(proto, x.numpy()), y) <= 1e-5


# -- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Conv2d(3, 4, 3)),
    nn.Sequential(nn.Flatten(), ABCLinear(3 * 8 * 8, 2)),
], ids=["float-only", "abc-linear-only"])
def test_model_without_abc_convs_is_rejected(model):
    with pytest.raises(ValueError, match="no ABCConv2d"):
        to_onnx(model, torch.rand(1, 3, 8, 8))


@pytest.mark.parametrize("x", [torch.rand(3, 8, 8), torch.rand(1, 1, 3, 8, 8),
                               np.zeros((1, 3, 8, 8), np.float32), None],
                         ids=["3d", "5d", "numpy", "none"])
def test_non_4d_example_input_is_rejected(x, tmp_path):
    path = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match="4-D NCHW"):
        to_onnx(ABCConv2d(3, 4, 3), x, path)
    assert not path.exists()


def test_wrong_channel_count_is_a_value_error(tmp_path):
    path = tmp_path / "m.onnx"
    m = ABCConv2d(3, 4, 3)
    with pytest.raises(ValueError, match="3 input channels"):
        to_onnx(m, torch.rand(1, 5, 8, 8), path)
    assert not path.exists()
    assert m.training
