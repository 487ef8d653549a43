"""PyTorch ABC layers: the bases formula, least-squares α, the STE, eval freezing, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from abc_tvm.nn import (
    ABCConv2d,
    ABCLinear,
    abc_layers,
    base_shifts,
    least_squares_alpha,
    sign_pos,
    weight_bases,
)

P, Q = 1.0, -1.0  # readable ±1 in the hand-computed bases below


def _w(*values: float, shape=(1, 1, 2, 2)) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(*shape)


# -- the bases formula ------------------------------------------------------------------------

@pytest.mark.parametrize("M,expected", [
    (1, [0.0]), (2, [-1.0, 1.0]), (3, [-1.0, 0.0, 1.0]), (5, [-1.0, -0.5, 0.0, 0.5, 1.0]),
    (8, [-1 + 2 * m / 7 for m in range(8)]),
])
def test_base_shifts_spread_over_minus_one_one(M, expected):
    np.testing.assert_allclose(base_shifts(M).numpy(), expected, atol=1e-7)


def test_sign_pos_maps_zero_to_plus_one():
    x = torch.tensor([-2.0, -1e-30, 0.0, -0.0, 1e-30, 3.0])
    assert sign_pos(x).tolist() == [Q, Q, P, P, P, P]


# W = (0, 1, 2, 5): mean 2, std sqrt(3.5) ≈ 1.871 (population std).
#   u = −1: W − 2 − 1.871 = (−3.87, −2.87, −1.87, 1.13) → (−, −, −, +)
#   u =  0: W − 2         = (−2, −1, 0, 3)              → (−, −, +, +)   sign(0) = +1
#   u = +1: W − 2 + 1.871 = (−0.13, 0.87, 1.87, 4.87)   → (−, +, +, +)
@pytest.mark.parametrize("M,bases", [
    (1, [[Q, Q, P, P]]),
    (2, [[Q, Q, Q, P], [Q, P, P, P]]),
    (3, [[Q, Q, Q, P], [Q, Q, P, P], [Q, P, P, P]]),
])
def test_weight_bases_hand_computed(M, bases):
    w = _w(0, 1, 2, 5)
    b = weight_bases(w, M, channelwise=False)
    assert b.shape == (M, 1, 1, 2, 2)
    assert b.reshape(M, 4).tolist() == bases
    assert torch.equal(weight_bases(w, M, channelwise=True), b)  # one channel: same stats


@pytest.mark.parametrize("w,M,alpha", [
    # M = 1: α = <W, B>/K = (−0 − 1 + 2 + 5)/4
    ((0, 1, 2, 5), 1, [1.5]),
    # M = 2: B1 ⊥ B2, so α_m = <W, B_m>/K: (−0 − 1 − 2 + 5)/4, (−0 + 1 + 2 + 5)/4
    ((0, 1, 2, 5), 2, [0.5, 2.0]),
    # exact: (−3, −1, 1, 3) = 1·(−,−,−,+) + 1·(−,−,+,+) + 1·(−,+,+,+)
    ((-3, -1, 1, 3), 3, [1.0, 1.0, 1.0]),
    # exact with a negative α: (−3, −3, 1) has bases (−,−,+) and (+,+,+): 2·B1 − 1·B2
    ((-3, -3, 1), 2, [2.0, -1.0]),
])
def test_least_squares_alpha_hand_computed(w, M, alpha):
    w = _w(*w, shape=(1, len(w), 1, 1))
    b = weight_bases(w, M, channelwise=False)
    a = least_squares_alpha(w, b, channelwise=False)
    assert a.shape == (M,)
    np.testing.assert_allclose(a.numpy(), alpha, atol=2e-6)
    ac = least_squares_alpha(w, b, channelwise=True)
    assert ac.shape == (M, 1)
    np.testing.assert_allclose(ac[:, 0].numpy(), alpha, atol=2e-6)


def test_least_squares_alpha_matches_lstsq_when_residual_nonzero():
    """M = 3 on (0, 1, 2, 5) has no exact solution: α is the float64 least-squares one."""
    w = _w(0, 1, 2, 5)
    b = weight_bases(w, 3, channelwise=False)
    ref = np.linalg.lstsq(b.reshape(3, 4).double().numpy().T, np.array([0, 1, 2, 5.0]),
                          rcond=None)[0]
    np.testing.assert_allclose(least_squares_alpha(w, b, False).numpy(), ref, atol=1e-5)


def test_least_squares_alpha_min_norm_for_identical_bases():
    """Identical bases split α evenly (the minimum-norm solution)."""
    w = _w(-1, -1, 1, 1)
    b = torch.stack([sign_pos(w)] * 2)
    np.testing.assert_allclose(least_squares_alpha(w, b, False).numpy(), [0.5, 0.5], atol=1e-6)


def test_channelwise_statistics_are_per_output_channel():
    # channel 0: (0, 1, 2, 5) as above; channel 1: (94, 98, 102, 106), mean 100, deviations
    # (−6, −2, 2, 6), std √20 ≈ 4.47: the same thermometer bases, and far enough from channel 0
    # that layer-wide statistics (mean 51) give different ones
    w = torch.stack([_w(0, 1, 2, 5)[0], _w(94, 98, 102, 106)[0]])
    b = weight_bases(w, 3, channelwise=True)
    thermo = [[Q, Q, Q, P], [Q, Q, P, P], [Q, P, P, P]]
    assert b[:, 0].reshape(3, 4).tolist() == thermo
    assert b[:, 1].reshape(3, 4).tolist() == thermo
    layer = weight_bases(w, 3, channelwise=False)
    assert (layer[1, 0] == -1).all() and (layer[1, 1] == 1).all()  # u = 0: W − 51
    a = least_squares_alpha(w, b, channelwise=True)
    assert a.shape == (3, 2)
    for o, values in enumerate(([0, 1, 2, 5.0], [94, 98, 102, 106.0])):
        ref = np.linalg.lstsq(b[:, o].reshape(3, 4).double().numpy().T, np.array(values),
                              rcond=None)[0]
        np.testing.assert_allclose(a[:, o].numpy(), ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a[:, o], least_squares_alpha(w[o:o + 1], b[:, o:o + 1], False))


@pytest.mark.parametrize("channelwise", [False, True])
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8])
def test_module_bases_and_alpha(M, channelwise):
    torch.manual_seed(M)
    m = ABCConv2d(3, 4, 3, M=M, N=2, channelwise=channelwise)
    bases, alpha = m.bases_and_alpha()
    assert torch.equal(bases, weight_bases(m.weight.detach(), M, channelwise))
    assert set(bases.unique().tolist()) <= {-1.0, 1.0}
    assert alpha.shape == ((M, 4) if channelwise else (M,))
    assert torch.equal(alpha, least_squares_alpha(m.weight.detach(), bases, channelwise))
    # least squares: the residual is orthogonal to every base (per channel if channelwise)
    view = alpha.view(M, -1, 1, 1, 1) if channelwise else alpha.view(M, 1, 1, 1, 1)
    resid = (m.weight.detach() - (view * bases).sum(0)).double()
    dims = (1, 2, 3) if channelwise else (0, 1, 2, 3)
    for b in bases.double():
        assert (resid * b).sum(dims).abs().max() < 1e-4


# -- activations and the STE ------------------------------------------------------------------

X = torch.tensor([-1.0, 0.2, 0.4, 0.6, 3.0])
#        x + 0    clipped (0, .2, .4, .6, 1)     ≥ 0.5 → (0, 0, 0, 1, 1)
#        x + .25  = (−.75, .45, .65, .85, 3.25)  ≥ 0.5 → (0, 0, 1, 1, 1)
BITS = [[0.0, 0, 0, 1, 1], [0.0, 0, 1, 1, 1]]


@pytest.mark.parametrize("act", ["bipolar", "unipolar"])
def test_binarize_values(act):
    m = ABCConv2d(1, 1, 1, M=1, N=2, act=act)
    with torch.no_grad():
        m.shift.copy_(torch.tensor([0.0, 0.25]))
    want = [[2 * b - 1 if act == "bipolar" else b for b in row] for row in BITS]
    for n in range(2):
        np.testing.assert_allclose(m.binarize(X, n).detach().numpy(), want[n], atol=1e-6)
    m.eval()
    planes = m._eval_planes(X)
    assert [p.tolist() for p in planes] == want
    np.testing.assert_array_equal(m.report()["shift"], np.float32([0.0, 0.25]))


@pytest.mark.parametrize("act,slope", [("bipolar", 2.0), ("unipolar", 1.0)])
def test_binarize_straight_through_gradient(act, slope):
    """The gradient is that of clip(x + v, 0, 1) (times 2 for bipolar): 0 outside [0, 1]."""
    m = ABCConv2d(1, 1, 1, M=1, N=1, act=act)
    x = torch.tensor([-0.5, 0.1, 0.45, 0.7, 1.5], requires_grad=True)
    m.binarize(x, 0).sum().backward()
    assert x.grad.tolist() == [0.0, slope, slope, slope, 0.0]
    assert m.shift.grad.item() == pytest.approx(3 * slope)


@pytest.mark.parametrize("channelwise", [False, True])
def test_weight_straight_through_gradient(channelwise):
    """d/dW <Σ α_m STE(B_m), G> = (Σ_m α_m) G: the sign is passed straight through."""
    torch.manual_seed(0)
    m = ABCConv2d(3, 4, 3, M=3, N=1, channelwise=channelwise)
    g = torch.randn(m.weight.shape)
    (m.approx_weight() * g).sum().backward()
    _, alpha = m.bases_and_alpha()
    scale = alpha.sum(0).view(-1, 1, 1, 1) if channelwise else alpha.sum()
    torch.testing.assert_close(m.weight.grad, scale * g)
    bases, alpha = m.bases_and_alpha()
    view = alpha.view(3, -1, 1, 1, 1) if channelwise else alpha.view(3, 1, 1, 1, 1)
    torch.testing.assert_close(m.approx_weight().detach(), (view * bases).sum(0))


def _train(student: nn.Module, teacher: nn.Module, x: torch.Tensor, params, steps: int = 20):
    with torch.no_grad():
        target = teacher(x)
    opt = torch.optim.Adam(params, lr=0.02)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(student(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("act,channelwise", [("bipolar", False), ("unipolar", True)])
def test_ste_training_reduces_loss_conv(act, channelwise):
    """A few Adam steps fit a float teacher conv: the STE gives useful gradients."""
    torch.manual_seed(0)
    teacher = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    student = ABCConv2d(4, 6, 3, padding=1, M=3, N=3, act=act, channelwise=channelwise)
    x = torch.rand(16, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 3 - 1
    w0, v0, b0 = (p.detach().clone() for p in (student.weight, student.shift, student.beta))
    losses = _train(student, teacher, x, student.parameters())
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(np.isfinite(losses))
    for before, p in ((w0, student.weight), (v0, student.shift), (b0, student.beta)):
        assert not torch.equal(before, p.detach())


def test_ste_training_through_the_weights_alone():
    """β and v fixed: only the latent weight moves, through the sign's STE, and the loss falls."""
    torch.manual_seed(2)
    teacher = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    student = ABCConv2d(4, 6, 3, padding=1, M=2, N=2)
    x = torch.rand(16, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 3 - 1
    bases0, _ = student.bases_and_alpha()
    losses = _train(student, teacher, x, [student.weight], steps=30)
    assert losses[-1] < 0.8 * losses[0], losses
    assert not torch.equal(bases0, student.bases_and_alpha()[0])  # some bits flipped


def test_ste_training_reduces_loss_linear():
    torch.manual_seed(0)
    teacher = nn.Linear(10, 5, bias=False)
    student = ABCLinear(10, 5, M=2, N=2)
    x = torch.rand(64, 10, generator=torch.Generator().manual_seed(1)) * 3 - 1
    losses = _train(student, teacher, x, student.parameters())
    assert losses[-1] < 0.5 * losses[0], losses


# -- eval: frozen float32 constants -----------------------------------------------------------

def _manual_conv(m: ABCConv2d, x: torch.Tensor) -> torch.Tensor:
    """Σ_n β_n Conv(A_n, Σ_m α_m B_m) from the module's report(): bits from float32 x + v,
    as the graph computes them, then the convolution in float64."""
    r = m.report()
    alpha = torch.from_numpy(r["alpha"]).double()
    bases = torch.from_numpy(r["bases"]).double()
    view = alpha.view(m.M, -1, 1, 1, 1) if alpha.dim() == 2 else alpha.view(m.M, 1, 1, 1, 1)
    w = (view * bases).sum(0)
    y = 0
    for v, b in zip(r["shift"], r["beta"], strict=True):
        bits = ((x + torch.tensor(v)).clamp(0, 1) >= 0.5).double()  # x, v float32
        a = 2 * bits - 1 if r["act"] == "bipolar" else bits
        y = y + float(b) * F.conv2d(a, w, None, m.stride, m.padding)
    return y


@pytest.mark.parametrize("M,N,act,channelwise,stride,padding,k", [
    (1, 1, "bipolar", False, 1, 0, 3),
    (2, 3, "unipolar", True, 2, 1, 3),
    (3, 2, "bipolar", True, 1, 1, 1),
    (5, 5, "unipolar", False, 2, 0, 1),
])
def test_eval_forward_matches_report(M, N, act, channelwise, stride, padding, k):
    torch.manual_seed(M * 10 + N)
    m = ABCConv2d(3, 5, k, stride=stride, padding=padding, M=M, N=N, act=act,
                  channelwise=channelwise)
    with torch.no_grad():
        m.shift.copy_(torch.linspace(-0.4, 0.4, N) + 0.05)
        m.beta.copy_(torch.rand(N) + 0.2)
    x = torch.rand(2, 3, 9, 9) * 3 - 1
    with torch.no_grad():
        y_train = m(x)
        m.eval()
        y = m(x)
    r = m.report()
    assert set(r) >= {"bases", "alpha", "shift", "beta", "act"}
    assert r["act"] == act
    assert r["bases"].shape == (M, 5, 3, k, k) and r["bases"].dtype == np.float32
    assert r["alpha"].shape == ((M, 5) if channelwise else (M,))
    assert r["alpha"].dtype == r["shift"].dtype == r["beta"].dtype == np.float32
    assert r["shift"].shape == r["beta"].shape == (N,)
    ref = _manual_conv(m, x)
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5
    # the train-mode forward (STE) has the same value
    assert ((y_train - y).abs().max() / y.abs().max()).item() < 1e-5


def test_eval_freezes_float32_constants():
    m = ABCConv2d(2, 3, 3, M=2, N=2, channelwise=True)
    with torch.no_grad():
        m.shift.copy_(torch.tensor([0.1, 0.3], dtype=torch.float32))
    m.eval()
    fz = m.frozen()
    assert fz.bases.dtype == fz.alpha.dtype == torch.float32
    assert all(v.dtype == torch.float32 and v.dim() == 0 for v in fz.shift + fz.beta)
    r = m.report()
    np.testing.assert_array_equal(r["bases"], fz.bases.numpy())
    np.testing.assert_array_equal(r["shift"], np.float32([0.1, 0.3]))
    m.train()
    assert m._frozen is None


def test_eval_forward_follows_load_state_dict():
    torch.manual_seed(0)
    a = ABCConv2d(3, 4, 3, M=2, N=2).eval()
    b = ABCConv2d(3, 4, 3, M=2, N=2).eval()
    a.load_state_dict(b.state_dict())
    x = torch.rand(1, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


def test_linear_eval_forward():
    torch.manual_seed(4)
    m = ABCLinear(6, 3, M=2, N=2, act="unipolar", channelwise=True).eval()
    x = torch.rand(4, 6) * 3 - 1
    r = m.report()
    assert r["bases"].shape == (2, 3, 6) and r["alpha"].shape == (2, 3)
    w = (torch.from_numpy(r["alpha"]).view(2, 3, 1) * torch.from_numpy(r["bases"])).sum(0)
    ref = sum(float(b) * F.linear(((x + float(v)).clamp(0, 1) >= 0.5).float(), w)
              for v, b in zip(r["shift"], r["beta"], strict=True))
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref)


def test_abc_layers_lists_the_abc_modules():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), ABCConv2d(4, 4, 3), nn.Flatten(), ABCLinear(4, 2))
    found = abc_layers(net)
    assert [name for name, _ in found] == ["1", "3"]
    assert isinstance(found[0][1], ABCConv2d) and isinstance(found[1][1], ABCLinear)
    assert abc_layers(nn.Conv2d(1, 1, 1)) == []


# -- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    ({"M": 0}, "M must be"), ({"M": 9}, "M must be"), ({"N": 0}, "N must be"),
    ({"N": 9}, "N must be"), ({"M": 2.0}, "M must be"), ({"N": "3"}, "N must be"),
    ({"act": "ternary"}, "act must be"),
])
@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_bad_constructor_arguments(layer, kw, match):
    with pytest.raises(ValueError, match=match):
        if layer == "conv":
            ABCConv2d(3, 4, 3, **kw)
        else:
            ABCLinear(3, 4, **kw)


@pytest.mark.parametrize("M,N", [(1, 1), (8, 8)])
def test_m_n_bounds_accepted(M, N):
    assert ABCConv2d(2, 2, 1, M=M, N=N).bases_and_alpha()[0].shape[0] == M


def test_bad_channels():
    with pytest.raises(ValueError, match="positive"):
        ABCConv2d(0, 4, 3)
    with pytest.raises(ValueError, match="positive"):
        ABCLinear(3, 0)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("shape,match", [
    ((3, 8, 8), "4-D NCHW"), ((1, 1, 3, 8, 8), "4-D NCHW"), ((1, 5, 8, 8), "3 input channels"),
])
def test_conv_bad_input_shape(mode, shape, match):
    m = ABCConv2d(3, 4, 3, M=2, N=2)
    m.train(mode == "train")
    with pytest.raises(ValueError, match=match):
        m(torch.rand(*shape))


def test_linear_bad_input_shape():
    with pytest.raises(ValueError, match="6 input features"):
        ABCLinear(6, 2)(torch.rand(2, 5))
