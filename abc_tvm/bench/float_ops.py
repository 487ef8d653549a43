"""The float layers of a compiled model, op by op, against ONNX Runtime's time for the same op
of the same ONNX.

Why: the issue asks that every float layer (stem, projections, pools, classifier) take at most
1.5x ONNX Runtime's time for that op; whole-model times hide which layer is slow, and the
binary-layer profile skips the float ones.

How: both sides run in the calling process (the bench's child for one thread count, whose
thread settings are already fixed), in interleaved rounds, best of runs per call. abc-tvm:
every kernel call of the compiled model, timed by a Relax VM instrument (its argument shapes
taken on the first run). ONNX Runtime: its own profiler's per-node `_kernel_time` events, whose
shapes are the logical (NCHW) ones even where it runs NCHWc. Calls and nodes are matched by op
kind and shapes (conv: batch, channels, H, W, out channels, kernel, output size; FC: in and out
features; other ops: their input and output dimensions in any order, so NHWC meets NCHW), in
execution order within one key. What does not match is listed on its side; an ORT conv of the
shape of one of abc-tvm's binary kernels is counted apart (abc-tvm ran it as a binary layer).
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROUNDS = 3  # interleaved rounds: a noisy moment of the machine hits both sides
MIN_S = 2.0  # profile each side for about this long in all ...
MAX_RUNS = 30  # ... but at most this many runs (ORT's profile grows with every run)

FLOAT_CONV = re.compile(r"float_conv_nhwc_b(\d+)h(\d+)w(\d+)c(\d+)o(\d+)k(\d+)x(\d+)"
                        r"s(\d+)x(\d+)p(\d+)_(\d+)_(\d+)_(\d+)")
BINARY_CONV = re.compile(r"^abc_(?:block|conv|dot)_b(\d+)c(\d+)h(\d+)w(\d+)o(\d+)_k(\d+)x(\d+)"
                         r"s(\d+)x(\d+)p(\d+)_(\d+)_(\d+)_(\d+)")

# Relax op names (as they start a kernel's name) -> the ONNX op kind they are keyed by.
RELAX_OPS = {
    "max_pool2d": "MaxPool", "avg_pool2d": "AveragePool", "adaptive_avg_pool2d": "GlobalPool",
    "mean": "GlobalPool", "matmul": "FC", "dense": "FC", "add": "Add", "subtract": "Sub",
    "multiply": "Mul", "divide": "Div", "relu": "Relu", "prelu": "PRelu", "clip": "Clip",
    "sigmoid": "Sigmoid", "tanh": "Tanh", "softmax": "Softmax", "transpose": "Transpose",
    "reshape": "Reshape", "concatenate": "Concat", "maximum": "Max", "minimum": "Min",
    "sign": "Sign", "flatten": "Layout", "conv2d": "Conv", "batch_norm": "BatchNormalization",
    "layer_norm": "LayerNormalization", "round": "Round", "floor": "Floor", "exp": "Exp",
    "sqrt": "Sqrt", "power": "Pow", "where": "Where", "less": "Less", "astype": "Cast",
    "squeeze": "Layout", "expand_dims": "Layout", "layout_transform": "Layout",
}

# Ops that only move data: a kernel made of them alone is keyed "Layout" (ORT's Flatten or
# Reshape of the same tensor); in a fused kernel the first other op names its kind.
LAYOUT = {"transpose", "reshape", "flatten", "squeeze", "expand_dims", "layout_transform"}

# ONNX Runtime op names -> the same kinds (its fused nodes keep the leading op's shapes).
ORT_OPS = {"FusedConv": "Conv", "Gemm": "FC", "FusedGemm": "FC", "MatMul": "FC",
           "FusedMatMul": "FC", "GlobalAveragePool": "GlobalPool", "ReduceMean": "GlobalPool",
           "Transpose": "Layout", "Reshape": "Layout", "Flatten": "Layout",
           "Squeeze": "Layout", "Unsqueeze": "Layout"}


@dataclass(frozen=True)
class Op:
    """One kernel call or ORT node as the table shows it and the matcher keys it."""

    label: str
    key: tuple | None
    shape: str
    macs: int | None
    ms: float


def _dims(shape: list[int]) -> str:
    return "x".join(str(d) for d in shape)


def _conv_op(label: str, b: int, c: int, h: int, w: int, o: int, cin: int, kh: int, kw: int,
             oh: int, ow: int, ms: float) -> Op:
    """A conv by its logical (NCHW) geometry; cin is the input channels per group."""
    stride = max(1, round(h / oh)) if oh else 1
    shape = f"{c}x{h}x{w} -> {o}x{oh}x{ow} k{kh}x{kw} s{stride}"
    if c != cin:
        shape += f" g{c // max(cin, 1)}"
    if b != 1:
        shape = f"b{b} " + shape
    return Op(label, ("Conv", b, c, h, w, o, cin, kh, kw, oh, ow), shape,
              b * oh * ow * o * cin * kh * kw, ms)


def _fc_op(label: str, x: list[int], y: list[int], ms: float) -> Op:
    """In features from the input's size (a flatten may be fused in front of it)."""
    batch = math.prod(y[:-1]) if len(y) > 1 else 1
    feats = math.prod(x) // batch
    shape = f"{feats} -> {y[-1]}" + (f" b{batch}" if batch != 1 else "")
    return Op(label, ("FC", batch, feats, y[-1]), shape, batch * feats * y[-1], ms)


def _other_op(label: str, kind: str, x: list[int], y: list[int], ms: float) -> Op:
    """Keyed by its dimensions other than 1, in any order: abc-tvm runs NHWC (and may fold a
    reshape in) what the ONNX says NCHW."""
    def dims(s: list[int]) -> tuple[int, ...]:
        return tuple(sorted(d for d in s if d != 1))

    return Op(label, (kind, dims(x), dims(y)), f"{_dims(x)} -> {_dims(y)}", None, ms)


def _relax_ops(core: str) -> list[str]:
    """The ops a fused kernel's name lists (`fused_matmul_add9` -> matmul, add)."""
    ops, rest = [], core.removeprefix("fused_")
    names = sorted(RELAX_OPS, key=len, reverse=True)
    while rest:
        hit = next((n for n in names if re.match(re.escape(n) + r"\d*(?:_|$)", rest)), None)
        tok = hit or re.sub(r"\d+$", "", rest.split("_", 1)[0])
        ops.append(tok)
        rest = rest[len(hit):] if hit else rest[len(rest.split("_", 1)[0]):]
        rest = re.sub(r"^\d*_?", "", rest)
    return [o for o in ops if o]


def conv_from_name(m: re.Match, binary: bool) -> tuple[int, ...]:
    """(b, c, h, w, o, kh, kw, oh, ow) from a float or binary conv kernel's name."""
    g = [int(v) for v in m.groups()]
    if binary:
        b, c, h, w, o = g[:5]
    else:
        b, h, w, c, o = g[:5]
    kh, kw, sh, sw, pt, pl, pb, pr = g[5:]
    return b, c, h, w, o, kh, kw, (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1


def describe_call(symbol: str, shapes: list[list[int]], ms: float) -> tuple[str, Op] | None:
    """("float" | "binary", the op) for one kernel call of the model; None for VM builtins."""
    if symbol.startswith("vm."):
        return None
    if symbol.startswith("abc_"):
        m = BINARY_CONV.match(symbol)
        if not m:  # bit-pack and other helpers of the binary layers
            return "binary", Op(symbol, None, "", None, ms)
        b, c, h, w, o, kh, kw, oh, ow = conv_from_name(m, binary=True)
        return "binary", _conv_op(symbol, b, c, h, w, o, c, kh, kw, oh, ow, ms)
    core = symbol.removeprefix("fused_")
    m = FLOAT_CONV.match(core)
    if m:
        b, c, h, w, o, kh, kw, oh, ow = conv_from_name(m, binary=False)
        label = "+".join(["conv", *_relax_ops(core[m.end():].lstrip("_"))])
        return "float", _conv_op(label, b, c, h, w, o, c, kh, kw, oh, ow, ms)
    ops = _relax_ops(core) or [core]
    compute = [o for o in ops if o not in LAYOUT]
    label = "+".join(ops)
    kind = RELAX_OPS.get(compute[0], compute[0]) if compute else "Layout"
    x, y = (shapes[0], shapes[-1]) if shapes else ([], [])
    if kind == "Conv" and len(x) == len(y) == 4 and len(shapes) >= 3 and len(shapes[1]) == 4 \
            and y[1] == shapes[1][0]:  # Relax's default NCHW / OIHW
        wt = shapes[1]
        return "float", _conv_op(label, x[0], x[1], x[2], x[3], wt[0], wt[1], wt[2], wt[3],
                                 y[2], y[3], ms)
    if kind == "FC" and x and y:
        return "float", _fc_op(label, x, y, ms)
    return "float", _other_op(label, kind, x, y, ms)


def describe_node(node: dict) -> Op:
    """One ORT node (as `ort_nodes` gives it) with the key of its abc-tvm peer."""
    op, xs, ys = node["op"], node["inputs"], node["outputs"]
    kind = ORT_OPS.get(op, op)
    x, y = (xs[0] if xs else []), (ys[0] if ys else [])
    label = f"ORT {op}"
    if kind == "Conv" and len(x) == 4 and len(xs) > 1 and len(xs[1]) == 4 and len(y) == 4:
        wt = xs[1]
        return _conv_op(label, x[0], x[1], x[2], x[3], wt[0], wt[1], wt[2], wt[3], y[2], y[3],
                        node["ms"])
    if kind == "FC" and x and y:
        return _fc_op(label, x, y, node["ms"])
    return _other_op(label, kind, x, y, node["ms"])


def _binary_keys(op: Op) -> list[tuple]:
    """The keys an ORT node has when abc-tvm ran it as this binary kernel (a 1x1 conv on a
    1x1 map is also a fully connected layer)."""
    if op.key is None:
        return []
    _, b, c, h, w, o, _, kh, kw, _, _ = op.key
    return [op.key, *([("FC", b, c, o)] if h == w == kh == kw == 1 else [])]


CHAIN_WINDOW = 6  # ORT nodes scanned past the previous one for the next op of a chain


def _with_chain(op: Op, j: int, theirs: list[Op], taken: set[int]) -> Op:
    """ORT's node j, with the ORT nodes of the rest of a fused elementwise chain added: a
    kernel `concatenate+add+prelu+add` is ORT's Concat, Add, PRelu and Add of that output
    (convs are left: ORT fuses their bias and activation itself)."""
    kinds = [RELAX_OPS.get(o, o) for o in op.label.split("+")[1:] if o not in LAYOUT]
    if op.macs is not None or not kinds or op.key is None:
        return theirs[j]
    out, ms, labels, at = op.key[-1], theirs[j].ms, [theirs[j].label], j
    for kind in kinds:
        nxt = next((k for k in range(at + 1, min(len(theirs), at + 1 + CHAIN_WINDOW))
                    if k not in taken and theirs[k].key is not None
                    and theirs[k].key[0] == kind and theirs[k].key[-1] == out), None)
        if nxt is None:
            break
        taken.add(nxt)
        ms, at = ms + theirs[nxt].ms, nxt
        labels.append(theirs[nxt].label.removeprefix("ORT "))
    return Op("+".join(labels), theirs[j].key, theirs[j].shape, theirs[j].macs, ms)


@dataclass
class Matched:
    """abc-tvm's float calls each with its ORT peer (or None), and the ORT nodes left over."""

    pairs: list[tuple[Op, Op | None]]
    ort_only: list[Op]
    ort_binary: list[Op]  # ORT convs of a binary kernel's shape: abc-tvm ran them binary


def match(calls: list[dict], nodes: list[dict]) -> Matched:
    """Pair abc-tvm's float calls with ORT nodes of the same key, in execution order."""
    ours = [d for d in (describe_call(c["symbol"], c.get("shapes", []), c["ms"])
                        for c in calls) if d is not None]
    theirs = [describe_node(n) for n in nodes]
    queue: dict[tuple, deque[int]] = defaultdict(deque)
    for j, t in enumerate(theirs):
        queue[t.key].append(j)
    taken: set[int] = set()
    pairs = []
    for kind, op in ours:
        if kind != "float":
            continue
        j = queue[op.key].popleft() if op.key is not None and queue[op.key] else None
        peer = None
        if j is not None:
            taken.add(j)
            peer = _with_chain(op, j, theirs, taken)
        pairs.append((op, peer))
    binary = {k for kind, op in ours if kind == "binary" for k in _binary_keys(op)}
    left = [t for j, t in enumerate(theirs) if j not in taken]
    return Matched(pairs, [t for t in left if t.key not in binary],
                   [t for t in left if t.key in binary])


HEAD = ["op", "shape", "MMAC", "abc-tvm ms", "ORT ms", "abc-tvm / ORT",
        "abc-tvm GMAC/s"]


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _row(label: str, shape: str, macs: int | None, a: float | None, b: float | None
         ) -> list[str]:
    ratio = f"{a / b:.2f}x" if a is not None and b else "-"
    rate = f"{macs / a / 1e6:.1f}" if macs and a else "-"
    return [label, shape, f"{macs / 1e6:.1f}" if macs else "-", _ms(a), _ms(b), ratio, rate]


def _grouped(ops: list[Op], what: str) -> list[list[str]]:
    """ORT's unmatched nodes, one row per op kind (an ABC model has dozens of them)."""
    by_op: dict[str, list[Op]] = defaultdict(list)
    for t in ops:
        by_op[t.label].append(t)
    rows = []
    for label, group in by_op.items():
        shapes = Counter(t.shape for t in group)
        shape = group[0].shape if len(shapes) == 1 else f"{len(shapes)} shapes"
        rows.append(_row(f"{label} x{len(group)} ({what})", shape, None, None,
                         sum(t.ms for t in group)))
    return rows


def rows(prof: dict) -> list[list[str]]:
    """The table: each float call of abc-tvm with its ORT peer, ORT's other nodes by op, sums."""
    m = match(prof["abc"], prof["ort"])
    out = [_row(o.label, o.shape, o.macs, o.ms, t.ms if t else None) for o, t in m.pairs]
    out += _grouped(m.ort_only, "ORT only")
    both = [(o, t) for o, t in m.pairs if t is not None]
    mac_pairs = [(o, t) for o, t in both if o.macs]
    macs = sum(o.macs or 0 for o, _ in mac_pairs)
    a, b = sum(o.ms for o, _ in both), sum(t.ms for _, t in both)
    rate = f"{macs / sum(o.ms for o, _ in mac_pairs) / 1e6:.1f}" if mac_pairs else "-"
    out.append([f"sum: matched ({len(both)})", "", f"{macs / 1e6:.1f}" if macs else "-",
                _ms(a), _ms(b), f"{a / b:.2f}x" if b else "-", rate])
    mine = [o for o, t in m.pairs if t is None]
    out.append(_row(f"sum: abc-tvm only ({len(mine)})", "", None,
                    sum(o.ms for o in mine), None))
    out.append(_row(f"sum: ORT only ({len(m.ort_only)})", "", None, None,
                    sum(t.ms for t in m.ort_only)))
    if m.ort_binary:
        out.append(_row(f"sum: ORT nodes abc-tvm runs as binary kernels ({len(m.ort_binary)})",
                        "", None, None, sum(t.ms for t in m.ort_binary)))
    return out


def worst(prof: dict) -> tuple[float, str, int] | None:
    """(the highest abc-tvm / ORT time of a matched float op, that op, how many matched)."""
    pairs = [(o.ms / t.ms, f"{o.label} {o.shape}") for o, t in match(prof["abc"],
                                                                      prof["ort"]).pairs
             if t is not None and t.ms > 0]
    if not pairs:
        return None
    r, what = max(pairs)
    return r, what, len(pairs)


def ort_nodes(events: list[dict]) -> list[dict]:
    """Each node of ORT's profile once, in execution order, with its best time over runs."""
    best: dict[str, dict] = {}
    for e in events:
        name = e.get("name", "")
        if e.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        args, ms = e.get("args", {}), float(e["dur"]) / 1e3
        node = best.get(name)
        if node is None:
            best[name] = {"name": name.removesuffix("_kernel_time"),
                          "op": args.get("op_name", "?"),
                          "inputs": _ort_shapes(args.get("input_type_shape")),
                          "outputs": _ort_shapes(args.get("output_type_shape")), "ms": ms}
        else:
            node["ms"] = min(node["ms"], ms)
    return list(best.values())


def _ort_shapes(items: list[dict] | None) -> list[list[int]]:
    """[{'float': [1, 64, 56, 56]}, ...] -> [[1, 64, 56, 56], ...]."""
    return [[int(d) for d in next(iter(i.values()), [])] for i in items or []]


class _VmSide:
    """abc-tvm: the time of every kernel call of a run, best over runs, per call."""

    def __init__(self, so: str, x: Any) -> None:
        from abc_tvm.bench.common import VmCalls

        self.timer = VmCalls(so, x, shapes=True)  # the first run's shapes, for the keys
        self.calls: list[dict] = []

    def run(self) -> None:
        mine = [(s, secs * 1e3, sh) for s, secs, sh in self.timer.run()
                if not s.startswith("vm.")]
        if not self.calls:
            self.calls = [{"symbol": s, "shapes": sh, "ms": ms} for s, ms, sh in mine]
        elif [s for s, _, _ in mine] == [c["symbol"] for c in self.calls]:
            for c, (_, ms, _) in zip(self.calls, mine, strict=True):
                c["ms"] = min(c["ms"], ms)


class _OrtSide:
    """ONNX Runtime with its profiler on, set up as the whole-model peer is."""

    def __init__(self, onnx_path: str, x: Any, threads: int, tmp: str) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "ort_profile")
        self.sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
        self.feed = {self.sess.get_inputs()[0].name: x}

    def run(self) -> None:
        self.sess.run(None, self.feed)

    def nodes(self) -> list[dict]:
        path = Path(self.sess.end_profiling())
        events = json.loads(path.read_text())
        path.unlink()
        return ort_nodes(events)


def profile_pair(so: str, onnx_path: str, xpath: str, threads: int, repeat: int) -> dict:
    """Both sides' per-op times on the same input: interleaved rounds, at least `repeat` runs
    each, about MIN_S of runs in all, at most MAX_RUNS (the JSON the tables are built from)."""
    import numpy as np

    x = np.load(xpath)
    with tempfile.TemporaryDirectory() as tmp:
        vm, rt = _VmSide(so, x), _OrtSide(onnx_path, x, threads, tmp)
        vm.run()  # warm-up; also the call shapes
        rt.run()
        t0 = time.perf_counter()
        vm.run()
        rt.run()
        once = time.perf_counter() - t0
        per_round = max(1, min(MAX_RUNS // ROUNDS, math.ceil(MIN_S / ROUNDS / max(once, 1e-6))))
        rounds = max(ROUNDS, math.ceil(repeat / per_round))
        for _ in range(rounds):
            for side in (vm, rt):
                time.sleep(0.05)  # let the other side's pool threads go to sleep
                for _ in range(per_round):
                    side.run()
        return {"threads": threads, "runs": 2 + rounds * per_round, "abc": vm.calls,
                "ort": rt.nodes()}


def profile_models(job: dict) -> dict[str, dict]:
    """The bench's models of one thread count: TVM fp32 against ORT on the float twin's ONNX,
    each ABC model against ORT on its ABC ONNX."""
    from abc_tvm.bench.common import step

    pairs = []
    twin = job.get("twin")
    if twin and twin.get("so"):
        pairs.append(("tvm_fp32", twin))
    pairs += [(m["name"], m) for m in job["models"] if m.get("so") and m.get("onnx")]
    out: dict[str, dict] = {}
    for name, m in pairs:
        try:
            out[name] = profile_pair(m["so"], m["onnx"], m["x"], job["threads"], job["repeat"])
        except Exception as e:  # noqa: BLE001 - the table is missing, the run goes on
            out[name] = {"error": f"{type(e).__name__}: {e}"}
        step(f"{job['threads']}T: float ops of {name}")
    return out
