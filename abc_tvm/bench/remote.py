"""`abc-tvm bench --rpc-tracker HOST:PORT --rpc-key KEY [--target arm]`: time on a board.

The local benchmark (`abc_tvm.bench`) needs ONNX Runtime and PyTorch beside the kernels,
which a board may not have. Over RPC only TVM runs remotely, so the peers are the ones TVM
can run there: abc-tvm's ABC models and the float twin compiled by TVM for the same target.
Each model is compiled here (cross-linked for the board), uploaded through the tracker,
run by a Relax VM on the board and timed with the VM's `time_evaluator`; the board's output
is checked against ONNX Runtime run here on the same ONNX file, so a wrong kernel cannot
pass as a fast one. Threads on the board are those its RPC server was started with
(`TVM_NUM_THREADS`, all cores by default).
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from abc_tvm import rpc, targets
from abc_tvm.bench.common import _parse_mn, max_rel_err, quiet_stdio
from abc_tvm.bench.jobs import _build_model
from abc_tvm.bench.tables import Tables, _fmt_x
from abc_tvm.errors import UserError


@dataclass
class RemoteTiming:
    """One compiled model timed on the board."""

    label: str
    best_ms: float
    median_ms: float
    rel_err: float


def export_models(models: list[tuple[int, int]], arch: str, size: int,
                  work: Path) -> tuple[dict[str, Path], np.ndarray]:
    """ONNX files of the float twin and each ABC model, and one fixed input for all."""
    import warnings

    import torch

    from abc_tvm.export import to_onnx
    from abc_tvm.models import float_twin

    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    out: dict[str, Path] = {}
    work.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for i, (m, n) in enumerate(models):
            model = _build_model(arch, m, n)
            if i == 0:
                path = out["TVM fp32 (float twin)"] = work / "float_twin.onnx"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(float_twin(model), (x,), str(path), dynamo=False,
                                      opset_version=17, input_names=["input"],
                                      output_names=["output"])
            path = out[f"abc-tvm M={m} N={n}"] = work / f"abc{m}x{n}.onnx"
            to_onnx(model, x, path)
    return out, x.numpy()


def time_on_board(so: Path, x: np.ndarray, tracker: str, key: str, repeat: int,
                  min_repeat_ms: int = 200) -> tuple[np.ndarray, list[float]]:
    """Upload `so`, run it once for its output, then time `repeat` samples (seconds/call)."""
    import tvm
    from tvm.runtime.vm import VirtualMachine

    session = rpc.rpc_config(tracker, key).connect_server()
    session.upload(str(so))
    dev = session.cpu(0)
    vm = VirtualMachine(session.load_module(so.name), dev)
    vm.set_input("main", tvm.runtime.tensor(x, dev))
    vm.invoke_stateful("main")
    y = vm.get_outputs("main")
    y = (y[0] if isinstance(y, (list, tuple)) or not hasattr(y, "numpy") else y).numpy()
    timer = vm.time_evaluator("invoke_stateful", dev, number=1, repeat=repeat,
                              min_repeat_ms=min_repeat_ms)
    return y, [float(r) for r in timer("main").results]


def bench_remote(target: str, tracker: str, key: str, models: list[tuple[int, int]],
                 arch: str, size: int, repeat: int, work: Path,
                 tuning_log: Path | None = None) -> list[RemoteTiming]:
    """Compile each model for `target`, time it on the board, check it against ORT here."""
    import onnxruntime as ort
    from tqdm import tqdm

    from abc_tvm.compiler import compile_model

    targets.resolve(target)  # the cross compiler must be here before anything is built
    rpc.check_tracker(rpc.rpc_config(tracker, key))
    onnx_files, x = export_models(models, arch, size, work)
    rows = []
    for label, path in tqdm(onnx_files.items(), desc=f"bench on {key} ({target})",
                            unit="model"):
        so = path.with_suffix(f".{target}.so")
        with quiet_stdio():
            compile_model(path, target, so, quiet=True, tuning_log=tuning_log)
        ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            None, {"input": x})[0]
        y, secs = time_on_board(so, x, tracker, key, repeat)
        ms = [s * 1e3 for s in secs]
        rows.append(RemoteTiming(label, min(ms), statistics.median(ms), max_rel_err(y, ref)))
    return rows


def table(rows: list[RemoteTiming], key: str, target: str, arch: str, size: int) -> Tables:
    base = rows[0].best_ms
    t = Tables()
    t.add(f"{arch}, batch 1, {size}x{size}, on RPC key {key!r} (--target {target})",
          ["model", "ms (best)", "ms (median)", "speed-up vs TVM fp32", "max rel. err vs ORT"],
          [[r.label, f"{r.best_ms:.3f}", f"{r.median_ms:.3f}", _fmt_x(base / r.best_ms),
            f"{r.rel_err:.1e}"] for r in rows])
    return t


def bench_remote_from_args(args: argparse.Namespace) -> list[RemoteTiming]:
    """The `abc-tvm bench --rpc-tracker` path (local peers and --threads do not apply)."""
    if not args.rpc_key:
        raise UserError("--rpc-tracker needs --rpc-key: the key the board's RPC server "
                        "registered with")
    if args.threads is not None or args.topi_tuned is not None:
        raise UserError("--threads and --topi-tuned apply to the local benchmark; on a board "
                        "the RPC server's TVM_NUM_THREADS decides the threads")
    models = _parse_mn(args.models or "1x1,3x3,5x5")
    arch = "abc_resnet20" if args.quick else "abc_resnet18"
    size = args.image_size or (32 if args.quick else 224)
    args.target = args.target or "arm"
    rows = bench_remote(args.target, args.rpc_tracker, args.rpc_key, models, arch, size,
                        args.repeat or 10, Path(args.work_dir) / f"rpc-{args.target}",
                        args.tuning_log)
    print(table(rows, args.rpc_key, args.target, arch, size).text())
    return rows
