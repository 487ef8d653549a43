"""ABC-Net as trained the paper's way compiles to binary kernels (issue 21, item 1).

The weight construction `Σ_m α_m · sign(W − mean(W) + u_m·std(W))` is read before folding
erases it (`abc_weights.read_bases`), stacked weights are kept through ONNX Runtime's
folding (`held_for_folding`), and where only a folded weight is left it is decomposed within
FOLD_ULPS ulps and replaced by the exact sum, with a note (`snap_folded`). The nets are
tests/abc_paper.py's, written after the paper and public ports, not abc-tvm's own layers.
"""

from __future__ import annotations

import copy
import os
import tempfile

import numpy as np
import onnx
import pytest
import torch
from abc_paper import PaperABCConv, PaperABCNet, digits, export, train
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from abc_tvm import pattern
from abc_tvm.canonical import abc_weights, canonicalize
from abc_tvm.canonical.graph import Graph
from abc_tvm.compiler import compile_model
from abc_tvm.runtime import load

TOL = 1e-4  # float32 rounding of the α·β sums; a flipped bit would be far above it
LAYERS = [(5, 3, "layer"), (3, 1, "channel"), (5, 3, "layer")]  # PaperABCNet's (M, N, α)


def _ort_fold(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX Runtime's basic optimisation of the whole model, as a user's tool chain runs it
    (onnxsim, an ORT-optimised file): the weights arrive folded into one constant each."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    with tempfile.TemporaryDirectory() as tmp:
        opts.optimized_model_filepath = os.path.join(tmp, "folded.onnx")
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return onnx.load(opts.optimized_model_filepath)


def _compile(model: onnx.ModelProto, tmp_path, x: np.ndarray, ort_run, max_rel_err):
    """Compile for x86; (report, compiled output, ORT's output of the model as given)."""
    so = tmp_path / "m.so"
    report = compile_model(model, "x86", so, quiet=True, require_binary=True)
    y, ref = load(so, workers=1)(x), ort_run(model, x)
    assert max_rel_err(y, ref) <= TOL
    return report, y, ref


# -- a net trained on digits ----------------------------------------------------------------

@pytest.fixture(scope="module")
def trained() -> tuple[PaperABCNet, float]:
    """PaperABCNet with α by least squares at run time, six epochs of Adam (~5 s)."""
    torch.manual_seed(0)
    net = PaperABCNet(alpha="lstsq")
    return net, train(net)


@pytest.mark.parametrize("form", ["runtime", "frozen"])
@pytest.mark.parametrize("fold", [True, False], ids=["torch-fold", "no-torch-fold"])
def test_trained_abc_net_is_binary_and_matches_ort(trained, form, fold, tmp_path, ort_run,
                                                   max_rel_err):
    """Every ABC conv a binary kernel, whether the bases are computed in the graph or frozen
    as buffers, and whether torch folded constants or left them (then the view's shape
    arithmetic makes ONNX Runtime fold the graph, the stacked weights kept)."""
    net, acc = trained
    assert acc >= 0.85  # six epochs reach ~95%
    model_net = net if form == "runtime" else copy.deepcopy(net).freeze()
    xte, yte = digits()[2:]
    model = export(model_net, torch.from_numpy(xte), fold=fold)
    report, y, ref = _compile(model, tmp_path, xte, ort_run, max_rel_err)
    assert [(a["M"], a["N"], a["alpha"]) for a in report.abc_layers] == LAYERS
    rules = {r["rule"] for r in report.canonical}
    if form == "runtime":
        assert all("abc_bases" in a["rules"] for a in report.abc_layers)
    if not fold:
        assert "fold_constants" in rules  # something else folded; the weights kept
    assert (y.argmax(1) == ref.argmax(1)).all()
    assert (y.argmax(1) == yte).mean() == (ref.argmax(1) == yte).mean()
    with torch.no_grad():
        assert max_rel_err(model_net(torch.from_numpy(xte)).numpy(), ref) <= TOL


def test_trained_abc_net_folded_by_ort_is_snapped(trained, tmp_path, ort_run, max_rel_err):
    """Only the folded weights left (the model optimised by ONNX Runtime first): each is
    decomposed within FOLD_ULPS ulps, replaced by the exact Σ α_m B_m, and noted."""
    net, _ = trained
    xte = digits()[2][:64]
    model = _ort_fold(export(net, torch.from_numpy(xte), fold=False))
    report, _, _ = _compile(model, tmp_path, xte, ort_run, max_rel_err)
    assert [(a["M"], a["N"], a["alpha"]) for a in report.abc_layers] == LAYERS
    snaps = [r for r in report.canonical if r["rule"] == "snap_folded"]
    assert len(snaps) == sum(n for _, n, _ in LAYERS)  # one per conv (planes share none)
    assert all(a["rules"].count("snap_folded") == 1 for a in report.abc_layers)


# -- the forms ports write, untrained ---------------------------------------------------------

class _OneABC(nn.Module):
    """BN → ABC conv → a flatten through `view(size(0), -1)` (shape arithmetic to fold)."""

    def __init__(self, **kw) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(6)
        self.conv = PaperABCConv(6, 8, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.bn(x))
        return y.view(y.size(0), -1)


@pytest.mark.parametrize("kw", [
    dict(M=5, N=2, alpha="lstsq", channelwise=True),
    dict(M=4, N=1, alpha="param", terms=True),
    dict(M=3, N=2, alpha="param", channelwise=True, sign="where"),
    dict(M=2, N=1, alpha="lstsq", bias=True),
], ids=["lstsq-channel", "param-terms", "param-where", "lstsq-bias"])
def test_port_forms_are_read_before_folding(kw, tmp_path, ort_run, max_rel_err):
    torch.manual_seed(1)
    m = _OneABC(**kw).eval()
    x = torch.rand(2, 6, 7, 7)
    model = export(m, x, fold=False)
    report, _, _ = _compile(model, tmp_path, x.numpy(), ort_run, max_rel_err)
    ((layer),) = report.abc_layers
    assert (layer["M"], layer["N"]) == (kw["M"], kw["N"])
    assert layer["alpha"] == ("channel" if kw.get("channelwise") else "layer")
    assert "abc_bases" in layer["rules"]
    # the bases are the model's own
    fz = m.conv.bases().detach().numpy()
    proto, _ = canonicalize(model)
    blocks, _ = pattern.find_abc_blocks(pattern.from_onnx(proto))
    np.testing.assert_array_equal(blocks[0].bases, fz)


def test_read_bases_leaves_a_weight_that_is_not_bases():
    """tanh instead of sign: not ±1, no rewrite (and no binary kernel later)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Unsqueeze", ["w", "ax"], ["w5"]),
             helper.make_node("Add", ["w5", "u"], ["z"]),
             helper.make_node("Tanh", ["z"], ["s"]),
             helper.make_node("Mul", ["a", "s"], ["p"]),
             helper.make_node("ReduceSum", ["p", "ax"], ["wh"], keepdims=0),
             helper.make_node("Sign", ["x"], ["xs"]),
             helper.make_node("Conv", ["xs", "wh"], ["y"])]
    inits = {"w": w, "ax": np.array([0], np.int64),
             "u": np.array([-1, 1], np.float32).reshape(2, 1, 1, 1, 1),
             "a": np.array([0.5, 0.25], np.float32).reshape(2, 1, 1, 1, 1)}
    m = _model(nodes, inits)
    assert abc_weights.read_bases(Graph(m)) == []


# -- decomposition within tolerance -----------------------------------------------------------

def _model(nodes, inits, x_shape=(1, 3, 5, 5)) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     list(x_shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _nested(M: int, shape=(8, 6, 3, 3), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """ABC-Net's nested bases of a random latent W (layer-wise), α by least squares."""
    W = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)  # noqa: N806
    u = np.linspace(-1, 1, M).reshape(-1, 1, 1, 1, 1)
    B = np.where(W - W.mean() + u * W.std() >= 0, 1.0, -1.0).astype(np.float32)  # noqa: N806
    a = np.linalg.lstsq(B.reshape(M, -1).T, W.reshape(-1), rcond=None)[0].astype(np.float32)
    return B, a


def _ort_sum(B: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Σ α_m B_m as ONNX Runtime folds ReduceSum(Mul(α, B), axes=[0])."""
    import onnxruntime as ort

    g = helper.make_graph(
        [helper.make_node("Mul", ["a", "b"], ["p"]),
         helper.make_node("ReduceSum", ["p", "ax"], ["w"], keepdims=0)], "s", [],
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(a.reshape(-1, 1, 1, 1, 1).astype(np.float32), "a"),
         numpy_helper.from_array(B, "b"), numpy_helper.from_array(np.array([0], np.int64), "ax")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]
                                ).run(["w"], {})[0]


@pytest.mark.parametrize("M", [2, 3, 5, 8])
def test_nested_levels_decompose_into_m_bases(M):
    """M + 1 levels (not 2^M): the thermometer reading gives back M bases."""
    B, a = _nested(M)
    w = _ort_sum(B, a)
    assert len(np.unique(w)) == M + 1
    got = abc_weights.decompose_near(w, abc_weights.FOLD_ULPS)
    assert got is not None
    bases, alpha, off = got
    assert bases.shape[0] == M and off <= abc_weights.FOLD_ULPS
    # the same bases and α, lowest threshold first (u_m = +1 has the lowest: W ≥ mean − std)
    np.testing.assert_array_equal(bases, B[::-1])
    np.testing.assert_allclose(alpha[:, 0], a[::-1], rtol=1e-4)


def test_ulp_off_values_are_decomposed_not_exactly():
    """A weight a few ulps off Σ α_m B_m (summed in another order): the exact reading
    refuses it, the tolerant one finds the M bases and says how far off it was."""
    rng = np.random.default_rng(4)
    M = 3  # noqa: N806
    B = np.where(rng.random((M, 8, 4, 3, 3)) < 0.5, -1.0, 1.0).astype(np.float32)  # noqa: N806
    a = np.array([0.61, 0.27, 0.113], np.float32)
    w = _ort_sum(B, a)
    noisy = w.copy()
    noisy.flat[::7] = np.nextafter(noisy.flat[::7], np.float32(np.inf))
    noisy.flat[3::11] = np.nextafter(np.nextafter(noisy.flat[3::11], np.float32(-np.inf)),
                                     np.float32(-np.inf))
    assert pattern.decompose_folded(noisy) is None
    bases, alpha, off = abc_weights.decompose_near(noisy, abc_weights.FOLD_ULPS)
    assert bases.shape[0] == M and 1 <= off <= abc_weights.FOLD_ULPS
    assert np.all(abc_weights.ulps_off(noisy, bases, alpha, layer=True) <= off)


@pytest.mark.parametrize("case", ["random", "one-level-off", "too-many-levels"])
def test_not_decomposable_within_tolerance_is_refused(case):
    rng = np.random.default_rng(5)
    if case == "random":
        w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    else:
        M = 4 if case == "one-level-off" else 9  # noqa: N806
        B = np.where(rng.random((M, 8, 16, 3, 3)) < 0.5, -1.0, 1.0).astype(np.float32)  # noqa: N806
        a = (2.0 ** -np.arange(1, M + 1)).astype(np.float32) * np.float32(1.37)
        w = _ort_sum(B, a)
        if case == "one-level-off":  # one of the 16 signed sums moved by 200 ulps
            lv = np.unique(w)[5]
            w[w == lv] = lv + 200 * np.spacing(np.abs(w).max())
    assert abc_weights.decompose_near(w, abc_weights.FOLD_ULPS) is None


def _binary_conv(w: np.ndarray) -> onnx.ModelProto:
    """Sign(x) → Conv with a constant weight w."""
    return _model([helper.make_node("Sign", ["x"], ["xs"]),
                   helper.make_node("Conv", ["xs", "w"], ["y"], pads=[1, 1, 1, 1])],
                  {"w": w}, (1, w.shape[1], 5, 5))


def test_snap_folded_notes_and_replaces_the_weight(ort_run, max_rel_err):
    B, a = _nested(5, (4, 3, 3, 3), seed=2)
    w = _ort_sum(B, a)
    w.flat[::5] = np.nextafter(w.flat[::5], np.float32(np.inf))  # another order's rounding
    m = _binary_conv(w)
    proto, notes = canonicalize(m)
    (note,) = [n for n in notes if n.rule == "snap_folded"]
    assert "5 ±1 bases" in note.detail and "ulp off" in note.detail
    (block,) = pattern.find_abc_blocks(pattern.from_onnx(proto))[0]
    np.testing.assert_array_equal(block.bases, B[::-1])
    x = np.random.default_rng(0).standard_normal((1, 3, 5, 5)).astype(np.float32)
    assert max_rel_err(ort_run(proto, x), ort_run(m, x)) <= 1e-5


def test_snap_folded_refuses_what_is_not_within_tolerance():
    """16 signed sums of 4 bases, one of them 200 ulps off: too many levels for the
    thermometer, no signed sums within tolerance. The conv stays float, with the reason."""
    rng = np.random.default_rng(3)
    B = np.where(rng.random((4, 8, 3, 3, 3)) < 0.5, -1.0, 1.0).astype(np.float32)  # noqa: N806
    w = _ort_sum(B, np.array([0.7, 0.33, 0.161, 0.07], np.float32))
    assert abc_weights.decompose_near(w, abc_weights.FOLD_ULPS) is not None
    lv = np.unique(w)[6]
    w[w == lv] = lv + 200 * np.spacing(np.abs(w).max())
    proto, notes = canonicalize(_binary_conv(w))
    assert not [n for n in notes if n.rule == "snap_folded"]
    blocks, misses = pattern.find_abc_blocks(pattern.from_onnx(proto))
    assert blocks == [] and misses[0].reason.startswith(abc_weights.NOT_EXACT)


def test_snap_folded_leaves_float_convs_alone():
    """A decomposable weight behind no binarizer is a float conv: not rewritten."""
    B, a = _nested(3, (4, 3, 3, 3))
    w = _ort_sum(B, a)
    w.flat[::5] = np.nextafter(w.flat[::5], np.float32(np.inf))
    m = _model([helper.make_node("Relu", ["x"], ["xr"]),
                helper.make_node("Conv", ["xr", "w"], ["y"])], {"w": w})
    assert abc_weights.snap_folded(Graph(m)) == []


def test_stacked_weight_survives_folding_elsewhere():
    """ReduceSum(Mul(α, B)) of constants stays the stacked form when ONNX Runtime folds
    something else in the graph (a weight it would otherwise fold into one constant)."""
    B, a = _nested(5, (4, 3, 3, 3), seed=6)
    nodes = [helper.make_node("Mul", ["a", "b"], ["p"]),
             helper.make_node("ReduceSum", ["p", "ax"], ["w"], keepdims=0),
             helper.make_node("Sign", ["x"], ["xs"]),
             helper.make_node("Conv", ["xs", "w"], ["c"]),
             helper.make_node("Neg", ["k"], ["nk"]),  # foldable, elsewhere
             helper.make_node("Add", ["c", "nk"], ["y"])]
    m = _model(nodes, {"a": a.reshape(-1, 1, 1, 1, 1), "b": B, "ax": np.array([0], np.int64),
                       "k": np.float32(0.5)})
    proto, notes = canonicalize(m)
    assert "fold_constants" in [n.rule for n in notes]
    (block,) = pattern.find_abc_blocks(pattern.from_onnx(proto))[0]
    assert block.weight_form == "stacked"
    np.testing.assert_array_equal(block.bases, B)
    np.testing.assert_array_equal(block.alpha[:, 0], a)
