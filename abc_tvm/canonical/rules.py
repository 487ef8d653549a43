"""Canonicalization rules: each one small, one concern, applied to a `Graph` in place.

Each rule returns the notes of what it did (`Note`: the node it changed, the rule, a detail)
so `inspect` and the compile report can say which rules shaped a layer. The binarizer forms
themselves (Sign, compares, Where, uniform quantizers) are read by `abc_tvm.pattern`, once;
these rules only bring a graph into shapes the matcher reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import helper

from abc_tvm.canonical.graph import Graph
from abc_tvm.pattern import decompose_folded

SNAP_ULPS = 8  # |W| within this many float32 ulps of one value per channel snaps to it


@dataclass
class Note:
    node: str  # the node (or layer) the rule changed
    rule: str
    detail: str = ""


def straight_through(g: Graph) -> list[Note]:
    """`a - p + p` is `a`: what `a.detach() - p.detach() + p` exports to (the straight-
    through estimator kept in eval). Add(Sub(a, p), p) and Add(p, Sub(a, p)) read `a`."""
    notes = []
    for add in list(g.nodes):
        if add.op_type != "Add" or len(add.input) != 2:
            continue
        for k in (0, 1):
            sub = g.producer(add.input[k])
            p = add.input[1 - k]
            if sub is None or sub.op_type != "Sub" or sub.input[1] != p:
                continue
            g.replace_uses(add.output[0], sub.input[0])
            kept = g.producer(sub.input[0])  # the note goes to the op whose value is kept
            notes.append(Note(kept.name if kept is not None else add.name, "straight_through",
                              f"{add.output[0]} is {sub.input[0]}"))
            break
    g.prune()
    return notes


_BROADCASTING = ("Add", "Sub", "Mul", "Div")


def expand_as_broadcast(g: Graph) -> list[Note]:
    """`x + c.expand_as(x)` is `x + c`: Add/Sub/Mul/Div of x and Expand(c, Shape(x)) read
    the constant c, which broadcasts the same. Folded instead, the Expand became a constant
    of x's full size (ReActNet's learnable biases: 3.2 MB each, read by every call)."""
    notes = []
    for node in list(g.nodes):
        if node.op_type not in _BROADCASTING or len(node.input) != 2:
            continue
        for k in (0, 1):
            expand = g.producer(node.input[k])
            if expand is None or expand.op_type != "Expand" or g.const(expand.input[0]) is None:
                continue
            shape = g.producer(expand.input[1])
            if shape is None or shape.op_type != "Shape" or len(shape.attribute) \
                    or shape.input[0] != node.input[1 - k]:
                continue
            node.input[k] = expand.input[0]
            notes.append(Note(node.name, "expand_as_broadcast",
                              f"{expand.output[0]} is {expand.input[0]} broadcast"))
            break
    if notes:
        g.prune()
    return notes


def _binary_weight(w: np.ndarray) -> bool:
    """Every output channel is ±one magnitude (exactly): a binary layer's weight."""
    mag = np.abs(w.reshape(w.shape[0], -1))
    return bool(np.all(mag == mag[:, :1]) and np.all(mag[:, 0] > 0))


def _out_major(node, w: np.ndarray) -> np.ndarray:
    """A Conv/Gemm/MatMul weight with output channels first ([O, ...])."""
    return w if node.op_type == "Conv" or _gemm_trans_b(node) else w.T


def _gemm_trans_b(node) -> bool:
    return node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)


def snap_weights(g: Graph) -> list[Note]:
    """A Conv/Gemm/MatMul weight whose |W| per output channel lies within SNAP_ULPS ulps of
    one value (`alpha * sign(W)` folded with rounding, e.g. through a straight-through
    residue computed in float) becomes exactly ±alpha_o, alpha_o the channel's median."""
    notes = []
    for node in g.nodes:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        w = g.const(node.input[1])
        if w is None or w.dtype != np.float32 or w.ndim < 2:
            continue
        wo = _out_major(node, w)
        if _binary_weight(wo):
            continue
        mag = np.abs(wo.reshape(wo.shape[0], -1))
        alpha = np.median(mag, axis=1).astype(np.float32)
        if np.any(alpha == 0):
            continue
        ulp = np.spacing(alpha)[:, None]
        off = np.abs(mag - alpha[:, None]) / ulp
        if not np.all(off <= SNAP_ULPS):
            continue
        snapped = np.where(wo >= 0, 1, -1) * alpha.reshape(-1, *[1] * (wo.ndim - 1))
        back = _out_major(node, snapped.astype(np.float32))  # the same transpose undoes it
        node.input[1] = g.add_const(np.ascontiguousarray(back), node.input[1])
        notes.append(Note(node.name, "snap_weights", "weight snapped to ±alpha per output "
                                                     f"channel ({float(off.max()):.0f} ulp off)"))
    g.prune()
    return notes


def split_conv_bias(g: Graph) -> list[Note]:
    """Conv(x, W, b) -> Conv(x, W) + b[1, O, 1, 1]: a binary conv's bias becomes glue its
    kernel fuses, and every conv is written as TVM's importer writes it (conv2d, then add),
    so a binarizer after a float conv reads the same bias Add at both levels."""
    notes = []
    for node in list(g.nodes):
        if node.op_type != "Conv" or len(node.input) < 3 or not node.input[2]:
            continue
        w, b = g.const(node.input[1]), g.const(node.input[2])
        if w is None or b is None or w.ndim != 4 or b.ndim != 1:
            continue
        out = node.output[0]
        conv_out = g.fresh(out)
        bias = g.add_const(b.reshape(1, -1, 1, 1).astype(b.dtype), f"{node.name}.bias")
        del node.input[2]
        g.rename_output(node, out, conv_out)
        g.add_node_named("Add", [conv_out, bias], [out], f"{node.name}.bias_add")
        kind = "binary" if _binary_weight(w) else "float"
        notes.append(Note(node.name, "split_conv_bias", f"{kind} conv's bias added after it"))
    return notes


def pool_before_binarizer(g: Graph) -> list[Note]:
    """MaxPool(f(x)) -> f(MaxPool(x)) for f a chain of non-decreasing elementwise ops (Sign,
    Where(x >= t, a, b) with a >= b, Round, Clip, scalar or per-channel Add/Sub and Mul/Div
    by positive constants, a BatchNorm with positive scales): the max of a non-decreasing
    function is the function of the max, channel by channel (ONNX MaxPool ignores its
    padding). A MaxPool between a binarizer and a binary conv then no longer hides it."""
    notes = []
    for pool in list(g.nodes):
        if pool.op_type != "MaxPool" or len(pool.output) != 1:
            continue
        chain = _monotone_chain(g, pool.input[0])
        if not any(n.op_type in _STEPS for n, _ in chain):
            continue  # no binarizer in the chain: nothing to gain (and a fused ReLU to lose)
        top, k = chain[-1]
        out = pool.output[0]
        pooled = g.fresh(out)
        pool.input[0] = top.input[k]
        g.rename_output(pool, out, pooled)
        top.input[k] = pooled
        g.rename_output(chain[0][0], chain[0][0].output[0], out)
        g.prune()
        notes.append(Note(pool.name, "pool_before_binarizer",
                          "MaxPool moved before " + ", ".join(n.op_type for n, _ in chain)))
    return notes


_ORDER = ("Sign", "Round", "Relu", "Ceil", "Floor")  # unary and non-decreasing
_STEPS = ("Sign", "Round", "Where", "Cast", "Ceil", "Floor")  # what makes the chain a binarizer


def _monotone_chain(g: Graph, value: str) -> list[tuple]:
    """The non-decreasing elementwise ops computing `value`, each read only by the next:
    [(node, data input index)] from `value` upwards; a compare only with the Where or Cast
    that reads it (a MaxPool never lands on a boolean)."""
    chain: list[tuple] = []
    while (node := g.producer(value)) is not None and len(g.consumers(value)) == 1:
        k = _monotone_input(g, node)
        if k is None:
            break
        if node.op_type in ("Where", "Cast"):
            cmp = g.producer(node.input[0])
            if cmp is None or len(g.consumers(node.input[0])) != 1 \
                    or cmp.op_type not in ("GreaterOrEqual", "Greater") \
                    or g.scalar(cmp.input[1]) is None:
                break
            chain += [(node, 0), (cmp, 0)]
            value = cmp.input[0]
            continue
        chain.append((node, k))
        value = node.input[k]
    return chain


def _monotone_input(g: Graph, node) -> int | None:
    """The data input through which `node` is non-decreasing (its other inputs constant)."""
    op, ins = node.op_type, list(node.input)
    if op in _ORDER:
        return 0
    if op == "Clip":
        return 0 if all(g.const(i) is not None for i in ins[1:] if i) else None
    if op == "Where":
        a, b = (g.scalar(i) for i in ins[1:3])
        return 0 if a is not None and b is not None and a >= b else None
    if op == "Cast":
        return 0
    if op == "BatchNormalization":
        scale, _, _, var = (g.const(i) for i in ins[1:5])
        return 0 if scale is not None and var is not None and np.all(scale > 0) else None
    if op not in ("Add", "Sub", "Mul", "Div") or len(ins) != 2:
        return None
    consts = [g.const(i) for i in ins]
    if (consts[0] is None) == (consts[1] is None):
        return None
    k = 0 if consts[1] is not None else 1
    c = consts[1 - k]
    if c.size != 1 and (c.ndim < 3 or any(d != 1 for i, d in enumerate(c.shape)
                                          if i != c.ndim - 3)):
        return None  # scalar or per channel of NCHW ([C,1,1], [1,C,1,1]) only
    if op == "Add" or (op == "Sub" and k == 0):
        return k
    if op in ("Mul", "Div") and np.all(c > 0) and (op == "Mul" or k == 0):
        return k
    return None


_ELEMENTWISE = ("Sign", "Clip", "Round", "Cast", "Where", "GreaterOrEqual", "Greater", "Less",
                "LessOrEqual", "Add", "Sub", "Mul", "Div")


def _scalar_elementwise(g: Graph, node) -> bool:
    """An elementwise op whose other operands are scalar constants (commutes with Reshape)."""
    if node.op_type not in _ELEMENTWISE:
        return False
    data = [i for i in node.input if i and g.const(i) is None]
    consts = [i for i in node.input if i and g.const(i) is not None]
    return len(data) == 1 and all(g.const(c).size == 1 for c in consts)


def binary_fc_as_conv(g: Graph) -> list[Note]:
    """Gemm/MatMul over [B, C] with a binary weight [C, O] (or [O, C] with transB; or one
    that is an exact sum of a few ±1 bases, as a k-bit weight is) becomes
    Reshape -> 1×1 Conv -> Reshape, so the binary conv kernels run it; the Reshape moves
    above the binarizer's elementwise chain so the conv reads the binarized activation."""
    notes = []
    for node in list(g.nodes):
        if node.op_type not in ("Gemm", "MatMul") or len(node.input) < 2:
            continue
        w = g.const(node.input[1])
        if w is None or w.ndim != 2:
            continue
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Gemm" and (("transA" in attrs and attrs["transA"].i)
                                       or ("alpha" in attrs and attrs["alpha"].f != 1.0)
                                       or ("beta" in attrs and attrs["beta"].f != 1.0)):
            continue
        wo = _out_major(node, w)  # [O, C]
        if not (_binary_weight(wo) or decompose_folded(wo) is not None):
            continue  # neither ±α per channel nor an exact sum of ±1 bases (k-bit weights)
        shape = g.shape_of(node.input[0])
        if shape is None or len(shape) != 2:
            continue
        batch, channels = shape
        x = _hoist_reshape(g, node.input[0], [batch, channels, 1, 1])
        w4 = g.add_const(np.ascontiguousarray(wo).reshape(*wo.shape, 1, 1), f"{node.name}.w")
        (y4,) = g.add_node("Conv", [x, w4], f"{node.name}.conv", kernel_shape=[1, 1])
        out = node.output[0]
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        shape2 = g.add_const(np.array([batch, wo.shape[0]], np.int64), f"{node.name}.shape")
        g.nodes.remove(node)
        if bias is None:
            g.add_node_named("Reshape", [y4, shape2], [out], f"{node.name}.out")
        else:
            (y2,) = g.add_node("Reshape", [y4, shape2], f"{node.name}.out")
            g.add_node_named("Add", [y2, bias], [out], f"{node.name}.bias_add")
        notes.append(Note(node.name, "binary_fc_as_conv",
                          f"{node.op_type} {channels}->{wo.shape[0]} as a 1x1 conv"))
    g.prune()
    return notes


def _hoist_reshape(g: Graph, value: str, shape: list[int]) -> str:
    """`value` reshaped to `shape`, the Reshape placed below the elementwise binarizer chain
    that computes it (each op re-emitted on the reshaped input, scalar constants kept)."""
    node = g.producer(value)
    if node is not None and node.op_type in ("Reshape", "Flatten") \
            and len(g.consumers(value)) == 1:
        return _hoist_reshape(g, node.input[0], shape)  # a reshape of a reshape is one
    if node is None or not _scalar_elementwise(g, node):
        target = g.add_const(np.array(shape, np.int64), "fc.shape4")
        return g.add_node("Reshape", [value, target], "fc.reshape")[0]
    data = next(i for i in node.input if i and g.const(i) is None)
    inner = _hoist_reshape(g, data, shape)
    ins = [inner if i == data else i for i in node.input]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    (out,) = g.add_node(node.op_type, ins, node.name or node.op_type, **attrs)
    if node.name:  # the re-emitted op keeps the name (notes of earlier rules refer to it)
        new = g.producer(out)
        node.name, new.name = new.name, node.name
    return out


def min_max_as_clip(g: Graph) -> list[Note]:
    """Min(x, c) and Max(x, c) with a one-element constant c are Clip(x, -, c) and
    Clip(x, c, -): what `tf.clip_by_value` exports to through tf2onnx (DoReFa's quantizer
    `Max(Min(x, 1), 0)`). The matcher reads a Clip as a bound of the binarizer chain, and TVM
    imports it as one elementwise op (its Min/Max are a stack and a reduction, on which its
    layout conversion fails)."""
    opset = next((o.version for o in g.model.opset_import if o.domain in ("", "ai.onnx")), 13)
    notes = []
    for node in list(g.nodes):
        if node.op_type not in ("Min", "Max") or len(node.input) != 2:
            continue
        consts = [g.const(i) for i in node.input]
        if (consts[0] is None) == (consts[1] is None):
            continue
        k = 0 if consts[1] is not None else 1
        c, x = consts[1 - k], node.input[k]
        if c.size != 1 or c.dtype != np.float32:
            continue
        if c.ndim > 0 and (g.shape_of(x) is None or c.ndim > len(g.shape_of(x))):
            continue  # the constant would broadcast x to a higher rank
        bound = np.float32(c.reshape(()))
        lo, hi = (bound, None) if node.op_type == "Max" else (None, bound)
        out = node.output[0]
        g.nodes.remove(node)
        if opset >= 11:
            ins = [x, "" if lo is None else g.add_const(lo, f"{node.name}.min"),
                   "" if hi is None else g.add_const(hi, f"{node.name}.max")]
            g.add_node_named("Clip", [i for i in ins if i] if hi is None else ins, [out],
                             node.name or "clip")
        else:
            bounds = {k: float(v) for k, v in (("min", lo), ("max", hi)) if v is not None}
            g.add_node_named("Clip", [x], [out], node.name or "clip", **bounds)
        notes.append(Note(node.name, "min_max_as_clip", f"{node.op_type} with {bound:g} as Clip"))
    if notes:
        g.prune()
    return notes
