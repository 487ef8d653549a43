"""`abc-tvm tune --kernels float`: the float register tile searched by MetaSchedule.

The model: a padded 3x3 conv + bias + ReLU (NHWC blocked conv, 32 channels, 12x12) and a
max pool. The rule's design spaces must hold the untuned tile unchanged, a record whose
tile differs from the default must be what compile applies, and the answer must stay ORT's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import tvm
import tvm_ffi
from design_spaces import knob_draws
from onnx import TensorProto, helper, numpy_helper
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms

from abc_tvm import targets, tuning
from abc_tvm.compiler import compile_model
from abc_tvm.runtime import load
from abc_tvm.schedules import float_default as fd
from abc_tvm.schedules import float_tune

SPEC = targets.resolve("x86")
C = 32


@pytest.fixture(scope="module")
def conv_model(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.2, (C, C, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 1, C).astype(np.float32), "b")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["y"], kernel_shape=[2, 2], strides=[2, 2])]
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, 6, 6])], inits)
    path = tmp_path_factory.mktemp("ftune") / "conv.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _conv_task(path: Path) -> ms.ExtractedTask:
    (task,) = [t for t in tuning.extract(path, SPEC) if "float_conv_nhwc" in t.task_name]
    return task


def _spaces(task: ms.ExtractedTask) -> tuple[ms.TuneContext, list[s_tir.Schedule]]:
    ctx = ms.TuneContext(mod=task.dispatched[0], target=SPEC.target,
                         space_generator="post-order-apply", task_name=task.task_name,
                         num_threads=1)
    with SPEC.target:
        return ctx, ctx.generate_design_space()


def test_rule_spaces_hold_the_default_tile_and_draw_the_others(conv_model):
    task = _conv_task(conv_model)
    _, spaces = _spaces(task)
    drawn = [s for s in spaces if knob_draws(s)]
    fixed = [s for s in spaces if not knob_draws(s)]
    # drawn tile; the default; the default with the padding placed, and the input channels
    # chunked, the other way
    assert len(drawn) == 1 and len(fixed) == 3, (len(drawn), len(fixed))
    with SPEC.target:
        default = fd.schedule_func(task.dispatched[0]["main"], SPEC.target)
    assert any(tvm_ffi.structural_equal(s.mod["main"].body, default.body, map_free_vars=True)
               for s in fixed), "the untuned tile is not among the design spaces"
    vectors, pixels = float_tune.tile_candidates(C, 12, fd.simd_of(SPEC.target))
    assert len(vectors) > 1 and 12 in pixels and 5 not in pixels  # divisors only


def test_compile_applies_a_float_record_and_keeps_ort_answer(conv_model, tmp_path, ort_run,
                                                            max_rel_err):
    """A record with every draw at its last candidate (not the default tile), claimed faster
    than anything: compile must apply it, and its output must still be ORT's."""
    task = _conv_task(conv_model)
    ctx, spaces = _spaces(task)
    (space,) = [s for s in spaces if knob_draws(s)]
    draws = knob_draws(space)
    trace = s_tir.schedule.Trace(space.trace.insts, {i: len(i.attrs[0]) - 1 for i in draws})
    mod = task.dispatched[0]
    sch = s_tir.Schedule(mod)
    with SPEC.target:
        trace.apply_to_schedule(sch, remove_postproc=True)
    assert all(p.apply(sch) for p in ctx.space_generator.postprocs)
    log = tmp_path / "log"
    db = tuning.open_database(log)
    db.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, db.commit_workload(mod), [1e-9], SPEC.target,
        ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
    (log / tuning.TASKS).write_text(f'["{task.task_name}"]')
    report = compile_model(conv_model, "x86", tmp_path / "t.so", quiet=True, tuning_log=log)
    assert report.tuned_kernels == [task.task_name]
    x = np.random.default_rng(1).normal(0, 1, (1, C, 12, 12)).astype(np.float32)
    assert max_rel_err(load(tmp_path / "t.so", workers=1)(x), ort_run(str(conv_model), x)) < 1e-5


def test_tune_float_kernels_only(conv_model, tmp_path, ort_run, max_rel_err):
    log = tmp_path / "log"
    result = tuning.tune_model(conv_model, "x86", 6, log, kernels="float", quiet=True)
    tasks = set(tuning.json.loads((log / tuning.TASKS).read_text()))
    assert result.trials_run >= 6 and not any(t.startswith("abc_") for t in tasks)
    assert any("float_conv_nhwc" in t for t in tasks)
    report = compile_model(conv_model, "x86", tmp_path / "t.so", quiet=True, tuning_log=log)
    assert any("float_conv_nhwc" in k for k in report.tuned_kernels)
    x = np.random.default_rng(2).normal(0, 1, (1, C, 12, 12)).astype(np.float32)
    assert max_rel_err(load(tmp_path / "t.so", workers=1)(x), ort_run(str(conv_model), x)) < 1e-5


def test_mark_leaves_functions_without_a_tile_alone():
    """An elementwise function has no reduction: MetaSchedule's generic rules keep it."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def relu(a: T.Buffer((4, 16), "float32"), b: T.Buffer((4, 16), "float32")):
        for i, j in T.grid(4, 16):
            with T.sblock("r"):
                vi, vj = T.axis.remap("SS", [i, j])
                b[vi, vj] = T.max(a[vi, vj], T.float32(0))

    marked = float_tune.mark_tunable(tvm.IRModule({"main": relu}))
    assert "schedule_rule" not in marked["main"].script()
