"""Find ABC convolutions in a dataflow graph: the import contract of DESIGN.md, written once.

The matcher works on a small op graph in ONNX's vocabulary. `from_onnx` builds one from an
ONNX model (the exporter's checker uses it); the Relax pass builds one from a Relax function
(`abc_tvm.relay_passes`), so both sides agree on what an ABC block is.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from abc_tvm.floats import least_true_array

MAX_BASES = 8
MAX_LEVELS = 15  # a uniform quantizer of up to 4 bits becomes up to 15 thermometer planes


@dataclass
class Op:
    """One operation: ONNX op type, value names in and out, attributes."""

    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict = field(default_factory=dict)


class Graph:
    """Ops in topological order plus the constant values they may read."""

    def __init__(self, ops: list[Op], consts: dict[str, np.ndarray]) -> None:
        self.ops = ops
        self.consts = consts
        # values a binarizer chain stops at: the outputs of other binary blocks (their β Mul
        # is monotone, but it belongs to the block that computes it)
        self.barriers: set[str] = set()
        self._producer = {o: op for op in ops for o in op.outputs}
        self._consumers: dict[str, list[Op]] = defaultdict(list)
        for op in ops:
            for i in op.inputs:
                self._consumers[i].append(op)

    def producer(self, value: str) -> Op | None:
        return self._producer.get(value)

    def consumers(self, value: str) -> list[Op]:
        return self._consumers.get(value, [])

    def const(self, value: str) -> np.ndarray | None:
        """The value if it is a compile-time constant (folding Mul of two constants)."""
        if value in self.consts:
            return self.consts[value]
        op = self.producer(value)
        if op is not None and op.op == "Mul" and len(op.inputs) == 2:
            a, b = (self.const(i) for i in op.inputs)
            if a is not None and b is not None:
                return np.multiply(a, b, dtype=np.float32)
        return None

    def scalar(self, value: str) -> float | None:
        c = self.const(value)
        if c is None or c.size != 1:
            return None
        return np.float32(c.reshape(()))


# What each binarizer form means, for reports (sign(0) has no binary form: read as +1).
BINARIZERS = {
    "canonical": "ABC: [Clip](X + v) >= 0.5",
    "sign": "sign, sign(0) read as +1",
    "compare": "X compared with a constant",
    "where": "Where(X compared with a constant, ±1)",
    "uniform": "k-level uniform quantizer as thermometer planes",
}


@dataclass
class ABCBlock:
    """One recognised ABC convolution: Y = Σ_n β_n Conv(A_n(X), Σ_m α_m B_m)."""

    name: str
    input: str  # X
    output: str  # Y, the value the rewrite replaces
    act: str  # "bipolar" | "unipolar"
    # "canonical" (the ABC contract's Cast(GreaterOrEqual(H, 0.5))), "sign" (Sign(h), 0 read
    # as +1), "compare" (Cast(Compare(h, t))), "where" (Where(Compare, ±1)), "uniform" (k-level)
    act_form: str
    clip: bool
    beta_position: str  # "after" | "before" the conv
    weight_form: str  # "stacked" | "folded-stacked" | "folded"
    bases: np.ndarray  # float32 ±1 [M, O, I, kh, kw]
    alpha: np.ndarray  # float32 [M, O]
    # float32 [N], or [N, C] per input channel: plane n's bit is X >= thresholds[n(, c)]
    thresholds: np.ndarray
    shift: np.ndarray | None  # float32 [N], v_n, where the model wrote the ABC contract
    beta: np.ndarray  # float32 [N]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    ops: list[str] = field(default_factory=list)
    # input channels whose kernel bit is the complement of the graph's (a negative BatchNorm
    # scale in the binarizer; the bases are negated there): such bits do not OR-pool
    flip: np.ndarray | None = None
    # the activation's value in the padded border: 0 (a conv's zero padding), or ±1 for a
    # bipolar plane padded by `Pad(value=±1)` (Larq's `pad_values=1.0`, QuickNet)
    pad_value: float = 0.0

    @property
    def M(self) -> int:
        return int(self.bases.shape[0])

    @property
    def N(self) -> int:
        return int(self.thresholds.shape[0])

    @property
    def alpha_kind(self) -> str:
        """'layer' when every output channel shares α_m, else 'channel'."""
        return "layer" if np.all(self.alpha == self.alpha[:, :1]) else "channel"

    def summary(self) -> dict:
        O, I, kh, kw = self.bases.shape[1:]
        return {
            "name": self.name, "M": self.M, "N": self.N, "alpha": self.alpha_kind,
            "act": self.act, "act_form": self.act_form, "weight_form": self.weight_form,
            "beta_position": self.beta_position, "in_channels": int(I),
            "out_channels": int(O), "kernel": [int(kh), int(kw)],
            "strides": list(self.strides), "pads": list(self.pads),
            "thresholds": ([float(t) for t in self.thresholds] if self.thresholds.ndim == 1
                           else "per channel"),
            "binarizer": BINARIZERS[self.act_form],
            **({"pad_value": self.pad_value} if self.pad_value else {}),
        }


@dataclass
class Miss:
    """A conv that looked like an ABC candidate but stays float, and why."""

    name: str
    op: str
    reason: str
    error: bool = False  # the model is a malformed ABC export, not merely a float conv


@dataclass
class _Branch:
    conv: Op
    x: str
    act: str
    act_form: str
    clip: bool
    thresholds: list[np.float32]  # one per plane: bit = x >= t
    betas: list[np.float32]  # one per plane: the plane's weight in the sum
    shift: np.float32 | None  # v of the ABC form [Clip](Add(X, v)) >= 0.5, else None
    beta_position: str
    out: str  # Z_n
    ops: list[str]
    flip: np.ndarray | None = None  # input channels whose bits are complemented (see _Chain)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # the conv's and a Pad's before it
    pad_value: float = 0.0  # the border's activation value (see ABCBlock)


class _NoMatch(Exception):
    def __init__(self, reason: str, error: bool = False) -> None:
        super().__init__(reason)
        self.error = error


def _const_operand(g: Graph, op: Op) -> tuple[str, np.float32] | None:
    """For a binary op with one scalar-constant operand: (the other operand, the scalar)."""
    if len(op.inputs) != 2:
        return None
    for i, j in ((1, 0), (0, 1)):
        s = g.scalar(op.inputs[i])
        if s is not None and g.const(op.inputs[j]) is None:
            return op.inputs[j], s
    return None


def per_channel(c: np.ndarray, channels: int) -> np.ndarray | None:
    """A float32 constant that broadcasts over NCHW as one value per channel, as [C]:
    a scalar, [C, 1, 1] / [.., C, 1, 1], or [B, C, H, W] equal over B, H and W (what an
    `expand_as` folds to)."""
    c = np.asarray(c)
    if c.dtype != np.float32:
        return None
    if c.size == 1:
        return np.full(channels, c.reshape(()), np.float32)
    if c.size == channels and c.ndim >= 3 and c.shape[-2:] == (1, 1) and c.shape[-3] == channels:
        return c.reshape(channels).astype(np.float32)
    if c.ndim == 4 and c.shape[1] == channels and np.all(c == c[:1, :, :1, :1]):
        return c[0, :, 0, 0].astype(np.float32)
    return None


def _channel_operand(g: Graph, op: Op, channels: int | None
                     ) -> tuple[str, np.ndarray | np.float32] | None:
    """(other operand, constant) for a binary op with one constant operand that is a scalar,
    or (given `channels`) one value per channel as float32 [C]."""
    co = _const_operand(g, op)
    if co is not None or channels is None or len(op.inputs) != 2:
        return co
    for i, j in ((1, 0), (0, 1)):
        c = g.const(op.inputs[i])
        if c is not None and g.const(op.inputs[j]) is None:
            pc = per_channel(c, channels)
            if pc is not None:
                return op.inputs[j], pc
    return None


def bn_affine(gamma, beta, mean, var, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Inference BatchNorm as (scale, shift) per channel, folded as ONNX Runtime folds it:
    scale = gamma / sqrt(var + eps), shift = beta - mean * scale (float32)."""
    gamma, beta, mean, var = (np.asarray(c, np.float32).reshape(-1)
                              for c in (gamma, beta, mean, var))
    inv_std = np.float32(1.0) / np.sqrt(var + np.float32(eps))
    scale = (inv_std * gamma).astype(np.float32)
    return scale, (beta - mean * scale).astype(np.float32)


def _onnx_batch_norm(g: Graph, op: Op, channels: int | None):
    """(scale, shift) of an inference ONNX BatchNormalization with constant statistics."""
    if channels is None or len(op.inputs) != 5 or op.attrs.get("training_mode", 0):
        return None
    consts = [g.const(i) for i in op.inputs[1:]]
    if any(c is None or np.asarray(c).size != channels for c in consts):
        return None
    return bn_affine(*consts, op.attrs.get("epsilon", 1e-5))


@dataclass
class _Chain:
    """h = f(x) for a chain of float32 ops that never decrease (Add/Sub, positive Mul/Div by
    a scalar or per-channel constant, Clip), walked back from h while each op has no other
    reader; f evaluates on float32 arrays (one value per channel) exactly as the graph."""

    x: str
    steps: list  # callables float32 -> float32, innermost first
    ops: list[str]
    clip: bool = False
    kinds: list[tuple[str, float | None]] = field(default_factory=list)  # outermost first
    per_channel: bool = False  # some step has one constant per channel
    # channels where the chain decreases (a BatchNorm with a negative scale): their bit is
    # the complement of X >= T, which a bipolar block absorbs by negating the weight there
    flip: np.ndarray | None = None

    def abc_shift(self, *outer: tuple[str, float | None]) -> np.float32 | None:
        """v when the chain is `outer` then [Clip](Add(h, v)) (the ABC contract), else None.

        h is X or, where the chain absorbed the ops before the block (a single-reader
        BatchNorm ahead of an N = 1 block), their output: the contract is what the model
        wrote; the thresholds say what the kernel computes."""
        k = self.kinds
        if tuple(k[:len(outer)]) != outer:
            return None
        rest = k[len(outer):]
        if rest and rest[0][0] == "Clip":
            rest = rest[1:]
        return np.float32(rest[0][1]) if rest and rest[0][0] == "Add" and rest[0][1] is not None \
            else None

    def __call__(self, x):
        for f in self.steps:
            x = np.asarray(f(x), np.float32)
        return x


def _monotone(g: Graph, h: str, channels: int | None = None) -> _Chain:
    steps: list = []
    ops: list[str] = []
    clip, kinds, per_ch, flip = False, [], False, None
    while True:
        op = g.producer(h)
        if op is None or len(g.consumers(h)) != 1 or h in g.barriers:
            break
        if op.op == "BatchNormalization" and (bn := _onnx_batch_norm(g, op, channels)):
            scale, shift = bn
            if flip is not None or np.any(scale == 0):
                break  # one BatchNorm per chain; a zero scale makes a constant bit
            steps.append(lambda v, a=scale, b=shift: v * a + b)
            flip = scale < 0
            per_ch = True
            kinds.append(("BatchNormalization", None))
        elif op.op == "Clip":
            lo, hi = op.attrs.get("min", -np.inf), op.attrs.get("max", np.inf)
            if np.isnan(lo) or np.isnan(hi):
                break
            lo, hi = np.float32(lo), np.float32(hi)
            steps.append(lambda v, lo=lo, hi=hi: np.minimum(np.maximum(v, lo), hi))
            clip = True
            kinds.append(("Clip", None))
        elif op.op == "Sign":  # non-decreasing: Larq's ste_sign is Sign(Sign(x) + 0.1)
            steps.append(np.sign)
            kinds.append(("Sign", None))
        elif op.op in ("Add", "Sub", "Mul", "Div") and (
                co := _channel_operand(g, op, channels)):
            c = np.asarray(co[1], np.float32)
            if op.op == "Add":
                steps.append(lambda v, c=c: v + c)
            elif op.op == "Sub" and op.inputs[0] == co[0]:
                steps.append(lambda v, c=c: v - c)
            elif op.op == "Mul" and np.all(c > 0):
                steps.append(lambda v, c=c: v * c)
            elif op.op == "Div" and np.all(c > 0) and op.inputs[0] == co[0]:
                steps.append(lambda v, c=c: v / c)
            else:
                break
            per_ch = per_ch or c.ndim > 0
            kinds.append((op.op, float(c) if c.ndim == 0 else None))
            h = co[0]
            ops.append(op.name)
            continue
        else:
            break
        ops.append(op.name)
        h = op.inputs[0]
    steps.reverse()
    return _Chain(h, steps, ops, clip, kinds, per_ch,
                  flip if flip is not None and flip.any() else None)


def _threshold(chain: _Chain, on, channels: int | None) -> np.ndarray:
    """The least float32 x with on(chain(x)), exactly: one per channel where the chain has
    per-channel constants ([C]), else one ([]). A constant binarizer is no match."""
    n = channels if chain.per_channel else 1
    flip = chain.flip if chain.flip is not None else np.zeros(n, bool)
    t = least_true_array(lambda xs: np.asarray(on(chain(xs)), bool) ^ flip, n)
    if not np.all(np.isfinite(t)):
        raise _NoMatch("binarizer output does not depend on its input (constant bit)")
    return t if chain.per_channel else t[0]


def _constant_plane(chain: _Chain, channels: int | None) -> np.ndarray:
    """Thresholds of a plane whose bit is 1 for every value: -inf (x >= -inf), and NaN
    (never) on a flipped channel, whose negated weight then gives back the same +1 term."""
    if not chain.per_channel:
        return np.float32(-np.inf)
    t = np.full(channels, -np.inf, np.float32)
    if chain.flip is not None:
        t[chain.flip] = np.nan
    return t


_COMPARE = {"GreaterOrEqual": (np.greater_equal, True), "Greater": (np.greater, True),
            "Less": (np.less, False), "LessOrEqual": (np.less_equal, False)}


def _bit(g: Graph, cond: str, ops: list[str],
         channels: int | None) -> tuple[_Chain, object, bool, np.float32]:
    """cond = Compare(h, t): (chain of h, predicate of h that is the bit's 1, whether the
    compare is the 1 (GreaterOrEqual/Greater) or the 0 (Less/LessOrEqual), t)."""
    op = g.producer(cond)
    if op is None or op.op not in _COMPARE or g.scalar(op.inputs[1]) is None:
        raise _NoMatch("activation bits are not GreaterOrEqual(H, threshold)")
    t = np.float32(g.scalar(op.inputs[1]))
    fn, rising = _COMPARE[op.op]
    ops.append(op.name)
    chain = _monotone(g, op.inputs[0], channels)
    pred = (lambda h: fn(h, t)) if rising else (lambda h: np.logical_not(fn(h, t)))
    return chain, pred, rising, t


def _uniform(g: Graph, rnd: Op, w: np.float32, ops: list[str], channels: int | None):
    """A uniform quantizer w * Round(h) with Round(h) spanning 0..L (DoReFa, an unsigned
    QONNX Quant: L unipolar planes Round(h) >= j of weight w), -L..L (a signed narrow
    Quant: 2L bipolar planes Round(h) >= j of weight w/2, whose ±1 sum is 2 Round(h)) or
    -L-1..L (signed, full range: those 2L+1 planes sum to 2 Round(h) + 1, and one constant
    +1 plane of weight -w/2 takes the 1 off; it is 0 in the zero padding, as it must be)."""
    chain = _monotone(g, rnd.inputs[0], channels)
    at = [np.round(chain(np.full(channels or 1, v, np.float32))) for v in (-np.inf, np.inf)]
    ends = [np.minimum(*at), np.maximum(*at)]  # a decreasing (flipped) channel swaps them
    if not all(np.all(e == e.flat[0]) for e in ends):
        raise _NoMatch("uniform quantizer spans different levels per channel")
    lo, hi = (float(e.flat[0]) for e in ends)
    if not np.isfinite(hi) or not np.isfinite(lo) or hi < 1 or lo not in (0, -hi, -hi - 1) \
            or (hi - lo) > MAX_LEVELS:
        raise _NoMatch(f"uniform quantizer spans levels {lo:g}..{hi:g}: binary planes need "
                       f"0..L, -L..L or -L-1..L with at most {MAX_LEVELS} steps")
    ops.append(rnd.name)
    if lo == 0:
        planes = [(lambda h, j=j: np.round(h) >= j, w) for j in range(1, int(hi) + 1)]
        return chain, planes, "unipolar", "uniform"
    half = np.float32(w / np.float32(2))
    planes = [(lambda h, j=j: np.round(h) >= j, half) for j in range(int(lo) + 1, int(hi) + 1)]
    if lo == -hi - 1:  # the planes' ±1 sum is 2 Round(h) + 1: a constant plane takes the 1
        planes.append((None, -half))
    return chain, planes, "bipolar", "uniform"


def _plane(g: Graph, a: str, ops: list[str], channels: int | None = None):
    """Walk back from a conv's data input to X: (chain, [(on-predicate, plane weight)], act,
    act_form). Forms: Sign(h) (sign(0) read as +1), Cast(Compare(h, t)) (unipolar),
    Sub(Mul(Cast(..), 2), 1) and Where(Compare, ±1, ∓1) (bipolar), Where(Compare, 1, 0),
    and k-level uniform Div(Round(h), k), Mul(Round(h), s) or Round(h) (`_uniform`)."""
    op = g.producer(a)
    if op is None:
        raise _NoMatch("conv input is not a binarised activation")
    if op.op == "Sign":
        ops.append(op.name)
        return _monotone(g, op.inputs[0], channels), [(lambda h: h >= 0, np.float32(1))], \
            "bipolar", "sign"
    if op.op == "Round":
        return _uniform(g, op, np.float32(1), ops, channels)
    if op.op in ("Div", "Mul") and (co := _const_operand(g, op)) is not None \
            and g.producer(co[0]) is not None and g.producer(co[0]).op == "Round":
        w = np.float32(np.float32(1) / np.float32(co[1])) if op.op == "Div" \
            else np.float32(co[1])
        ops.append(op.name)
        return _uniform(g, g.producer(co[0]), w, ops, channels)
    if op.op == "Where":
        c1, c0 = g.scalar(op.inputs[1]), g.scalar(op.inputs[2])
        if (c1, c0) not in ((1, -1), (-1, 1), (1, 0), (0, 1)):
            raise _NoMatch("Where does not select constant ±1 or 1/0")
        ops.append(op.name)
        chain, pred, _, _ = _bit(g, op.inputs[0], ops, channels)
        one = pred if c1 == 1 else (lambda h: np.logical_not(pred(h)))
        return chain, [(one, np.float32(1))], "bipolar" if -1 in (c1, c0) else "unipolar", \
            "where"
    act, form = "unipolar", "compare"
    if op.op == "Sub":
        mul = g.producer(op.inputs[0])
        is_mul = mul is not None and mul.op == "Mul" and g.scalar(op.inputs[1]) == 1.0
        mco = _const_operand(g, mul) if is_mul else None
        if mco is None or mco[1] != 2.0:
            raise _NoMatch("bipolar form must be Sub(Mul(I, 2), 1)")
        ops += [op.name, mul.name]
        act, op = "bipolar", g.producer(mco[0])
    if op is None or op.op != "Cast" or op.attrs.get("to") != onnx.TensorProto.FLOAT:
        raise _NoMatch("conv input is not a binarised activation")
    ops.append(op.name)
    chain, pred, rising, t = _bit(g, op.inputs[0], ops, channels)
    if rising and t == 0.5 and chain.abc_shift() is not None:
        form = "canonical"
    return chain, [(pred, np.float32(1))], act, form


def _in_channels(g: Graph, conv: Op) -> int | None:
    """The conv's input channels from its (constant or stacked-constant) weight."""
    w = g.const(conv.inputs[1]) if len(conv.inputs) > 1 else None
    if w is not None and w.ndim == 4:
        return int(w.shape[1])
    op = g.producer(conv.inputs[1]) if len(conv.inputs) > 1 else None
    s = g.const(op.inputs[0]) if op is not None and op.op == "ReduceSum" else None
    return int(s.shape[2]) if s is not None and s.ndim == 5 else None


def _branch(g: Graph, conv: Op) -> _Branch:
    """Match one Conv of a binary block, with its β before or after."""
    ops = [conv.name]
    a = conv.inputs[0]
    padded = _pad_before(g, a)
    if padded is not None:
        a, extra, value = padded
        ops.append(g.producer(conv.inputs[0]).name)
    beta, position = np.float32(1.0), "after"
    pre = g.producer(a)
    if pre is not None and pre.op == "Mul" and (co := _const_operand(g, pre)) is not None:
        a, beta, position = co[0], co[1], "before"
        ops.append(pre.name)
    channels = _in_channels(g, conv)
    # the activation first: a float conv says so, whatever its attributes
    chain, planes, act, form = _plane(g, a, ops, channels)
    if len(conv.inputs) > 2 and conv.inputs[2]:
        raise _NoMatch("conv has a bias")
    if conv.attrs.get("group", 1) != 1:
        raise _NoMatch(f"grouped conv (group={conv.attrs['group']})")
    if any(d != 1 for d in conv.attrs.get("dilations", [1, 1])):
        raise _NoMatch(f"dilated conv {conv.attrs['dilations']}")
    if conv.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID", b"NOTSET", b"VALID"):
        raise _NoMatch("auto_pad SAME is not supported")
    if len(conv.attrs.get("strides", [1, 1])) != 2:
        raise _NoMatch("not a 2-D conv")
    if chain.flip is not None and act != "bipolar":
        raise _NoMatch("a BatchNorm with a negative scale before a unipolar binarizer")
    ops += chain.ops
    pads, border = _conv_pads(conv), 0.0
    if padded is not None:
        if value != 0 and any(pads):
            raise _NoMatch(f"Pad(value={value:g}) before a conv with its own zero padding: "
                           "two borders")
        if value != 0:
            # the border is the plane's value there: ±1 (times β where β comes before)
            border = float(np.float32(value) / beta) if position == "before" else value
            if act != "bipolar" or len(planes) != 1 or border not in (1.0, -1.0) \
                    or chain.flip is not None:
                raise _NoMatch(f"Pad(value={value:g}) before a {act} binary conv: only 0, or "
                               "±1 around one bipolar plane (no BatchNorm sign flips), is a "
                               "border the kernels keep")
        pads = tuple(p + q for p, q in zip(pads, extra, strict=True))
    thresholds = [_threshold(chain, on, channels) if on is not None
                  else _constant_plane(chain, channels) for on, _ in planes]
    out = conv.outputs[0]
    users = g.consumers(out)
    if position == "after" and len(users) == 1 and users[0].op == "Mul":
        co = _const_operand(g, users[0])
        if co is not None:
            beta, out = co[1], users[0].outputs[0]
            ops.append(users[0].name)
    betas = [np.float32(w * beta) if w != 1 else np.float32(beta) for _, w in planes]
    shift = (chain.abc_shift() if form == "canonical" else
             chain.abc_shift(("Sub", 0.5)) if form == "sign" else None)
    return _Branch(conv, chain.x, act, form, chain.clip, thresholds, betas, shift, position,
                   out, ops, chain.flip, pads, border)


def _conv_pads(conv: Op) -> tuple[int, int, int, int]:
    """The conv's own padding as (top, left, bottom, right)."""
    if conv.attrs.get("auto_pad") in ("VALID", b"VALID"):
        return (0, 0, 0, 0)
    pads = list(conv.attrs.get("pads", [0, 0, 0, 0]))
    return (int(pads[0]), int(pads[1]), int(pads[2]), int(pads[3]))


def _pad_before(g: Graph, a: str) -> tuple[str, tuple[int, int, int, int], float] | None:
    """A constant-mode Pad of the spatial axes alone that only the conv reads: (its input,
    its pads as (top, left, bottom, right), its value). Larq pads with 1.0 after the sign
    (`pad_values=1.0`), Keras' ZeroPadding2D with 0."""
    op = g.producer(a)
    if op is None or op.op != "Pad" or len(g.consumers(a)) != 1:
        return None
    if op.attrs.get("mode", "constant") != "constant" or (len(op.inputs) > 3 and op.inputs[3]):
        return None
    pads = g.const(op.inputs[1]) if len(op.inputs) > 1 and op.inputs[1] else op.attrs.get("pads")
    value = g.scalar(op.inputs[2]) if len(op.inputs) > 2 and op.inputs[2] else \
        np.float32(op.attrs.get("value", 0.0))
    if pads is None or value is None or np.size(pads) != 8:
        return None
    p = [int(v) for v in np.asarray(pads).reshape(-1)]
    if any(v < 0 for v in p) or p[0] or p[1] or p[4] or p[5]:
        return None  # negative pads crop; batch or channel pads change the shape
    return op.inputs[0], (p[2], p[3], p[6], p[7]), float(value)


def _levels(w: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Thermometer decomposition of a tensor with few distinct values into bases and α.

    Sorted symmetric levels L_0 < … < L_M give α_m = (L_{m+1} − L_m)/2 and
    B_m = +1 where W ≥ L_{m+1}; a missing mirror level is added so that L_0 = −L_M.
    """
    vals = np.unique(w)
    if len(vals) > MAX_BASES + 1:
        return None
    top = max(abs(float(vals[0])), abs(float(vals[-1])))
    levels = np.unique(np.concatenate([vals.astype(np.float64), [-top, top]]))
    if top == 0 or len(levels) - 1 > MAX_BASES:
        return None
    alpha = ((levels[1:] - levels[:-1]) / 2).astype(np.float32)
    bases = np.stack([np.where(w >= lv, 1.0, -1.0) for lv in levels[1:]]).astype(np.float32)
    return bases, alpha


def weight_of(bases: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Σ_m α_m B_m in float32, accumulated in order m = 1..M ([M, O, ...] and [M, O])."""
    acc = np.zeros(bases.shape[1:], np.float32)
    for m in range(bases.shape[0]):
        acc = acc + (alpha[m].reshape(-1, *[1] * (bases.ndim - 2)) * bases[m]).astype(np.float32)
    return acc


def _reconstructs(w: np.ndarray, bases: np.ndarray, alpha: np.ndarray) -> bool:
    """Σ_m α_m B_m in float32, in order, equals W bit for bit."""
    acc = weight_of(bases, alpha)
    return bool(np.array_equal(acc.view(np.uint32), w.astype(np.float32).view(np.uint32))
                or np.array_equal(acc, w))


def _signed_sums(w: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """W = Σ_m α_m B_m from W's distinct values, when they are all 2^M sums ±α_1 ± … ± α_M.

    That is what an ABC weight folded into one constant looks like. The two largest sums
    differ by 2·α_min; pairing every value l with l − 2·α_min leaves the 2^(M−1) sums of the
    other α, and so on. M bases come back where the thermometer decomposition needs up to
    2^M − 1. None if the values are not such a set (some sums missing or coinciding).
    """
    levels = np.unique(w.astype(np.float64))
    if len(levels) > 2 ** MAX_BASES:
        return None
    alphas: list[float] = []
    cur = levels
    while len(cur) > 1:
        if len(cur) % 2:
            return None
        a = (cur[-1] - cur[-2]) / 2
        tol = 1e-6 * max(abs(cur[-1]), abs(cur[0]))
        if a <= tol:
            return None
        left, mids = list(cur), []
        while left:  # the largest value left is some x + a: its partner x − a must be there
            high = left.pop()
            j = int(np.argmin(np.abs(np.asarray(left) - (high - 2 * a)))) if left else -1
            if j < 0 or abs(left[j] - (high - 2 * a)) > tol:
                return None
            left.pop(j)
            mids.append(high - a)
        alphas.append(a)
        cur = np.asarray(sorted(mids))
    if len(cur) != 1 or abs(cur[0]) > 1e-6 * max(abs(levels[-1]), 1e-30):
        return None
    alpha = np.asarray(sorted(alphas, reverse=True))
    signs = np.array(np.meshgrid(*[[-1.0, 1.0]] * len(alpha), indexing="ij")).reshape(
        len(alpha), -1)  # every sign pattern, one per column
    sums = alpha @ signs
    pick = np.abs(w.reshape(-1, 1).astype(np.float64) - sums[None, :]).argmin(axis=1)
    bases = signs[:, pick].reshape(len(alpha), *w.shape)
    return bases.astype(np.float32), alpha.astype(np.float32)


def _per_channel(w: np.ndarray, split) -> tuple[np.ndarray, np.ndarray] | None:
    """`split` applied to each output channel; channels with fewer bases get α = 0."""
    per = [split(w[o]) for o in range(w.shape[0])]
    if any(p is None for p in per):
        return None
    M = max(p[1].shape[0] for p in per)  # noqa: N806
    if M > MAX_BASES:
        return None
    bases = np.ones((M, *w.shape), np.float32)
    alpha = np.zeros((M, w.shape[0]), np.float32)
    for o, (b, a) in enumerate(per):
        bases[: b.shape[0], o], alpha[: a.shape[0], o] = b, a
    return bases, alpha


def _layer_wise(w: np.ndarray, split) -> tuple[np.ndarray, np.ndarray] | None:
    """`split` applied to the whole weight: one α set, repeated over output channels."""
    got = split(w)
    if got is None:
        return None
    return got[0], np.repeat(got[1][:, None], w.shape[0], axis=1)


def decompose_folded(w: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Exact decomposition of one folded (O, I, kh, kw) weight into the fewest bases, or None.

    Candidates: the greedy signed-sum and the thermometer decompositions, each with one α
    set for the layer or one per output channel. Only those whose float32 reconstruction
    Σ α_m B_m is bit-exact count; the one with the fewest bases (less binary work) wins,
    layer-wise α on a tie.
    """
    w = w.astype(np.float32)
    found = []
    for split in (_signed_sums, _levels):
        for scope in (_layer_wise, _per_channel):
            got = scope(w, split)
            if got is not None and got[0].shape[0] <= MAX_BASES and _reconstructs(w, *got):
                found.append(got)
    return min(found, key=lambda c: c[0].shape[0]) if found else None


def _split_stacked(s: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Stacked α_m·B_m slices [M, O, I, kh, kw] → exact ±1 bases and α [M, O]."""
    if s.shape[0] > MAX_BASES:
        return None
    mag = np.abs(s).reshape(s.shape[0], s.shape[1], -1)
    if not np.all(mag == mag[..., :1]):
        return None
    alpha = mag[..., 0].astype(np.float32)
    bases = np.where(s >= 0, 1.0, -1.0).astype(np.float32)
    return bases, alpha


def _mul_operands(g: Graph, mul: Op,
                  shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """Mul(α, B) as the graph writes it: the ±1 operand is B, the other α ([M|1, O|1, 1, 1,
    1] after broadcasting). Reading them, rather than splitting the product, keeps the
    graph's own bases where an α_m is negative."""
    consts = [g.const(i) for i in mul.inputs]
    if len(consts) != 2 or any(c is None for c in consts):
        return None
    M, O = shape[:2]  # noqa: N806
    for b, a in (consts, consts[::-1]):
        if b.shape != tuple(shape) or not np.all(np.abs(b) == 1) or a.ndim > 5:
            continue
        a5 = a.reshape((1,) * (5 - a.ndim) + a.shape)
        if a5.shape[0] in (1, M) and a5.shape[1] in (1, O) and all(d == 1 for d in a5.shape[2:]):
            alpha = np.broadcast_to(a5[:, :, 0, 0, 0], (M, O)).astype(np.float32)
            return b.astype(np.float32), np.ascontiguousarray(alpha)
    return None


def _weights(g: Graph, w: str) -> tuple[np.ndarray, np.ndarray, str, list[str]]:
    """The conv weight as (bases ±1 [M,O,I,kh,kw], α [M,O], form, ops computing it)."""
    op = g.producer(w)
    if op is not None and op.op == "ReduceSum":
        axes = op.attrs.get("axes")
        if axes is None and len(op.inputs) > 1 and op.inputs[1]:
            c = g.const(op.inputs[1])
            axes = None if c is None else [int(a) for a in c.reshape(-1)]
        s = g.const(op.inputs[0])
        if s is None or s.ndim != 5 or list(axes or []) != [0] or op.attrs.get("keepdims", 1):
            raise _NoMatch("weight ReduceSum is not over axis 0 of constant stacked bases")
        mul = g.producer(op.inputs[0])
        if mul is not None and mul.op == "Mul":
            big = max((g.const(i) for i in mul.inputs), key=lambda c: c.size)
            if big.ndim == 5 and not np.all(np.abs(big) == 1):
                bad = big[np.abs(big) != 1].reshape(-1)[:3].tolist()
                raise _NoMatch(f"ABC bases must be exactly ±1, found values such as {bad}",
                               error=True)
        is_mul = mul is not None and mul.op == "Mul"
        split = (_mul_operands(g, mul, s.shape) if is_mul else None) or _split_stacked(s)
        if split is None:
            raise _NoMatch("stacked weight slices are not α_m·(±1) bases (or M > 8)")
        ops = [op.name] + ([mul.name] if is_mul else [])
        return split[0], split[1], "stacked" if is_mul else "folded-stacked", ops
    c = g.const(w)
    if c is None:
        raise _NoMatch("weight is not a compile-time constant")
    if c.ndim != 4:
        raise _NoMatch("not a 2-D conv weight")
    dec = decompose_folded(c)
    if dec is None:
        raise _NoMatch("folded weight has no exact decomposition into ≤ 8 ±1 bases")
    return dec[0], dec[1], "folded", [op.name] if op is not None else []


def _is_sum_of(g: Graph, value: str, leaves: dict[str, _Branch]) -> bool:
    """`value` is a branch output, or a single-use Add/Sum of such values."""
    if value in leaves:
        return True
    op = g.producer(value)
    return (op is not None and op.op in ("Add", "Sum") and len(g.consumers(value)) == 1
            and all(_is_sum_of(g, i, leaves) for i in op.inputs))


def _add_tree(g: Graph, value: str, leaves: dict[str, _Branch]) -> tuple[str, list[str]]:
    """Climb the Add/Sum ops whose operands are all sums of branch outputs: Y = Z_1 + … + Z_N."""
    ops: list[str] = []
    while True:
        users = g.consumers(value)
        if len(users) != 1 or users[0].op not in ("Add", "Sum"):
            return value, ops
        if not all(_is_sum_of(g, i, leaves) for i in users[0].inputs):
            return value, ops
        ops.append(users[0].name)
        value = users[0].outputs[0]


def _weight_key(g: Graph, w: str) -> object:
    """What makes two convs' weights the same: the value itself, or for constants their
    contents (an importer may give each conv of a block its own copy of the weight)."""
    c = g.const(w)
    return w if c is None else (c.shape, c.dtype.str, c.tobytes())


def _branches(g: Graph) -> tuple[dict[str, _Branch], list[Miss]]:
    """Every conv matched as one branch of a binary block (by its output), and the misses."""
    branches: dict[str, _Branch] = {}
    misses: list[Miss] = []
    for op in g.ops:
        if op.op != "Conv":
            continue
        try:
            branches[op.outputs[0]] = _branch(g, op)
        except _NoMatch as e:
            misses.append(Miss(op.name, op.op, str(e)))
    return branches, misses


def find_abc_blocks(g: Graph) -> tuple[list[ABCBlock], list[Miss]]:
    """Every ABC block of the graph, and the convs that stay float with the reason."""
    branches, misses = _branches(g)
    outs = {b.out for b in branches.values()}
    ends = {b.out: g.producer(b.out).name for b in branches.values()}
    if any(set(b.ops) & (set(ends.values()) - {ends[b.out]}) for b in branches.values()):
        # a chain walked into another block's output (its β Mul): match again, stopping there
        g.barriers = outs
        branches, misses = _branches(g)
    by_out = {b.out: b for b in branches.values()}
    keys = {b.out: (b.x, _weight_key(g, b.conv.inputs[1]), b.act, b.act_form, b.beta_position)
            for b in branches.values()}
    blocks: list[ABCBlock] = []
    taken: set[str] = set()
    for b in branches.values():
        if b.out in taken:
            continue
        same = {o: br for o, br in by_out.items() if o not in taken and keys[o] == keys[b.out]}
        root, add_ops = _add_tree(g, b.out, same)
        members = _leaves(g, root, same) if add_ops else [b]
        if any(m.conv.attrs != b.conv.attrs or (m.pads, m.pad_value) != (b.pads, b.pad_value)
               for m in members):
            for m in members:
                misses.append(Miss(m.conv.name, "Conv", "summed branches differ in conv attrs"))
                taken.add(m.out)
            continue
        flips = {None if m.flip is None else m.flip.tobytes() for m in members}
        if len(flips) > 1:
            for m in members:
                misses.append(Miss(m.conv.name, "Conv", "summed branches differ in BatchNorm "
                                                        "signs"))
                taken.add(m.out)
            continue
        try:
            bases, alpha, form, weight_ops = _weights(g, b.conv.inputs[1])
            if b.flip is not None:  # -A' on a flipped channel: the weight's sign absorbs it
                bases = bases.copy()
                bases[:, :, b.flip] *= -1
        except _NoMatch as e:
            for m in members:
                misses.append(Miss(m.conv.name, "Conv", str(e), e.error))
                taken.add(m.out)
            continue
        taken.update(m.out for m in members)
        pads = b.pads
        blocks.append(ABCBlock(
            name=b.conv.name, input=b.x, output=root, act=b.act, act_form=b.act_form,
            clip=all(m.clip for m in members), beta_position=b.beta_position,
            weight_form=form, bases=bases, alpha=alpha,
            thresholds=_stack_thresholds([t for m in members for t in m.thresholds]),
            shift=(np.array([m.shift for m in members], np.float32)
                   if all(m.shift is not None for m in members) else None),
            beta=np.array([bt for m in members for bt in m.betas], np.float32),
            strides=tuple(b.conv.attrs.get("strides", [1, 1])),
            pads=(pads[0], pads[1], pads[2], pads[3]),
            ops=[o for m in members for o in m.ops] + add_ops + weight_ops, flip=b.flip,
            pad_value=b.pad_value,
        ))
    return blocks, misses


def _stack_thresholds(ts: list[np.ndarray]) -> np.ndarray:
    """Planes' thresholds as [N] (one per plane), or [N, C] where any plane's is per channel."""
    width = max((np.size(t) for t in ts if np.ndim(t) == 1), default=0)
    if not width:
        return np.array(ts, np.float32)
    return np.stack([np.broadcast_to(np.asarray(t, np.float32), (width,)) for t in ts])


def _leaves(g: Graph, root: str, branches: dict[str, _Branch]) -> list[_Branch]:
    """The branches summed into `root`, in graph order."""
    if root in branches:
        return [branches[root]]
    op = g.producer(root)
    assert op is not None
    return [b for i in op.inputs for b in _leaves(g, i, branches)]


# -- ONNX adapter -------------------------------------------------------------------------------

def _onnx_attrs(node: onnx.NodeProto) -> dict:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}


def from_onnx(model: onnx.ModelProto) -> Graph:
    """An op graph of an ONNX model; Constant, Identity and Cast of constants are folded."""
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    ops: list[Op] = []
    for i, node in enumerate(model.graph.node):
        attrs = _onnx_attrs(node)
        name = node.name or f"{node.op_type}_{i}"
        if node.op_type == "Constant" and "value" in attrs:
            consts[node.output[0]] = numpy_helper.to_array(attrs["value"])
            continue
        if node.op_type in ("Identity", "Cast") and node.input[0] in consts:
            val = consts[node.input[0]]
            if node.op_type == "Cast":
                val = val.astype(onnx.helper.tensor_dtype_to_np_dtype(attrs["to"]))
            consts[node.output[0]] = val
            continue
        if node.op_type == "Clip":
            # opset ≥ 11 gives the bounds as inputs; keep them as attributes like opset 6
            for j, key in ((1, "min"), (2, "max")):
                if len(node.input) > j and node.input[j]:
                    c = consts.get(node.input[j])
                    attrs[key] = float(c) if c is not None else np.nan
        ops.append(Op(name, node.op_type, list(node.input), list(node.output), attrs))
    return Graph(ops, consts)


def check_canonical(model: onnx.ModelProto) -> list[ABCBlock]:
    """The ABC blocks of an exported model, asserting each is in the canonical form.

    Raises ValueError naming the first block (or conv) that is not canonical.
    """
    blocks, misses = find_abc_blocks(from_onnx(model))
    if not blocks:
        detail = "; ".join(f"{m.name}: {m.reason}" for m in misses) or "no Conv at all"
        raise ValueError(f"no ABC convolution found ({detail})")
    for b in blocks:
        if not (b.clip and b.act_form == "canonical" and b.beta_position == "after"
                and b.weight_form == "stacked"):
            raise ValueError(f"ABC block {b.name} is not canonical: {b.summary()}")
    return blocks
