"""Float glue around the ABC kernels (x86, aarch64): BatchNorm folding, NHWC, permute cleanup.

After the ABC rewrite the binary region is NHWC (the fused kernels read and write NHWC) and
the float ops around it are NCHW with `permute_dims` at every boundary. These passes make
the float ops NHWC as well, so that layout changes remain only where the network enters and
leaves the ABC region (the float stem's input, the classifier head):

- `fold_conv_batch_norm`: inference BatchNorm after a float conv with constant weights is
  folded into the weights and a bias, as ONNX Runtime folds it (W' = W * gamma/sqrt(var+eps),
  b' = beta - mean * gamma/sqrt(var+eps), float32), so conv + bias + ReLU fuse into one
  kernel;
- `to_nhwc`: Relax's ConvertLayout (conv2d to NHWC/HWIO; BN, ReLU, pooling, adds follow),
  then `simplify_permutes`: permute pairs cancel, identity permutes vanish, permutes of
  constants fold, and a keepdims mean over a permuted tensor reduces the tensor before
  permuting (the classifier's global pooling).
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator


def _defs(func: relax.Function) -> tuple[dict, dict]:
    """Var -> bound value, and Var -> number of uses, over a function's dataflow bindings."""
    defs: dict = {}
    uses: dict = {}

    def count(e: relax.Expr) -> None:
        if isinstance(e, relax.Var):
            uses[e] = uses.get(e, 0) + 1
        elif isinstance(e, relax.Call):
            for a in e.args:
                count(a)
        elif isinstance(e, relax.Tuple):
            for f in e.fields:
                count(f)
        elif isinstance(e, relax.TupleGetItem):
            count(e.tuple_value)

    for block in func.body.blocks:
        for b in block.bindings:
            defs[b.var] = b.value
            count(b.value)
    count(func.body.body)
    return defs, uses


def _is_op(e: relax.Expr, name: str) -> bool:
    return isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == name


def _const(e: relax.Expr, defs: dict) -> np.ndarray | None:
    while isinstance(e, relax.Var) and e in defs:
        e = defs[e]
    if isinstance(e, tvm.ir.GenericConst):
        return e.value.numpy()
    return None


@mutator
class _FoldBN(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, defs: dict, uses: dict) -> None:
        super().__init__(mod)
        self.defs, self.uses = defs, uses

    def _fold(self, value: relax.Expr) -> relax.Expr | None:
        if not isinstance(value, relax.TupleGetItem) or value.index != 0:
            return None
        bn = self.defs.get(value.tuple_value)
        if not _is_op(bn, "relax.nn.batch_norm"):
            return None
        a = bn.attrs
        conv_var = bn.args[0]
        conv = self.defs.get(conv_var)
        if bool(a.training) or int(a.axis) != 1 or not _is_op(conv, "relax.nn.conv2d"):
            return None
        ca = conv.attrs
        if (str(ca.data_layout), str(ca.kernel_layout), str(ca.out_layout)) != (
                "NCHW", "OIHW", "NCHW") or self.uses.get(conv_var, 0) != 1:
            return None
        w = _const(conv.args[1], self.defs)
        params = [_const(p, self.defs) for p in bn.args[1:]]
        if w is None or w.dtype != np.float32 or any(p is None for p in params):
            return None
        o = w.shape[0]
        gamma, beta, mean, var = (np.asarray(p, np.float32).reshape(-1) for p in params)
        if any(p.size != o for p in (gamma, beta, mean, var)):
            return None
        if not bool(a.scale):
            gamma = np.ones(o, np.float32)
        if not bool(a.center):
            beta = np.zeros(o, np.float32)
        scale = ((np.float32(1.0) / np.sqrt(var + np.float32(a.epsilon))) * gamma).astype(
            np.float32)
        shift = (beta - mean * scale).astype(np.float32)
        w2 = (w * scale[:, None, None, None]).astype(np.float32)
        x = self.visit_expr(conv.args[0])
        new_conv = self.builder_.emit(relax.op.nn.conv2d(
            x, relax.const(w2), strides=ca.strides, padding=ca.padding, dilation=ca.dilation,
            groups=ca.groups, data_layout="NCHW", kernel_layout="OIHW", out_layout="NCHW",
            out_dtype=ca.out_dtype if str(ca.out_dtype) else None))
        return relax.op.add(new_conv, relax.const(shift.reshape(1, o, 1, 1)))

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        folded = self._fold(binding.value)
        if folded is not None:
            binding = relax.VarBinding(binding.var, folded)
        super().visit_var_binding_(binding)


_ELEMENTWISE = ("relax.add", "relax.subtract", "relax.multiply")
_POOLS = {"relax.nn.avg_pool2d": relax.op.nn.avg_pool2d,
          "relax.nn.max_pool2d": relax.op.nn.max_pool2d}


@mutator
class _Permutes(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, defs: dict, changed: list[int]) -> None:
        super().__init__(mod)
        self.defs = defs
        self.changed = changed  # one entry per rewritten binding

    def _permute_of(self, e: relax.Expr) -> tuple[relax.Expr, list[int]] | None:
        value = self.defs.get(e) if isinstance(e, relax.Var) else e
        if _is_op(value, "relax.permute_dims") and value.attrs.axes is not None:
            return value.args[0], [int(a) for a in value.attrs.axes]
        return None

    def _simplify(self, value: relax.Expr) -> relax.Expr | None:
        if _is_op(value, "relax.permute_dims") and value.attrs.axes is not None:
            x, axes = value.args[0], [int(a) for a in value.attrs.axes]
            inner = self._permute_of(x)
            if inner is not None:  # permute(permute(y, p1), p2) = permute(y, p1[p2])
                x, axes = inner[0], [inner[1][a] for a in axes]
            c = _const(x, self.defs)
            if c is not None:
                return relax.const(np.ascontiguousarray(np.transpose(c, axes)))
            if axes == list(range(len(axes))):
                return x
            if inner is not None:
                return relax.op.permute_dims(x, axes)
            return None
        if any(_is_op(value, op) for op in _ELEMENTWISE) and len(value.args) == 2:
            # op(permute(y, p), c) = permute(op(y, c'), p): the permute moves down to meet
            # the next one (a per-channel bias between two NHWC kernels costs no transposes)
            for k in (0, 1):
                inner, c = self._permute_of(value.args[k]), _const(value.args[1 - k], self.defs)
                if inner is None or c is None or c.ndim != len(inner[1]):
                    continue
                y, perm = inner
                back = np.ascontiguousarray(np.transpose(c, np.argsort(perm)))
                ops = [self.visit_expr(y), relax.const(back)]
                inner_op = self.builder_.emit(relax.Call(value.op, ops if k == 0 else ops[::-1],
                                                         value.attrs))
                return relax.op.permute_dims(inner_op, perm)
            return None
        pool = next((op for op in _POOLS if _is_op(value, op)), None)
        if pool is not None and str(value.attrs.layout) == "NCHW" and \
                str(value.attrs.out_layout) == "NCHW":
            # pool(permute(y, NHWC->NCHW)) = permute(pool of y in NHWC)
            inner = self._permute_of(value.args[0])
            if inner is None or inner[1] != [0, 3, 1, 2]:
                return None
            a = value.attrs
            new = self.builder_.emit(_POOLS[pool](
                self.visit_expr(inner[0]), [int(v) for v in a.pool_size],
                [int(v) for v in a.strides], [int(v) for v in a.padding],
                [int(v) for v in a.dilation], bool(a.ceil_mode), bool(a.count_include_pad),
                layout="NHWC", out_layout="NHWC"))
            return relax.op.permute_dims(new, [0, 3, 1, 2])
        if _is_op(value, "relax.nn.prelu"):
            # prelu(permute(y, p), slope, axis) = permute(prelu(y, slope, p[axis]), p)
            inner = self._permute_of(value.args[0])
            if inner is None:
                return None
            y, perm = inner
            axis = perm[int(value.attrs.axis) % len(perm)]
            new = self.builder_.emit(relax.op.nn.prelu(self.visit_expr(y),
                                                       self.visit_expr(value.args[1]), axis))
            return relax.op.permute_dims(new, perm)
        if _is_op(value, "relax.concat") and isinstance(value.args[0], relax.Tuple):
            # concat of tensors permuted alike = permute of their concat on the mapped axis
            parts = [self._permute_of(f) for f in value.args[0].fields]
            if any(p is None for p in parts) or len({tuple(p[1]) for p in parts}) != 1:
                return None
            perm = parts[0][1]
            axis = perm[int(value.attrs.axis) % len(perm)]
            new = self.builder_.emit(relax.op.concat(
                [self.visit_expr(p[0]) for p in parts], axis))
            return relax.op.permute_dims(new, perm)
        if _is_op(value, "relax.mean") and bool(value.attrs.keepdims) and \
                value.attrs.axis is not None:
            inner = self._permute_of(value.args[0])
            if inner is None:
                return None
            y, p = inner
            axes = sorted(p[int(a)] for a in value.attrs.axis)
            reduced = self.builder_.emit(relax.op.mean(self.visit_expr(y), axes, keepdims=True))
            return relax.op.permute_dims(reduced, p)
        return None

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        new = self._simplify(binding.value)
        if new is not None:
            self.changed.append(1)
            if isinstance(new, relax.Var) and isinstance(binding.var, relax.DataflowVar):
                self.set_var_remap(binding.var, self.visit_expr(new))
                return
            binding = relax.VarBinding(binding.var, new)
        super().visit_var_binding_(binding)


def _run(mutator_cls, mod: tvm.IRModule, func_name: str, *extra) -> tvm.IRModule:
    func = mod[func_name]
    defs, uses = _defs(func)
    args = (defs, uses) if mutator_cls is _FoldBN else (defs,)
    m = mutator_cls(mod, *args, *extra)
    new_func = m.visit_expr(func)
    m.builder_.update_func(mod.get_global_var(func_name), new_func)
    return relax.transform.DeadCodeElimination()(m.builder_.get())


def fold_conv_batch_norm(mod: tvm.IRModule, func_name: str = "main") -> tvm.IRModule:
    """Fold inference BatchNorm into the float conv2d before it (constant weights)."""
    return _run(_FoldBN, mod, func_name)


def simplify_permutes(mod: tvm.IRModule, func_name: str = "main") -> tvm.IRModule:
    for _ in range(12):  # a permute moves one op per sweep: until a sweep changes nothing
        changed: list[int] = []
        mod = _run(_Permutes, mod, func_name, changed)
        if not changed:
            break
    return mod


@mutator
class _BlockConvs(PyExprMutator):
    """NHWC/HWIO float convs with a constant weight -> the blocked-weight conv kernel, or
    for depthwise and narrow groups the banded one (`_lower_conv`)."""

    def __init__(self, mod: tvm.IRModule, defs: dict, simd) -> None:
        super().__init__(mod)
        self.defs, self.simd = defs, simd

    def _block(self, value: relax.Expr, out: relax.Var) -> relax.Expr | None:
        if not _is_op(value, "relax.nn.conv2d"):
            return None
        a = value.attrs
        if (str(a.data_layout), str(a.kernel_layout), str(a.out_layout)) != (
                "NHWC", "HWIO", "NHWC") or any(int(d) != 1 for d in a.dilation):
            return None
        w = _const(value.args[1], self.defs)
        x_sinfo, y_sinfo = value.args[0].ty, out.ty
        if w is None or w.dtype != np.float32 or str(y_sinfo.dtype) != "float32" \
                or x_sinfo.shape is None or y_sinfo.shape is None:
            return None
        try:
            x_shape = tuple(int(d) for d in x_sinfo.shape)
            _, oh, ow, o = (int(d) for d in y_sinfo.shape)
        except TypeError:  # a symbolic dimension
            return None
        geometry = (x_shape, tuple(int(s) for s in a.strides),
                    tuple(int(p) for p in a.padding), (oh, ow))
        lowered = _lower_conv(w, int(a.groups), geometry, self.simd)
        if lowered is None:
            return None
        func, weight = lowered
        gv = self.builder_.add_func(func, str(func.attrs["global_symbol"]))
        return relax.call_tir(gv, [self.visit_expr(value.args[0]), relax.const(weight)],
                              relax.TensorType(y_sinfo.shape, "float32"))

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        new = self._block(binding.value, binding.var)
        if new is not None:
            binding = relax.VarBinding(binding.var, new)
        super().visit_var_binding_(binding)


def _lower_conv(w: np.ndarray, groups: int, geometry: tuple, simd,
                ) -> tuple[tvm.tirx.PrimFunc, np.ndarray] | None:
    """(the unscheduled PrimFunc, its weight) for an HWIO float conv; None: TOPI's conv.

    Dense convs, and groups of at least a vector of output channels: the blocked conv
    (`float_conv`). Narrower groups are merged into groups of a vector (block-diagonal
    weights), except groups of k in and k out channels with 4k <= lanes (depthwise: k = 1),
    which take the banded conv (`float_depthwise`: 2k - 1 taps per k; merging would do
    lanes / k). Measured 1 thread, AVX-512, 3x3 at 28x28: k = 4 banded 0.13 ms, merged
    0.27; k = 8 banded 0.39, merged 0.20 (TOPI's gather: 2 and 5 ms).
    """
    if groups == 1:
        return _blocked(w, 1, geometry, simd)
    group_in, out = w.shape[2:]
    per_group = out // groups
    lanes = simd.fp32_lanes
    merge = lanes // math.gcd(per_group, lanes)
    if group_in == per_group and (4 * per_group <= lanes or groups % merge):
        return _banded(w, geometry)
    if groups % merge:
        return None
    if merge > 1:
        from abc_tvm.schedules import float_conv

        w = float_conv.merge_groups(w, groups, merge)
    return _blocked(w, groups // merge, geometry, simd)


def _blocked(w: np.ndarray, groups: int, geometry: tuple, simd,
             ) -> tuple[tvm.tirx.PrimFunc, np.ndarray] | None:
    """The blocked conv; a grouped one's block within a group (its input a broadcast)."""
    from abc_tvm.schedules import float_conv
    from abc_tvm.schedules.float_default import conv_block

    x_shape, stride, pads, (oh, ow) = geometry
    out = w.shape[3]
    block = math.gcd(conv_block(out, ow, simd), out // groups)
    if out % block:
        return None
    wb = float_conv.block_weight(w, block)
    return float_conv.conv_func(x_shape, wb.shape, stride, pads, (oh, ow), groups), wb


def _banded(w: np.ndarray, geometry: tuple) -> tuple[tvm.tirx.PrimFunc, np.ndarray]:
    from abc_tvm.schedules import float_depthwise

    x_shape, stride, pads, out_hw = geometry
    band = float_depthwise.band_weight(w)
    return float_depthwise.depthwise_func(x_shape, band.shape, stride, pads, out_hw), band


def block_float_convs(mod: tvm.IRModule, target: tvm.target.Target,
                      func_name: str = "main") -> tvm.IRModule:
    """NHWC float convs -> `schedules.float_conv` with the weight blocked for the target's
    register tile (contiguous weight reads; see that module), depthwise and narrow-group
    convs -> `schedules.float_depthwise`."""
    from abc_tvm.schedules._util import simd_of

    func = mod[func_name]
    defs, _ = _defs(func)
    m = _BlockConvs(mod, defs, simd_of(target))
    new_func = m.visit_expr(func)
    m.builder_.update_func(mod.get_global_var(func_name), new_func)
    return relax.transform.DeadCodeElimination()(m.builder_.get())


def to_nhwc(mod: tvm.IRModule, func_name: str = "main") -> tvm.IRModule:
    """Float convs (and the ops that follow their layout) to NHWC; boundary permutes cleaned."""
    mod = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]})(mod)
    return simplify_permutes(mod, func_name)
