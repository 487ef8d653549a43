"""Transposes pushed towards the outputs and cancelled: tf2onnx's NHWC <-> NCHW pairs.

tf2onnx writes every Conv (and BatchNorm, pooling) of a Keras/Larq model between a
`Transpose` to NCHW and one back to NHWC, and its own optimiser stops at ops it has no
handler for (Sign): `v -> Transpose(0,2,3,1) -> Sign -> Add(0.1) -> Sign -> [Pad] ->
Transpose(0,3,1,2) -> Conv`. A binarizer then reaches its conv only through a transpose,
and the matcher sees no binary block. `push_transposes` moves each Transpose down through
ops that commute with it (elementwise ops, their constants permuted; Pad, its pads
permuted; Concat, ReduceMax and ReduceMin, their axes permuted; reshapes of a transpose that only
moves size-1 axes) until it meets its inverse, and the pair cancels; a Reshape moves up through
a binarizer to the Reshape before it (the flatten before an FC-like conv). Every rewrite keeps
the values bit for bit: a layout change moves elements, it computes nothing.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from abc_tvm.canonical.graph import Graph
from abc_tvm.canonical.rules import Note

# Elementwise ops: y[i] = f(x[i], c[i], ...) with numpy broadcasting; any of their inputs
# may be the transposed value, the others constants or the same transpose of another value.
_ELEMENTWISE = {
    "Abs", "Acos", "Asin", "Atan", "Ceil", "Cos", "Erf", "Exp", "Floor", "Identity", "IsInf",
    "IsNaN", "Log", "Neg", "Not", "Reciprocal", "Relu", "Round", "Sigmoid", "Sign", "Sin",
    "Softplus", "Softsign", "Sqrt", "Tan", "Tanh", "Cast", "Elu", "Selu", "Celu",
    "LeakyRelu", "HardSigmoid", "HardSwish", "ThresholdedRelu", "Clip", "Add", "Sub", "Mul",
    "Div", "Pow", "Max", "Min", "Sum", "Mean", "Mod", "PRelu", "Equal", "Greater",
    "GreaterOrEqual", "Less", "LessOrEqual", "And", "Or", "Xor", "Where",
}
# Reductions whose result does not depend on the order they visit elements in (a sum or mean
# in another layout rounds differently, so those stay where they are).
_REDUCE = {"ReduceMax", "ReduceMin"}
_RESHAPES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_ints(node: onnx.NodeProto, name: str, values: list[int]) -> None:
    for a in node.attribute:
        if a.name == name:
            del a.ints[:]
            a.ints.extend(int(v) for v in values)
            return
    node.attribute.append(helper.make_attribute(name, [int(v) for v in values]))


def _set_int(node: onnx.NodeProto, name: str, value: int) -> None:
    for a in node.attribute:
        if a.name == name:
            a.i = int(value)
            return
    node.attribute.append(helper.make_attribute(name, int(value)))


def _perm(g: Graph, t: onnx.NodeProto) -> list[int] | None:
    perm = _attr(t, "perm")
    if perm is None:  # the default reverses the axes: the rank is needed
        shape = g.shape_of(t.input[0])
        return None if shape is None else list(range(len(shape)))[::-1]
    return [int(p) for p in perm]


def _inverse(p: list[int]) -> list[int]:
    inv = [0] * len(p)
    for i, a in enumerate(p):
        inv[a] = i
    return inv


def _moves_only_ones(shape: tuple[int, ...], p: list[int]) -> bool:
    """Whether Transpose(perm=p) of this shape keeps the row-major order (a reshape)."""
    moved = [a for a in p if shape[a] != 1]
    return moved == sorted(moved)


class _Pusher:
    """One pass over the graph's transposes; `shapes` knows the values this pass made."""

    def __init__(self, g: Graph) -> None:
        self.g = g
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.notes: list[Note] = []

    def shape(self, value: str) -> tuple[int, ...] | None:
        return self.shapes.get(value) or self.g.shape_of(value)

    def run(self) -> list[Note]:
        self.g.shape_of(self.g.outputs[0])  # shapes inferred once, on the graph as it came
        changed = True
        while changed:
            changed = False
            for t in [n for n in self.g.nodes if n.op_type in ("Transpose", "Reshape")]:
                if not any(n is t for n in self.g.nodes) or self.g.const(t.input[0]) is not None:
                    continue
                if t.op_type == "Reshape":
                    changed |= self._pull_reshape(t)
                    continue
                p = _perm(self.g, t)
                if p is None:
                    continue
                for n in self.g.consumers(t.output[0]):
                    if self._push(t, p, n):
                        changed = True
                if not self.g.consumers(t.output[0]) and not self.g.is_output(t.output[0]):
                    self.g.remove(t)
        self.g.prune()
        return self.notes

    # -- reshapes -------------------------------------------------------------------------

    def _pull_reshape(self, r: onnx.NodeProto) -> bool:
        """A Reshape moves up through single-reader elementwise ops with scalar constants
        (they do not see the shape) and merges with the Reshape it meets; a reshape back to
        the original shape cancels. tf2onnx writes the NHWC flatten before an FC-like conv
        (AlexNet, XNOR-Net) as `Reshape -> binarizer -> Reshape -> Conv`: the conv then reads
        its binarizer directly."""
        if len(r.input) < 2 or self.g.const(r.input[1]) is None or _attr(r, "allowzero", 0):
            return False
        shape = np.asarray(self.g.const(r.input[1])).reshape(-1)
        value = r.input[0]
        n = self.g.producer(value)
        if n is None:
            return False
        if n.op_type == "Reshape" and not np.any(shape == 0):
            x = n.input[0]
            self.g.set_input(r, 0, x)
            if self.shape(r.output[0]) is not None and self.shape(r.output[0]) == self.shape(x):
                readers = self.g.consumers(r.output[0])
                self.g.replace_uses(r.output[0], x)
                self.g.remove(r)
                self.notes.append(Note(readers[0].name if readers else r.name,
                                       "push_transposes", "Reshape pair cancelled"))
            if not self.g.consumers(value) and not self.g.is_output(value):
                self.g.remove(n)
            return True
        if n.op_type not in _ELEMENTWISE or len(n.output) != 1 or n.domain not in ("", "ai.onnx") \
                or len(self.g.consumers(value)) != 1 or self.g.is_output(value):
            return False
        data = [i for i in n.input if i and self.g.const(i) is None]
        if len(set(data)) != 1 or not self._scalar_operands(n, data[0], shape.size):
            return False
        out = r.output[0]
        out_shape = self.shape(out)
        self.g.remove(r)
        (moved,) = self.g.add_node("Reshape", [data[0], r.input[1]], f"{n.name or n.op_type}.r")
        if out_shape is not None:
            self.shapes[moved] = out_shape
        for k, i in enumerate(list(n.input)):
            if i == data[0]:
                self.g.set_input(n, k, moved)
        self.g.rename_output(n, value, out)
        return True

    def _scalar_operands(self, n: onnx.NodeProto, value: str, rank: int) -> bool:
        """Every input of `n` other than `value` is a one-element constant of rank ≤ rank
        (so the result has the shape of `value`, whatever shape that is)."""
        for i in n.input:
            if not i or i == value:
                continue
            c = self.g.const(i)
            if c is None or c.size != 1 or c.ndim > rank:
                return False
        return True

    # -- one consumer ---------------------------------------------------------------------

    def _push(self, t: onnx.NodeProto, p: list[int], n: onnx.NodeProto) -> bool:
        op = n.op_type
        if n.domain not in ("", "ai.onnx") or len(n.output) != 1:
            return False
        if op == "Transpose":
            return self._compose(t, p, n)
        if op in _ELEMENTWISE:
            ins = self._operands(t, p, list(n.input), range(len(n.input)))
            return ins is not None and self._move(t, p, n, ins)
        if op == "Pad":
            return self._pad(t, p, n)
        if op == "Concat":
            ins = self._operands(t, p, list(n.input), range(len(n.input)))
            if ins is None:
                return False
            axis = int(_attr(n, "axis")) % len(p)
            _set_int(n, "axis", p[axis])
            return self._move(t, p, n, ins)
        if op in _REDUCE:
            return self._reduce(t, p, n)
        if op in _RESHAPES and n.input[0] == t.output[0]:
            return self._reshape(t, p, n)
        return False

    def _operands(self, t: onnx.NodeProto, p: list[int], ins: list[str],
                  slots) -> list[str] | None:
        """The inputs in the untransposed layout: the transposed value itself, constants
        permuted (scalars as they are), the same transpose of another value; else None."""
        inv = _inverse(p)
        out = list(ins)
        for k in slots:
            v = ins[k]
            if not v:
                continue
            if v == t.output[0]:
                out[k] = t.input[0]
                continue
            c = self.g.const(v)
            if c is not None:
                if c.size == 1 or c.ndim == 0:
                    continue
                if c.ndim > len(p):
                    return None
                c4 = c.reshape((1,) * (len(p) - c.ndim) + c.shape)
                out[k] = self.g.add_const(np.ascontiguousarray(c4.transpose(inv)), v)
                continue
            other = self.g.producer(v)
            if other is not None and other.op_type == "Transpose" and _perm(self.g, other) == p:
                out[k] = other.input[0]
                continue
            small = self._untransposed(v, p, t.output[0])
            if small is None:
                return None
            out[k] = small
        return out

    def _untransposed(self, v: str, p: list[int], big: str) -> str | None:
        """A value much smaller than the transposed one (a broadcast scale, RealToBinaryNet's
        [1, 1, 1, C] gate) in the untransposed layout: reshaped where the transpose moves only
        its size-1 axes, else transposed by the inverse permutation (cheap at that size)."""
        shape, full = self.shape(v), self.shape(big)
        if shape is None or full is None or len(shape) != len(p) \
                or 4 * int(np.prod(shape)) > int(np.prod(full)):
            return None
        inv = _inverse(p)
        new = tuple(shape[i] for i in inv)
        if _moves_only_ones(shape, inv):
            target = self.g.add_const(np.array(new, np.int64), f"{v}.shape")
            (out,) = self.g.add_node("Reshape", [v, target], f"{v}.nchw")
        else:
            (out,) = self.g.add_node("Transpose", [v], f"{v}.nchw", perm=inv)
        self.shapes[out] = new
        return out

    def _move(self, t: onnx.NodeProto, p: list[int], n: onnx.NodeProto,
              ins: list[str], transpose_after: bool = True) -> bool:
        """`n` reads `ins` (untransposed) and writes a fresh value, transposed by p into
        n's old output, so its readers see the same values."""
        for k, v in enumerate(ins):
            self.g.set_input(n, k, v)
        out = n.output[0]
        if not transpose_after:
            return True
        fresh = self.g.fresh(out)
        self.g.rename_output(n, out, fresh)
        self.g.add_node_named("Transpose", [fresh], [out], f"{n.name or n.op_type}.t", perm=p)
        shape = self.shape(out)
        if shape is not None:
            self.shapes[fresh] = tuple(shape[i] for i in _inverse(p))
        return True

    def _compose(self, t: onnx.NodeProto, p: list[int], n: onnx.NodeProto) -> bool:
        q = _perm(self.g, n)
        if q is None or len(q) != len(p):
            return False
        r = [p[i] for i in q]
        x = t.input[0]
        if r == list(range(len(r))):
            readers = self.g.consumers(n.output[0])
            self.g.replace_uses(n.output[0], x)
            self.g.remove(n)
            self.notes.append(Note(readers[0].name if readers else n.name, "push_transposes",
                                   f"Transpose pair {p}/{q} cancelled"))
        else:
            self.g.set_input(n, 0, x)
            _set_ints(n, "perm", r)
        return True

    def _pad(self, t: onnx.NodeProto, p: list[int], n: onnx.NodeProto) -> bool:
        if n.input[0] != t.output[0] or any(i == t.output[0] for i in n.input[1:]):
            return False
        r = len(p)
        if len(n.input) > 3 and n.input[3]:
            return False  # explicit axes (opset 18): not worth the cases
        pads = self.g.const(n.input[1]) if len(n.input) > 1 else _attr(n, "pads")
        if pads is None or np.size(pads) != 2 * r:
            return False
        pads = np.asarray(pads).reshape(-1)
        new = np.zeros(2 * r, np.int64)
        for i in range(r):
            new[p[i]], new[r + p[i]] = pads[i], pads[r + i]
        if len(n.input) > 1:
            self.g.set_input(n, 1, self.g.add_const(new, n.input[1]))
        else:
            _set_ints(n, "pads", new.tolist())
        ins = list(n.input)
        ins[0] = t.input[0]
        return self._move(t, p, n, ins)

    def _reduce(self, t: onnx.NodeProto, p: list[int], n: onnx.NodeProto) -> bool:
        if n.input[0] != t.output[0]:
            return False
        r = len(p)
        from_input = len(n.input) > 1 and n.input[1]
        axes = self.g.const(n.input[1]) if from_input else _attr(n, "axes")
        if from_input and axes is None:
            return False
        if axes is None:
            if _attr(n, "noop_with_empty_axes", 0):
                return False
            axes = list(range(r))
        axes = [int(a) % r for a in np.asarray(axes).reshape(-1)]
        new = sorted(p[a] for a in axes)
        keep = _attr(n, "keepdims", 1)
        kept = [p[i] for i in range(r) if i not in axes]
        if not keep and kept != sorted(kept):
            return False  # the kept axes would come out in another order
        if from_input:
            self.g.set_input(n, 1, self.g.add_const(np.array(new, np.int64), n.input[1]))
        else:
            _set_ints(n, "axes", new)
        ins = list(n.input)
        ins[0] = t.input[0]
        return self._move(t, p, n, ins, transpose_after=bool(keep))

    def _reshape(self, t: onnx.NodeProto, p: list[int], n: onnx.NodeProto) -> bool:
        """A transpose that moves only size-1 axes keeps the row-major element order: a
        reshape after it reads the untransposed value as well (as a Reshape to its shape)."""
        x = t.input[0]
        shape, out_shape = self.shape(x), self.shape(n.output[0])
        if shape is None or out_shape is None:
            return False
        if not _moves_only_ones(shape, p):
            return False
        target = self.g.add_const(np.array(out_shape, np.int64), f"{n.name or n.op_type}.shape")
        out = n.output[0]
        self.g.remove(n)
        self.g.add_node_named("Reshape", [x, target], [out], n.name or "Reshape")
        return True


def push_transposes(g: Graph) -> list[Note]:
    """Transposes moved towards the outputs through ops that commute with them, and each
    pair that composes to the identity removed: a binarizer then reaches its Conv in NCHW."""
    if not any(n.op_type == "Transpose" for n in g.nodes):
        return []
    return _Pusher(g).run()
