"""`abc-tvm bench`: abc-tvm against its float and binary peers, measured side by side.

Why it is built this way:
- Every expensive step runs in a worker process (`python -m abc_tvm.bench --worker JOB`):
  exporting, compiling, tuning TOPI and measuring. A crash or a leaked thread pool in one
  step cannot take the run down or skew another, and its log lands in the work dir.
- All peers of one thread count are timed in **one** child process, whose TVM_NUM_THREADS,
  OMP_NUM_THREADS and ONNX Runtime/PyTorch settings are fixed before anything starts, with
  their samples interleaved (round r times every peer once), so that drift and noise from
  other work on the machine fall on every peer alike.
- Exports, compiled models and TOPI tuning databases are cached in the work dir under keys
  that include the sources they depend on, so a rerun after a kernel change recompiles
  abc-tvm but reuses the exports and the TOPI databases (tuning resumes where it stopped).
- Speed is reported, never asserted: `docs/benchmarks.md` gets the latest figures, the
  command that produced them, and the issue's targets with "met" or "not met".
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import importlib.util
import io
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from abc_tvm.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
STEP = "@@step "  # a worker's progress line on stdout
FLOAT_PEERS = {
    "ort": "ONNX Runtime fp32",
    "torch": "PyTorch eager fp32",
    "tvm_fp32": "TVM fp32 (compile_model)",
}
# Sources whose change invalidates a cached export / compiled model.
EXPORT_SOURCES = ["abc_tvm/models.py", "abc_tvm/nn.py", "abc_tvm/export.py", "abc_tvm/pattern.py"]
COMPILE_SOURCES = ["abc_tvm/*.py", "schedules/*.py", "relay_passes/*.py", "tuning_logs/**/*"]
COMPILE_EXCLUDE = {"bench.py", "bench_args.py", "serving.py", "serving_args.py", "cli.py",
                   "demo.py", "rpc.py"}
CHECK_TOL = 1e-3  # relative output error above which a peer's row is flagged


# ----------------------------------------------------------------------------- configuration


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


def _command_line() -> str:
    """The command as a user would type it again (`abc-tvm bench ...` or `python -m ...`)."""
    argv = list(sys.argv)
    head = Path(argv[0]).name if argv else ""
    if head == "abc-tvm":
        return shlex.join(["abc-tvm", *argv[1:]])
    if head == "bench.py":
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
    if args.tuning_log is not None and not args.tuning_log.is_dir():
        raise UserError(f"--tuning-log {args.tuning_log} is not a directory")
    return Config(
        threads=list(dict.fromkeys(threads)), models=list(dict.fromkeys(models)),
        topi_tuned=list(dict.fromkeys(topi_tuned)), trials=trials, image_size=size,
        repeat=repeat, parts=parts, work_dir=Path(args.work_dir).resolve(), plot=args.plot,
        doc=None if args.no_doc else args.doc,
        tuning_log=args.tuning_log.resolve() if args.tuning_log else None, quick=quick,
        progress=not args.no_progress, command=_command_line(),
        arch="abc_resnet20" if quick else "abc_resnet18",
        min_sample_s=0.02 if quick else 0.2, layer_repeat_ms=10 if quick else 50,
    )


# ----------------------------------------------------------------------------- helpers


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
    """CPU model, LLVM's name for it, popcount support, core count, library versions."""
    from importlib import metadata

    model, flags = platform.processor() or "unknown", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("unknown", "", platform.machine()):
                model = value.strip()
            if key.strip() == "flags":
                flags = set(value.split())
                break

    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "-"

    return {
        "cpu": model, "cores": os.cpu_count(),
        "avx512_vpopcntdq": "avx512_vpopcntdq" in flags, "avx512f": "avx512f" in flags,
        "python": platform.python_version(), "apache-tvm": version("apache-tvm"),
        "apache-tvm-ffi": version("apache-tvm-ffi"), "onnxruntime": version("onnxruntime"),
        "torch": version("torch"), "kernel": platform.release(),
    }


# ----------------------------------------------------------------------------- workers


def _build_model(arch: str, M: int, N: int):  # noqa: N803
    from abc_tvm.models import ZOO

    return ZOO[arch][0](M, N, seed=0)


def _layers_of(model, size: int) -> list[dict]:
    """The distinct ABC conv shapes of a model at an input size, with how often each occurs."""
    import torch

    from abc_tvm.nn import ABCConv2d

    seen: dict[str, dict] = {}
    hooks = []

    def hook(mod, inputs, _output):
        b, c, h, w = (int(d) for d in inputs[0].shape)
        stride = mod.stride if isinstance(mod.stride, int) else mod.stride[0]
        pad = mod.padding if isinstance(mod.padding, int) else mod.padding[0]
        layer = {"channels": c, "out_channels": int(mod.out_channels), "height": h, "width": w,
                 "stride": int(stride), "padding": int(pad), "kernel": int(mod.kernel_size[0]),
                 "batch": b}
        key = json.dumps(layer, sort_keys=True)
        seen.setdefault(key, {"layer": layer, "count": 0})["count"] += 1

    for m in model.modules():
        if isinstance(m, ABCConv2d):
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return list(seen.values())


def _job_export(job: dict) -> dict:
    """Export every ABC model (and the float twin) to ONNX, with an input and its reference."""
    import warnings

    import numpy as np
    import torch

    from abc_tvm.export import to_onnx
    from abc_tvm.models import float_twin

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    size, arch = job["image_size"], job["arch"]
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    out: dict = {"models": {}, "layers": None}
    for item in job["items"]:
        d = Path(item["dir"])
        meta = d / "meta.json"
        M, N = item["M"], item["N"]  # noqa: N806
        if meta.is_file() and json.loads(meta.read_text()).get("key") == item["key"]:
            out["models"][item["name"]] = json.loads(meta.read_text())
            if out["layers"] is None and item["kind"] == "abc":
                out["layers"] = out["models"][item["name"]].get("layers")
            step(f"export {item['name']} (cached)")
            continue
        d.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        model = _build_model(arch, M, N)
        onnx_path = d / "model.onnx"
        tmp = d / "model.onnx.tmp"
        with torch.no_grad():
            if item["kind"] == "abc":
                ref = model(x).numpy()
                to_onnx(model, x, tmp)
            else:
                model = float_twin(model)
                ref = model(x).numpy()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(model, (x,), str(tmp), dynamo=False, opset_version=17,
                                      input_names=["input"], output_names=["output"])
        os.replace(tmp, onnx_path)
        np.save(d / "x.npy", x.numpy())
        np.save(d / "ref.npy", ref)
        info = {"key": item["key"], "onnx": str(onnx_path), "x": str(d / "x.npy"),
                "ref": str(d / "ref.npy"), "M": M, "N": N, "kind": item["kind"],
                "export_s": time.perf_counter() - t0,
                "onnx_mb": onnx_path.stat().st_size / 2**20}
        if item["kind"] == "abc":
            info["layers"] = _layers_of(model, size)
            if out["layers"] is None:
                out["layers"] = info["layers"]
        meta.write_text(json.dumps(info, indent=1))
        out["models"][item["name"]] = info
        step(f"export {item['name']}")
    if out["layers"] is None:  # only the float twin was asked for: still name the layers
        out["layers"] = _layers_of(_build_model(arch, 1, 1), size)
    return out


def _job_compile(job: dict) -> dict:
    """compile_model one ONNX file to a .so (reusing a cached one with the same key)."""
    so = Path(job["so"])
    meta = Path(str(so) + ".bench.json")
    if so.is_file() and meta.is_file() and json.loads(meta.read_text()).get("key") == job["key"]:
        step(f"compile {job['name']} (cached)")
        return json.loads(meta.read_text())
    from abc_tvm.compiler import compile_model

    for old in so.parent.glob(f"{job['name']}-*.so*"):  # earlier keys of the same model
        old.unlink()
    kwargs = {"tuning_log": job["tuning_log"]} if job.get("tuning_log") else {}
    t0 = time.perf_counter()
    with quiet_stdio():
        report = compile_model(job["onnx"], "x86", so, quiet=True, **kwargs)
    info = {"key": job["key"], "so": str(so), "compile_s": time.perf_counter() - t0,
            "abc_layers": len(report.abc_layers), "float_ops": len(report.float_ops),
            "tuning_databases": list(report.tuning),
            "kernels": sorted({a.get("kernel_impl", "") for a in report.abc_layers})}
    meta.write_text(json.dumps(info, indent=1))
    step(f"compile {job['name']}")
    return info


def _job_tune(job: dict) -> dict:
    """MetaSchedule-tune TOPI's bitserial conv for one layer (resumes a cached database)."""
    import tvm

    topi = load_benchmark("topi_bitserial")
    layer = topi.Layer(**job["layer"])
    target = tvm.target.Target.from_device("cpu")
    t0 = time.perf_counter()
    before = topi.records(job["dir"])
    held = topi.tune(layer, job["M"], job["N"], job["trials"], job["dir"], target,
                     light=job["light"])
    step(f"tune TOPI {layer.label()} M{job['M']}N{job['N']}")
    return {"records": held, "before": before, "tune_s": time.perf_counter() - t0}


def _time_loop(fn: Callable[[], Any], number: int) -> float:
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def _measure_models(job: dict) -> dict:
    """Whole models: every peer of this thread count, samples interleaved round by round."""
    import numpy as np
    import onnxruntime as ort
    import torch
    import tvm
    from tvm import relax

    threads = job["threads"]
    dev = tvm.cpu()
    peers: dict[str, Callable[[], Any]] = {}
    outputs: dict[str, Callable[[], Any]] = {}
    refs: dict[str, Any] = {}
    timers: dict[str, Callable[[int], float]] = {}
    errors: dict[str, str] = {}
    twin = job.get("twin")
    if twin:
        x = np.load(twin["x"])
        twin_ref = np.load(twin["ref"])
        try:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            sess = ort.InferenceSession(twin["onnx"], opts, providers=["CPUExecutionProvider"])
            feed = {sess.get_inputs()[0].name: x}
            outputs["ort"] = lambda sess=sess, feed=feed: sess.run(None, feed)[0]
            refs["ort"] = twin_ref
        except Exception as e:  # noqa: BLE001 - a failed peer is reported, not fatal
            errors["ort"] = f"{type(e).__name__}: {e}"
        try:
            from abc_tvm.models import float_twin

            tm = float_twin(_build_model(job["arch"], twin["M"], twin["N"])).eval()
            x_torch = torch.from_numpy(x)

            def run_torch(tm=tm, x_torch=x_torch) -> Any:
                with torch.inference_mode():
                    return tm(x_torch).numpy()

            outputs["torch"] = run_torch
            refs["torch"] = twin_ref
        except Exception as e:  # noqa: BLE001
            errors["torch"] = f"{type(e).__name__}: {e}"
    vm_models = []
    if twin and twin.get("so"):
        vm_models.append(("tvm_fp32", twin["so"], twin["x"], twin["ref"]))
    elif twin:
        errors["tvm_fp32"] = twin.get("so_error", "not compiled")
    for m in job["models"]:
        if m.get("so"):
            vm_models.append((m["name"], m["so"], m["x"], m["ref"]))
        else:
            errors[m["name"]] = m.get("so_error", "not compiled")
    for name, so, xpath, refpath in vm_models:
        try:
            vm = relax.VirtualMachine(tvm.runtime.load_module(so), dev)
            xt = tvm.runtime.tensor(np.load(xpath), dev)
            outputs[name] = (lambda vm=vm, xt=xt: vm["main"](xt).numpy())
            refs[name] = np.load(refpath)
            timers[name] = (lambda n, vm=vm, xt=xt:
                            float(vm.time_evaluator("main", dev, number=n, repeat=1)(xt).mean))
        except Exception as e:  # noqa: BLE001
            errors[name] = f"{type(e).__name__}: {e}"
    checks: dict[str, dict] = {}
    for name, fn in list(outputs.items()):
        try:
            y = fn()  # also the warm-up run
            checks[name] = {"check_rel_err": max_rel_err(y, refs[name]),
                            "top1_match": bool(np.argmax(y) == np.argmax(refs[name]))}
            peers[name] = fn
        except Exception as e:  # noqa: BLE001
            errors[name] = f"{type(e).__name__}: {e}"
    # The yardstick for abc-tvm's error: ONNX Runtime on the same ABC ONNX against the same
    # PyTorch output. Binarisation amplifies float rounding (a value at x + v ≈ 0.5 flips a
    # bit), so two correct float runtimes already disagree by ~1e-2 for M, N > 1.
    for m in job["models"]:
        if m["name"] in checks and m.get("onnx"):
            try:
                sess = ort.InferenceSession(m["onnx"], providers=["CPUExecutionProvider"])
                y = sess.run(None, {sess.get_inputs()[0].name: np.load(m["x"])})[0]
                checks[m["name"]]["ort_rel_err"] = max_rel_err(y, refs[m["name"]])
                del sess
            except Exception as e:  # noqa: BLE001 - only the yardstick is missing
                checks[m["name"]]["ort_rel_err_error"] = f"{type(e).__name__}: {e}"
    step(f"{threads}T: load {len(peers)} models")
    numbers: dict[str, int] = {}
    for name, fn in peers.items():
        timer = timers.get(name) or (lambda n, fn=fn: _time_loop(fn, n))
        timers[name] = timer
        once = timer(1)
        numbers[name] = max(1, math.ceil(job["min_sample_s"] / max(once, 1e-6)))
    samples: dict[str, list[float]] = {n: [] for n in peers}
    for r in range(job["repeat"]):
        for name in peers:
            time.sleep(0.05)  # let the previous peer's spinning pool threads go to sleep
            samples[name].append(timers[name](numbers[name]))
        step(f"{threads}T: models round {r + 1}/{job['repeat']}")
    result = {}
    for name in peers:
        result[name] = {**stats(samples[name]), "number": numbers[name],
                        **checks.get(name, {})}
    for name, err in errors.items():
        result[name] = {"error": err}
    return result


ABC_KERNEL = re.compile(r"^abc_(?:block|conv|dot)_b(\d+)c(\d+)h(\d+)w(\d+)o(\d+)_k(\d+)x\d+"
                        r"s(\d+)x\d+p.*?_m(\d+)n(\d+)_")
ABC_PACK = re.compile(r"^abc_bitpack")


PROFILE_MIN_S = 2.0  # in-model kernel profile: run the model for at least this long ...
PROFILE_MAX_RUNS = 200  # ... but not more often than this


def _profile_kernels(so: str, xpath: str, repeat: int) -> list[dict]:
    """Time every ABC kernel call inside the compiled model (VM instrument, best of runs).

    A bit-pack call's time goes to the ABC conv that follows it (it packs that conv's
    input). The kernel's shape comes from its name (`schedules._conv_name` and the block
    kernel's name); a kernel named otherwise is skipped.
    """
    import numpy as np
    import tvm
    from tvm import relax

    dev = tvm.cpu()
    vm = relax.VirtualMachine(tvm.runtime.load_module(so), dev)
    x = tvm.runtime.tensor(np.load(xpath), dev)
    calls: list[tuple[str, float]] = []
    start = [0.0]

    def instrument(_func, symbol, before, _ret, *_args) -> int:
        if before:
            start[0] = time.perf_counter()
        else:
            calls.append((str(symbol), time.perf_counter() - start[0]))
        return 0

    vm.set_instrument(instrument)
    vm["main"](x)
    best: list[dict] = []
    # At least `repeat` runs and PROFILE_MIN_S of them: the best of few runs of a 10 ms model
    # still carries a neighbour's burst on a shared machine.
    t0, runs = time.perf_counter(), 0
    while runs < repeat or (time.perf_counter() - t0 < PROFILE_MIN_S and runs < PROFILE_MAX_RUNS):
        runs += 1
        calls.clear()
        vm["main"](x)
        layers, pack = [], 0.0
        for symbol, secs in calls:
            if ABC_PACK.match(symbol):
                pack += secs
                continue
            m = ABC_KERNEL.match(symbol)
            if m:
                b, c, h, w, o, k, st, mm, nn = (int(g) for g in m.groups())
                layers.append({"symbol": symbol, "batch": b, "channels": c, "height": h,
                               "width": w, "out_channels": o, "kernel": k, "stride": st,
                               "M": mm, "N": nn, "pack_ms": pack * 1e3,
                               "ms": (secs + pack) * 1e3})
                pack = 0.0
        if not best:
            best = layers
        elif len(layers) == len(best):
            for b_, l_ in zip(best, layers, strict=True):
                if l_["ms"] < b_["ms"]:
                    b_.update(ms=l_["ms"], pack_ms=l_["pack_ms"])
    return best


def _attach_in_model(rows: list[dict], profiles: dict[str, list[dict]], peak: float) -> None:
    """Give each layer row the times of its instances inside the compiled model, and both
    kernels (standalone and in model) their % of `peak` (measured after all of them)."""
    for row in rows:
        if peak and _ok(row.get("abc")):
            row["abc"]["pct_peak"] = 100 * row["abc"]["gbitops"] / peak
        lay = row["layer"]
        inst = [p for p in profiles.get(f"abc{row['M']}x{row['N']}", [])
                if (p["channels"], p["out_channels"], p["height"], p["width"], p["stride"],
                    p["M"], p["N"]) == (lay["channels"], lay["out_channels"], lay["height"],
                                        lay["width"], lay["stride"], row["M"], row["N"])]
        if not inst:
            continue
        ms = [p["ms"] for p in inst]
        pct = [100 * row["bitops"] / (t / 1e3) / 1e9 / peak for t in ms] if peak else []
        row["in_model"] = {"ms": ms, "pct_peak": pct, "mean_ms": sum(ms) / len(ms),
                           "symbols": sorted({p["symbol"] for p in inst})}


def _abc_layer_kernels(layer: dict, M: int, N: int, target):  # noqa: N803
    """abc-tvm's bitpack + fused ABC conv for one layer, compiled, with random inputs."""
    import numpy as np
    import tvm

    from abc_tvm.schedules import abc_conv_func, bitpack_func

    b, c, h, w = layer["batch"], layer["channels"], layer["height"], layer["width"]
    o, k, s, p = layer["out_channels"], layer["kernel"], layer["stride"], layer["padding"]
    word = 64
    pack = bitpack_func(b, c, h, w, N, word, target)
    conv = abc_conv_func(b, c, h, w, o, k, s, p, M, N, bipolar=True, word_bits=word,
                         target=target)
    names = [str(f.attrs["global_symbol"]) for f in (pack, conv)]
    mod = tvm.compile(tvm.IRModule(dict(zip(names, (pack, conv), strict=True))), target=target)
    rng = np.random.default_rng(0)
    words = -(-c // word)
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    wbits = rng.integers(0, 2**64 - 1, (M, o, k, k, words), dtype=np.uint64, endpoint=True)
    if c % word:  # channels past C are 0 bits, as the packer writes them
        wbits[..., -1] &= np.uint64((1 << (c % word)) - 1)
    bits = np.unpackbits(wbits.view(np.uint8), axis=-1).reshape(M, o, k, k, -1)
    wsum = (2 * bits[..., :c].sum(-1, dtype=np.int64) - c).astype(np.int32)
    dev = tvm.cpu()
    arr = tvm.runtime.tensor
    pack_args = [arr(rng.random((b, c, h, w), dtype=np.float32), dev),
                 arr(np.linspace(-0.3, 0.3, N).astype(np.float32), dev),
                 arr(np.zeros((N, b, h, w, words), np.uint64), dev)]
    conv_args = [pack_args[2], arr(wbits, dev), arr(wsum, dev),
                 arr(rng.random((M, o), dtype=np.float32), dev),
                 arr(rng.random(N, dtype=np.float32), dev),
                 arr(np.zeros((b, o, oh, ow), np.float32), dev)]
    return mod.mod, names, pack_args, conv_args


def _measure_layers(job: dict) -> list[dict]:
    """Per binary layer: abc-tvm's kernel, TOPI untuned and TOPI tuned (the % of peak is
    `_attach_in_model`'s: the peak is measured again after the layers)."""
    import numpy as np
    import tvm

    topi = load_benchmark("topi_bitserial")
    target = tvm.target.Target.from_device("cpu")
    dev = tvm.cpu()
    repeat, min_ms = job["repeat"], job["layer_repeat_ms"]
    rows = []

    def timed(mod, name: str, args) -> list[float]:
        ev = mod.time_evaluator(name, dev, number=1, repeat=repeat, min_repeat_ms=min_ms)
        return [float(t) for t in ev(*args).results]

    for item in job["layers"]:
        layer, M, N = item["layer"], item["M"], item["N"]  # noqa: N806
        lay = topi.Layer(**layer)
        bitops = lay.macs() * M * N
        row: dict = {"layer": layer, "label": lay.label(), "count": item["count"], "M": M,
                     "N": N, "bitops": bitops}
        try:
            mod, names, pack_args, conv_args = _abc_layer_kernels(layer, M, N, target)
            mod[names[0]](*pack_args)
            t_pack, t_conv = timed(mod, names[0], pack_args), timed(mod, names[1], conv_args)
            total = [a + b for a, b in zip(t_pack, t_conv, strict=True)]
            row["abc"] = {**stats(total), "pack_best_ms": min(t_pack) * 1e3,
                          "conv_best_ms": min(t_conv) * 1e3}
            best_s = row["abc"]["best_ms"] / 1e3
            row["abc"]["gbitops"] = bitops / best_s / 1e9
        except Exception as e:  # noqa: BLE001 - report and go on
            row["abc"] = {"error": f"{type(e).__name__}: {e}"}
        if not topi.supported(lay):
            row["topi_untuned"] = row["topi_tuned"] = {
                "na": f"TOPI bitpack needs C % 64 == 0 (C = {lay.channels})"}
            rows.append(row)
            step(f"{job['threads']}T: layer {lay.label()} M{M}N{N}")
            continue
        host_args = topi.random_args(lay, M, N)
        expected = topi.reference(lay, host_args[0], host_args[1])
        args = [tvm.runtime.tensor(a, dev) for a in host_args]
        for key, db in (("topi_untuned", None), ("topi_tuned", item.get("topi_db"))):
            if key == "topi_tuned" and not db:
                row[key] = {"na": "not tuned for this M, N (see --topi-tuned)"}
                continue
            try:
                # Each build is checked against the NumPy reference; tuned: the fastest of
                # the database's best records whose output is right.
                mods = [topi.build(lay, M, N, target)] if db is None else \
                    topi.tuned_builds(lay, M, N, target, db)
                mod, wrong = None, 0
                for cand in mods:
                    args[2].copyfrom(np.zeros(args[2].shape, np.int32))
                    cand["main"](*args)
                    if np.array_equal(args[2].numpy(), expected):
                        mod = cand
                        break
                    wrong += 1
                if mod is None:
                    what = "TOPI's unscheduled kernel" if db is None else \
                        f"all {wrong} best tuning records"
                    # A finding about the peer, not a failure of the benchmark: no "error".
                    row[key] = {"wrong": f"{what} computed a result that differs from the "
                                         "NumPy reference", "wrong_records_skipped": wrong}
                    continue
                row[key] = {**stats(timed(mod, "main", args)), "correct": True,
                            "wrong_records_skipped": wrong}
                if key == "topi_tuned":
                    row[key]["trials"] = topi.records(db)
            except Exception as e:  # noqa: BLE001
                row[key] = {"error": f"{type(e).__name__}: {e}"}
        rows.append(row)
        step(f"{job['threads']}T: layer {lay.label()} M{M}N{N}")
    return rows


def _job_measure(job: dict) -> dict:
    """Everything for one thread count, in this one process (TVM_NUM_THREADS set by parent)."""
    import torch

    torch.set_num_threads(job["threads"])
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    peak_mod = load_benchmark("popcount_peak")

    def measure_peak():
        res = peak_mod.measure_peak(job["threads"], min_repeat_ms=100 if not job["quick"] else 20)
        step(f"{job['threads']}T: popcount peak")
        return res

    # The ceiling is measured at the start and again at the end and the higher one is kept: on
    # a shared machine one busy moment would understate it (and push layers above 100%).
    peaks = [measure_peak()]
    out: dict = {"threads": job["threads"], "env_TVM_NUM_THREADS":
                 os.environ.get("TVM_NUM_THREADS")}
    if "models" in job["parts"]:
        out["models"] = _measure_models(job)
    if "layers" in job["parts"]:
        out["layers"] = _measure_layers(job)
        profiles = {}
        for m in job["models"]:
            if m.get("so"):
                try:
                    profiles[m["name"]] = _profile_kernels(m["so"], m["x"], job["repeat"])
                except Exception as e:  # noqa: BLE001 - the column stays empty
                    out.setdefault("profile_errors", {})[m["name"]] = f"{type(e).__name__}: {e}"
            step(f"{job['threads']}T: kernels in model {m['name']}")
        peaks.append(measure_peak())
    peak = max(peaks, key=lambda p: p.gbitops_per_s)
    out["peak"] = {**peak.as_dict(), "samples_gbitops_per_s": [p.gbitops_per_s for p in peaks]}
    if "layers" in job["parts"]:
        out["in_model"] = profiles
        _attach_in_model(out["layers"], profiles, peak.gbitops_per_s)
    return out


JOBS: dict[str, Callable[[dict], Any]] = {
    "export": _job_export, "compile": _job_compile, "tune": _job_tune, "measure": _job_measure,
}


def run_worker(job_path: Path) -> None:
    """Worker entry: run the job in `job_path` and write its JSON result beside it."""
    job = json.loads(job_path.read_text())
    out_path = Path(job["out"])
    try:
        result = {"ok": True, "result": JOBS[job["kind"]](job)}
    except Exception as e:  # noqa: BLE001 - the parent reports it
        import traceback

        traceback.print_exc()
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    out_path.write_text(json.dumps(result, indent=1))


# ----------------------------------------------------------------------------- parent


class Runner:
    """Starts workers, feeds their progress lines to one tqdm bar, keeps their logs."""

    def __init__(self, cfg: Config, total: int) -> None:
        from tqdm import tqdm

        self.cfg = cfg
        self.jobs = cfg.work_dir / "jobs"
        self.jobs.mkdir(parents=True, exist_ok=True)
        self.bar = tqdm(total=total, desc="abc-tvm bench", unit="step", disable=not cfg.progress,
                        dynamic_ncols=True)

    def note(self, text: str) -> None:
        self.bar.write(text) if self.cfg.progress else print(text, file=sys.stderr)

    def run(self, name: str, job: dict, env: dict | None = None, steps: int = 1) -> dict:
        """Run a job in a worker; returns its result, or {'error': ...} if it failed."""
        job_path = self.jobs / f"{name}.json"
        out = self.jobs / f"{name}.out.json"
        log = self.jobs / f"{name}.log"
        out.unlink(missing_ok=True)
        job_path.write_text(json.dumps({**job, "out": str(out)}, indent=1))
        self.bar.set_postfix_str(name)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        seen = 0
        with open(log, "w") as logf:
            proc = subprocess.Popen(
                [sys.executable, "-m", "abc_tvm.bench", "--worker", str(job_path)],
                stdout=subprocess.PIPE, stderr=logf, text=True, env=full_env, cwd=ROOT)
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(STEP):
                    seen += 1
                    self.bar.update(1)
                    self.bar.set_postfix_str(line[len(STEP):].strip()[:60])
                else:
                    logf.write(line)
            rc = proc.wait()
        if seen < steps:  # a worker that died early still moves the bar on
            self.bar.update(steps - seen)
        if rc != 0 or not out.is_file():
            return {"error": f"worker {name} exited with code {rc}; log: {log}"}
        res = json.loads(out.read_text())
        if not res.get("ok"):
            return {"error": f"{res.get('error')} (log: {log})"}
        return res["result"]

    def close(self) -> None:
        self.bar.close()


def _export_items(cfg: Config) -> list[dict]:
    src = sources_hash(EXPORT_SOURCES)
    items = []
    for m, n in cfg.models:
        name = f"abc{m}x{n}"
        key = f"{cfg.arch}-m{m}n{n}-s{cfg.image_size}-{src}"
        d = cfg.work_dir / "models" / f"{cfg.arch}-m{m}n{n}-s{cfg.image_size}"
        items.append({"name": name, "kind": "abc", "M": m, "N": n, "key": key, "dir": str(d)})
    # The twin's weights are Σ α_m B_m of an M = N = 1 model: any M, N has the same FLOPs.
    key = f"{cfg.arch}-twin-m1n1-s{cfg.image_size}-{src}"
    items.append({"name": "float_twin", "kind": "twin", "M": 1, "N": 1, "key": key,
                  "dir": str(cfg.work_dir / "models" / f"{cfg.arch}-twin-s{cfg.image_size}")})
    return items


def _estimate_steps(cfg: Config, n_layers: int) -> int:
    n_models = len(cfg.models)
    steps = (n_models + 1) * 2  # exports, compiles
    if "layers" in cfg.parts:
        steps += n_layers * len([c for c in cfg.topi_tuned if c in cfg.models])
    per_thread = 1
    if "models" in cfg.parts:
        per_thread += 1 + cfg.repeat
    if "layers" in cfg.parts:
        per_thread += (n_layers + 1) * n_models + 1  # + the second peak measurement
    return steps + per_thread * len(cfg.threads)


def _topi_db_dir(cfg: Config, layer: dict, M: int, N: int) -> Path:  # noqa: N803
    topi = load_benchmark("topi_bitserial")
    lay = topi.Layer(**layer)
    light = "-light" if cfg.quick else ""
    return cfg.work_dir / "topi_tuning" / f"{lay.key()}-m{M}n{N}-uint64{light}"


def collect(cfg: Config) -> dict:
    """Run every step and return the results (also written to WORK_DIR/results.json)."""
    t_start = time.perf_counter()
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    n_layers_guess = 7 if cfg.arch == "abc_resnet18" else 5
    runner = Runner(cfg, _estimate_steps(cfg, n_layers_guess))
    results: dict = {
        "meta": {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": cfg.command, "machine": machine_info(), "arch": cfg.arch,
            "image_size": cfg.image_size, "batch": 1, "threads": cfg.threads,
            "models": [cfg.mn(m, n) for m, n in cfg.models],
            "topi_tuned": [cfg.mn(m, n) for m, n in cfg.topi_tuned], "trials": cfg.trials,
            "repeat": cfg.repeat, "parts": sorted(cfg.parts), "quick": cfg.quick,
            "min_sample_s": cfg.min_sample_s, "layer_repeat_ms": cfg.layer_repeat_ms,
            "tuning_log": str(cfg.tuning_log) if cfg.tuning_log else None,
            "search": "light (population 32, 1 genetic iteration)" if cfg.quick
            else "MetaSchedule defaults (evolutionary, XGBoost cost model)",
        },
        "errors": [],
    }
    try:
        exported = runner.run("export", {"kind": "export", "items": _export_items(cfg),
                                         "image_size": cfg.image_size, "arch": cfg.arch},
                              steps=len(cfg.models) + 1)
        if "error" in exported:
            raise UserError(f"export failed: {exported['error']}")
        layers = exported["layers"] or []
        runner.bar.total = _estimate_steps(cfg, len(layers))
        runner.bar.refresh()
        results["layers"] = layers
        results["exports"] = exported["models"]

        # Compile (cached by sources + tuning databases + TVM version).
        import importlib.metadata as md

        tvm_v = md.version("apache-tvm")
        src = sources_hash(COMPILE_SOURCES, tvm_v + dir_hash(cfg.tuning_log),
                           exclude=COMPILE_EXCLUDE)
        compiled: dict[str, dict] = {}
        comp_dir = cfg.work_dir / "compiled"
        comp_dir.mkdir(exist_ok=True)
        for name, info in exported["models"].items():
            key = f"{info['key']}-{src}"
            so = comp_dir / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.so"
            job = {"kind": "compile", "name": name, "onnx": info["onnx"], "so": str(so),
                   "key": key, "tuning_log": str(cfg.tuning_log) if cfg.tuning_log else None}
            compiled[name] = runner.run(f"compile-{name}", job)
            if "error" in compiled[name]:
                runner.note(f"compile {name} failed: {compiled[name]['error']}")
                results["errors"].append(f"compile {name}: {compiled[name]['error']}")
        results["compiled"] = compiled

        # TOPI tuning databases, per layer and tuned configuration.
        dbs: dict[str, str] = {}
        topi = load_benchmark("topi_bitserial")
        if "layers" in cfg.parts:
            for m, n in cfg.topi_tuned:
                if (m, n) not in cfg.models:
                    continue
                for item in layers:
                    lay = topi.Layer(**item["layer"])
                    if not topi.supported(lay):
                        runner.bar.update(1)
                        continue
                    d = _topi_db_dir(cfg, item["layer"], m, n)
                    res = runner.run(f"tune-{lay.key()}-m{m}n{n}", {
                        "kind": "tune", "layer": item["layer"], "M": m, "N": n,
                        "trials": cfg.trials, "dir": str(d), "light": cfg.quick})
                    if "error" in res:
                        runner.note(f"TOPI tuning {lay.label()} M{m}N{n} failed: {res['error']}")
                        results["errors"].append(f"tune {lay.label()} M{m}N{n}: {res['error']}")
                    elif res["records"] > 0:
                        dbs[f"{lay.key()}-m{m}n{n}"] = str(d)

        # Measure, one child process per thread count.
        def model_entry(name: str) -> dict:
            e, c = exported["models"][name], compiled.get(name, {})
            return {"name": name, "x": e["x"], "ref": e["ref"], "onnx": e["onnx"], "M": e["M"],
                    "N": e["N"], "so": c.get("so"), "so_error": c.get("error")}

        measure_layers = [
            {"layer": item["layer"], "count": item["count"], "M": m, "N": n,
             "topi_db": dbs.get(f"{topi.Layer(**item['layer']).key()}-m{m}n{n}")}
            for m, n in cfg.models for item in layers]
        runs = {}
        for t in cfg.threads:
            job = {"kind": "measure", "threads": t, "arch": cfg.arch, "quick": cfg.quick,
                   "parts": sorted(cfg.parts), "repeat": cfg.repeat,
                   "min_sample_s": cfg.min_sample_s, "layer_repeat_ms": cfg.layer_repeat_ms,
                   "twin": model_entry("float_twin"),
                   "models": [model_entry(f"abc{m}x{n}") for m, n in cfg.models],
                   "layers": measure_layers}
            env = {k: str(t) for k in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                       "OPENBLAS_NUM_THREADS")}
            steps = 1 + (1 + cfg.repeat if "models" in cfg.parts else 0) + (
                len(measure_layers) + len(cfg.models) if "layers" in cfg.parts else 0)
            runs[str(t)] = runner.run(f"measure-{t}T", job, env=env, steps=steps)
            if "error" in runs[str(t)]:
                runner.note(f"measuring {t} thread(s) failed: {runs[str(t)]['error']}")
                results["errors"].append(f"measure {t}T: {runs[str(t)]['error']}")
        results["runs"] = runs
    finally:
        runner.close()
    results["meta"]["wall_s"] = time.perf_counter() - t_start
    (cfg.work_dir / "results.json").write_text(json.dumps(results, indent=1))
    return results


# ----------------------------------------------------------------------------- reporting


def _ok(entry: dict | None) -> bool:
    return bool(entry) and "error" not in entry and "best_ms" in entry


def _fmt_ms(entry: dict | None) -> str:
    if not _ok(entry):
        if entry and "wrong" in entry:
            return "wrong result"
        return "failed" if entry and "error" in entry else ("n/a" if entry else "-")
    return f"{entry['best_ms']:.3f}"


def _ratio(a: dict | None, b: dict | None) -> float | None:
    """a's time / b's time (how many times faster b is), None if either is missing."""
    if _ok(a) and _ok(b):
        return a["best_ms"] / b["best_ms"]
    return None


def _fmt_x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


@dataclass
class Tables:
    """The result tables as rows of cells (printed aligned, or as Markdown)."""

    sections: list[tuple[str, list[str], list[list[str]]]] = field(default_factory=list)

    def add(self, title: str, head: list[str], rows: list[list[str]]) -> None:
        self.sections.append((title, head, rows))

    def text(self) -> str:
        out = []
        for title, head, rows in self.sections:
            widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=True)]
            out.append(title)
            out.append("  " + "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
            out.append("  " + "  ".join("-" * w for w in widths))
            for r in rows:
                out.append("  " + "  ".join(str(c).ljust(w) for c, w in
                                            zip(r, widths, strict=True)))
            out.append("")
        return "\n".join(out)

    def markdown(self, level: str = "###") -> str:
        out = []
        for title, head, rows in self.sections:
            out += [f"{level} {title}", "", "| " + " | ".join(head) + " |",
                    "|" + "|".join("---" for _ in head) + "|"]
            out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
            out.append("")
        return "\n".join(out)


def _pct_range(pcts: list[float]) -> str:
    if not pcts:
        return "-"
    lo, hi = min(pcts), max(pcts)
    return f"{lo:.0f}%" if round(lo) == round(hi) else f"{lo:.0f}-{hi:.0f}%"


def _model_label(name: str, arch: str) -> str:
    if name in FLOAT_PEERS:
        return FLOAT_PEERS[name]
    mn = name.removeprefix("abc")
    m, n = mn.split("x")
    pretty = "ABC-ResNet-18" if arch == "abc_resnet18" else "ABC-ResNet-20"
    return f"abc-tvm {pretty} M={m} N={n}"


def suspicious(entry: dict) -> bool:
    """An output error above 1e-3 and above twice ONNX Runtime's own on the same ONNX."""
    err = entry.get("check_rel_err")
    if err is None:
        return False
    return err > max(CHECK_TOL, 2 * entry.get("ort_rel_err", 0.0)) or \
        entry.get("top1_match") is False


def _check(entry: dict) -> str:
    err = entry.get("check_rel_err")
    if err is None:
        return "-"
    text = f"{err:.1e}"
    if "ort_rel_err" in entry:
        text += f" (ORT {entry['ort_rel_err']:.1e})"
    return text + (" (!)" if suspicious(entry) else "")


def build_tables(results: dict) -> Tables:
    """Tables for the terminal and the doc: peak, models, layers, thread scaling."""
    meta, runs = results["meta"], results.get("runs", {})
    tabs = Tables()
    rows = []
    for t, run in runs.items():
        if "peak" in run:
            p = run["peak"]
            rows.append([t, f"{p['gbitops_per_s']:.0f}", f"{p['gbitops_per_s_per_core']:.0f}",
                         ", ".join(p["popcount_insns"]) or "none"])
    if rows:
        tabs.add("Popcount peak (AND + popcount + add, L1-resident uint64 words)",
                 ["threads", "Gbit-ops/s", "per core", "popcount instruction"], rows)
    for t, run in runs.items():
        models = run.get("models")
        if not models:
            continue
        ort_e = models.get("ort")
        rows = []
        for name in [*FLOAT_PEERS, *[f"abc{m}" for m in meta["models"]]]:
            e = models.get(name)
            if e is None:
                continue
            med = f"{e['median_ms']:.3f}" if _ok(e) else "-"
            rows.append([_model_label(name, meta["arch"]), _fmt_ms(e), med,
                         _fmt_x(_ratio(ort_e, e)), _check(e) if _ok(e) else
                         e.get("error", "")[:60]])
        tabs.add(f"Whole models, {t} thread(s), batch 1, {meta['image_size']}x"
                 f"{meta['image_size']}", ["peer", "ms (best)", "ms (median)",
                                            "speed-up vs ORT",
                                            "max rel. err vs PyTorch"], rows)
    for t, run in runs.items():
        lay = run.get("layers")
        if not lay:
            continue
        for mn in meta["models"]:
            m, n = (int(v) for v in mn.split("x"))
            rows = []
            for r in lay:
                if (r["M"], r["N"]) != (m, n):
                    continue
                a = r.get("abc", {})
                pct = f"{a['pct_peak']:.0f}%" if _ok(a) and a.get("pct_peak") else "-"
                im = r.get("in_model") or {}
                im_ms = ", ".join(f"{v:.3f}" for v in im.get("ms", [])) or "-"
                im_pct = _pct_range(im.get("pct_peak", []))
                im_mean = {"best_ms": im["mean_ms"]} if im.get("ms") else None
                rows.append([r["label"], str(r["count"]), im_ms, im_pct, _fmt_ms(a), pct,
                             _fmt_ms(r.get("topi_untuned")), _fmt_ms(r.get("topi_tuned")),
                             _fmt_x(_ratio(r.get("topi_tuned"), a)),
                             _fmt_x(_ratio(r.get("topi_tuned"), im_mean))])
            tabs.add(f"Binary layers, M={m} N={n}, {t} thread(s)",
                     ["layer (C->O HxW)", "x", "in model ms (each)", "% of peak in model",
                      "kernel ms (pack + conv)", "kernel % of peak", "TOPI untuned ms",
                      f"TOPI tuned ms ({meta['trials']} trials)", "kernel vs tuned TOPI",
                      "in model (mean) vs tuned TOPI"],
                     rows)
    ts = sorted(int(t) for t in runs if "models" in runs[t])
    if len(ts) >= 2:
        lo, hi = str(ts[0]), str(ts[-1])
        rows = []
        for name in [*FLOAT_PEERS, *[f"abc{m}" for m in meta["models"]]]:
            a, b = runs[lo]["models"].get(name), runs[hi]["models"].get(name)
            if _ok(a) and _ok(b):
                rows.append([_model_label(name, meta["arch"]), _fmt_ms(a), _fmt_ms(b),
                             _fmt_x(_ratio(a, b))])
        tabs.add(f"Thread scaling ({lo} -> {hi} threads)",
                 ["peer", f"{lo}T ms", f"{hi}T ms", "speed-up"], rows)
    return tabs


def targets(results: dict) -> list[list[str]]:
    """The issue's targets, each with the measured figure and met / not met."""
    meta, runs = results["meta"], results.get("runs", {})
    out: list[list[str]] = []

    def verdict(ok: bool | None) -> str:
        return "-" if ok is None else ("met" if ok else "**not met**")

    one = runs.get("1") or (runs[min(runs, key=int)] if runs else {})
    models = one.get("models") or {}
    ort_e = models.get("ort")
    for mn, goal, text in (("1x1", 6.0, ">= 6x faster than ORT"),
                           ("3x3", 1.8, ">= 1.8x faster than ORT"),
                           ("5x5", 1 / 1.3, "<= 1.3x ORT's time")):
        r = _ratio(ort_e, models.get(f"abc{mn}"))
        if r is None:
            continue
        shown = f"{r:.2f}x faster" if mn != "5x5" else f"{1 / r:.2f}x ORT's time"
        out.append([f"M={mn[0]} N={mn[2]}: {text}", shown, verdict(r >= goal)])
    for mn in meta["models"]:
        rows = [r for r in one.get("layers") or [] if f"{r['M']}x{r['N']}" == mn]
        in_model = [p for r in rows for p in (r.get("in_model") or {}).get("pct_peak", [])]
        kernel = [r["abc"]["pct_peak"] for r in rows
                  if _ok(r.get("abc")) and r["abc"].get("pct_peak")]
        for pcts, where in ((in_model, "in the model"), (kernel, "standalone kernel")):
            if pcts:
                out.append([f"M={mn[0]} N={mn[2]}: every binary layer >= 50% of popcount peak "
                            f"({where})", f"min {min(pcts):.0f}% (max {max(pcts):.0f}%)",
                            verdict(min(pcts) >= 50)])
    for mn in meta["topi_tuned"]:
        rows = [r for r in one.get("layers") or [] if f"{r['M']}x{r['N']}" == mn]
        for where, get in (
                ("standalone kernel", lambda r: r.get("abc")),
                ("in the model, mean", lambda r: {"best_ms": r["in_model"]["mean_ms"]}
                 if (r.get("in_model") or {}).get("ms") else None)):
            ratios = [_ratio(r.get("topi_tuned"), get(r)) for r in rows]
            ratios = [x for x in ratios if x is not None]
            if ratios:
                geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
                out.append([f"M={mn[0]} N={mn[2]}: >= 1.5x faster than tuned TOPI on every "
                            f"layer ({where})", f"min {min(ratios):.2f}x (geomean {geo:.2f}x, "
                            f"{len(ratios)} layers)", verdict(min(ratios) >= 1.5)])
    ts = sorted(int(t) for t in runs if runs[t].get("models"))
    if 1 in ts and 2 in ts:
        for mn in meta["models"]:
            r = _ratio(runs["1"]["models"].get(f"abc{mn}"), runs["2"]["models"].get(f"abc{mn}"))
            if r is not None:
                out.append([f"M={mn[0]} N={mn[2]}: 2 threads >= 1.8x faster than 1",
                            f"{r:.2f}x", verdict(r >= 1.8)])
    return out


def _wrong_topi_note(results: dict) -> str:
    """How many TOPI builds (unscheduled or tuned records) computed a wrong result."""
    wrong = sum(int(r.get(key, {}).get("wrong_records_skipped", 0))
                for run in results["runs"].values() for r in run.get("layers", [])
                for key in ("topi_untuned", "topi_tuned"))
    return f"; {wrong} wrong build(s) in this run" if wrong else "; none was wrong in this run"


def section_title(results: dict) -> str:
    """The doc section a run writes: one per CPU model (`## x86: znver5`), so that runs on
    CPUs with and without AVX-512 VPOPCNTDQ keep their figures side by side."""
    return f"## x86: {_mcpu(results)}"


def _peak_kernel_note(results: dict) -> str:
    """How the peak kernel counted bits on this CPU (its asm, as `measure_peak` found it)."""
    insns = sorted({i for run in results.get("runs", {}).values()
                    for i in run.get("peak", {}).get("popcount_insns", [])})
    how = ", ".join(insns) or "unknown"
    if "vpopcntq" in insns:
        return f"{how}: a 4×4-zmm register tile, 16 VPOPCNTQ per 8 loads"
    return f"{how}: LLVM's popcount without AVX-512 VPOPCNTDQ (nibble table, byte sums)"


def doc_section(results: dict, doc_path: Path | None, plot: Path | None) -> str:
    """The Markdown '## x86: <cpu>' section: setup, command, tables, targets."""
    meta = results["meta"]
    mach = meta["machine"]
    size = meta["image_size"]
    pretty = "ABC-ResNet-18" if meta["arch"] == "abc_resnet18" else "ABC-ResNet-20 (--quick)"
    lines = [section_title(results), "",
             f"Latest run: {meta['date']}, {meta['wall_s'] / 60:.1f} min wall time, "
             f"produced by", "", "```sh", meta["command"], "```", "",
             f"- Machine: {mach['cpu']}, {mach['cores']} cores visible, AVX-512 VPOPCNTDQ "
             f"{'yes' if mach['avx512_vpopcntdq'] else 'no'}; TVM target `llvm -mcpu` "
             f"{_mcpu(results)}; Linux {mach['kernel']}.",
             f"- Software: apache-tvm {mach['apache-tvm']} (ffi {mach['apache-tvm-ffi']}), "
             f"onnxruntime {mach['onnxruntime']}, torch {mach['torch']}, Python "
             f"{mach['python']}.",
             f"- Workload: {pretty} (`abc_tvm.models`), bipolar activations, one α per layer, "
             f"batch 1, {size}x{size} float32 input; threads {', '.join(map(str, meta['threads']))}"
             f" (each thread count in its own process: TVM_NUM_THREADS, OMP_NUM_THREADS, ORT "
             f"intra-op threads and torch.set_num_threads all set to it).",
             "- Float peers run the float twin (`abc_tvm.models.float_twin`: every ABC conv "
             "replaced by an ordinary conv with the weight Σ α_m B_m, here of the M = N = 1 "
             "model; same architecture and FLOPs for every M, N): ONNX Runtime (CPU EP, all "
             "graph optimisations, sequential), PyTorch eager "
             "(inference_mode), and TVM fp32 = the twin's ONNX through `compile_model` with "
             "its default float schedule, "
             + ("tuned with the given log." if meta.get("tuning_log") else
                "**untuned** (no tuning log given; shipped databases applied: "
                + _tuning_note(results, ["float_twin"]) + "). abc-tvm models: compiled as "
                "`abc-tvm compile` does, with the shipped tuning databases that match their "
                "kernels: " + _tuning_note(results, None) + "."),
             "- Timing: each peer warmed up, then "
             f"{meta['repeat']} samples interleaved across peers (one round times every peer "
             "once); a sample is the mean of enough calls to last ≥ "
             f"{meta.get('min_sample_s', 0.2)} s "
             "(TVM via "
             "`time_evaluator`, ORT and PyTorch via a Python loop). \"best\" is the fastest "
             "sample and is what speed-ups use; the median shows the noise (shared machine). "
             "\"max rel. err\" is each output against the PyTorch model's (the ABC model's "
             "for abc-tvm, the float twin's for float peers), as max|y−ref|/max|ref|; in "
             "brackets, ONNX Runtime's error on the same ABC ONNX: binarisation turns float "
             "rounding into flipped bits (x + v ≈ 0.5), so for M, N > 1 two correct float "
             "runtimes already differ by ~1e-2. (!) marks an error above 1e-3 and above twice "
             "ORT's, or a different top-1 class.",
             "- Bit-ops: one bit-op is one bit pair through AND + popcount + accumulate (one "
             "binary multiply-accumulate). A layer does B·OH·OW·O·C·KH·KW·M·N of them; the "
             "peak is `benchmarks/popcount_peak.py`: a TVM kernel doing AND + popcount + add "
             "over L1-resident words, the popcount as LLVM emits it for this CPU ("
             f"{_peak_kernel_note(results)}), bit-ops/s = 64 × words/s, measured at the start of "
             "each thread count's run and again after its layers, the higher kept. \"% of "
             "peak\" = layer bit-ops/s ÷ peak at the same thread count.",
             "- Binary layers are timed two ways. **In model**: every ABC kernel call of the "
             "compiled model, timed by a Relax VM instrument (best of at least "
             f"{meta['repeat']} runs and {PROFILE_MIN_S:.0f} s of runs, per instance, "
             "in model order; a bit-pack call is added to the conv it feeds); these kernels "
             "also carry whatever glue the compiler fused into them (BatchNorm, residual, ReLU, "
             "packing the next layer's input), so their % of peak is a lower bound. "
             "**Kernel**: abc-tvm's standalone bit-pack (float NCHW → N planes) plus fused "
             "conv (`abc_tvm.schedules.bitpack_func` + `abc_conv_func`, hand-written "
             "schedule, 0 tuning trials): the like-for-like peer of TOPI, which also packs its "
             "activations inside the timed kernel.",
             "- TOPI peer: TVM's `topi.nn.bitserial_conv2d_nhwc` (activation_bits = N, "
             "weight_bits = M, uint64 words, unipolar = {0,1} activations × ±1 weights, int32 "
             "out), its activations bit-packed inside the timed kernel and its weights packed "
             "ahead (`benchmarks/topi_bitserial.py`); \"untuned\" is `tvm.compile` of TOPI's "
             f"unscheduled PrimFunc, \"tuned\" is MetaSchedule `tune_tir` with {meta['trials']} "
             f"trials per layer ({meta['search']}), tuned for "
             f"{', '.join(meta['topi_tuned']) or 'no'} M×N; the tuned time is that of the "
             f"fastest of its {load_benchmark('topi_bitserial').TUNED_CANDIDATES} best records "
             "whose output equals a NumPy reference (every TOPI build is checked; a wrong one "
             "is reported, not timed)"
             f"{_wrong_topi_note(results)}.",
             ""]
    if plot is not None and Path(plot).is_file():
        rel = os.path.relpath(Path(plot).resolve(), (doc_path or Path(".")).resolve().parent)
        lines += [f"![x86 benchmark]({rel})", ""]
    tgt = targets(results)
    if tgt:
        lines += ["### Targets (1 thread unless stated)", "",
                  "| target | measured | |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in tgt]
        lines.append("")
    lines.append(build_tables(results).markdown("###"))
    errors = all_errors(results)
    if errors:
        lines += ["### Errors in this run", ""] + [f"- {e}" for e in errors] + [""]
    return "\n".join(lines).rstrip() + "\n"


def all_errors(results: dict) -> list[str]:
    """Job failures, plus every peer or layer that failed inside a measurement."""
    out = list(results.get("errors", []))
    for t, run in results.get("runs", {}).items():
        for name, e in (run.get("models") or {}).items():
            if "error" in e:
                out.append(f"{t}T {name}: {e['error'][:300]}")
        for r in run.get("layers") or []:
            for key in ("abc", "topi_untuned", "topi_tuned"):
                if "error" in r.get(key, {}):
                    out.append(f"{t}T {r['label']} M{r['M']}N{r['N']} {key}: "
                               f"{r[key]['error'][:300]}")
    return out


def _mcpu(results: dict) -> str:
    for run in results.get("runs", {}).values():
        tgt = run.get("peak", {}).get("target")
        if tgt:
            try:
                return json.loads(tgt).get("mcpu", "?")
            except ValueError:
                return "?"
    return "?"


def _tuning_note(results: dict, names: list[str] | None) -> str:
    """The tuning databases applied to the compiled models `names` (None: the ABC ones)."""
    compiled = results.get("compiled", {})
    names = [n for n in compiled if n != "float_twin"] if names is None else names
    dbs = sorted({f"{Path(d).name} ({n})" for n in names
                  for d in compiled.get(n, {}).get("tuning_databases", [])})
    return ", ".join(dbs) if dbs else "none did"


def write_doc(path: Path, section: str) -> None:
    """Replace the section of `path` that has the title of `section` (its first line), keeping
    every other section; a new one goes after the last x86 section, else first."""
    text = path.read_text() if path.is_file() else ""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("# "):
        lines = ["# Benchmarks", "", *lines]
    title = section.splitlines()[0].strip()
    start = next((i for i, line in enumerate(lines) if line.strip() == title), None)
    if start is None:
        x86 = [i for i, line in enumerate(lines) if line.startswith("## x86")]
        at = next((j for j in range(x86[-1] + 1, len(lines)) if lines[j].startswith("## ")),
                  len(lines)) if x86 else 1
        head, body = lines[:at], lines[at:]
        while body and not body[0].strip():
            body = body[1:]
        while len(head) > 1 and not head[-1].strip():
            head = head[:-1]
        new = [*head, "", *section.rstrip("\n").splitlines(), *([""] if body else []), *body]
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")),
                   len(lines))
        tail = lines[end:]
        new = [*lines[:start], *section.rstrip("\n").splitlines(), *([""] if tail else []),
               *tail]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(new).rstrip("\n") + "\n")


def plot_results(results: dict, path: Path) -> None:
    """Bar charts: whole-model latency per peer and thread count; per-layer latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, runs = results["meta"], results.get("runs", {})
    names = [*FLOAT_PEERS, *[f"abc{m}" for m in meta["models"]]]
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    ax = axes[0]
    ts = [t for t in runs if runs[t].get("models")]
    width = 0.8 / max(1, len(ts))
    for i, t in enumerate(ts):
        vals = [runs[t]["models"].get(n, {}).get("best_ms", 0) if _ok(runs[t]["models"].get(n))
                else 0 for n in names]
        xs = [j + i * width for j in range(len(names))]
        bars = ax.bar(xs, vals, width, label=f"{t} thread(s)")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks([j + width * (len(ts) - 1) / 2 for j in range(len(names))])
    ax.set_xticklabels([_model_label(n, meta["arch"]).replace("abc-tvm ", "abc-tvm\n")
                        .replace(" (compile_model)", "").replace(" fp32", "\nfp32")
                        for n in names], fontsize=7)
    ax.set_ylabel("latency, ms (best sample)")
    ax.set_title(f"Whole model, batch 1, {meta['image_size']}x{meta['image_size']}")
    ax.legend()
    ax = axes[1]
    t0 = min(runs, key=int) if runs else None
    lay = [r for r in (runs.get(t0, {}).get("layers") or [])
           if f"{r['M']}x{r['N']}" in meta["topi_tuned"]] if t0 else []
    if not lay and t0:
        lay = runs[t0].get("layers") or []
    series = (("in_model", "abc-tvm in model (mean)"), ("abc", "abc-tvm kernel"),
              ("topi_untuned", "TOPI untuned"),
              ("topi_tuned", f"TOPI tuned ({meta['trials']} trials)"))
    bw = 0.2
    for i, (key, label) in enumerate(series):
        if key == "in_model":
            vals = [(r.get("in_model") or {}).get("mean_ms", 0) for r in lay]
        else:
            vals = [r[key]["best_ms"] if _ok(r.get(key)) else 0 for r in lay]
        ax.bar([j + i * bw for j in range(len(lay))], vals, bw, label=label)
    ax.set_xticks([j + 1.5 * bw for j in range(len(lay))])
    ax.set_xticklabels([f"{r['label']}\nM{r['M']}N{r['N']}" for r in lay], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("latency, ms (log)")
    ax.set_title(f"Binary 3x3 layers, {t0} thread(s)")
    ax.legend()
    fig.suptitle(f"abc-tvm bench, {meta['machine']['cpu']}, {meta['date']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: dict, cfg: Config) -> str:
    """Print the tables, write the plot, the JSON beside it, and the doc section."""
    text = build_tables(results).text()
    tgt = targets(results)
    if tgt:
        w = max(len(a) for a, _, _ in tgt)
        text += "Targets (1 thread)\n" + "\n".join(
            f"  {a.ljust(w)}  {b:<32} {c.replace('**', '')}" for a, b, c in tgt) + "\n"
    if cfg.plot is not None:
        plot_results(results, cfg.plot)
        shutil.copyfile(cfg.work_dir / "results.json", cfg.plot.with_suffix(".json"))
        text += f"\nwrote {cfg.plot} and {cfg.plot.with_suffix('.json')}"
    if cfg.doc is not None:
        write_doc(cfg.doc, doc_section(results, cfg.doc, cfg.plot))
        text += f"\nwrote section '{section_title(results)}' of {cfg.doc}"
    text += f"\nresults: {cfg.work_dir / 'results.json'} ({results['meta']['wall_s'] / 60:.1f} min)"
    for e in all_errors(results):
        text += f"\nerror: {e}"
    return text


def bench_from_args(args: argparse.Namespace) -> dict:
    """`abc-tvm bench`: collect, print, write doc/plot/JSON. Returns the results."""
    if getattr(args, "rpc_tracker", None):
        from abc_tvm.bench_remote import bench_remote_from_args

        return {"remote": bench_remote_from_args(args)}
    cfg = config_from_args(args)
    results = collect(cfg)
    print(report(results, cfg))
    return results


def main(argv: list[str] | None = None) -> int:
    """`python -m abc_tvm.bench [options]` (and `--worker JOB` for the parent's children)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"] and len(argv) == 2:
        run_worker(Path(argv[1]))
        return 0
    from abc_tvm.bench_args import add_bench_arguments

    p = argparse.ArgumentParser(prog="python -m abc_tvm.bench",
                                description="benchmark abc-tvm against its float and binary "
                                            "peers")
    add_bench_arguments(p)
    args = p.parse_args(argv)
    try:
        bench_from_args(args)
    except (UserError, ValueError) as e:
        print(f"abc-tvm bench: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
