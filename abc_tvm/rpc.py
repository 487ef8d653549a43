"""Remote measurement over TVM RPC: tune and time on a board from the workstation.

The board runs `python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY` (an aarch64
`pip install apache-tvm` of the same version); the workstation runs a tracker
(`python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190`). Then:
- `rpc_runner("HOST:PORT", KEY)` is the MetaSchedule runner `abc-tvm tune --rpc-tracker`
  passes to `ms.tune.tune_tasks(runner=...)`, with `builder_for(spec)` as the builder
  (it links each candidate with the target's cross compiler);
- `measure(lib, ...)` uploads one exported library and times a function of it with
  `time_evaluator` (what `abc-tvm bench --rpc-tracker` needs).
`local_rpc()` starts a tracker and a server on 127.0.0.1, for tests and for trying the
flow on one machine.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm
from tvm import rpc
from tvm.ir.utils import derived_object
from tvm.rpc.tracker import Tracker
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.builder import BuilderInput, BuilderResult, PyBuilder
from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, RPCConfig, RPCRunner

from abc_tvm import _inspect_fix, targets
from abc_tvm.errors import UserError

LOOPBACK = "127.0.0.1"
_HOST_PORT = re.compile(r"^\[?(?P<host>[A-Za-z0-9_.\-:]+?)\]?:(?P<port>\d{1,5})$")


def parse_tracker(text: str) -> tuple[str, int]:
    """"HOST:PORT" (or "[v6]:PORT") -> (host, port), refusing anything else in one line."""
    m = _HOST_PORT.match(text.strip())
    if m is None:
        raise UserError(f"--rpc-tracker must be HOST:PORT (e.g. 192.168.1.20:9190), got {text!r}")
    port = int(m.group("port"))
    if not 0 < port < 65536:
        raise UserError(f"--rpc-tracker port must be 1-65535, got {port}")
    return m.group("host"), port


def rpc_config(tracker: str, key: str, timeout_sec: int = 60) -> RPCConfig:
    """The MetaSchedule RPC configuration for a tracker address and a device key."""
    if not key:
        raise UserError("--rpc-key must name the device key the board's RPC server registered")
    host, port = parse_tracker(tracker)
    return RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                     session_timeout_sec=timeout_sec)


def check_tracker(config: RPCConfig) -> int:
    """How many servers the tracker has for the key; a clear UserError when none or down."""
    where = f"{config.tracker_host}:{config.tracker_port}"
    try:
        with socket.create_connection((config.tracker_host, config.tracker_port), timeout=5):
            pass
        count = config.count_num_servers(allow_missing=True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot reach the RPC tracker at {where}: "
                        f"{str(e).splitlines()[0]}") from None
    if count == 0:
        raise UserError(f"the RPC tracker at {where} has no server with key "
                        f"{config.tracker_key!r}: start `python -m tvm.exec.rpc_server "
                        f"--tracker {where} --key {config.tracker_key}` on the board")
    return count


def rpc_runner(tracker: str, key: str, *, number: int = 3, repeat: int = 1,
               min_repeat_ms: int = 100, timeout_sec: int = 60, check: bool = True,
               max_workers: int | None = None) -> RPCRunner:
    """A configured MetaSchedule RPCRunner for "HOST:PORT" and a device key.

    `check` asks the tracker first, so a wrong address fails here in one line rather than
    as a failed measurement per trial. One worker per server the tracker has for the key.
    """
    config = rpc_config(tracker, key, timeout_sec)
    servers = check_tracker(config) if check else 1
    evaluator = EvaluatorConfig(number=number, repeat=repeat, min_repeat_ms=min_repeat_ms,
                                enable_cpu_cache_flush=False)
    return RPCRunner(rpc_config=config, evaluator_config=evaluator,
                     max_workers=max_workers or servers, initializer=_inspect_fix.install)


def export_aarch64(mod: tvm.runtime.Module) -> str:
    """MetaSchedule builder export: link a candidate with the aarch64 cross compiler."""
    path = os.path.join(tempfile.mkdtemp(prefix="abc-tvm-ms-"), "candidate.so")
    mod.export_library(path, fcompile=tvm.support.cc.cross_compiler(targets.AARCH64_CXX))
    return path


@derived_object
class InProcessBuilder(PyBuilder):
    """Builds candidates in this process, one after the other.

    MetaSchedule's LocalBuilder starts worker processes that each import TVM's tensor
    intrinsics (~15 s on 2 cores) before building anything; for short runs (tests, a few
    trials) building here is much faster. Cross targets are linked with `export`.
    """

    def __init__(self, export: Callable[[tvm.runtime.Module], str] | None = None) -> None:
        super().__init__()
        self.export = export

    def build(self, build_inputs: list[BuilderInput]) -> list[BuilderResult]:
        results = []
        for item in build_inputs:
            try:
                with tvm.transform.PassContext(opt_level=3):
                    lib = tvm.compile(item.mod, target=item.target)
                if self.export is not None:
                    path = self.export(lib)
                else:
                    path = os.path.join(tempfile.mkdtemp(prefix="abc-tvm-ms-"), "candidate.so")
                    lib.export_library(path)
                results.append(BuilderResult(path, None))
            except Exception as e:  # noqa: BLE001 - a failed candidate is a result, not a crash
                results.append(BuilderResult(None, f"{type(e).__name__}: {e}"))
        return results


BUILD_TIMEOUT_S = 300.0  # ABC kernels unroll M x N x tile: LLVM needs > 30 s on a busy 2-core box


def builder_for(spec: targets.TargetSpec, max_workers: int | None = None,
                in_process: bool = False) -> ms.builder.Builder:
    """The MetaSchedule builder for a target: cross-linking for aarch64, plain otherwise."""
    if spec.cross_compiler and spec.arch != "aarch64":
        raise UserError(f"remote tuning for {spec.name} ({spec.arch}) is not supported: "
                        "use an aarch64 target")
    export = export_aarch64 if spec.cross_compiler else None
    if in_process:
        return InProcessBuilder(export)
    if export is not None:
        return ms.builder.LocalBuilder(f_export=export, max_workers=max_workers,
                                       timeout_sec=BUILD_TIMEOUT_S,
                                       initializer=_inspect_fix.install)
    # The initializer: a worker otherwise spends a minute parsing TVM's tensor intrinsics.
    return ms.builder.LocalBuilder(max_workers=max_workers, timeout_sec=BUILD_TIMEOUT_S,
                                   initializer=_inspect_fix.install)


def local_runner() -> ms.runner.Runner:
    """MetaSchedule's runner on this host (its worker gets the same initializer)."""
    return ms.runner.LocalRunner(initializer=_inspect_fix.install)


@dataclass
class Measurement:
    """One remote run: the outputs it wrote and the time_evaluator statistics."""

    outputs: list[np.ndarray]
    mean_s: float
    results_s: list[float]


def measure(lib: str | os.PathLike, tracker: str, key: str, inputs: Sequence[np.ndarray],
            outputs: Sequence[np.ndarray], func: str = "main", number: int = 10,
            repeat: int = 3, timeout_sec: int = 60) -> Measurement:
    """Upload an exported library to a tracker's device, run `func` once, then time it.

    `func` takes the inputs then the outputs (destination passing, as our kernels do);
    `outputs` gives their shapes and dtypes. Returns what the device wrote and the times.
    """
    config = rpc_config(tracker, key, timeout_sec)
    check_tracker(config)
    session = config.connect_server()
    lib = Path(lib)
    session.upload(str(lib))
    remote = session.load_module(lib.name)
    dev = session.cpu(0)
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in inputs]
    outs = [tvm.runtime.tensor(np.zeros_like(o), dev) for o in outputs]
    remote[func](*args, *outs)
    timer = remote.time_evaluator(func, dev, number=number, repeat=repeat)
    result = timer(*args, *outs)
    return Measurement([o.numpy() for o in outs], float(result.mean),
                       [float(r) for r in result.results])


@dataclass
class LocalRPC:
    """A tracker and servers on loopback: `tracker` is "127.0.0.1:PORT"."""

    tracker: str
    key: str
    servers: int


@contextlib.contextmanager
def local_rpc(key: str = "abc-local", servers: int = 1, port: int = 9190) -> Iterator[LocalRPC]:
    """Start an RPC tracker and `servers` RPC servers on 127.0.0.1; stop them on exit.

    Only the loopback address is ever bound or advertised, so nothing is reachable from
    outside this machine. Free ports are searched upwards from `port`.
    """
    tracker = Tracker(host=LOOPBACK, port=port, port_end=port + 200, silent=True)
    started: list[rpc.Server] = []
    try:
        for _ in range(servers):
            started.append(rpc.Server(host=LOOPBACK, port=tracker.port + 1,
                                      port_end=tracker.port + 400,
                                      tracker_addr=(LOOPBACK, tracker.port), key=key,
                                      custom_addr=LOOPBACK, silent=True))
        config = RPCConfig(tracker_host=LOOPBACK, tracker_port=tracker.port, tracker_key=key,
                           session_timeout_sec=30)
        for _ in range(100):  # servers register with the tracker asynchronously
            if config.count_num_servers(allow_missing=True) >= servers:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("the local RPC servers did not register with the tracker")
        yield LocalRPC(f"{LOOPBACK}:{tracker.port}", key, servers)
    finally:
        for server in started:
            server.terminate()
        tracker.terminate()
