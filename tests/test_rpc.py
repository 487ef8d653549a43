"""TVM RPC on loopback: MetaSchedule tuning through the RPC runner, and an ABC kernel measured
on the "remote" device with time_evaluator. Only 127.0.0.1 is ever used.

The local server runs this machine's CPU, so kernels are built for the host; on a board the
same calls take `builder_for(spec)` (cross-linking) and the board's tracker address.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import te
from tvm.s_tir import meta_schedule as ms

from abc_tvm import reference as ref
from abc_tvm import rpc, schedules, targets, tuning
from abc_tvm.errors import UserError

HOST = tvm.target.Target.from_device("cpu")


@pytest.fixture(scope="module")
def loopback():
    with rpc.local_rpc(key="abc-test") as session:
        yield session


def test_parse_tracker():
    assert rpc.parse_tracker("127.0.0.1:9190") == ("127.0.0.1", 9190)
    assert rpc.parse_tracker("board.local:9000") == ("board.local", 9000)
    assert rpc.parse_tracker("[::1]:9190") == ("::1", 9190)
    for bad in ("127.0.0.1", "host:", ":9190", "host:port", "host:99999", "a b:1"):
        with pytest.raises(UserError, match="--rpc-tracker"):
            rpc.parse_tracker(bad)
    with pytest.raises(UserError, match="--rpc-key"):
        rpc.rpc_config("127.0.0.1:9190", "")


def test_unreachable_tracker_and_unknown_key_fail_clearly(loopback):
    with pytest.raises(UserError, match="cannot reach the RPC tracker at 127.0.0.1:1"):
        rpc.rpc_runner("127.0.0.1:1", "abc-test")
    with pytest.raises(UserError, match="no server with key 'rpi9'"):
        rpc.rpc_runner(loopback.tracker, "rpi9")


def _matmul(n: int = 64) -> tvm.IRModule:
    a = te.placeholder((n, n), "float32", name="A")
    b = te.placeholder((n, n), "float32", name="B")
    k = te.reduce_axis((0, n), name="k")
    c = te.compute((n, n), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    return tvm.IRModule({"main": te.create_prim_func([a, b, c])})


def test_metaschedule_tunes_over_rpc(loopback, tmp_path):
    """A 64x64 matmul, 6 trials, every measurement through the tracker and the RPC server."""
    runner = rpc.rpc_runner(loopback.tracker, loopback.key, number=2, repeat=1,
                            min_repeat_ms=0)
    target = tvm.target.Target({**HOST.export(), "num-cores": 1})
    database = ms.database.MemoryDatabase()
    builder = rpc.builder_for(targets.resolve("x86"), in_process=True)
    tuning.quiet_ms_logging()  # another test may have tuned in this process before
    ms.tune_tir(mod=_matmul(), target=target, work_dir=str(tmp_path), max_trials_global=6,
                num_trials_per_iter=3, builder=builder,
                runner=runner, database=database, cost_model="random",
                strategy="replay-trace")
    records = database.get_all_tuning_records()
    measured = [r for r in records if r.run_secs and all(float(s) < 1e9 for s in r.run_secs)]
    assert len(measured) >= 3, [r.run_secs for r in records]
    assert all(float(s) > 0 for r in measured for s in r.run_secs)


def test_abc_kernel_measured_over_rpc(loopback, tmp_path):
    """Export the dot stage, upload it, run and time it remotely: bit-exact vs reference."""
    rng = np.random.default_rng(0)
    M, N, O, C, H, W = 2, 3, 16, 70, 6, 6  # noqa: N806 - the paper's names
    x = rng.uniform(-1, 2, (1, C, H, W)).astype(np.float32)
    v = rng.uniform(-0.5, 0.5, N).astype(np.float32)
    bases = np.where(rng.random((M, O, C, 3, 3)) < 0.5, -1, 1).astype(np.int8)
    wbits, wsum = ref.pack_weights(bases, 64)
    packed = ref.pack_activations(x, v, 64)
    want = ref.abc_conv_dot(x, v, bases, (1, 1), (1, 1, 1, 1), "bipolar", 64)
    func = schedules.abc_dot_func(1, C, H, W, O, 3, 1, 1, M, N, True, 64, HOST)
    lib = tmp_path / "abc_dot.so"
    tvm.compile(func, target=HOST).export_library(str(lib))
    result = rpc.measure(lib, loopback.tracker, loopback.key, [packed, wbits, wsum],
                         [np.zeros(want.shape, np.int32)], func=str(func.attrs["global_symbol"]),
                         number=5, repeat=2)
    np.testing.assert_array_equal(result.outputs[0], want)
    assert result.mean_s > 0 and len(result.results_s) == 2


def test_builder_for_cross_target_links_aarch64():
    try:
        spec = targets.resolve("arm")
    except UserError as e:
        pytest.skip(str(e))
    assert isinstance(rpc.builder_for(spec, max_workers=1), ms.builder.LocalBuilder)
    builder = rpc.builder_for(spec, in_process=True)
    func = schedules.abc_dot_func(1, 8, 4, 4, 4, 3, 1, 1, 1, 1, True, 64, spec.target)
    (result,) = builder.build([ms.builder.BuilderInput(tvm.IRModule({"main": func}),
                                                       spec.target)])
    assert result.error_msg is None, result.error_msg
    with open(result.artifact_path, "rb") as f:
        head = f.read(20)
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183


def test_bench_over_rpc_times_models_on_the_device(loopback, tmp_path, capsys):
    """`abc-tvm bench --rpc-tracker`: the float twin and an ABC model run on the RPC device;
    their outputs there agree with ONNX Runtime here."""
    from abc_tvm.cli import main

    rc = main(["bench", "--quick", "--models", "1x1", "--repeat", "2", "--target", "x86",
               "--work-dir", str(tmp_path), "--rpc-tracker", loopback.tracker,
               "--rpc-key", loopback.key, "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = [line.split() for line in out.splitlines()
            if line.strip().startswith(("TVM fp32", "abc-tvm M"))]
    assert [r[0] for r in rows] == ["TVM", "abc-tvm"], out
    for r in rows:
        assert float(r[-1]) <= 1e-4 and float(r[-4]) > 0, out  # rel. err, best ms
    assert main(["bench", "--rpc-tracker", loopback.tracker, "--rpc-key", "nope",
                 "--target", "x86", "--work-dir", str(tmp_path)]) == 2
    assert "no server with key 'nope'" in capsys.readouterr().err


def test_tune_cli_over_rpc_and_cross_target_needs_a_tracker(loopback, tmp_path, capsys):
    """`abc-tvm tune --rpc-tracker`: every candidate measured on the RPC device; a board
    target without a tracker is refused (its candidates cannot run here)."""
    import onnx
    import onnx_builders as ob

    from abc_tvm.cli import main
    from abc_tvm.tuning import open_database

    model, _ = ob.canonical(batch=1, in_channels=16, out_channels=16, height=8, width=8)
    path = tmp_path / "tiny.onnx"
    onnx.save(model, path)
    log = tmp_path / "log"
    assert main(["tune", str(path), "--trials", "2", "--log", str(log),
                 "--rpc-tracker", loopback.tracker, "--rpc-key", loopback.key]) == 0
    records = open_database(log).get_all_tuning_records()
    assert len(records) >= 2
    assert any(0 < float(min(r.run_secs)) < 1.0 for r in records)  # a failed run: 1e10 s
    capsys.readouterr()
    assert main(["tune", str(path), "--target", "rpi4", "--trials", "2",
                 "--log", str(tmp_path / "arm")]) == 2
    assert "tune on the board with --rpc-tracker" in capsys.readouterr().err
