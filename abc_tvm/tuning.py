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


def open_database(log_dir: str | os.PathLike) -> ms.database.JSONDatabase:
    """The MetaSchedule JSON database kept in `log_dir` (created if missing)."""
    # Records name our schedule rules' tensor intrinsics: register them before parsing.
    import abc_tvm.schedules.arm  # noqa: F401
    import abc_tvm.schedules.cpu  # noqa: F401

    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(path_workload=str(log_dir / WORKLOADS),
                                    path_tuning_record=str(log_dir / RECORDS))


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
    dbs = [open_database(d) for d in dirs]
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
