"""`abc-tvm compile`: ONNX → Relax → ABC rewrite → TVM build → .so + manifest + report."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import tvm

from abc_tvm import coverage, frontend, limits, pattern, targets
from abc_tvm.blocks import Front, front
from abc_tvm.canonical import Note, rules_for, summary_lines
from abc_tvm.errors import InternalError, UserError
from abc_tvm.relay_passes.abc_rewrite import rewrite
from abc_tvm.runtime import MANIFEST_DIGEST_KEY, manifest_digest

MANIFEST_SUFFIX = ".json"


@dataclass
class Report:
    """What the compiler did: ABC layers found and rewritten, and what stayed float and why."""

    model: str
    target: str
    abc_layers: list[dict] = field(default_factory=list)
    float_ops: list[dict] = field(default_factory=list)
    tuning: list[str] = field(default_factory=list)  # databases applied
    tuned_kernels: list[str] = field(default_factory=list)  # kernels scheduled from them
    canonical: list[dict] = field(default_factory=list)  # what the canonical stage changed
    binary_looking_float: list[dict] = field(default_factory=list)  # layer, reason


    def as_dict(self) -> dict:
        return {"model": self.model, "target": self.target, "abc_layers": self.abc_layers,
                "float_ops": self.float_ops, "tuning_databases": self.tuning,
                "tuned_kernels": self.tuned_kernels, "canonicalization": self.canonical,
                "binary_looking_float": self.binary_looking_float}

    def table(self) -> str:
        """A short human summary: one line per ABC layer, float ops counted by reason."""
        lines = [f"{len(self.abc_layers)} ABC layer(s) -> binary kernels "
                 f"(target {self.target})"]
        if self.abc_layers:
            lines.append(f"  {'layer':<36} {'M':>2} {'N':>2} {'alpha':<8} {'act':<9} "
                         f"{'shape (O,I,kh,kw)':<20} kernel")
        for a in self.abc_layers:
            shape = f"({a['out_channels']},{a['in_channels']},{a['kernel'][0]},{a['kernel'][1]})"
            lines.append(f"  {a['name'][-36:]:<36} {a['M']:>2} {a['N']:>2} {a['alpha']:<8} "
                         f"{a['act']:<9} {shape:<20} {a['kernel_impl']}")
        counts: dict[tuple[str, str], int] = {}
        for f in self.float_ops:
            counts[(f["op"], f["reason"])] = counts.get((f["op"], f["reason"]), 0) + 1
        lines.append(f"{len(self.float_ops)} op(s) left in float:")
        if self.tuning:
            lines.insert(1, f"  {len(self.tuned_kernels)} kernel(s) scheduled from tuning "
                            f"database(s) {', '.join(self.tuning)}")
        lines += [f"  {n:>4} x {op:<20} {reason}" for (op, reason), n in sorted(counts.items())]
        lines += summary_lines([Note(**c) for c in self.canonical])
        return "\n".join(lines)


def pipeline(spec: targets.TargetSpec, database=None,
             fallback: dict[str, tvm.tirx.PrimFunc] | None = None,
             applied: list[str] | None = None) -> tvm.transform.Pass | str:
    """The Relax pipeline for a target.

    CPUs: TVM's CPU passes, then the tuning database's schedules (if any), then the
    hand-written ABC schedules for kernels the database has no record of (`fallback`, by
    name), then a default parallel/vectorised schedule for the float ops still unscheduled.
    CUDA: TVM's default pipeline (DLight schedules the float ops).
    """
    if spec.kind != "llvm":
        return "default"
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from abc_tvm.schedules.float_default import default_cpu_schedule
    from abc_tvm.tuning import apply_database_pass

    t = spec.target
    tuned = ([apply_database_pass(database, applied), _fallback_pass(fallback or {})]
             if database is not None else [])
    return tvm.transform.Sequential(
        legalize_passes(spec) + tuned + [default_cpu_schedule]
        + cpu.dataflow_lower_passes(t) + cpu.finalize_passes(t))


def legalize_passes(spec: targets.TargetSpec) -> list[tvm.transform.Pass]:
    """Relax ops -> fused PrimFuncs: the functions a tuning database is keyed on.

    `abc-tvm tune` extracts its tasks after exactly these passes, so that the workloads it
    records are the ones `compile` looks up (same passes, same structural hash).
    """
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from abc_tvm.schedules.float_tune import mark_tunable

    return (cpu.library_dispatch_passes(spec.target) + cpu.legalize_passes(spec.target)
            + [mark_tunable])


def _fallback_pass(fallback: dict[str, tvm.tirx.PrimFunc]) -> tvm.transform.Pass:
    """Swap in the scheduled kernel for every ABC kernel still unscheduled."""

    @tvm.transform.module_pass(opt_level=0, name="ABCScheduleFallback")
    def _swap(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        for gv, func in list(mod.functions.items()):
            attrs = func.attrs if isinstance(func, tvm.tirx.PrimFunc) else None
            if attrs is None or "tirx.is_scheduled" in attrs:
                continue
            if gv.name_hint in fallback:
                mod[gv] = fallback[gv.name_hint]
        return mod

    return _swap


def kernel_signatures(mod: tvm.IRModule) -> dict[str, list[dict]]:
    """Each compiled kernel's buffers ({shape, dtype} per parameter, in call order), by symbol:
    what tools reading the .so without TVM (the ARM cycle model) need to know of its work."""
    out: dict[str, list[dict]] = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        name = str(func.attrs["global_symbol"]) if func.attrs is not None \
            and "global_symbol" in func.attrs else gv.name_hint
        out[name] = [{"shape": [int(d) for d in p.shape], "dtype": str(p.dtype)}
                     for p in func.params if hasattr(p, "shape")]
    return out


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fused_glue(g: pattern.Graph, value: str, kinds: list[str]) -> list[str]:
    """The ONNX nodes after a block's output that its kernel absorbed (`kinds`, in order:
    BatchNormalization, Mul, Add, Relu), so the report does not list them as float ops."""
    names = []
    for kind in kinds:
        users = [u for u in g.consumers(value) if u.op == kind]
        if len(users) != 1:
            break
        names.append(users[0].name)
        value = users[0].outputs[0]
    return names


def _report(fr: Front, model_name: str, spec: targets.TargetSpec, rewritten: list,
            refused: list[pattern.Miss]) -> Report:
    """The rewritten blocks under their ONNX names (the blocks are the ONNX match's own),
    then every other node of the canonical model as a float op, with the reason."""
    report = Report(model_name, spec.name, canonical=[
        {"node": n.node, "rule": n.rule, "detail": n.detail} for n in fr.notes])
    by_name = {b.name: b for b in fr.blocks}
    graph = pattern.from_onnx(fr.proto)
    covered: set[str] = set()
    for r in rewritten:
        blk = by_name[r.block.name]
        fused = _fused_glue(graph, blk.output, r.glue)
        pool = graph.producer(blk.input) if r.pooled_input else None
        if pool is not None and pool.op == "MaxPool":
            fused.insert(0, pool.name)
        covered.update([*blk.ops, *fused])
        report.abc_layers.append({**blk.summary(), "kernel_impl": r.kernel,
                                  "word_bits": spec.word_bits, "fused_ops": fused,
                                  "rules": rules_for(fr.notes, [blk.name, *blk.ops])})
    reasons = {m.name: m.reason for m in [*fr.misses, *refused]}
    for m in refused:  # computed as float ops: every op of the block is a float op
        covered.difference_update(by_name[m.name].ops)
    for i, node in enumerate(fr.proto.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        if name in covered or node.op_type == "Constant":
            continue
        if node.op_type in ("Identity", "Cast") and not node.input:
            continue
        reason = reasons.get(name, "no binary form (float op)" if node.op_type != "Conv"
                             else "not an ABC convolution")
        report.float_ops.append({"name": name, "op": node.op_type, "reason": reason})
    return report


@contextlib.contextmanager
def internal(stage: str, fr: Front) -> Iterator[None]:
    """TVM failing on a module abc-tvm built is abc-tvm's bug, not the model's: its error
    becomes a one-line InternalError naming the stage and the model's binary blocks; a
    tensor too large for TVM's 32-bit indices is the model's (a UserError naming the largest
    tensor). abc-tvm's own ValueErrors (bad kernel parameters) pass through unchanged."""
    try:
        yield
    except (RuntimeError, TypeError, AttributeError, AssertionError, KeyError,
            ValueError) as e:
        if isinstance(e, (InternalError, UserError)) or (
                type(e) is ValueError and not limits.from_tvm(e)):
            raise
        if limits.int32_overflow(e):
            big = limits.largest_tensor(fr.proto)
            where = (f"; the largest is layer {big[0]}'s output {big[1]!r}, shape {big[2]}"
                     if big else "")
            raise UserError(f"{stage} failed: a tensor of the model (or one TVM makes from "
                            f"it, e.g. a padded input) has more than {limits.LIMIT_TEXT}"
                            f"{where}: use a smaller input") from None
        names = ", ".join(b.name for b in fr.blocks[:4]) + (" ..." if len(fr.blocks) > 4 else "")
        raise InternalError(f"{stage} failed ({type(e).__name__}: {limits.tvm_error(e)}); "
                            f"binary blocks: {names or 'none'}") from e


def compile_model(model: str | os.PathLike | onnx.ModelProto, target: str,
                  output: str | os.PathLike, report_path: str | os.PathLike | None = None,
                  quiet: bool = False,
                  tuning_log: str | os.PathLike | None | bool = None,
                  require_binary: bool = False) -> Report:
    """Compile an ONNX ABC model for `target` ("x86", "arm", "cuda") into `output` (.so).

    `require_binary` makes a layer that looks binary (a Sign or threshold before it) but
    stays float an error; without it that is one warning line on stderr.
    Applies the MetaSchedule database in `tuning_log`, or else any shipped one in
    tuning_logs/ whose records match (CPU targets); `tuning_log=False` applies none.
    Writes the .so, its manifest `<output>.json` and, if asked, the JSON report; nothing is
    written when it fails.
    """
    spec = targets.resolve(target)
    # what the .so's instructions need (runtimes refuse a CPU without them); also its level
    features = targets.cpu_features(spec.target) if spec.kind == "llvm" else []
    output = Path(output)
    if not output.parent.exists():
        raise UserError(f"output directory {output.parent} does not exist")
    fr = front(model)
    limits.check_tensor_sizes(fr.proto)  # before TVM's 50-line int32 overflow dump
    proto, mod = fr.proto, fr.mod
    model_name = str(model) if not isinstance(model, onnx.ModelProto) else "<ModelProto>"
    with internal("the binary-block rewrite", fr):
        scheduled, rewritten, misses = rewrite(mod, spec.target, spec.word_bits,
                                               blocks=fr.blocks)
    database, dirs, applied = None, [], []
    if spec.kind == "llvm":
        from abc_tvm.tuning import find_databases, load_databases

        kernels = {gv.name_hint for gv, f in scheduled.functions.items()
                   if isinstance(f, tvm.tirx.PrimFunc)}
        level = targets.x86_level(set(features))
        dirs = find_databases(tuning_log, kernels, level)
        database = load_databases(dirs)
    elif tuning_log not in (None, False):
        raise UserError("--tuning-log applies to CPU targets (x86, arm) only for now")
    fallback = None
    if database is None:
        mod = scheduled
    else:
        # The kernels go in unscheduled, as `tune` extracted them, so that its records
        # match; those it has none for get `fallback`, the hand-written schedule.
        fallback = {gv.name_hint: f for gv, f in scheduled.functions.items()
                    if isinstance(f, tvm.tirx.PrimFunc)}
        with internal("the binary-block rewrite", fr):
            mod, rewritten, misses = rewrite(mod, spec.target, spec.word_bits, tunable=True,
                                             blocks=fr.blocks)
    if fr.blocks and not rewritten:
        why = "; ".join(dict.fromkeys(m.reason for m in misses)) or "no reason given"
        raise UserError(f"{len(fr.blocks)} ABC block(s) found in the model but none could "
                        f"be turned into binary kernels ({why}); refusing to build a model "
                        "whose ABC layers would all run as float convs")
    report = _report(fr, model_name, spec, rewritten, misses)
    cover = coverage.coverage(pattern.from_onnx(fr.proto), report.float_ops)
    report.binary_looking_float = [{"layer": n, "reason": r} for n, r in cover.float_]
    if require_binary:
        cover.require()
    if cover.warning() is not None:
        print(f"abc-tvm compile: WARNING: {cover.warning()}", file=sys.stderr)
    elif not rewritten:
        print("abc-tvm compile: warning: no ABC convolution found; the model runs entirely in "
              "float", file=sys.stderr)
    with internal("TVM's build", fr), tvm.transform.PassContext(opt_level=3):
        passes = pipeline(spec, database, fallback, applied)
        lowered = mod
        if not isinstance(passes, str):  # lowered here, so the manifest can list the kernels
            with spec.target:
                lowered = passes(mod)
        ex = tvm.compile(lowered, target=spec.target,
                         relax_pipeline=passes if isinstance(passes, str) else None)
    if applied:  # name the databases only when one of their records was used
        report.tuning = [str(p) for p in dirs]
        report.tuned_kernels = applied
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=output.parent)
    os.close(fd)
    try:
        kwargs = {}
        if spec.cross_compiler:
            kwargs["fcompile"] = tvm.support.cc.cross_compiler(spec.cross_compiler)
        ex.export_library(tmp, **kwargs)
        manifest = {
            "format": "abc-tvm/1",
            "inputs": [t.as_dict() for t in frontend.inputs(proto)],
            "outputs": [t.as_dict() for t in frontend.outputs(proto)],
            "target": {"name": spec.name, "tvm": str(spec.target), "word_bits": spec.word_bits,
                       "cpu_features": features},
            "tvm_version": tvm.__version__,
            "sha256": sha256(tmp),
            "abc_layers": report.abc_layers,
            "kernels": kernel_signatures(lowered),
        }
        manifest[MANIFEST_DIGEST_KEY] = manifest_digest(manifest)  # checked by runtime.load
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    Path(str(output) + MANIFEST_SUFFIX).write_text(json.dumps(manifest, indent=1))
    if report_path is not None:
        Path(report_path).write_text(json.dumps(report.as_dict(), indent=1))
    if not quiet:
        print(report.table())
        print(f"wrote {output} and {output}{MANIFEST_SUFFIX}")
    return report
