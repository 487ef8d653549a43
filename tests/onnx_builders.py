"""ONNX graphs of one ABC convolution, built by hand: one builder per variant of the contract.

DESIGN.md, "The ABC pattern in ONNX (the import contract)", lists the forms an ABC convolution
may take in an ONNX file. Each builder here writes one of them with `onnx.helper` (opset 17,
NCHW, float32 input "input", output "output") and returns `(model, expected)`, where
`expected` (an `Expected`) holds the true bases, α, v, β and conv geometry, so that a test can
compare what the pattern matcher, or a compiler, recovers from the graph.

All builders take the keywords of `abc_conv` (shape, M, N, act, channelwise, stride, pads,
seed, ...); each variant fixes the keywords that define it and refuses them as arguments.
Near misses (`miss_*`) are graphs that look like ABC blocks but must stay float; their
`expected.miss` is a fragment of the reason the matcher should give.

Random values come from `numpy.random.default_rng(seed)`:
- bases are random ±1; α are positive multiples of 1/64 in [1/8, 1], so that every partial
  sum Σ α_m B_m is exact in float32 (a folded weight then reconstructs bit for bit);
- v_n are spread over about [-0.7, 0.7], so the threshold x ≥ 0.5 − v_n lies well inside
  [-1, 2] and inputs from `random_input` give both bit values in every plane;
- β_n are positive, in [0.25, 1] / N.

`reference_output(expected, x)` computes what the graph computes, in float64 with NumPy, for
checking ONNX Runtime (or a compiled module) against the builder's own numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # the IR version of opset 17; every ONNX Runtime in use reads it
INPUT, OUTPUT = "input", "output"

#: how the conv weight is written in the graph → the matcher's `weight_form` for it
WEIGHT_FORMS = {
    "mul-reducesum": "stacked",  # ReduceSum(Mul(α, B), axes=[0], keepdims=0)
    "reducesum": "folded-stacked",  # ReduceSum(C, axes=[0]) with C = α·B one constant
    "folded": "folded",  # one (O, I, kh, kw) constant Σ α_m B_m
    "scaled": "folded",  # M = 1 without ReduceSum: Mul(α, B_1), α scalar or (O, 1, 1, 1)
    "random": "folded",  # a random float tensor: no exact decomposition (near miss)
}


@dataclass(frozen=True, kw_only=True)
class Expected:
    """The truth behind a built graph (what the matcher should find, or why it should not).

    Arrays are float32. `bases` is ±1 [M, O, I/group, kh, kw] and `alpha` [M, O] (a layer-wise
    α is repeated over O); `weight` is the conv weight the graph computes, Σ_m α_m B_m summed
    in float32 in order m = 1..M (or the random tensor of `miss_random_weight`).
    """

    variant: str
    bases: np.ndarray | None
    alpha: np.ndarray | None
    weight: np.ndarray
    shift: np.ndarray  # v_n [N]
    beta: np.ndarray  # β_n [N]
    act: str  # "bipolar" | "unipolar"
    act_form: str  # "canonical" | "sign"
    clip: bool
    beta_position: str  # "after" | "before"
    weights: str  # a key of WEIGHT_FORMS: how W is written in the graph
    weight_form: str  # the matcher's name for it
    channelwise: bool
    stride: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    input_shape: tuple[int, int, int, int]
    output_shape: tuple[int, int, int, int]
    threshold: float = 0.5
    clip_range: tuple[float, float] = (0.0, 1.0)
    group: int = 1
    dilation: int = 1
    bias: np.ndarray | None = None
    binarised: bool = True
    miss: str | None = None  # near misses: a fragment of the matcher's reason

    @property
    def M(self) -> int:
        return 0 if self.bases is None else int(self.bases.shape[0])

    @property
    def N(self) -> int:
        return int(self.shift.shape[0])

    @property
    def alpha_kind(self) -> str:
        """'channel' for one α per output channel, else 'layer' (the matcher's names)."""
        return "channel" if self.channelwise else "layer"

    @property
    def kernel(self) -> tuple[int, int]:
        return int(self.weight.shape[2]), int(self.weight.shape[3])

    @property
    def n_convs(self) -> int:
        """Conv nodes in the graph (one per activation plane)."""
        return self.N


# -- random values ----------------------------------------------------------------------------

def _pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int | np.integer) else (int(v[0]), int(v[1]))


def _pads(p: int | tuple[int, ...] | list[int]) -> tuple[int, int, int, int]:
    if isinstance(p, int | np.integer):
        return (int(p),) * 4
    p = tuple(int(x) for x in p)
    if len(p) == 2:
        return (p[0], p[1], p[0], p[1])
    if len(p) != 4:
        raise ValueError(f"pads must be an int, (h, w) or (top, left, bottom, right), got {p}")
    return p  # type: ignore[return-value]


def random_bases(rng: np.random.Generator, M: int, shape: tuple[int, ...]) -> np.ndarray:
    """M random ±1 bases of `shape`, stacked [M, *shape] (float32)."""
    return rng.choice(np.array([-1.0, 1.0], np.float32), size=(M, *shape)).astype(np.float32)


def random_alpha(rng: np.random.Generator, M: int, O: int, channelwise: bool) -> np.ndarray:
    """Positive α [M, O], multiples of 1/64 in [1/8, 1]; layer-wise α repeats over O."""
    if channelwise:
        alpha = rng.integers(8, 65, size=(M, O)) / 64.0
        if O > 1 and np.all(alpha == alpha[:, :1]):  # make sure it reads as per channel
            alpha[:, 0] += 1 / 64
    else:
        alpha = np.repeat(rng.integers(8, 65, size=(M, 1)) / 64.0, O, axis=1)
    return alpha.astype(np.float32)


def random_shifts(rng: np.random.Generator, N: int) -> np.ndarray:
    """N shifts v_n spread over about [-0.7, 0.7], distinct, so every plane has both bits."""
    centre = np.linspace(-0.6, 0.6, N) if N > 1 else np.zeros(1)
    return (centre + rng.uniform(-0.1, 0.1, N)).astype(np.float32)


def random_betas(rng: np.random.Generator, N: int) -> np.ndarray:
    """N positive β_n in [0.25, 1] / N."""
    return (rng.uniform(0.25, 1.0, N) / N).astype(np.float32)


def random_input(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A float32 input uniform in [-1, 2] (both sides of every builder's thresholds)."""
    return np.random.default_rng(seed).uniform(-1.0, 2.0, shape).astype(np.float32)


def fold(bases: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Σ_m α_m B_m in float32, accumulated in order m = 1..M ([M, O, ...] and [M, O])."""
    acc = np.zeros(bases.shape[1:], np.float32)
    for m in range(bases.shape[0]):
        scale = alpha[m].reshape(-1, *[1] * (bases.ndim - 2)).astype(np.float32)
        acc = (acc + scale * bases[m]).astype(np.float32)
    return acc


# -- the general builder ----------------------------------------------------------------------

def abc_conv(
    *,
    batch: int = 2,
    in_channels: int = 3,
    out_channels: int = 4,
    height: int = 8,
    width: int = 8,
    kernel: int | tuple[int, int] = 3,
    M: int = 2,
    N: int = 2,
    act: str = "bipolar",
    channelwise: bool = False,
    stride: int | tuple[int, int] = 1,
    pads: int | tuple[int, ...] = 1,
    clip: bool = True,
    act_form: str = "canonical",
    beta_position: str = "after",
    weights: str = "mul-reducesum",
    threshold: float = 0.5,
    clip_range: tuple[float, float] = (0.0, 1.0),
    bias: bool = False,
    group: int = 1,
    dilation: int = 1,
    binarised: bool = True,
    bases: np.ndarray | None = None,
    alpha: np.ndarray | None = None,
    shift: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    seed: int = 0,
    variant: str = "abc_conv",
    miss: str | None = None,
) -> tuple[onnx.ModelProto, Expected]:
    """One ABC convolution Y = Σ_n β_n Conv(A_n(X), Σ_m α_m B_m) with every option open.

    Shape: `batch`, `in_channels`, `out_channels`, `height`, `width`, `kernel`, `stride`,
    `pads` (int, (h, w) or (top, left, bottom, right)), `group`, `dilation`.
    ABC: `M` bases, `N` planes, `act` ("bipolar" | "unipolar"), `channelwise` α.
    Form: `clip` (Clip(S, lo, hi) present, bounds `clip_range`), `act_form` ("canonical":
    GreaterOrEqual/Cast[/Mul/Sub], or "sign": Sign(Sub(H, 0.5))), `beta_position` ("after":
    Mul(Conv(A, W), β), or "before": Conv(Mul(A, β), W)), `weights` (a key of WEIGHT_FORMS).
    Near-miss knobs: `threshold` of GreaterOrEqual, `bias` (a random Conv bias), `binarised`
    (False: A_n = [Clip](Add(X, v_n)), no threshold).
    Values: `bases` [M, O, I/group, kh, kw], `alpha` [M, O], `shift` [N], `beta` [N] override
    the seeded random ones (`seed`). `variant` and `miss` are recorded in the Expected.
    """
    if act not in ("bipolar", "unipolar"):
        raise ValueError(f"act must be 'bipolar' or 'unipolar', got {act!r}")
    if act_form not in ("canonical", "sign"):
        raise ValueError(f"act_form must be 'canonical' or 'sign', got {act_form!r}")
    if act_form == "sign" and act != "bipolar":
        raise ValueError("Sign(Sub(H, 0.5)) is a bipolar form")
    if beta_position not in ("after", "before"):
        raise ValueError(f"beta_position must be 'after' or 'before', got {beta_position!r}")
    if weights not in WEIGHT_FORMS:
        raise ValueError(f"weights must be one of {list(WEIGHT_FORMS)}, got {weights!r}")
    if weights == "scaled" and M != 1:
        raise ValueError("weights='scaled' (no ReduceSum) needs M = 1")
    if in_channels % group or out_channels % group:
        raise ValueError("in_channels and out_channels must be divisible by group")
    rng = np.random.default_rng(seed)
    kh, kw = _pair(kernel)
    sh, sw = _pair(stride)
    pt, pl, pb, pr = _pads(pads)
    O, Ig = out_channels, in_channels // group
    wshape = (O, Ig, kh, kw)

    B = random_bases(rng, M, wshape) if bases is None else np.asarray(bases, np.float32)
    A = random_alpha(rng, M, O, channelwise) if alpha is None else np.asarray(alpha, np.float32)
    v = random_shifts(rng, N) if shift is None else np.asarray(shift, np.float32).reshape(N)
    b = random_betas(rng, N) if beta is None else np.asarray(beta, np.float32).reshape(N)
    if B.shape != (M, *wshape):
        raise ValueError(f"bases must have shape {(M, *wshape)}, got {B.shape}")
    A = np.broadcast_to(A.reshape(M, -1), (M, O)).astype(np.float32)
    bias_v = rng.normal(0.0, 0.5, O).astype(np.float32) if bias else None
    if weights == "random":
        W = rng.normal(0.0, 0.5, wshape).astype(np.float32)
        B_exp, A_exp = None, None
    else:
        W = fold(B, A)
        B_exp, A_exp = B, A

    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: Any) -> str:
        if all(t.name != name for t in inits):
            inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op: str, inputs: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=out.replace(".out", ""), **attrs))
        return out

    # the weight
    alpha5 = A.reshape(M, O, 1, 1, 1) if channelwise else A[:, :1].reshape(M, 1, 1, 1, 1)
    if weights == "mul-reducesum":
        scaled = node("Mul", [const("abc.alpha", alpha5), const("abc.bases", B)], "abc.scaled")
        w_name = node("ReduceSum", [scaled, const("abc.axes", np.array([0], np.int64))],
                      "abc.weight", keepdims=0)
    elif weights == "reducesum":
        stacked = (alpha5 * B).astype(np.float32)
        w_name = node("ReduceSum", [const("abc.stacked", stacked),
                                    const("abc.axes", np.array([0], np.int64))],
                      "abc.weight", keepdims=0)
    elif weights == "scaled":
        a = A[0].reshape(O, 1, 1, 1) if channelwise else np.float32(A[0, 0])
        w_name = node("Mul", [const("abc.alpha", a), const("abc.bases", B[0])], "abc.weight")
    else:  # folded, random
        w_name = const("abc.weight", W)

    conv_attrs = {"kernel_shape": [kh, kw], "strides": [sh, sw], "pads": [pt, pl, pb, pr],
                  "dilations": [dilation, dilation], "group": group}
    conv_in = [w_name] + ([const("abc.bias", bias_v)] if bias_v is not None else [])
    lo, hi = (const("abc.clip_lo", np.float32(clip_range[0])),
              const("abc.clip_hi", np.float32(clip_range[1]))) if clip else ("", "")
    outs = []
    for n in range(N):
        p = f"abc{n}"
        h = node("Add", [INPUT, const(f"{p}.v", np.float32(v[n]))], f"{p}.shifted.out")
        if clip:
            h = node("Clip", [h, lo, hi], f"{p}.clip.out")
        if not binarised:
            a = h
        elif act_form == "sign":
            half = const("abc.half", np.float32(0.5))
            a = node("Sign", [node("Sub", [h, half], f"{p}.centred.out")], f"{p}.sign.out")
        else:
            thr = const("abc.threshold", np.float32(threshold))
            bits = node("GreaterOrEqual", [h, thr], f"{p}.ge.out")
            a = node("Cast", [bits], f"{p}.bits.out", to=TensorProto.FLOAT)
            if act == "bipolar":
                twice = node("Mul", [a, const("abc.two", np.float32(2.0))], f"{p}.twice.out")
                a = node("Sub", [twice, const("abc.one", np.float32(1.0))], f"{p}.pm1.out")
        beta_name = const(f"{p}.beta", np.float32(b[n]))
        if beta_position == "before":
            a = node("Mul", [a, beta_name], f"{p}.scaled.out")
        y = node("Conv", [a, *conv_in], f"{p}.conv.out", **conv_attrs)
        if beta_position == "after":
            y = node("Mul", [y, beta_name], f"{p}.beta_mul.out")
        outs.append(y)
    total = outs[0]
    for n, z in enumerate(outs[1:], start=1):
        total = node("Add", [total, z], f"abc.sum{n}.out")
    nodes[-1].output[0] = OUTPUT  # the last node writes Y

    Hp, Wp = height + pt + pb, width + pl + pr
    Ho = (Hp - ((kh - 1) * dilation + 1)) // sh + 1
    Wo = (Wp - ((kw - 1) * dilation + 1)) // sw + 1
    in_shape, out_shape = (batch, in_channels, height, width), (batch, O, Ho, Wo)
    graph = helper.make_graph(
        nodes, variant, [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, out_shape)], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=IR_VERSION, producer_name="tests/onnx_builders")
    expected = Expected(
        variant=variant, bases=B_exp, alpha=A_exp, weight=W, shift=v, beta=b, act=act,
        act_form=act_form, clip=clip, beta_position=beta_position, weights=weights,
        weight_form=WEIGHT_FORMS[weights], channelwise=channelwise, stride=(sh, sw),
        pads=(pt, pl, pb, pr), input_shape=in_shape, output_shape=out_shape,
        threshold=threshold, clip_range=clip_range, group=group, dilation=dilation,
        bias=bias_v, binarised=binarised, miss=miss,
    )
    return model, expected


def _variant(name: str, fixed: dict[str, Any], options: dict[str, Any],
             defaults: dict[str, Any] | None = None) -> tuple[onnx.ModelProto, Expected]:
    clash = sorted(k for k in set(fixed) & set(options) if options[k] != fixed[k])
    if clash:
        raise TypeError(f"{name}() fixes {', '.join(clash)}: use abc_conv() to change it")
    return abc_conv(**{**(defaults or {}), **options, **fixed, "variant": name})


# -- the contract's variants ------------------------------------------------------------------

def canonical(**options: Any) -> tuple[onnx.ModelProto, Expected]:
    """The canonical form the exporter writes: Clip present, GreaterOrEqual/Cast, bipolar as
    Sub(Mul(I, 2), 1) (or unipolar with act="unipolar"), β after the conv, W as
    ReduceSum(Mul(α, B), axes=[0], keepdims=0). Options: those of `abc_conv`."""
    return _variant("canonical", {"clip": True, "act_form": "canonical",
                                  "beta_position": "after", "weights": "mul-reducesum"}, options)


def without_clip(**options: Any) -> tuple[onnx.ModelProto, Expected]:
    """Canonical, but P_n = GreaterOrEqual(Add(X, v_n), 0.5) with no Clip in between."""
    return _variant("without_clip", {"clip": False, "act_form": "canonical",
                                     "beta_position": "after", "weights": "mul-reducesum"},
                    options)


def sign_bipolar(**options: Any) -> tuple[onnx.ModelProto, Expected]:
    """Bipolar planes written as A_n = Sign(Sub(H_n, 0.5)) (public ABC-Net ports); Clip
    present unless clip=False. Sign(0) = 0 at an exact tie (measure zero on random inputs)."""
    return _variant("sign_bipolar", {"act": "bipolar", "act_form": "sign",
                                     "beta_position": "after", "weights": "mul-reducesum"},
                    options)


def unipolar(**options: Any) -> tuple[onnx.ModelProto, Expected]:
    """Unipolar planes A_n = I_n = Cast(GreaterOrEqual(Clip(Add(X, v_n)), 0.5)), no Mul/Sub."""
    return _variant("unipolar", {"act": "unipolar", "act_form": "canonical",
                                 "beta_position": "after", "weights": "mul-reducesum"}, options)


def beta_before(**options: Any) -> tuple[onnx.ModelProto, Expected]:
    """β applied to the plane before the conv: Y_n = Conv(Mul(A_n, β_n), W)."""
    return _variant("beta_before", {"act_form": "canonical", "beta_position": "before",
                                    "weights": "mul-reducesum"}, options)


def prescaled_weight(**options: Any) -> tuple[onnx.ModelProto, Expected]:
    """W = ReduceSum(C, axes=[0], keepdims=0) with C = α·B one pre-multiplied stacked
    constant [M, O, I, kh, kw] (the matcher's weight_form "folded-stacked")."""
    return _variant("prescaled_weight", {"act_form": "canonical", "beta_position": "after",
                                         "weights": "reducesum"}, options)


def folded_weight(**options: Any) -> tuple[onnx.ModelProto, Expected]:
    """W as one folded (O, I, kh, kw) constant Σ α_m B_m. The matcher decomposes it again;
    a decomposition need not be the builder's, so compare the reconstruction with
    `expected.weight`. Keep M ≤ 3 (at most 2^M ≤ 8 levels) for a decomposable weight."""
    return _variant("folded_weight", {"act_form": "canonical", "beta_position": "after",
                                      "weights": "folded"}, options)


def single_plane(**options: Any) -> tuple[onnx.ModelProto, Expected]:
    """N = 1: one plane, one Conv, one Mul(·, β); no Add chain."""
    return _variant("single_plane", {"N": 1, "act_form": "canonical", "beta_position": "after",
                                     "weights": "mul-reducesum"}, options)


def single_base(**options: Any) -> tuple[onnx.ModelProto, Expected]:
    """M = 1 without ReduceSum: W = Mul(α, B) with B one (O, I, kh, kw) ±1 constant and α a
    scalar (layer) or (O, 1, 1, 1) (channelwise=True); the matcher sees a folded constant."""
    return _variant("single_base", {"M": 1, "act_form": "canonical", "beta_position": "after",
                                    "weights": "scaled"}, options)


VARIANTS: dict[str, Callable[..., tuple[onnx.ModelProto, Expected]]] = {
    f.__name__: f for f in (canonical, without_clip, sign_bipolar, unipolar, beta_before,
                            prescaled_weight, folded_weight, single_plane, single_base)
}


# -- near misses: must stay float -------------------------------------------------------------

def miss_conv_bias(**options: Any) -> tuple[onnx.ModelProto, Expected]:
    """Canonical, but every Conv has a (random) bias input."""
    return _variant("miss_conv_bias", {"bias": True, "miss": "bias"}, options)


def miss_grouped(**options: Any) -> tuple[onnx.ModelProto, Expected]:
    """Canonical, but a grouped conv (group=2 unless given; 4 in and out channels)."""
    return _variant("miss_grouped", {"miss": "grouped conv"}, options,
                    {"group": 2, "in_channels": 4, "out_channels": 4})


def other_threshold(**options: Any) -> tuple[onnx.ModelProto, Expected]:
    """Canonical, but GreaterOrEqual(H, t) with t ≠ 0.5 (0.4 unless given): still binary,
    at its own exact threshold (the matcher's "compare" form)."""
    t = options.pop("threshold", 0.4)
    if t == 0.5:
        raise ValueError("other_threshold needs a threshold other than 0.5")
    return _variant("other_threshold", {"threshold": t}, options)


def miss_constant_bit(**options: Any) -> tuple[onnx.ModelProto, Expected]:
    """Canonical, but Clip(S, 0.6, 1) before GreaterOrEqual(., 0.5): every bit is 1."""
    return _variant("miss_constant_bit", {"clip_range": (0.6, 1.0),
                                          "miss": "does not depend on its input"}, options)


def miss_random_weight(**options: Any) -> tuple[onnx.ModelProto, Expected]:
    """Binarised planes, but the weight is a random float tensor (no exact ±1 decomposition);
    `expected.bases` and `expected.alpha` are None."""
    return _variant("miss_random_weight", {"weights": "random",
                                           "miss": "no exact decomposition"}, options)


def miss_unbinarised(**options: Any) -> tuple[onnx.ModelProto, Expected]:
    """The conv input is Clip(Add(X, v_n), 0, 1) itself: shifted but never thresholded."""
    return _variant("miss_unbinarised", {"binarised": False,
                                         "miss": "not a binarised activation"}, options)


def miss_dilated(**options: Any) -> tuple[onnx.ModelProto, Expected]:
    """Canonical, but a dilated conv (dilation 2 unless given)."""
    return _variant("miss_dilated", {"miss": "dilated"}, options, {"dilation": 2})


NEAR_MISSES: dict[str, Callable[..., tuple[onnx.ModelProto, Expected]]] = {
    f.__name__: f for f in (miss_conv_bias, miss_grouped, miss_constant_bit, miss_random_weight,
                            miss_unbinarised, miss_dilated)
}


# -- what the graph computes ------------------------------------------------------------------

def planes(expected: Expected, x: np.ndarray) -> list[np.ndarray]:
    """The N activation planes A_n exactly as the graph computes them (float32)."""
    x = np.asarray(x, np.float32)
    out = []
    for v in expected.shift:
        h = (x + np.float32(v)).astype(np.float32)
        if expected.clip:
            h = np.clip(h, np.float32(expected.clip_range[0]), np.float32(expected.clip_range[1]))
        if not expected.binarised:
            out.append(h)
        elif expected.act_form == "sign":
            out.append(np.sign((h - np.float32(0.5)).astype(np.float32)))
        else:
            bits = (h >= np.float32(expected.threshold)).astype(np.float32)
            out.append(2 * bits - 1 if expected.act == "bipolar" else bits)
    return out


def conv2d(x: np.ndarray, w: np.ndarray, *, stride: tuple[int, int],
           pads: tuple[int, int, int, int], dilation: int = 1, group: int = 1,
           bias: np.ndarray | None = None) -> np.ndarray:
    """ONNX Conv (NCHW, zero padding) in float64."""
    t, l, b, r = pads
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (0, 0), (t, b), (l, r)))
    O, Ig, kh, kw = w.shape
    win = sliding_window_view(xp, ((kh - 1) * dilation + 1, (kw - 1) * dilation + 1),
                              axis=(2, 3))
    win = win[:, :, :: stride[0], :: stride[1], ::dilation, ::dilation]
    og = O // group
    y = np.concatenate([
        np.einsum("bchwij,ocij->bohw", win[:, g * Ig:(g + 1) * Ig],
                  np.asarray(w[g * og:(g + 1) * og], np.float64))
        for g in range(group)
    ], axis=1)
    return y if bias is None else y + np.asarray(bias, np.float64)[None, :, None, None]


def reference_output(expected: Expected, x: np.ndarray) -> np.ndarray:
    """Y = Σ_n β_n Conv(A_n, W) (with any bias) in float64, from the Expected's numbers."""
    y = np.zeros(expected.output_shape, np.float64)
    bias = (0.0 if expected.bias is None
            else np.asarray(expected.bias, np.float64)[None, :, None, None])
    for a, beta in zip(planes(expected, x), expected.beta, strict=True):
        conv = conv2d(a, expected.weight, stride=expected.stride, pads=expected.pads,
                      dilation=expected.dilation, group=expected.group)
        if expected.beta_position == "after":  # β·(conv + bias)
            y += float(beta) * (conv + bias)
        else:  # Conv(β·A) = β·conv + bias
            y += float(beta) * conv + bias
    return y
