"""The ABC rewrite: find ABC blocks in a Relax function and replace each by binary kernels.

Every block `Y = Σ_n β_n Conv(A_n(X), Σ_m α_m B_m)` becomes
    packed = call_tir(bitpack, X, v)            # N bit-planes, NHWC words
    Y      = call_tir(abc_conv2d, packed, Bbits, Σ_c B, α, β)
with the bases packed at compile time. Matching is `abc_tvm.pattern` (the same matcher the
exporter's checker uses) on an op graph read from the Relax bindings; what it does not match
is left as it is, so it runs as ordinary float ops.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx
import tvm
from abc_tvm.schedules import abc_conv_func, bitpack_func
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from abc_tvm import pattern
from abc_tvm.reference import pack_weights

# Relax ops in ONNX's vocabulary, for the matcher.
_OPS = {
    "relax.add": "Add", "relax.subtract": "Sub", "relax.multiply": "Mul",
    "relax.greater_equal": "GreaterOrEqual", "relax.sign": "Sign", "relax.astype": "Cast",
    "relax.sum": "ReduceSum", "relax.nn.conv2d": "Conv",
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
                ops.append(pattern.Op(out, type(v).__name__, ins, [out]))
                continue
            op = v.op.name
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
                        ops.append(pattern.Op(out, "Clip", [x], [out],
                                              {"min": lo, "max": float(bound)}))
                        continue
                ops.append(pattern.Op(out, f"call_tir:{gv.name_hint}", ins, [out]))
                continue
            ins = [name(a) for a in v.args]
            out = name(b.var)
            if op in _NUMPY and all(i in consts for i in ins):
                consts[out] = np.asarray(_NUMPY[op](*(consts[i] for i in ins)))
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
            ops.append(pattern.Op(out, _OPS.get(op, op), ins, [out], attrs))
    if isinstance(func.body.body, relax.Var):
        ops.append(pattern.Op("return", "Return", [name(func.body.body)], []))
    return pattern.Graph(ops, consts), vars_


def _shape(e: relax.Expr) -> tuple[int, ...]:
    return tuple(int(d) for d in e.ty.shape)


@mutator
class _Rewriter(PyExprMutator):
    """Replace each block's output binding with the bitpack + ABC conv calls."""

    def __init__(self, mod: tvm.IRModule, plans: dict, target: tvm.target.Target,
                 word_bits: int) -> None:
        super().__init__(mod)
        self.plans, self.target, self.word_bits = plans, target, word_bits
        self.kernels: list[str] = []

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
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
        pack = bitpack_func(B, C, H, W, block.N, w, self.target)
        conv = abc_conv_func(B, C, H, W, O, kernel=(kh, kw), stride=block.strides,
                             padding=block.pads, M=M, N=block.N,
                             bipolar=block.act == "bipolar", word_bits=w, target=self.target)
        # kernels are named by their shapes, so layers of one shape share one kernel
        pack_gv = self.builder_.add_func(pack, str(pack.attrs["global_symbol"]))
        conv_gv = self.builder_.add_func(conv, str(conv.attrs["global_symbol"]))
        wbits, wsum = pack_weights(block.bases, word_bits=w)
        packed = self.builder_.emit(relax.call_tir(
            pack_gv, [x, relax.const(block.shift, "float32")],
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


def rewrite(mod: tvm.IRModule, target: tvm.target.Target, word_bits: int,
            func_name: str = "main") -> tuple[tvm.IRModule, list[Rewritten], list[pattern.Miss]]:
    """Rewrite every ABC block of `mod[func_name]`; returns the module, the blocks, the misses.

    Blocks whose input is not a static 4-D float32 tensor, or whose output shape disagrees
    with the conv's, are left in float and reported as misses.
    """
    func = mod[func_name]
    graph, vars_ = _graph(func)
    blocks, misses = pattern.find_abc_blocks(graph)
    plans: dict = {}
    done: list[Rewritten] = []
    for blk in blocks:
        x, y = vars_.get(blk.input), vars_.get(blk.output)
        if x is None or y is None or x.ty.dtype != "float32" or len(x.ty.shape) != 4:
            misses.append(pattern.Miss(blk.name, "Conv", "block input is not a 4-D float32 tensor"))
            continue
        if _shape(x)[1] != blk.bases.shape[2]:
            misses.append(pattern.Miss(blk.name, "Conv", "input channels differ from the weight"))
            continue
        plans[y] = (blk, x)
        done.append(Rewritten(blk, "bitpack + abc_conv2d (AND/popcount)"))
    if not plans:
        return mod, done, misses
    rw = _Rewriter(mod, plans, target, word_bits)
    new_func = rw.visit_expr(func)
    rw.builder_.update_func(mod.get_global_var(func_name), new_func)
    out = rw.builder_.get()
    out = relax.transform.DeadCodeElimination()(out)
    return out, done, misses
