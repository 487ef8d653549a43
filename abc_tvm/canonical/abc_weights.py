"""ABC weights as trained: the bases read where the graph builds them, kept through folding.

ABC-Net's training code (Lin et al., NIPS 2017, and the public ports) computes each conv
weight from a latent W in the forward: `Σ_m α_m · sign(W − mean(W) + u_m·std(W))`, α
constants, learned, or least squares from W. Folded, that is one constant whose nested bases
leave only M + 1 distinct values, and whose float32 sum is ONNX Runtime's, not ours: an
exact decomposition then depends on rounding. Three rules instead:

- `read_bases` (before folding): a conv weight `ReduceSum(Mul(a, s), axes=[0])` or a sum of
  `Mul(a_m, s_m)` terms, computed from constants, where s evaluates to exactly ±1 and a
  broadcasts as α per layer or per output channel: a and s are evaluated by ONNX Runtime
  (the values the model computes) and the weight is rewritten as the contract's stacked
  `ReduceSum(Mul(α, B), axes=[0])` with α and B constants. The bases are the model's own.
- `held_for_folding` (used by `fold_constants`): the constants of every stacked weight,
  which ONNX Runtime's folding would otherwise fold into one weight again.
- `snap_folded` (after folding): a conv the matcher would make binary but for a folded
  weight with no exact decomposition gets one within FOLD_ULPS ulps (nested levels or 2^M
  signed sums, `decompose_near`), written in the stacked form and noted.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from abc_tvm import pattern
from abc_tvm.canonical.graph import Graph
from abc_tvm.canonical.rules import Note
from abc_tvm.pattern import MAX_BASES, _layer_wise, _levels, _per_channel, _signed_sums, weight_of

# A folded weight within this many float32 ulps (of the largest |w| of its α set) of
# Σ α_m B_m is read as that sum: the rounding of M ≤ 8 float32 products summed in some
# order is below (M - 1)/2 ulps, and α fitted to it adds at most M/2 more.
FOLD_ULPS = 16
# the matcher's reason for a folded weight it cannot decompose bit for bit
NOT_EXACT = "folded weight has no exact decomposition"


def _cluster(v: np.ndarray, tol: float) -> np.ndarray | None:
    """v (float64) with each value replaced by the mean of its cluster (sorted values closer
    than `tol` to a neighbour), the outermost pair made symmetric where it is within `tol`
    of it; None where a cluster spans more than 2·tol, or for more than 2^MAX_BASES.

    A folded weight holds each sum Σ α_m B_m once per sign pattern, up to float rounding:
    the clusters are those sums, the decompositions below read them as exact levels."""
    vals, inv = np.unique(v, return_inverse=True)
    cuts = np.flatnonzero(np.diff(vals) > tol) + 1
    if len(cuts) + 1 > 2 ** MAX_BASES:
        return None
    groups = np.split(vals, cuts)
    if any(grp[-1] - grp[0] > 2 * tol for grp in groups):
        return None
    reps = np.array([grp.mean() for grp in groups])
    if len(reps) > 1 and abs(reps[0] + reps[-1]) <= tol:
        reps[0], reps[-1] = -(reps[-1] - reps[0]) / 2, (reps[-1] - reps[0]) / 2
    label = np.repeat(np.arange(len(groups)), [len(grp) for grp in groups])
    return reps[label[inv]].reshape(v.shape)


def _near(split, ulps: float):
    """`split` read within `ulps` float32 ulps of the largest |w|: the structure (which
    bases) from the clustered levels, α by least squares on w itself (float64)."""
    def near(w: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        top = np.float32(np.abs(w).max())
        if top == 0:
            return None
        q = _cluster(w.astype(np.float64), ulps * float(np.spacing(top)))
        got = None if q is None else split(q)
        if got is None:
            return None
        bases = got[0]
        a = np.linalg.lstsq(bases.reshape(bases.shape[0], -1).T.astype(np.float64),
                            w.reshape(-1).astype(np.float64), rcond=None)[0]
        return bases, a.astype(np.float32)
    return near


def ulps_off(w: np.ndarray, bases: np.ndarray, alpha: np.ndarray,
             layer: bool = False) -> np.ndarray:
    """|Σ α_m B_m − W| per output channel in float32 ulps of the channel's largest |w| (of
    the layer's, with `layer`: one α set for the layer, one rounding scale)."""
    w = w.astype(np.float32)
    diff = np.abs(weight_of(bases, alpha).astype(np.float64) - w).reshape(len(w), -1)
    top = np.abs(w).reshape(w.shape[0], -1).max(axis=1)
    unit = np.spacing(np.full_like(top, top.max()) if layer else top).astype(np.float64)
    return diff.max(axis=1) / np.where(unit > 0, unit, np.inf)


def decompose_near(w: np.ndarray, ulps: float
                   ) -> tuple[np.ndarray, np.ndarray, float] | None:
    """A decomposition of a folded (O, I, kh, kw) weight within float rounding: (bases, α,
    the largest offset in ulps), or None.

    For weights folded by another program (ONNX Runtime's ReduceSum, a nested ABC weight
    with M + 1 levels, α from least squares): the exact `decompose_folded` asks that our
    float32 sum reproduce theirs bit for bit, which rounding decides. Here Σ α_m B_m must
    lie within `ulps` ulps of the largest |w| of each α set (a channel, or the layer); the
    caller replaces W by that sum and says so, so the kernel and the graph agree. Fewest
    bases win, layer-wise α on a tie."""
    w = w.astype(np.float32)
    found = []
    for split in (_signed_sums, _levels):
        for scope in (_layer_wise, _per_channel):
            got = scope(w, _near(split, ulps))
            if got is None or got[0].shape[0] > MAX_BASES:
                continue
            off = ulps_off(w, *got, layer=scope is _layer_wise)
            if np.all(off <= ulps):
                found.append((got[0], got[1], float(off.max())))
    return min(found, key=lambda c: c[0].shape[0]) if found else None


def _reduce_axes(g: Graph, node: onnx.NodeProto) -> list[int] | None:
    """ReduceSum's axes, from the attribute (opset < 13) or the constant input."""
    for a in node.attribute:
        if a.name == "axes":
            return list(a.ints)
    if len(node.input) > 1 and node.input[1]:
        c = g.const(node.input[1])
        return None if c is None else [int(v) for v in c.reshape(-1)]
    return None


def _keepdims(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "keepdims"), 1)


def _computed(g: Graph) -> set[str]:
    """Values computed from constants alone (random ops, having no inputs, excepted)."""
    known = set(g.consts)
    changed = True
    while changed:
        changed = False
        for n in g.nodes:
            if n.input and all(not i or i in known for i in n.input) \
                    and not all(o in known for o in n.output):
                known.update(o for o in n.output if o)
                changed = True
    return known


def _terms(g: Graph, value: str) -> list[tuple[str, str, bool]] | None:
    """The weight as a sum of α·B products: [(operand, operand, stacked)], where `stacked`
    says the product is summed over its axis 0 by a ReduceSum; None if not that form."""
    node = g.producer(value)
    if node is None:
        c = g.const(value)  # python's sum() starts from 0: a zero term is no term
        return [] if c is not None and not np.any(c) else None
    if node.op_type == "ReduceSum" and _reduce_axes(g, node) == [0] and not _keepdims(node):
        mul = g.producer(node.input[0])
        if mul is None or mul.op_type != "Mul" or len(mul.input) != 2:
            return None
        return [(mul.input[0], mul.input[1], True)]
    if node.op_type in ("Add", "Sum"):
        out: list[tuple[str, str, bool]] = []
        for i in node.input:
            t = _terms(g, i) if g.producer(i) is None or g.producer(i).op_type != "Mul" \
                else [(g.producer(i).input[0], g.producer(i).input[1], False)]
            if t is None:
                return None
            out += t
        return out
    return None


def _evaluate(g: Graph, values: set[str]) -> dict[str, np.ndarray]:
    """The float32 values the model computes for `values` (each computed from constants),
    by ONNX Runtime on the subgraph that computes them."""
    import onnxruntime as ort

    need, todo, nodes = set(), list(values), []
    while todo:
        v = todo.pop()
        node = g.producer(v)
        if v in need or node is None:
            continue
        need.add(v)
        if node not in nodes:
            nodes.append(node)
            todo += [i for i in node.input if i]
    want = [v for v in values if g.producer(v) is not None]
    got = {v: g.consts[v] for v in values if g.producer(v) is None}
    if not want:
        return got
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(
        _ordered(nodes, set(g.consts)), "abc_weights", [],
        [helper.make_tensor_value_info(v, TensorProto.FLOAT, None) for v in want],
        [numpy_helper.from_array(np.asarray(c), k) for k, c in g.consts.items() if k in used])
    model = helper.make_model(graph, opset_imports=list(g.model.opset_import))
    model.ir_version = g.model.ir_version
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return got | dict(zip(want, sess.run(want, {}), strict=True))


def _ordered(nodes: list[onnx.NodeProto], ready: set[str]) -> list[onnx.NodeProto]:
    """`nodes` in an order that computes each input before it is read."""
    ready, order, pending = set(ready) | {""}, [], list(nodes)
    while pending:
        rest = [n for n in pending if not all(i in ready for i in n.input)]
        for n in pending:
            if n not in rest:
                order.append(n)
                ready.update(n.output)
        if len(rest) == len(pending):
            raise ValueError("weight subgraph reads a value it does not compute")
        pending = rest
    return order


def _as_alpha(a: np.ndarray, lead: int, shape: tuple[int, ...]) -> np.ndarray | None:
    """a broadcast against ±1 bases of `shape` ([lead dims..., O, I, kh, kw]) as α per
    leading index and output channel, [lead, O]; None unless a is constant over I, kh, kw."""
    nd = len(shape)
    if a.ndim > nd or a.dtype != np.float32:
        return None
    a = a.reshape((1,) * (nd - a.ndim) + a.shape)
    if any(d != 1 for d in a.shape[-3:]) or any(d not in (1, s) for d, s in
                                                zip(a.shape[:-3], shape[:-3], strict=True)):
        return None
    return np.broadcast_to(a.reshape(a.shape[:-3]), shape[:-3]).reshape(lead, shape[-4])


def _bases_alpha(terms, vals: dict[str, np.ndarray],
                 shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """(B ±1 [M, O, I, kh, kw], α [M, O]) of α·B terms, or None where one is not such."""
    bases, alphas = [], []
    for p, q, stacked in terms:
        for s, a in ((vals[q], vals[p]), (vals[p], vals[q])):
            full = (s.shape[0], *shape) if stacked and s.ndim == 5 else shape
            if s.shape != full or s.dtype != np.float32 or not np.all(np.abs(s) == 1):
                continue
            alpha = _as_alpha(a, full[0] if stacked else 1, full)
            if alpha is not None:
                bases.append(s.reshape(-1, *shape))
                alphas.append(alpha)
                break
        else:
            return None
    if not bases:
        return None
    return np.concatenate(bases).astype(np.float32), np.concatenate(alphas).astype(np.float32)


def _stacked(g: Graph, bases: np.ndarray, alpha: np.ndarray, hint: str) -> str:
    """The contract's stacked weight ReduceSum(Mul(α, B), axes=[0]) as new nodes; α is
    [M, 1, 1, 1, 1] where every output channel shares it, else [M, O, 1, 1, 1]."""
    layer = bool(np.all(alpha == alpha[:, :1]))
    a5 = (alpha[:, :1] if layer else alpha).reshape(alpha.shape[0], -1, 1, 1, 1)
    a = g.add_const(np.ascontiguousarray(a5, np.float32), f"{hint}.alpha")
    b = g.add_const(np.ascontiguousarray(bases, np.float32), f"{hint}.bases")
    axes = g.add_const(np.array([0], np.int64), f"{hint}.axes")
    (scaled,) = g.add_node("Mul", [a, b], f"{hint}.scaled")
    return g.add_node("ReduceSum", [scaled, axes], f"{hint}.weight", keepdims=0)[0]


def _split_bias(g: Graph, conv: onnx.NodeProto) -> None:
    """Conv(x, W, b) -> Conv(x, W) + b[1, O, 1, 1], as `rules.split_conv_bias` writes it
    for constant weights (a stacked weight is no constant to that rule)."""
    if len(conv.input) < 3 or not conv.input[2]:
        return
    out, b = conv.output[0], conv.input[2]
    conv_out = g.fresh(out)
    if (c := g.const(b)) is not None and c.ndim == 1:
        bias = g.add_const(c.reshape(1, -1, 1, 1), f"{conv.name}.bias")
    else:  # computed: folding makes it a constant
        shape = g.add_const(np.array([1, -1, 1, 1], np.int64), f"{conv.name}.bias_shape")
        (bias,) = g.add_node("Reshape", [b, shape], f"{conv.name}.bias")
    del conv.input[2]
    g.rename_output(conv, out, conv_out)
    g.add_node_named("Add", [conv_out, bias], [out], f"{conv.name}.bias_add")


def read_bases(g: Graph) -> list[Note]:
    """Conv weights computed as Σ α_m·(±1) from constants, rewritten as the stacked form
    with the model's own bases and α (see the module doc)."""
    computed = _computed(g)
    convs = [n for n in g.nodes if n.op_type == "Conv" and len(n.input) > 1
             and n.input[1] in computed and n.input[1] not in g.consts]
    found = {}
    for conv in convs:
        w = conv.input[1]
        if w not in found and (terms := _terms(g, w)) and not _canonical(g, terms):
            found[w] = terms
    if not found:
        return []
    vals = _evaluate(g, set(found) | {v for t in found.values() for p, q, _ in t for v in (p, q)})
    notes, done = [], {}
    for conv in convs:
        w = conv.input[1]
        if w not in found:
            continue
        shape = vals[w].shape
        got = None if len(shape) != 4 else _bases_alpha(found[w], vals, shape)
        if got is None:
            continue
        layer = bool(np.all(got[1] == got[1][:, :1]))
        if not np.all(ulps_off(vals[w], *got, layer=layer) <= FOLD_ULPS):
            continue  # not the sum it looks like (a misread): leave it to folding
        if w not in done:
            done[w] = _stacked(g, *got, conv.name)
        _split_bias(g, conv)
        g.set_input(conv, 1, done[w])
        kind = "layer" if layer else "channel"
        notes.append(Note(conv.name, "abc_bases", f"weight read as {got[0].shape[0]} ±1 bases "
                                                  f"with {kind}-wise α (before folding)"))
    g.prune()
    return notes


def _canonical(g: Graph, terms: list[tuple[str, str, bool]]) -> bool:
    """Already the contract's stacked form: one ReduceSum(Mul) of two constants."""
    return len(terms) == 1 and terms[0][2] and all(g.const(v) is not None for v in terms[0][:2])


def held_for_folding(model: onnx.ModelProto) -> set[str]:
    """Initializers of every conv weight in a stacked form (ReduceSum over axis 0 of a
    constant, or of Mul(α, B) of two constants): folding them would give the matcher a
    weight to decompose again, which rounding may defeat."""
    g = Graph(model)
    held: set[str] = set()
    inits = {t.name for t in model.graph.initializer}
    for n in g.nodes:
        if n.op_type != "Conv" or len(n.input) < 2:
            continue
        red = g.producer(n.input[1])
        if red is None or red.op_type != "ReduceSum" or _reduce_axes(g, red) != [0]:
            continue
        src = red.input[0]
        mul = g.producer(src)
        ops = [src] if mul is None else list(mul.input) if mul.op_type == "Mul" else []
        if ops and all(v in inits for v in ops):
            held.update(ops)
    return held


def snap_folded(g: Graph) -> list[Note]:
    """A conv the matcher refuses only for a folded weight with no exact decomposition, whose
    weight is Σ α_m B_m within FOLD_ULPS ulps: that weight as the stacked Σ, noted."""
    cands = {}
    for n in g.nodes:
        w = g.const(n.input[1]) if n.op_type == "Conv" and len(n.input) > 1 else None
        if w is None or w.ndim != 4 or w.dtype != np.float32:
            continue
        per = w.reshape(w.shape[0], -1)
        if max(len(np.unique(r)) for r in per) > 2 ** MAX_BASES:
            continue  # a float weight: thousands of distinct values
        cands[n.output[0]] = n
    if not cands:
        return []
    model = g.to_model(prune=False)
    names = {node.name or f"{node.op_type}_{i}": node.output[0]
             for i, node in enumerate(model.graph.node)}
    _, misses = pattern.find_abc_blocks(pattern.from_onnx(model))
    notes, done = [], {}
    for m in misses:
        conv = cands.get(names.get(m.name, ""))
        if not m.reason.startswith(NOT_EXACT) or conv is None:
            continue
        c = g.const(conv.input[1])
        key = (c.shape, c.tobytes())  # the N convs of a block (or their copies of its
        if key not in done:           # weight) keep one weight: one block
            got = decompose_near(c, FOLD_ULPS)
            done[key] = None if got is None else (_stacked(g, *got[:2], conv.name), got)
        if done[key] is None:
            continue
        stacked, (bases, _, off) = done[key]
        g.set_input(conv, 1, stacked)
        notes.append(Note(conv.name or m.name, "snap_folded",
                          f"folded weight read as {bases.shape[0]} ±1 bases, Σ α_m B_m "
                          f"{off:.0f} ulp off (≤ {FOLD_ULPS})"))
    if notes:
        g.prune()
    return notes
