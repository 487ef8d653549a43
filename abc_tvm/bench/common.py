"""Bench configuration and helpers shared by every stage: the Config, source hashes, stats.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import io
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from abc_tvm.errors import UserError

ROOT = Path(__file__).resolve().parents[2]  # the checkout (benchmarks/, docs/)


STEP = "@@step "  # a worker's progress line on stdout


FLOAT_PEERS = {
    "ort": "ONNX Runtime fp32",
    "ort_int8": "ONNX Runtime int8 (static QDQ)",
    "openvino": "OpenVINO (default precision)",
    "openvino_int8": "OpenVINO int8 (QDQ model)",
    "torch": "PyTorch eager fp32",
    "tvm_fp32": "TVM fp32 (compile_model)",
}


# Sources whose change invalidates a cached export / compiled model.
EXPORT_SOURCES = ["abc_tvm/models.py", "abc_tvm/nn.py", "abc_tvm/export.py", "abc_tvm/pattern.py"]


COMPILE_SOURCES = ["abc_tvm/*.py", "abc_tvm/canonical/*.py", "schedules/*.py",
                   "relay_passes/*.py", "tuning_logs/**/*"]


COMPILE_EXCLUDE = {"bench_args.py", "serving.py", "serving_args.py", "cli.py",
                   "demo.py", "rpc.py"}


CHECK_TOL = 1e-3  # relative output error above which a peer's row is flagged


@dataclass
class Config:
    """The resolved options of one benchmark run (defaults filled in, --quick applied)."""

    threads: list[int]
    models: list[tuple[int, int]]
    topi_tuned: list[tuple[int, int]]
    trials: int
    image_size: int
    repeat: int
    parts: set[str]
    work_dir: Path
    plot: Path | None
    doc: Path | None
    tuning_log: Path | None
    quick: bool
    progress: bool
    command: str
    arch: str = "abc_resnet18"
    min_sample_s: float = 0.2  # one timing sample lasts at least this long
    target: str = "x86"  # what every TVM build of the run is compiled for (runs here)
    layer_repeat_ms: int = 50

    def mn(self, m: int, n: int) -> str:
        return f"{m}x{n}"


def _parse_mn(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            m, n = (int(v) for v in item.split("x"))
        except ValueError:
            raise UserError(f"expected MxN like 3x3, got {item!r}") from None
        if not (1 <= m <= 8 and 1 <= n <= 8):
            raise UserError(f"M and N must be 1..8, got {item!r}")
        out.append((m, n))
    return out


def command_line() -> str:
    """The command as a user would type it again (`abc-tvm bench ...` or `python -m ...`)."""
    argv = list(sys.argv)
    head = Path(argv[0]).name if argv else ""
    if head == "abc-tvm":
        return shlex.join(["abc-tvm", *argv[1:]])
    if head in ("bench.py", "__main__.py"):  # python -m abc_tvm.bench
        return shlex.join(["python", "-m", "abc_tvm.bench", *argv[1:]])
    return shlex.join(argv)


def config_from_args(args: argparse.Namespace) -> Config:
    """Fill the defaults (and the --quick ones) and check the options."""
    quick = bool(args.quick)
    try:
        threads = [int(t) for t in (args.threads or ("1" if quick else "1,2")).split(",") if t]
    except ValueError:
        raise UserError(f"--threads takes integers like 1,2 (got {args.threads!r})") from None
    if not threads or min(threads) < 1:
        raise UserError("--threads needs at least one count >= 1")
    models = _parse_mn(args.models or ("1x1" if quick else "1x1,3x3,5x5"))
    if not models:
        raise UserError("--models is empty")
    if args.topi_tuned is None:
        topi_tuned = [(3, 3)] if (3, 3) in models else models[:1]
    elif args.topi_tuned.strip().lower() == "none":
        topi_tuned = []
    else:
        topi_tuned = _parse_mn(args.topi_tuned)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - {"models", "layers"}:
        raise UserError(f"--parts takes models and/or layers (got {args.parts!r})")
    trials = args.trials if args.trials is not None else (2 if quick else 64)
    if trials < 1:
        raise UserError("--trials must be at least 1")
    size = args.image_size or (32 if quick else 224)
    if size < 32:
        raise UserError(f"--image-size must be at least 32 (got {size})")
    repeat = args.repeat or (3 if quick else 10)
    target = check_local_target(getattr(args, "target", None))
    if args.tuning_log is not None and not args.tuning_log.is_dir():
        raise UserError(f"--tuning-log {args.tuning_log} is not a directory")
    return Config(
        threads=list(dict.fromkeys(threads)), models=list(dict.fromkeys(models)),
        topi_tuned=list(dict.fromkeys(topi_tuned)), trials=trials, image_size=size,
        repeat=repeat, parts=parts, work_dir=Path(args.work_dir).resolve(), plot=args.plot,
        doc=None if args.no_doc else args.doc,
        tuning_log=args.tuning_log.resolve() if args.tuning_log else None, quick=quick,
        progress=not args.no_progress, command=command_line(),
        arch="abc_resnet20" if quick else "abc_resnet18",
        min_sample_s=0.02 if quick else 0.2, layer_repeat_ms=10 if quick else 50,
        target=target,
    )


def check_local_target(name: str | None) -> str:
    """A bench target timed on this machine: x86, or an x86 level or CPU this CPU runs."""
    from abc_tvm import targets

    name = name or "x86"
    if name != "x86" and not (name in targets.X86_LEVELS or name.startswith("x86:")):
        raise UserError(f"bench --target {name} is timed here, so it must be an x86 target "
                        "(x86, x86-64-v2/v3/v4, x86:MCPU); a board needs --rpc-tracker")
    if not targets.resolve(name).runs_on_host:
        raise UserError(f"bench --target {name}: this CPU lacks features that build needs")
    return name


def host_mcpu() -> str:
    """LLVM's name of this CPU (what the doc sections are titled by)."""
    import tvm

    return str(tvm.target.Target.from_device("cpu").attrs.get("mcpu", "?"))


def tvm_target(name: str):
    """The TVM target of a bench target name (TOPI, the peak kernel, standalone layers)."""
    from abc_tvm import targets

    return targets.resolve(name).target


def load_benchmark(name: str) -> ModuleType:
    """Import benchmarks/<name>.py (a folder of scripts, not an installed package)."""
    path = ROOT / "benchmarks" / f"{name}.py"
    if not path.is_file():
        raise UserError(f"{path} is missing: abc-tvm bench runs from a source checkout")
    mod_name = f"abc_tvm_benchmarks_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    return module


def sources_hash(patterns: list[str], extra: str = "", exclude: set[str] | None = None) -> str:
    """A short hash of the files matching `patterns` under the repo root, plus `extra`."""
    h = hashlib.sha256(extra.encode())
    for pattern in patterns:
        for path in sorted(ROOT.glob(pattern)):
            if path.is_file() and path.name not in (exclude or set()) \
                    and "__pycache__" not in path.parts:
                h.update(str(path.relative_to(ROOT)).encode())
                h.update(path.read_bytes())
    return h.hexdigest()[:16]


def dir_hash(path: Path | None) -> str:
    """Hash of a directory's files (a tuning database), '' for None."""
    if path is None:
        return ""
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def step(desc: str) -> None:
    """Tell the parent (reading our stdout) that one step of its progress bar is done."""
    print(f"{STEP}{desc}", flush=True)


@contextlib.contextmanager
def quiet_stdio() -> Iterator[None]:
    """Silence Python-level prints (compile reports, warnings) inside a worker."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def stats(samples_s: list[float]) -> dict:
    """best / median of per-call seconds, in ms."""
    ms = [s * 1e3 for s in samples_s]
    return {"best_ms": min(ms), "median_ms": statistics.median(ms), "samples_ms": ms}


def max_rel_err(y: Any, ref: Any) -> float:
    """max |y - ref| / max |ref| (the test suite's measure)."""
    import numpy as np

    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    if y.shape != ref.shape:
        return float("inf")
    return float(np.abs(y - ref).max() / max(float(np.abs(ref).max()), 1e-30))


def machine_info() -> dict:
    """CPU model, popcount support, core count, library versions."""
    from abc_tvm.bench.peers import matrix_features
    from abc_tvm.hostcpu import host_cpu, package_version

    cpu = host_cpu()
    model, flags = cpu.model, cpu.flags

    def version(pkg: str) -> str:
        return package_version(pkg, "-")

    return {
        "cpu": model, "cores": os.cpu_count(),
        "avx512_vpopcntdq": "avx512_vpopcntdq" in flags, "avx512f": "avx512f" in flags,
        "python": platform.python_version(), "apache-tvm": version("apache-tvm"),
        "apache-tvm-ffi": version("apache-tvm-ffi"), "onnxruntime": version("onnxruntime"),
        "torch": version("torch"), "openvino": version("openvino"),
        "matrix": matrix_features(flags), "kernel": platform.release(),
    }


class VmCalls:
    """A compiled model whose every kernel call is timed (a Relax VM instrument): what the
    binary-layer profile and the float per-op table both read."""

    def __init__(self, so: str, x: Any, shapes: bool = False) -> None:
        import tvm
        from tvm import relax

        dev = tvm.cpu()
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(so), dev)
        self.x = tvm.runtime.tensor(x, dev)
        self._shapes = shapes  # record argument shapes (on the next run only)
        self._calls: list[tuple[str, float, list[list[int]]]] = []
        self._args: list[list[int]] = []
        self._start = 0.0
        self.vm.set_instrument(self._instrument)

    def _instrument(self, _func, symbol, before, _ret, *args) -> int:
        if before:
            self._args = [[int(d) for d in a.shape] for a in args
                          if hasattr(a, "shape")] if self._shapes else []
            self._start = time.perf_counter()
        else:
            self._calls.append((str(symbol), time.perf_counter() - self._start, self._args))
        return 0

    def run(self) -> list[tuple[str, float, list[list[int]]]]:
        """One run: (symbol, seconds, argument shapes if asked) of every call, in order."""
        self._calls = []
        self.vm["main"](self.x)
        self._shapes = False  # shapes do not change between runs: taken once, untimed
        return self._calls
