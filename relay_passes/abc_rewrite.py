"""The ABC rewrite: find ABC blocks in a Relax function and replace each by binary kernels.

Every block `Y = Σ_n β_n Conv(A_n(X), Σ_m α_m B_m)` becomes binary kernels with the bases
packed at compile time. Matching is `abc_tvm.pattern` (the same matcher the exporter's
checker uses) on an op graph read from the Relax bindings; what it does not match is left as
it is, so it runs as ordinary float ops.

x86 (fused glue): each block and the float ops after it that have no other consumer —
BatchNorm (inference), per-channel scale/bias, one residual Add, ReLU — become one kernel
(`schedules.abc_block_func`) that writes the next ABC layer's packed bit-planes directly
where every ABC consumer of the activation shares one set of shifts, and a float NHWC tensor
only where something else (a residual, a float layer, the output) reads it:
    packed' = call_tir(abc_block, packed, Bbits, αβ, Q, ..., scale, shift, res_nhwc, v')
NHWC floats become NCHW (permute_dims) only for float consumers; the ABC region is NHWC.

Other targets:
    packed = call_tir(bitpack, X, v)            # N bit-planes, NHWC words
    Y      = call_tir(abc_conv2d, packed, Bbits, Σ_c B, α, β)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from abc_tvm import pattern
from abc_tvm.blocks import block_index
from abc_tvm.errors import InternalError
from abc_tvm.reference import pack_weights
from abc_tvm.relay_passes import float_layout
from abc_tvm.schedules import (
    abc_block_func,
    abc_conv_func,
    bitpack_func,
    bitpack_nhwc_func,
    block_lane_bits,
    block_vector,
    block_word_bits,
    compute,
    packed_maxpool_func,
)

# Relax ops in ONNX's vocabulary, for the matcher.
_OPS = {
    "relax.add": "Add", "relax.subtract": "Sub", "relax.multiply": "Mul",
    "relax.greater_equal": "GreaterOrEqual", "relax.sign": "Sign", "relax.astype": "Cast",
    "relax.sum": "ReduceSum", "relax.nn.conv2d": "Conv", "relax.divide": "Div",
    "relax.round": "Round", "relax.where": "Where", "relax.greater": "Greater",
    "relax.less": "Less", "relax.less_equal": "LessOrEqual",
}
# Ops on constants that the importer leaves unfolded (Clip's NaN-bound guards), folded here.
_NUMPY = {
    "relax.isnan": np.isnan, "relax.where": np.where, "relax.add": np.add,
    "relax.subtract": np.subtract, "relax.multiply": np.multiply,
}
_TIR_MINMAX = re.compile(r"^(maximum|minimum)(_?\d+)?$")


@dataclass
class Rewritten:
    """One block the pass replaced, for the compile report."""

    block: pattern.ABCBlock
    kernel: str
    glue: list[str] = field(default_factory=list)  # ONNX op types fused into the kernel
    pooled_input: bool = False  # the MaxPool writing the block's input ran on packed bits


def _graph(func: relax.Function) -> tuple[pattern.Graph, dict[str, relax.Var]]:
    """The op graph of a Relax function's dataflow bindings, plus name → Relax var."""
    names: dict[relax.Var, str] = {}
    vars_: dict[str, relax.Var] = {}

    def name(e: relax.Expr) -> str:
        if isinstance(e, tvm.ir.GenericConst):
            key = f"const{len(consts)}"
            consts[key] = e.value.numpy()
            return key
        if not isinstance(e, relax.Var):  # shapes, prim values, nested tuples: opaque
            return f"expr{len(consts)}.{len(names)}"
        if e not in names:
            names[e] = f"{e.name}.{len(names)}"
            vars_[names[e]] = e
        return names[e]

    consts: dict[str, np.ndarray] = {}
    for p in func.params:
        name(p)
    ops: list[pattern.Op] = []
    min_of: dict[str, tuple[str, float]] = {}  # maximum(x, lo) output → (x, lo)
    for block in func.body.blocks:
        for b in block.bindings:
            v = b.value
            if not isinstance(v, relax.Call) or not isinstance(v.op, tvm.ir.Op):
                # tuples, projections, aliases: kept so consumer counts stay right
                refs = (v.fields if isinstance(v, relax.Tuple) else
                        [v.tuple_value] if isinstance(v, relax.TupleGetItem) else
                        [v] if isinstance(v, relax.Var) else [])
                out = name(b.var)
                ins = [name(r) for r in refs if isinstance(r, relax.Var)]
                extra = {"index": int(v.index)} if isinstance(v, relax.TupleGetItem) else {}
                ops.append(pattern.Op(out, type(v).__name__, ins, [out], extra))
                continue
            op = v.op.name
            index = block_index(v)
            if index is not None:  # a block decided on the ONNX graph, carried explicitly
                x, out = name(v.args[1].fields[0]), name(b.var)
                ops.append(pattern.Op(out, "ABCBlock", [x], [out], {"index": index}))
                continue
            if op == "relax.call_tir":
                gv, args = v.args[0], list(v.args[1].fields)
                m = _TIR_MINMAX.match(gv.name_hint)
                ins = [name(a) for a in args]
                out = name(b.var)
                bound = consts.get(ins[1]) if len(ins) == 2 else None
                if m and bound is not None and bound.size == 1:
                    if m.group(1) == "maximum":
                        min_of[out] = (ins[0], float(bound))
                    elif ins[0] in min_of:  # Clip = minimum(maximum(x, lo), hi)
                        x, lo = min_of[ins[0]]
                        # the maximum is part of the Clip: drop it so x's readers count right
                        ops[:] = [o for o in ops if o.outputs != [ins[0]]]
                        ops.append(pattern.Op(out, "Clip", [x], [out],
                                              {"min": lo, "max": float(bound)}))
                        continue
                ops.append(pattern.Op(out, f"call_tir:{gv.name_hint}", ins, [out]))
                continue
            # an inline tuple (concat's operands) is read field by field: its readers count
            ins = [name(f) for a in v.args
                   for f in (a.fields if isinstance(a, relax.Tuple) else [a])]
            out = name(b.var)
            if op in _NUMPY and all(i in consts for i in ins):
                consts[out] = np.asarray(_NUMPY[op](*(consts[i] for i in ins)))
                continue
            if op == "relax.reshape" and ins[0] in consts:  # e.g. PRelu's slope
                consts[out] = consts[ins[0]].reshape(_shape(b.var))
                continue
            attrs: dict = {}
            if op == "relax.astype":
                dt = str(v.attrs.dtype)
                attrs["to"] = onnx.TensorProto.FLOAT if dt == "float32" else dt
            elif op == "relax.sum":
                axis = v.attrs.axis
                attrs = {"axes": None if axis is None else [int(a) for a in axis],
                         "keepdims": int(bool(v.attrs.keepdims))}
            elif op == "relax.nn.conv2d":
                a = v.attrs
                if (str(a.data_layout), str(a.kernel_layout), str(a.out_layout)) != (
                        "NCHW", "OIHW", "NCHW"):
                    attrs["group"] = -1  # not the layout the kernels take: leave it float
                attrs.update(strides=[int(s) for s in a.strides],
                             pads=[int(p) for p in a.padding],
                             dilations=[int(d) for d in a.dilation])
                attrs.setdefault("group", int(a.groups))
            elif op == "relax.nn.max_pool2d":
                a = v.attrs
                attrs = {"kernel": tuple(int(k) for k in a.pool_size),
                         "strides": tuple(int(k) for k in a.strides),
                         "pads": tuple(int(k) for k in a.padding),
                         "plain": (all(int(d) == 1 for d in a.dilation)
                                   and str(a.layout) == str(a.out_layout) == "NCHW")}
            elif op == "relax.nn.prelu":
                attrs = {"axis": int(v.attrs.axis)}
            elif op == "relax.nn.batch_norm":
                a = v.attrs
                attrs = {"axis": int(a.axis), "epsilon": float(a.epsilon),
                         "center": bool(a.center), "scale": bool(a.scale),
                         "training": bool(a.training)}
            ops.append(pattern.Op(out, _OPS.get(op, op), ins, [out], attrs))
    if isinstance(func.body.body, relax.Var):
        ops.append(pattern.Op("return", "Return", [name(func.body.body)], []))
    return pattern.Graph(ops, consts), vars_


def _shape(e: relax.Expr) -> tuple[int, ...]:
    return tuple(int(d) for d in e.ty.shape)


def _float_block(bb: relax.BlockBuilder, x: relax.Expr, blk: pattern.ABCBlock) -> relax.Var:
    """A block as float ops (for one the kernels refuse): per plane, the bits X >= T as 0/1
    (bipolar: ±1), conv with W = Σ_m α_m B_m (`pattern.weight_of`, which the matcher
    verified equals the graph's weight), times β_n, summed over planes."""
    w = relax.const(pattern.weight_of(blk.bases, blk.alpha), "float32")
    y = None
    for n in range(blk.N):
        t = blk.thresholds[n]
        t = relax.const(t.reshape(1, -1, 1, 1) if np.ndim(t) else np.float32(t), "float32")
        a = bb.emit(relax.op.astype(relax.op.greater_equal(x, t), "float32"))
        if blk.act == "bipolar":
            a = bb.emit(relax.op.subtract(relax.op.multiply(a, relax.const(2.0, "float32")),
                                          relax.const(1.0, "float32")))
        pads = blk.pads
        if blk.pad_value:  # a ±1 border (Pad(value=±1)): padded here, the conv pads nothing
            top, left, bottom, right = pads
            a = bb.emit(relax.op.nn.pad(a, [0, 0, 0, 0, top, bottom, left, right],
                                        pad_value=float(blk.pad_value)))
            pads = (0, 0, 0, 0)
        z = bb.emit(relax.op.nn.conv2d(a, w, strides=blk.strides, padding=pads))
        z = bb.emit(relax.op.multiply(z, relax.const(np.float32(blk.beta[n]), "float32")))
        y = z if y is None else bb.emit(relax.op.add(y, z))
    return y


@mutator
class _Rewriter(PyExprMutator):
    """Replace each block's output binding with the bitpack + ABC conv calls."""

    def __init__(self, mod: tvm.IRModule, plans: dict, target: tvm.target.Target,
                 word_bits: int, scheduled: bool = True, floats: dict | None = None) -> None:
        super().__init__(mod)
        self.plans, self.target, self.word_bits = plans, target, word_bits
        self.scheduled = scheduled
        self.floats = floats or {}  # output var -> (block, input var): lowered as float ops
        self.kernels: list[str] = []

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var in self.floats:
            blk, x = self.floats[binding.var]
            y = _float_block(self.builder_, self.visit_expr(x), blk)
            super().visit_var_binding_(relax.VarBinding(binding.var, y))  # the output's name
            return
        plan = self.plans.get(binding.var)
        if plan is None:
            super().visit_var_binding_(binding)
            return
        block, x = plan
        x = self.visit_expr(x)
        B, C, H, W = _shape(x)
        M, O, _, kh, kw = block.bases.shape
        w = self.word_bits
        K = -(-C // w)
        udt = f"uint{w}"
        pack = bitpack_func(B, C, H, W, block.N, w, self.target, scheduled=self.scheduled,
                            per_channel=block.thresholds.ndim == 2)
        conv = abc_conv_func(B, C, H, W, O, kernel=(kh, kw), stride=block.strides,
                             padding=block.pads, M=M, N=block.N,
                             bipolar=block.act == "bipolar", word_bits=w, target=self.target,
                             scheduled=self.scheduled)
        # kernels are named by their shapes, so layers of one shape share one kernel
        pack_gv = self.builder_.add_func(pack, str(pack.attrs["global_symbol"]))
        conv_gv = self.builder_.add_func(conv, str(conv.attrs["global_symbol"]))
        wbits, wsum = pack_weights(block.bases, word_bits=w)
        packed = self.builder_.emit(relax.call_tir(
            pack_gv, [x, relax.const(block.thresholds, "float32")],
            relax.TensorType((block.N, B, H, W, K), udt)))
        out_shape = _shape(binding.var)
        y = self.builder_.emit(relax.call_tir(
            conv_gv,
            [packed, relax.const(wbits, udt), relax.const(wsum.astype(np.int32), "int32"),
             relax.const(block.alpha.astype(np.float32), "float32"),
             relax.const(block.beta, "float32")],
            relax.TensorType(out_shape, "float32")))
        self.set_var_remap(binding.var, y)
        self.kernels.append(conv_gv.name_hint)


# ------------------------------------------------------- fused glue (x86 and aarch64)


@dataclass
class _Glue:
    """The float ops fused after one ABC block: z = relu?(y * scale + shift + res)."""

    end: str  # graph value the chain ends in (what later ops read)
    scale: np.ndarray | None = None
    shift: np.ndarray | None = None
    residual: str | None = None
    relu: bool = False
    pre: np.ndarray | None = None  # + pre[o] after the residual
    slope: np.ndarray | None = None  # PReLU's slope[o] (instead of ReLU)
    post: np.ndarray | None = None  # + post[o] after the activation
    hardtanh: tuple[float, float] | None = None  # Clip(lo, hi) as the activation
    ops: list[str] = field(default_factory=list)  # graph values of the fused ops
    kinds: list[str] = field(default_factory=list)  # their op kinds, for the report


def _affine(glue: _Glue, s: np.ndarray | None, t: np.ndarray | None, channels: int) -> None:
    """Compose z*s + t after the glue's affine so far (float32, as the ops would round)."""
    s0 = glue.scale if glue.scale is not None else np.ones(channels, np.float32)
    t0 = glue.shift if glue.shift is not None else np.zeros(channels, np.float32)
    if s is not None:
        s0, t0 = (s0 * s).astype(np.float32), (t0 * s).astype(np.float32)
    if t is not None:
        t0 = (t0 + t).astype(np.float32)
    glue.scale, glue.shift = s0, t0


def _batch_norm(g: pattern.Graph, op: pattern.Op, channels: int):
    """Inference Relax batch_norm over channels as (scale, shift) (`pattern.bn_affine`)."""
    a = op.attrs
    if a.get("training", True) or a.get("axis") != 1 or len(op.inputs) != 5:
        return None
    consts = [g.const(i) for i in op.inputs[1:]]
    if any(c is None or np.asarray(c).size != channels for c in consts):
        return None
    gamma, beta, mean, var = (np.asarray(c, np.float32).reshape(channels) for c in consts)
    if not a.get("scale", True):
        gamma = np.ones(channels, np.float32)
    if not a.get("center", True):
        beta = np.zeros(channels, np.float32)
    return pattern.bn_affine(gamma, beta, mean, var, a["epsilon"])


def _glue_chain(g: pattern.Graph, blk: pattern.ABCBlock, shapes: dict[str, tuple],
                claimed: set[str]) -> _Glue:
    """Follow single-consumer ops after a block: affine ops, a residual Add, per-channel
    biases, ReLU or PReLU, per-channel biases (z = act(c*s + t + res + pre) + post)."""
    channels = int(blk.bases.shape[1])
    glue = _Glue(blk.output)
    cur = blk.output
    stage = 0  # 0: affine; 1: after the residual; 2: after the activation

    def add_bias(acc: np.ndarray | None, c: np.ndarray) -> np.ndarray:
        return c if acc is None else (acc + c).astype(np.float32)

    while True:
        glue.end = cur
        users = g.consumers(cur)
        if len(users) != 1 or users[0].name in claimed:
            return glue
        u = users[0]
        if u.op == "relax.nn.batch_norm" and stage == 0 and u.inputs[0] == cur:
            folded = _batch_norm(g, u, channels)
            gets = g.consumers(u.outputs[0])
            first = [t for t in gets if t.op == "TupleGetItem" and t.attrs.get("index") == 0]
            # the running mean/var outputs may be projected, but nothing may read them
            rest_unused = all(t.op == "TupleGetItem" and not g.consumers(t.outputs[0])
                              for t in gets if t not in first)
            if folded is None or len(first) != 1 or not rest_unused:
                return glue
            _affine(glue, *folded, channels)
            glue.ops += [u.name, first[0].name]
            glue.kinds.append("BatchNormalization")
            cur = first[0].outputs[0]
            continue
        if u.op in ("Mul", "Add") and len(u.inputs) == 2 and u.inputs[0] != u.inputs[1]:
            other = u.inputs[1] if u.inputs[0] == cur else u.inputs[0]
            c = g.const(other)
            if c is not None:
                pc = pattern.per_channel(c, channels)
                if pc is None:
                    return glue
                if stage == 0:
                    _affine(glue, pc if u.op == "Mul" else None, pc if u.op == "Add" else None,
                            channels)
                elif u.op == "Add" and stage == 1:
                    glue.pre = add_bias(glue.pre, pc)
                elif u.op == "Add" and stage == 2:
                    glue.post = add_bias(glue.post, pc)
                else:
                    return glue
            elif u.op == "Add" and stage == 0 and shapes.get(other) == shapes.get(cur):
                glue.residual = other
                stage = 1
            else:
                return glue
            glue.ops.append(u.name)
            glue.kinds.append(u.op)
            cur = u.outputs[0]
            continue
        if u.op == "relax.nn.relu" and stage < 2:
            glue.relu, stage = True, 2
            glue.ops.append(u.name)
            glue.kinds.append("Relu")
            cur = u.outputs[0]
            continue
        if u.op == "Clip" and stage < 2 and np.isfinite([u.attrs["min"], u.attrs["max"]]).all():
            glue.hardtanh, stage = (float(u.attrs["min"]), float(u.attrs["max"])), 2
            glue.ops.append(u.name)
            glue.kinds.append("Clip")
            cur = u.outputs[0]
            continue
        if u.op == "relax.nn.prelu" and stage < 2 and u.inputs[0] == cur \
                and u.attrs.get("axis") == 1:
            slope = g.const(u.inputs[1])
            pc = None if slope is None else pattern.per_channel(
                np.asarray(slope).reshape(-1, 1, 1) if np.asarray(slope).ndim == 1 else slope,
                channels)
            if pc is None:
                return glue
            glue.slope, stage = pc, 2
            glue.ops.append(u.name)
            glue.kinds.append("PRelu")
            cur = u.outputs[0]
            continue
        return glue


@dataclass
class _Plan:
    """One fused kernel: the block, its glue, and what it writes."""

    block: pattern.ABCBlock
    x: str  # graph value of the block input
    glue: _Glue
    float_out: bool = False
    next_thresholds: np.ndarray | None = None  # thresholds of the ABC consumers it packs for
    packed_from: str | None = None  # chain end of the producer whose packed output we read
    pool: pattern.Op | None = None  # a MaxPool between that producer and us: OR-pool its planes
    word_bits: int = 64  # the packing word of the block's input (`block_word_bits`)


def _plan_fused(g: pattern.Graph, blocks: list[pattern.ABCBlock],
                shapes: dict[str, tuple],
                word_bits_of: Callable[[pattern.ABCBlock], int] | None = None
                ) -> dict[str, _Plan]:
    """Fused kernels by chain end: which glue each block absorbs and which planes it writes.
    `word_bits_of`: each block's input packing word (decided once, `block_word_bits`); a
    producer packs for its readers only where they take its own word."""
    claimed: set[str] = {op for b in blocks for op in b.ops}  # glue never takes a block's op
    plans: dict[str, _Plan] = {}
    for blk in blocks:
        glue = _glue_chain(g, blk, shapes, claimed)
        claimed.update(glue.ops)
        plans[glue.end] = _Plan(blk, blk.input, glue)
        if word_bits_of is not None:
            plans[glue.end].word_bits = word_bits_of(blk)
    block_ops = {op for p in plans.values() for op in p.block.ops}
    residual_of = {p.glue.residual for p in plans.values() if p.glue.residual}
    plan_of = {id(p.block): p for p in plans.values()}
    for end, plan in plans.items():
        pool = _pool_to_blocks(g, end, blocks)
        readers = [b for b in blocks if b.input == end] if pool is None else \
            [b for b in blocks if b.input == pool.outputs[0]]
        others = [u for u in g.consumers(end) if u.name not in block_ops
                  and (pool is None or u is not pool)]
        plan.float_out = bool(others) or end in residual_of
        o = int(plan.block.bases.shape[1])
        # Planes with per-channel thresholds pack in the kernel only ahead of a MaxPool (it
        # saves the float pool); before a binary conv directly a separate pack is faster.
        if readers and (not compute.packs_whole_words(o, 64)
                        or (pool is None and any(b.thresholds.ndim == 2 for b in readers))):
            plan.float_out = True  # the readers pack from the float output
        elif not any(plan_of[id(b)].word_bits == plan.word_bits for b in readers):
            plan.float_out = True  # the readers pack other words, from the float output
        elif readers:
            same = [b for b in readers if plan_of[id(b)].word_bits == plan.word_bits]
            thr = same[0].thresholds
            sharing = [b for b in same if np.array_equal(b.thresholds, thr)]
            plan.next_thresholds = np.asarray(thr, np.float32)
            for b in sharing:
                plan_of[id(b)].packed_from, plan_of[id(b)].pool = end, pool
            if len(sharing) != len(readers):
                plan.float_out = True  # the others pack from the float output
    return plans


def _pool_to_blocks(g: pattern.Graph, end: str,
                    blocks: list[pattern.ABCBlock]) -> pattern.Op | None:
    """A MaxPool that alone reads a fused kernel's output and is read by binary blocks only,
    none with complemented (flipped) bits: it can run on the packed planes (an OR)."""
    users = g.consumers(end)
    if len(users) != 1 or users[0].op != "relax.nn.max_pool2d" \
            or not users[0].attrs.get("plain"):
        return None
    pool = users[0]
    readers = [b for b in blocks if b.input == pool.outputs[0]]
    if not readers or len(g.consumers(pool.outputs[0])) != len(readers) \
            or any(b.flip is not None for b in readers):
        return None
    return pool


@mutator
class _FusedRewriter(PyExprMutator):
    """Emit each plan's kernel at its chain end; the replaced float ops become dead code."""

    def __init__(self, mod: tvm.IRModule, plans: dict[str, _Plan], vars_: dict[str, relax.Var],
                 target: tvm.target.Target, word_bits: int, scheduled: bool,
                 floats: dict | None = None) -> None:
        super().__init__(mod)
        self.floats = floats or {}
        self.plans, self.vars_, self.target = plans, vars_, target
        self.word_bits, self.scheduled = word_bits, scheduled
        self.by_var = {vars_[end]: end for end in plans}
        self.nhwc: dict[str, relax.Expr] = {}  # chain end -> NHWC float output
        self.packed: dict[str, relax.Expr] = {}  # chain end -> packed planes for its readers
        self.bitpacks: dict[tuple, relax.Expr] = {}
        self.pooled: dict[str, relax.Expr] = {}  # MaxPool output -> OR-pooled planes
        self.kernels: list[str] = []

    def _add(self, func: tvm.tirx.PrimFunc) -> relax.GlobalVar:
        return self.builder_.add_func(func, str(func.attrs["global_symbol"]))

    def _packed_input(self, plan: _Plan) -> relax.Expr:
        blk = plan.block
        if plan.packed_from is not None and plan.packed_from in self.packed:
            if plan.pool is None:
                return self.packed[plan.packed_from]
            return self._or_pool(self.packed[plan.packed_from], plan.pool, plan.x,
                                 plan.word_bits)
        w = plan.word_bits
        key = (plan.x, blk.thresholds.tobytes(), w)
        if key not in self.bitpacks:
            x = self._nhwc(plan.x)
            b, h, wd, c = _shape(x)
            func = bitpack_nhwc_func(b, h, wd, c, blk.N, w, self.target, scheduled=self.scheduled,
                                     per_channel=blk.thresholds.ndim == 2)
            out = relax.TensorType((blk.N, b, h, wd, -(-c // w)), f"uint{w}")
            thr = blk.thresholds
            self.bitpacks[key] = self.builder_.emit(relax.call_tir(
                self._add(func), [x, relax.const(thr, "float32")], out))
        return self.bitpacks[key]

    def _or_pool(self, packed: relax.Expr, pool: pattern.Op, out: str,
                 word_bits: int) -> relax.Expr:
        """MaxPool on the producer's planes (`packed_maxpool_func`), once per pool."""
        if out not in self.pooled:
            shape = _shape(packed)
            _, _, oh, ow = _shape(self.vars_[out])
            func = packed_maxpool_func(shape, pool.attrs["kernel"], pool.attrs["strides"],
                                       pool.attrs["pads"], (oh, ow), word_bits,
                                       self.target)
            ty = relax.TensorType((*shape[:2], oh, ow, shape[4]), f"uint{word_bits}")
            self.pooled[out] = self.builder_.emit(relax.call_tir(self._add(func), [packed], ty))
        return self.pooled[out]

    def _nhwc(self, name: str) -> relax.Expr:
        """A float activation in NHWC: a fused kernel's own output, or a permute of the NCHW
        value (which `_cancel_permutes` removes where the producer runs in NHWC too)."""
        if name not in self.nhwc:
            self.nhwc[name] = self.builder_.emit(relax.op.permute_dims(
                self.visit_expr(self.vars_[name]), [0, 2, 3, 1]))
        return self.nhwc[name]

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var in self.floats:
            blk, x = self.floats[binding.var]
            y = _float_block(self.builder_, self.visit_expr(x), blk)
            super().visit_var_binding_(relax.VarBinding(binding.var, y))  # the output's name
            return
        end = self.by_var.get(binding.var)
        if end is None:
            super().visit_var_binding_(binding)
            return
        plan = self.plans[end]
        blk, glue = plan.block, plan.glue
        wb = plan.word_bits
        geo = _block_geometry(blk, _shape(self.vars_[plan.x]), wb)
        b, o = geo.batch, geo.out_channels
        vec = block_vector(o, wb, self.target)
        nxt = 0 if plan.next_thresholds is None else int(plan.next_thresholds.shape[0])
        spec = compute.BlockSpec(
            geo, blk.act == "bipolar", vec, affine=glue.scale is not None,
            residual=glue.residual is not None, relu=glue.relu, float_out=plan.float_out,
            next_planes=nxt, pre_bias=glue.pre is not None, prelu=glue.slope is not None,
            post_bias=glue.post is not None, hardtanh=glue.hardtanh,
            next_per_channel=nxt > 0 and plan.next_thresholds.ndim == 2,
            lane_bits=block_lane_bits(geo, vec, self.target))
        func = abc_block_func(spec, self.target, scheduled=self.scheduled)
        wbits, wsum = pack_weights(blk.bases, word_bits=wb)
        ab = (blk.alpha[:, None, :] * blk.beta[None, :, None]).astype(np.float32)
        udt = f"uint{wb}"
        args = [self._packed_input(plan),
                relax.const(compute.block_weights(wbits, vec, spec.lane_bits),
                            "uint16" if spec.lane_bits else udt),
                relax.const(ab, "float32")]
        if spec.bipolar:
            args.append(relax.const(compute.bipolar_table(wsum, geo, int(blk.pad_value)),
                                    "float32"))
        if spec.affine:
            args += [relax.const(glue.scale, "float32"), relax.const(glue.shift, "float32")]
        if spec.residual:
            args.append(self._nhwc(glue.residual))
        args += [relax.const(v, "float32") for v in (glue.pre, glue.slope, glue.post)
                 if v is not None]
        if nxt:
            args.append(relax.const(plan.next_thresholds, "float32"))
        oh, ow = geo.out_height, geo.out_width
        outs = []
        if spec.float_out:
            outs.append(relax.TensorType((b, oh, ow, o), "float32"))
        if nxt:
            outs.append(relax.TensorType((nxt, b, oh, ow, -(-o // wb)), udt))
        gv = self._add(func)
        call = self.builder_.emit(relax.call_tir(gv, args, outs if len(outs) > 1 else outs[0]))
        results = ([self.builder_.emit(relax.TupleGetItem(call, i)) for i in range(len(outs))]
                   if len(outs) > 1 else [call])
        if spec.float_out:
            self.nhwc[end] = results[0]
            nchw = self.builder_.emit(relax.op.permute_dims(results[0], [0, 3, 1, 2]))
            self.set_var_remap(binding.var, nchw)
        else:
            super().visit_var_binding_(binding)  # dead after DCE: nothing reads it any more
        if nxt:
            self.packed[end] = results[-1]
        self.kernels.append(gv.name_hint)


def _block_geometry(blk: pattern.ABCBlock, x_shape: tuple[int, ...],
                    word_bits: int) -> compute.ConvGeometry:
    b, c, h, w = x_shape
    m, o, _, kh, kw = blk.bases.shape
    return compute.ConvGeometry(b, c, h, w, o, (kh, kw), tuple(blk.strides), tuple(blk.pads),
                                m, blk.N, word_bits)


def _fusable_target(target: tvm.target.Target, word_bits: int) -> bool:
    """x86 and aarch64 (64-bit words): on aarch64 the NHWC float path and the fused block
    kernels cut the modelled Pi 4 time of ABC-ResNet-18 from 202 to 64 ms (docs/benchmarks.md,
    the ARM cycle model); 32-bit ARMv7 keeps the unfused path."""
    triple = str(target.attrs.get("mtriple", ""))
    return (str(target.kind.name) == "llvm" and word_bits == 64
            and not triple.startswith(("arm",)))


def _explicit_blocks(graph: pattern.Graph, blocks: list[pattern.ABCBlock] | None
                     ) -> list[pattern.ABCBlock] | None:
    """The blocks carried as explicit calls (`abc_tvm.blocks`), named by their Relax values.
    `blocks=None` (a Relax module built some other way): None, and the matcher runs."""
    calls = [op for op in graph.ops if op.op == "ABCBlock"]
    if blocks is None:
        if calls:
            raise InternalError("the module carries explicit ABC blocks: pass them (blocks=)")
        return None
    if len(calls) != len(blocks) or {op.attrs["index"] for op in calls} != set(range(len(blocks))):
        lost = sorted(set(range(len(blocks))) - {op.attrs["index"] for op in calls})
        raise InternalError(f"{len(blocks)} binary blocks matched but {len(calls)} reached Relax "
                            f"(lost: {', '.join(blocks[i].name for i in lost) or 'none'})")
    return [dataclasses.replace(blocks[op.attrs["index"]], input=op.inputs[0],
                                output=op.outputs[0], ops=[op.name]) for op in calls]


def rewrite(mod: tvm.IRModule, target: tvm.target.Target, word_bits: int,
            func_name: str = "main", tunable: bool = False, fuse_glue: bool | None = None,
            accept: Callable[[pattern.ABCBlock], str | None] | None = None,
            blocks: list[pattern.ABCBlock] | None = None,
            ) -> tuple[tvm.IRModule, list[Rewritten], list[pattern.Miss]]:
    """Rewrite every ABC block of `mod[func_name]`; returns the module, the blocks, the misses.

    `tunable=True` emits the kernels unscheduled, tagged with their MetaSchedule rules (what
    `abc-tvm tune` extracts as tasks); the default emits them with the hand-written schedule.
    `fuse_glue` (default: on for x86 and aarch64 LLVM targets with 64-bit words) fuses the
    float ops after each block and the next block's bit-packing into one kernel (module doc).

    Blocks whose input is not a static 4-D float32 tensor, or whose output shape disagrees
    with the conv's, are left in float and reported as misses, as are those `accept` gives
    a reason to refuse (the compiler refuses blocks its ONNX-level matcher did not find).
    """
    func = mod[func_name]
    graph, vars_ = _graph(func)
    explicit = _explicit_blocks(graph, blocks)
    blocks, misses = (explicit, []) if explicit is not None else pattern.find_abc_blocks(graph)
    if fuse_glue is None:
        fuse_glue = _fusable_target(target, word_bits)
    accepted: list[pattern.ABCBlock] = []
    for blk in blocks:
        refused = accept(blk) if accept is not None else None
        if refused:
            misses.append(pattern.Miss(blk.name, "Conv", refused))
            continue
        x, y = vars_.get(blk.input), vars_.get(blk.output)
        if x is None or y is None or x.ty.dtype != "float32" or len(x.ty.shape) != 4:
            misses.append(pattern.Miss(blk.name, "Conv", "block input is not a 4-D float32 tensor"))
            continue
        if _shape(x)[1] != blk.bases.shape[2]:
            misses.append(pattern.Miss(blk.name, "Conv", "input channels differ from the weight"))
            continue
        if blk.pad_value and not fuse_glue:
            misses.append(pattern.Miss(blk.name, "Conv", "a ±1 border (Pad(value=±1)) runs on "
                                                         "the fused x86/aarch64 kernels only"))
            continue
        if fuse_glue and not _output_matches(blk, x, y):
            misses.append(pattern.Miss(blk.name, "Conv",
                                       "block output shape differs from the conv"))
            continue
        accepted.append(blk)
    # an explicit block the kernels refuse still has to be computed: as float ops
    floats = ({vars_[b.output]: (b, vars_[b.input]) for b in blocks if b not in accepted}
              if explicit is not None else {})
    if not accepted and not floats:  # a float model (or part): its layout all the same
        return (_float_layout(mod, func_name, target) if fuse_glue else mod), [], misses
    if fuse_glue:
        shapes = {n: _shape(v) for n, v in vars_.items()
                  if isinstance(v.ty, relax.TensorType) and v.ty.shape is not None}
        fplans = _plan_fused(graph, accepted, shapes, lambda blk: block_word_bits(
            _block_geometry(blk, shapes[blk.input], word_bits), target))
        done = [Rewritten(p.block, "abc_block: AND/popcount + fused " + (
            ", ".join(dict.fromkeys(p.glue.kinds)) or "epilogue")
            + ("; its input MaxPool runs on packed bits" if p.pool is not None else ""),
            list(p.glue.kinds), p.pool is not None) for p in fplans.values()]
        done.sort(key=lambda r: accepted.index(r.block))
        rw = _FusedRewriter(mod, fplans, vars_, target, word_bits, scheduled=not tunable,
                            floats=floats)
    else:
        done = [Rewritten(b, "bitpack + abc_conv2d (AND/popcount)") for b in accepted]
        plans = {vars_[b.output]: (b, vars_[b.input]) for b in accepted}
        rw = _Rewriter(mod, plans, target, word_bits, scheduled=not tunable, floats=floats)
    new_func = rw.visit_expr(func)
    rw.builder_.update_func(mod.get_global_var(func_name), new_func)
    out = rw.builder_.get()
    out = relax.transform.DeadCodeElimination()(out)
    if fuse_glue:
        out = _float_layout(out, func_name, target)
    return out, done, misses


def _float_layout(mod: tvm.IRModule, func_name: str, target: tvm.target.Target) -> tvm.IRModule:
    """x86: BatchNorm folded into float convs, float convs (and what follows them) in NHWC,
    the layout the float schedules tile and the binary kernels read and write, and their
    weights blocked for the register tile."""
    mod = float_layout.to_nhwc(float_layout.fold_conv_batch_norm(mod, func_name), func_name)
    return float_layout.block_float_convs(mod, target, func_name)


def _output_matches(blk: pattern.ABCBlock, x: relax.Var, y: relax.Var) -> bool:
    b, _, h, w = _shape(x)
    o, kh, kw = (int(d) for d in (blk.bases.shape[1], *blk.bases.shape[3:]))
    top, left, bottom, right = blk.pads
    oh = (h + top + bottom - kh) // blk.strides[0] + 1
    ow = (w + left + right - kw) // blk.strides[1] + 1
    return _shape(y) == (b, o, oh, ow)
