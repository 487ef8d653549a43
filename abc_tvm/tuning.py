"""`abc-tvm tune`: MetaSchedule (XGBoost cost model) over every task of a model.

The ABC kernels enter the search unscheduled, carrying a `schedule_rule` annotation, so
MetaSchedule explores their hand-written schedule's knobs through the custom rules that
`abc_tvm.schedules` registers; the float ops get MetaSchedule's generic rules. Records go to
a MetaSchedule JSON database in the log directory; a second run continues from it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm
from tqdm import tqdm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from abc_tvm import targets
from abc_tvm.errors import UserError
from abc_tvm.relay_passes.abc_rewrite import rewrite

RECORDS = "database_tuning_record.json"
WORKLOADS = "database_workload.json"
KERNEL_SETS = ("all", "abc", "float")
TASKS = "tasks.json"  # names of the kernels tuned into a database, to skip it cheaply


def open_database(log_dir: str | os.PathLike,
                  repair: bool = True) -> ms.database.JSONDatabase:
    """The MetaSchedule JSON database kept in `log_dir` (created if missing).

    A tuner killed mid-write (kill -9, power loss) leaves a cut-off last line, which makes
    TVM refuse the whole database ("Unexpected EOF"); such unreadable lines are skipped with
    a warning (`sound_database`): fixed in place where `repair` (tune, which appends), else
    read from a cleaned copy (compile, which must not change the user's or shipped files).
    """
    # Records name our schedule rules' tensor intrinsics: register them before parsing.
    import abc_tvm.schedules.arm  # noqa: F401
    import abc_tvm.schedules.cpu  # noqa: F401

    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    src = sound_database(log_dir, in_place=repair)
    try:
        return ms.database.JSONDatabase(path_workload=str(src / WORKLOADS),
                                        path_tuning_record=str(src / RECORDS))
    except (RuntimeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"tuning database {log_dir} cannot be read ({first}): move it away "
                        "and tune again, or compile with --no-tuning-log") from None


_CLEAN_COPIES: list[tempfile.TemporaryDirectory] = []  # kept while the process runs


def _sound_lines(text: str, is_record: bool, workloads: int) -> tuple[list[str], list[int]]:
    """(readable lines, 1-based numbers of the others): a workload is [hash, base64], a
    record a JSON list whose first item indexes a readable workload."""
    good, bad = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            ok = isinstance(item, list) and len(item) >= 2 and (
                isinstance(item[0], int) and 0 <= item[0] < workloads if is_record
                else all(isinstance(v, str) for v in item[:2]))
        except ValueError:
            ok = False
        (good.append(line) if ok else bad.append(n))
    return good, bad


def sound_database(log_dir: Path, in_place: bool) -> Path:
    """`log_dir`, or a cleaned copy of it, holding only readable database lines.

    Unreadable lines (cut off, corrupted) are dropped with a one-line warning on stderr;
    records of a dropped workload go with it and later records are renumbered. In place,
    the dropped lines are kept in `<file>.skipped` and the files rewritten atomically (a
    last line without its newline is ended, so the next append does not join it)."""
    wpath, rpath = log_dir / WORKLOADS, log_dir / RECORDS
    wtext = wpath.read_text(errors="replace") if wpath.is_file() else ""
    rtext = rpath.read_text(errors="replace") if rpath.is_file() else ""
    lines = [ln for ln in wtext.splitlines() if ln.strip()]
    wgood, wbad = _sound_lines(wtext, False, 0)
    readable = set(wgood)
    # Record indices count the workload file's lines: map the readable ones to new indices.
    new_index = {old: new for new, old in
                 enumerate(i for i, ln in enumerate(lines) if ln in readable)}
    rgood, rbad = _sound_lines(rtext, True, len(lines))
    records, orphans = [], []
    for line in rgood:
        item = json.loads(line)
        if item[0] not in new_index:  # its workload was dropped
            rbad.append(-1)
            orphans.append(line)
        elif new_index[item[0]] == item[0]:
            records.append(line)
        else:
            records.append(json.dumps([new_index[item[0]], *item[1:]], separators=(",", ":")))
    unended = any(t and not t.endswith("\n") for t in (wtext, rtext))
    if not wbad and not rbad and not unended:
        return log_dir
    if wbad or rbad:
        what = ", ".join(f"{len(b)} {name}" for b, name in ((rbad, "record line(s)"),
                                                            (wbad, "workload line(s)")) if b)
        where = f" (first: line {(rbad or wbad)[0]})" if (rbad or wbad)[0] > 0 else ""
        print(f"abc-tvm: warning: tuning database {log_dir}: skipped {what} that cannot be "
              f"read{where}, e.g. cut off by a killed tuner", file=sys.stderr)
    wkeep = wgood
    if in_place:
        for path, text, keep, bad, extra in ((wpath, wtext, wkeep, wbad, []),
                                             (rpath, rtext, records, rbad, orphans)):
            all_lines = text.splitlines()
            dropped = [all_lines[n - 1] for n in bad if n > 0] + extra
            if dropped:
                with open(str(path) + ".skipped", "a") as f:
                    f.write("".join(ln + "\n" for ln in dropped))
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            os.replace(tmp, path)
        return log_dir
    copy = tempfile.TemporaryDirectory(prefix="abc-tvm-db-")
    _CLEAN_COPIES.append(copy)
    out = Path(copy.name)
    (out / WORKLOADS).write_text("".join(ln + "\n" for ln in wkeep))
    (out / RECORDS).write_text("".join(ln + "\n" for ln in records))
    return out


def shipped_logs() -> Path | None:
    """The shipped databases' folder, found through the package (`abc_tvm.tuning_logs`, the
    top-level `tuning_logs/` of the checkout), so a wheel install finds them too."""
    from importlib import resources

    try:
        root = Path(str(resources.files("abc_tvm.tuning_logs")))
    except (ModuleNotFoundError, TypeError):
        return None
    return root if root.is_dir() else None


def find_databases(tuning_log: str | os.PathLike | None | bool,
                   kernels: set[str] | None = None, level: str | None = "any") -> list[Path]:
    """The database directories to apply: the one asked for, else the shipped ones of this
    ISA level (a shipped folder ends in `_<level>`, e.g. `_x86-64-v4`: an AVX2 build never
    takes AVX-512 records; `level=None`, a target of no x86 level, takes none; "any" takes
    all) that tuned one of `kernels` (by its `tasks.json`; all of them when `kernels` is
    None). `False`: none, the hand-written default schedules only."""
    if tuning_log is False:
        return []
    if tuning_log is not None:
        path = Path(tuning_log)
        if not (path / RECORDS).is_file():
            raise UserError(f"--tuning-log {path} holds no MetaSchedule database ({RECORDS}); "
                            "run `abc-tvm tune ... --log DIR` first")
        return [path]
    shipped = shipped_logs()
    if shipped is None:
        return []
    dirs = sorted(p.parent for p in shipped.glob(f"*/{RECORDS}")
                  if level == "any" or (level is not None and p.parent.name.endswith(f"_{level}")))
    if kernels is None:
        return dirs
    # Parsing a database takes seconds: open only those that can match this model.
    return [d for d in dirs if not (d / TASKS).is_file()
            or kernels & set(json.loads((d / TASKS).read_text()))]


def load_databases(dirs: list[Path]) -> ms.database.Database | None:
    """One database over all `dirs` (records of the same workload: the fastest wins)."""
    dbs = [open_database(d, repair=False) for d in dirs]  # compile leaves them as they are
    if not dbs:
        return None
    return dbs[0] if len(dbs) == 1 else ms.database.UnionDatabase(*dbs)


@derived_object
class _Progress(ms.measure_callback.PyMeasureCallback):
    """A tqdm bar over measured trials, showing the best latency found per task."""

    def __init__(self, bar: tqdm, weights: list[float]) -> None:
        super().__init__()
        self.bar = bar
        self.weights = weights
        self.best: dict[int, float] = {}

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
              runner_results) -> None:
        times = [float(np.mean([float(s) for s in r.run_secs])) for r in runner_results
                 if r.error_msg is None and r.run_secs]
        if times:
            self.best[task_id] = min(self.best.get(task_id, np.inf), min(times))
        est = sum(self.weights[t] * s for t, s in self.best.items()) * 1e3
        self.bar.set_postfix_str(f"tasks tuned {len(self.best)}/{len(self.weights)}, "
                                 f"their calls per inference take {est:.3f} ms")
        self.bar.update(len(runner_results))


@dataclass
class TuneResult:
    log_dir: Path
    tasks: int
    trials_before: int
    trials_run: int


def quiet_ms_logging() -> None:
    """Before MetaSchedule tunes: its per-round INFO lines would bury the progress bar, so
    the console gets warnings only (the full logs stay in LOG_DIR/logs). Its logger set-up
    names every handler already on its logger and fails on an unnamed one (seen under pytest,
    when a test tunes after another in one process): those are dropped, MetaSchedule adds
    its own."""
    ms_log = logging.getLogger("tvm.s_tir.meta_schedule")
    ms_log.setLevel(logging.WARNING)
    ms_log.handlers = [h for h in ms_log.handlers if h.get_name()]


def extract(model: str | os.PathLike, spec: targets.TargetSpec) -> list:
    """The tuning tasks of a model: every PrimFunc of its rewritten, legalized Relax module
    (the ABC kernels and the float ops), exactly as `compile` will look them up."""
    from abc_tvm.blocks import front
    from abc_tvm.compiler import legalize_passes

    fr = front(model)  # the same front end as compile: canonical form, blocks explicit
    mod, _, _ = rewrite(fr.mod, spec.target, spec.word_bits, tunable=True, blocks=fr.blocks)
    with spec.target, tvm.transform.PassContext(opt_level=3):
        mod = tvm.transform.Sequential(legalize_passes(spec))(mod)
    return ms.relax_integration.extract_tasks(mod, spec.target)


def tune_model(model: str | os.PathLike, target: str, trials: int, log_dir: str | os.PathLike,
               rpc_tracker: str | None = None, rpc_key: str | None = None,
               kernels: str = "all", trials_per_iter: int = 16,
               quiet: bool = False) -> TuneResult:
    """Tune `model` for `target` until `log_dir` holds `trials` measured trials in all.

    Candidates run here, or with `rpc_tracker` on the boards registered under `rpc_key`
    (built here, cross-linked for the board). `kernels` picks the tasks: "abc" (the binary
    kernels), "float" (the rest: convs, dense layers and pools search the register tile with
    `schedules.float_tune`'s rule, other float ops MetaSchedule's generic rules) or "all".
    """
    if kernels not in KERNEL_SETS:
        raise UserError(f"--kernels must be one of {', '.join(KERNEL_SETS)} (got {kernels!r})")
    if trials < 1:
        raise UserError(f"--trials must be at least 1 (got {trials})")
    spec = targets.resolve(target)
    from abc_tvm import rpc

    builder = rpc.builder_for(spec)  # (cross-)linking, with a build timeout ABC kernels fit
    runner = None  # local: started just before tuning (its worker takes seconds to start)
    if rpc_tracker:
        runner = rpc.rpc_runner(rpc_tracker, rpc_key or "")
    elif not spec.runs_on_host:
        raise UserError(f"--target {target} builds for {spec.arch}, which cannot run here: tune "
                        "on the board with --rpc-tracker HOST:PORT --rpc-key KEY")
    log_dir = Path(log_dir)
    database = open_database(log_dir)
    before = len(database)
    remaining = trials - before
    if remaining <= 0:
        if not quiet:
            print(f"{log_dir} already holds {before} trials (asked for {trials}): nothing to do")
        return TuneResult(log_dir, 0, before, 0)
    quiet_ms_logging()
    extracted = extract(model, spec)
    if kernels != "all":
        extracted = [t for t in extracted if t.task_name.startswith("abc_") == (kernels == "abc")]
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        extracted, str(log_dir), num_threads="physical")
    if not contexts:
        raise UserError("the model has no tunable task")
    if runner is None:
        runner = rpc.local_runner()
    # The target in scope sizes the custom rules' default tiles (its register file).
    with spec.target, tqdm(total=remaining, desc=f"tuning {len(contexts)} tasks",
                           unit="trial", disable=quiet) as bar:
        progress = _Progress(bar, [float(w) for w in weights])
        ms.tune.tune_tasks(
            tasks=contexts, task_weights=weights, work_dir=str(log_dir),
            max_trials_global=remaining,
            # At least two rounds over the tasks, so the cost model learns from the first
            # and the progress bar moves (results arrive when a task's round is joined).
            num_trials_per_iter=max(1, min(trials_per_iter, remaining // (2 * len(contexts)))),
            builder=builder, runner=runner, database=database, cost_model="xgb",
            measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"),
                               progress],
        )
    run = len(database) - before
    tasks = log_dir / TASKS
    known = set(json.loads(tasks.read_text())) if tasks.is_file() else set()
    tasks.write_text(json.dumps(sorted(known | {c.task_name for c in contexts}), indent=0))
    if not quiet:
        print(f"{run} trials measured over {len(contexts)} tasks; database: {log_dir} "
              f"({len(database)} records)")
    return TuneResult(log_dir, len(contexts), before, run)


def apply_database_pass(database: ms.database.Database,
                        applied: list[str] | None = None) -> tvm.transform.Pass:
    """MetaSchedule's ApplyDatabase bound to `database` (used inside the compile pipeline);
    the kernels it scheduled from a record are appended to `applied`."""

    @tvm.transform.module_pass(opt_level=0, name="ABCApplyTuningDatabase")
    def _apply(mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        def unscheduled(m: tvm.IRModule) -> set[str]:
            return {gv.name_hint for gv, f in m.functions.items()
                    if isinstance(f, tvm.tirx.PrimFunc) and "tirx.is_scheduled" not in f.attrs}

        before = unscheduled(mod)
        with database:
            out = tvm.relax.transform.MetaScheduleApplyDatabase()(mod)
        if applied is not None:
            applied.extend(sorted(before - unscheduled(out)))
        return out

    return _apply
