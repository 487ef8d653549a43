"""Small ABC networks written with onnx.helper, one ABC block form at a time.

`Net` tracks the NCHW shape of every value it builds and counts the ABC convs it wrote,
so a test can assert that each of them became a binary kernel. `BlockForm` names every
documented way of writing one ABC conv (docs/onnx-contract.md): the binarizer, the
weight, β's position, the kernel; the regression tests and the hypothesis sweep
(tests/test_forms.py) both build from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx_builders import IR_VERSION, OPSET, fold, random_alpha, random_bases

# Binarizers of one plane, each a documented form (bipolar forms end in ±1, unipolar 0/1):
#   canonical  Cast(GreaterOrEqual(Clip(X + v, 0, 1), 0.5))       the ABC contract
#   no-clip    Cast(GreaterOrEqual(X + v, 0.5))
#   sign       Sign(Clip(X + v, 0, 1) - 0.5)                       bipolar only
#   where      Where(GreaterOrEqual(Clip(X + v, 0, 1), 0.5), 1, -1 | 0)
#   compare    Cast(Greater(X + v, 0.5))
BINARIZERS = ("canonical", "no-clip", "sign", "where", "compare")
# Weights: stacked ReduceSum(Mul(α, B)), folded-stacked ReduceSum(α·B), folded Σ α_m B_m
WEIGHTS = ("stacked", "folded-stacked", "folded")


@dataclass(frozen=True)
class BlockForm:
    """One ABC conv: Y = Σ_n β_n Conv(A_n(X), Σ_m α_m B_m), written in one form."""

    M: int = 2
    N: int = 1
    channelwise: bool = False
    act: str = "bipolar"  # "bipolar" | "unipolar"
    binarizer: str = "canonical"
    weights: str = "stacked"
    beta: str = "after"  # "after" | "before" the conv
    kernel: int = 3
    stride: int = 1
    pad: int | None = None  # None: kernel // 2

    def __post_init__(self) -> None:
        if self.binarizer not in BINARIZERS:
            raise ValueError(f"binarizer {self.binarizer!r} not in {BINARIZERS}")
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights {self.weights!r} not in {WEIGHTS}")
        if self.binarizer == "sign" and self.act != "bipolar":
            raise ValueError("the sign binarizer is bipolar")

    @property
    def padding(self) -> int:
        return self.kernel // 2 if self.pad is None else self.pad


@dataclass
class Net:
    """An ONNX graph under construction: `x` is its input; every method returns a value."""

    batch: int = 2
    channels: int = 8
    size: int = 9
    seed: int = 0
    x: str = "x"
    abc_convs: int = 0  # ABC convs written (a block of N planes has N)
    abc_blocks: int = 0
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    _nodes: list = field(default_factory=list)
    _inits: list = field(default_factory=list)
    _n: int = 0

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.shapes[self.x] = (self.batch, self.channels, self.size, self.size)

    # -- plumbing ------------------------------------------------------------------------
    def _name(self, stem: str) -> str:
        self._n += 1
        return f"{stem}{self._n}"

    def const(self, value: Any, stem: str = "c") -> str:
        name = self._name(stem)
        self._inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def f32(self, v: float, stem: str = "c") -> str:
        return self.const(np.float32(v), stem)

    def node(self, op: str, inputs: list[str], shape: tuple[int, ...] | None = None,
             **attrs: Any) -> str:
        out = self._name(op.lower())
        self._nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        if shape is not None:
            self.shapes[out] = shape
        elif inputs and inputs[0] in self.shapes:
            self.shapes[out] = self.shapes[inputs[0]]
        return out

    def model(self, out: str) -> onnx.ModelProto:
        g = helper.make_graph(
            self._nodes, "abc_net",
            [helper.make_tensor_value_info(self.x, TensorProto.FLOAT, self.shapes[self.x])],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, self.shapes[out])],
            self._inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=IR_VERSION, producer_name="tests/abc_nets")
        onnx.checker.check_model(m, full_check=True)
        return m

    def input(self) -> np.ndarray:
        """A seeded input in the binarizers' working range (around 0.5 - v)."""
        return np.random.default_rng(self.seed + 1).uniform(
            -0.5, 1.5, self.shapes[self.x]).astype(np.float32)

    def _conv_shape(self, x: str, cout: int, k: int, stride: int, pad: int) -> tuple:
        b, _, h, w = self.shapes[x]
        return (b, cout, (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1)

    # -- float layers --------------------------------------------------------------------
    def conv(self, x: str, cout: int, k: int = 3, stride: int = 1,
             pad: int | None = None) -> str:
        """A float conv with bias."""
        cin, pad = self.shapes[x][1], k // 2 if pad is None else pad
        w = self.rng.normal(0, 1 / np.sqrt(cin * k * k), (cout, cin, k, k)).astype(np.float32)
        b = self.rng.normal(0, 0.1, cout).astype(np.float32)
        return self.node("Conv", [x, self.const(w, "w"), self.const(b, "b")],
                         self._conv_shape(x, cout, k, stride, pad), kernel_shape=[k, k],
                         strides=[stride, stride], pads=[pad] * 4)

    def bn(self, x: str, negative: bool = False) -> str:
        """Inference BatchNorm with non-trivial statistics (some scales < 0 if asked)."""
        c = self.shapes[x][1]
        gamma = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
        if negative:
            gamma[::3] *= -1
        beta = self.rng.normal(0.3, 0.2, c).astype(np.float32)
        mean = self.rng.normal(0, 0.2, c).astype(np.float32)
        var = self.rng.uniform(0.5, 2.0, c).astype(np.float32)
        return self.node("BatchNormalization",
                         [x] + [self.const(a, "bn") for a in (gamma, beta, mean, var)],
                         epsilon=1e-5)

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])

    def add(self, a: str, b: str) -> str:
        assert self.shapes[a] == self.shapes[b], (self.shapes[a], self.shapes[b])
        return self.node("Add", [a, b])

    # -- the ABC block -------------------------------------------------------------------
    def _binarize(self, x: str, v: float, f: BlockForm) -> str:
        h = self.node("Add", [x, self.f32(v, "v")])
        if f.binarizer == "compare":
            bit = self.node("Greater", [h, self.f32(0.5)])
        else:
            if f.binarizer != "no-clip":
                h = self.node("Clip", [h, self.f32(0.0), self.f32(1.0)])
            if f.binarizer == "sign":
                return self.node("Sign", [self.node("Sub", [h, self.f32(0.5)])])
            bit = self.node("GreaterOrEqual", [h, self.f32(0.5)])
        if f.binarizer == "where":
            return self.node("Where", [bit, self.f32(1.0),
                                       self.f32(-1.0 if f.act == "bipolar" else 0.0)])
        a = self.node("Cast", [bit], to=TensorProto.FLOAT)
        if f.act == "bipolar":
            a = self.node("Sub", [self.node("Mul", [a, self.f32(2.0)]), self.f32(1.0)])
        return a

    def _weight(self, cin: int, cout: int, f: BlockForm) -> str:
        k = f.kernel
        B = random_bases(self.rng, f.M, (cout, cin, k, k))
        A = random_alpha(self.rng, f.M, cout, f.channelwise)
        if f.weights == "folded":
            B, A = self._decomposable(B, A, f.channelwise)
        a5 = (A.reshape(f.M, cout, 1, 1, 1) if f.channelwise
              else A[:, :1].reshape(f.M, 1, 1, 1, 1)).astype(np.float32)
        axes = self.const(np.array([0], np.int64), "axes")
        if f.weights == "stacked":
            scaled = self.node("Mul", [self.const(a5, "alpha"), self.const(B, "bases")])
            return self.node("ReduceSum", [scaled, axes], keepdims=0)
        if f.weights == "folded-stacked":
            return self.node("ReduceSum", [self.const((a5 * B).astype(np.float32), "ab"),
                                           axes], keepdims=0)
        return self.const(fold(B, np.broadcast_to(A, (f.M, cout)).astype(np.float32)), "w")

    def _decomposable(self, B: np.ndarray, A: np.ndarray, channelwise: bool
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Folded bases as the contract promises to decompose them: every sign pattern
        occurs (per output channel for channel-wise α) and the 2^M sums of ±α differ."""
        M, O = A.shape
        scopes = [slice(o, o + 1) for o in range(O)] if channelwise else [slice(None)]
        for sc in scopes:
            flat = B[:, sc].reshape(M, -1)
            if flat.shape[1] < 2 ** M:
                raise ValueError(f"M = {M} needs {2 ** M} weights per α set, not {flat.shape[1]}")
            pos = self.rng.permutation(flat.shape[1])[: 2 ** M]
            flat[:, pos] = (((np.arange(2 ** M)[None] >> np.arange(M)[:, None]) & 1) * 2 - 1)
            B[:, sc] = flat.reshape(B[:, sc].shape)
        signs = ((np.arange(2 ** M)[None] >> np.arange(M)[:, None]) & 1) * 2.0 - 1
        for o in range(O if channelwise else 1):
            while len(np.unique(A[:, o] @ signs)) < 2 ** M:  # a coincident sum: redraw
                A[:, o] = self.rng.integers(8, 65, M) / 64.0
        if not channelwise:
            A[:] = A[:, :1]
        return B, A

    @staticmethod
    def max_folded_m(cin: int, cout: int, kernel: int, channelwise: bool) -> int:
        """The largest M whose folded weight can hold every sign pattern."""
        n = cin * kernel * kernel * (1 if channelwise else cout)
        return max(1, int(np.floor(np.log2(n))))

    def abc(self, x: str, cout: int, f: BlockForm) -> str:
        """One ABC conv block on x in form f; shifts and betas seeded."""
        cin = self.shapes[x][1]
        shape = self._conv_shape(x, cout, f.kernel, f.stride, f.padding)
        w = self._weight(cin, cout, f)
        shifts = np.linspace(-0.3, 0.3, f.N) if f.N > 1 else [self.rng.uniform(-0.2, 0.2)]
        total = None
        for v in shifts:
            beta = self.f32(self.rng.uniform(0.5, 1.5), "beta")
            a = self._binarize(x, float(v), f)
            if f.beta == "before":
                a = self.node("Mul", [a, beta])
            y = self.node("Conv", [a, w], shape, kernel_shape=[f.kernel] * 2,
                          strides=[f.stride] * 2, pads=[f.padding] * 4)
            if f.beta == "after":
                y = self.node("Mul", [y, beta])
            total = y if total is None else self.node("Add", [total, y])
            self.abc_convs += 1
        self.abc_blocks += 1
        assert total is not None
        return total

    def residual(self, x: str, cout: int, f: BlockForm, stride: int = 1) -> str:
        """Two ABC convs with BN, and a shortcut: identity, or a strided 1×1 float conv."""
        first = BlockForm(**{**f.__dict__, "stride": stride})
        y = self.bn(self.abc(x, cout, first))
        y = self.bn(self.abc(y, cout, BlockForm(**{**f.__dict__, "stride": 1})))
        short = x if stride == 1 and self.shapes[x][1] == cout else \
            self.bn(self.conv(x, cout, k=1, stride=stride, pad=0))
        return self.add(y, short)
