"""`abc-tvm tune` and tuned compiles: a MetaSchedule JSON database that `compile` applies,
that a rerun continues, and that never changes the answer.

The model is one ABC conv (16 -> 16 channels, 8x8, M = N = 2): four tasks (the NHWC bit-pack,
the fused ABC kernel, two layout transposes), so a handful of trials covers them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_builders as ob
import pytest
import tvm
import tvm_ffi
from design_spaces import knob_draws, sampled_and_fixed
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms

from abc_tvm import frontend, targets, tuning
from abc_tvm.cli import main as cli
from abc_tvm.compiler import compile_model, legalize_passes
from abc_tvm.errors import UserError
from abc_tvm.relay_passes.abc_rewrite import rewrite
from abc_tvm.runtime import load

SPEC = targets.resolve("x86")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, ob.Expected, np.ndarray]:
    d = tmp_path_factory.mktemp("tune")
    model, expected = ob.canonical(batch=1, in_channels=16, out_channels=16, height=8, width=8,
                                   M=2, N=2, seed=3)
    path = d / "tiny.onnx"
    onnx.save(model, path)
    return path, expected, ob.random_input(expected.input_shape, seed=1)


def _records(log: Path) -> list[str]:
    return [line for line in (log / tuning.RECORDS).read_text().splitlines() if line.strip()]


def _run(so: Path, x: np.ndarray) -> np.ndarray:
    return load(so, workers=1)(x)


def test_tune_writes_a_database_that_compile_applies_and_a_rerun_continues(
        tiny, tmp_path, ort_run, max_rel_err):
    path, expected, x = tiny
    log = tmp_path / "log"
    first = tuning.tune_model(path, "x86", 4, log, kernels="abc", quiet=True)
    assert first.trials_before == 0 and first.trials_run >= 4
    assert first.tasks == 2  # --kernels abc: the bit-pack and the ABC kernel, no transposes
    held = _records(log)
    assert len(held) == first.trials_run
    db = tuning.open_database(log)
    assert db.has_workload(_abc_task(path).dispatched[0])  # the ABC kernel was tuned
    assert all("abc_" in r.workload.mod.script() for r in db.get_all_tuning_records())

    # Same budget: nothing to do. A larger one continues: earlier records kept, more added.
    assert tuning.tune_model(path, "x86", len(held), log, quiet=True).trials_run == 0
    more = tuning.tune_model(path, "x86", len(held) + 2, log, quiet=True)
    assert more.trials_before == len(held) and more.trials_run >= 1 and more.tasks == 4
    assert _records(log)[:len(held)] == held

    # compile --tuning-log applies it (the report says so) and the answer does not change.
    # A fresh process: the records must load before any kernel was scheduled in it.
    default, tuned, rep = tmp_path / "default.so", tmp_path / "tuned.so", tmp_path / "r.json"
    compile_model(path, "x86", default, quiet=True)
    proc = subprocess.run([sys.executable, "-m", "abc_tvm.cli", "compile", str(path), "-o",
                           str(tuned), "--tuning-log", str(log), "--report", str(rep)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(rep.read_text())
    assert report["tuning_databases"] == [str(log)] and report["tuned_kernels"]
    y_default, y_tuned = _run(default, x), _run(tuned, x)
    np.testing.assert_array_equal(y_tuned, y_default)
    assert max_rel_err(y_tuned, ort_run(path, x)) <= 1e-4
    assert max_rel_err(y_tuned, ob.reference_output(expected, x)) <= 1e-4


def _abc_task(path: Path) -> ms.ExtractedTask:
    (task,) = [t for t in tuning.extract(path, SPEC) if t.task_name.startswith("abc_block")]
    return task


def _record_with_last_candidates(task: ms.ExtractedTask, log: Path) -> s_tir.Schedule:
    """A database whose only record schedules the ABC kernel with every knob at its last
    candidate (the hand-written default is the first), claimed faster than anything."""
    mod = task.dispatched[0]
    ctx = ms.TuneContext(mod=mod, target=SPEC.target, space_generator="post-order-apply",
                         task_name=task.task_name, num_threads=1)
    space, _ = sampled_and_fixed(ctx.generate_design_space())
    knobs = knob_draws(space)
    assert any(len(i.attrs[0]) > 1 for i in knobs), "no knob with a choice: nothing to tune"
    trace = s_tir.schedule.Trace(space.trace.insts, {i: len(i.attrs[0]) - 1 for i in knobs})
    sch = s_tir.Schedule(mod)
    trace.apply_to_schedule(sch, remove_postproc=True)
    assert all(p.apply(sch) for p in ctx.space_generator.postprocs)
    db = tuning.open_database(log)
    db.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, db.commit_workload(mod), [1e-9], SPEC.target,
        ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
    return sch


def _applied_kernel(path: Path, database: ms.database.Database | None,
                    name: str) -> tvm.tirx.PrimFunc:
    """The ABC kernel as the compile pipeline leaves it after the database (or, with none,
    as the hand-written schedule emits it)."""
    mod = frontend.to_relax(frontend.load(path))
    mod, _, _ = rewrite(mod, SPEC.target, SPEC.word_bits, tunable=database is not None)
    passes = legalize_passes(SPEC)
    if database is not None:
        passes.append(tuning.apply_database_pass(database))
    with SPEC.target, tvm.transform.PassContext(opt_level=3):
        mod = tvm.transform.Sequential(passes)(mod)
    (func,) = [f for gv, f in mod.functions.items() if gv.name_hint.startswith(name)]
    return func


def test_compile_applies_the_database_schedule_not_the_default(tiny, tmp_path):
    path, expected, x = tiny
    task = _abc_task(path)
    log = tmp_path / "log"
    recorded = _record_with_last_candidates(task, log)
    name = task.task_name
    applied = _applied_kernel(path, tuning.load_databases([log]), name)
    default = _applied_kernel(path, None, name)
    assert "tirx.is_scheduled" in applied.attrs
    assert tvm_ffi.structural_equal(applied.body, recorded.mod["main"].body, map_free_vars=True)
    assert not tvm_ffi.structural_equal(applied.body, default.body, map_free_vars=True)

    so_default, so_tuned = tmp_path / "default.so", tmp_path / "tuned.so"
    untuned = compile_model(path, "x86", so_default, quiet=True)
    assert untuned.tuning == [] and untuned.tuned_kernels == []  # no shipped record matches
    tuned = compile_model(path, "x86", so_tuned, quiet=True, tuning_log=log)
    assert tuned.tuned_kernels == [name]
    y = _run(so_tuned, x)
    np.testing.assert_array_equal(y, _run(so_default, x))
    np.testing.assert_allclose(y, ob.reference_output(expected, x), rtol=0, atol=1e-4 * float(
        np.abs(y).max()))


def test_tune_cli_bad_input_is_one_line(tiny, tmp_path, capsys):
    path, _, _ = tiny
    assert cli(["tune", str(path), "--trials", "0", "--log", str(tmp_path / "l")]) == 2
    assert "--trials must be at least 1" in capsys.readouterr().err
    with pytest.raises(UserError, match="--kernels must be"):
        tuning.tune_model(path, "x86", 1, tmp_path / "l", kernels="bogus")
    assert cli(["compile", str(path), "-o", str(tmp_path / "m.so"),
                "--tuning-log", str(tmp_path / "nothing")]) == 2
    assert "holds no MetaSchedule database" in capsys.readouterr().err
