"""The worker jobs of `abc-tvm bench`, each run in its own process: export, compile, tune TOPI,
measure (whole models, layers, the in-model kernel profile).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from abc_tvm.bench.common import (
    VmCalls,
    load_benchmark,
    max_rel_err,
    quiet_stdio,
    stats,
    step,
    tvm_target,
)
from abc_tvm.bench.float_ops import profile_models
from abc_tvm.bench.tables import _ok


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
    log = job.get("tuning_log")
    kwargs = {"tuning_log": log} if log is not None else {}  # False: no database at all
    t0 = time.perf_counter()
    with quiet_stdio():
        report = compile_model(job["onnx"], job.get("target", "x86"), so, quiet=True, **kwargs)
    info = {"key": job["key"], "so": str(so), "compile_s": time.perf_counter() - t0,
            "abc_layers": len(report.abc_layers), "float_ops": len(report.float_ops),
            "tuning_databases": list(report.tuning),
            "kernels": sorted({a.get("kernel_impl", "") for a in report.abc_layers})}
    meta.write_text(json.dumps(info, indent=1))
    step(f"compile {job['name']}")
    return info


def _job_tune(job: dict) -> dict:
    """MetaSchedule-tune TOPI's bitserial conv for one layer (resumes a cached database)."""

    topi = load_benchmark("topi_bitserial")
    layer = topi.Layer(**job["layer"])
    target = tvm_target(job.get("target", "x86"))
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


def _engine_peers(twin: dict, x: Any, ref: Any, threads: int, outputs: dict, refs: dict,
                  errors: dict) -> None:
    """The float twin in ONNX Runtime fp32 and int8 and in OpenVINO (`peers`): a peer that
    cannot be built is an error row, not a failed bench."""
    from abc_tvm.bench import peers as P

    builders: dict[str, Callable[[], Any]] = {
        "ort": lambda: P.ort_runner(twin["onnx"], x, threads),
        "ort_int8": lambda: P.ort_runner(_qdq(twin, x), x, threads),
        "openvino": lambda: _openvino(P.openvino_runner(twin["onnx"], x, threads), "openvino"),
        "openvino_int8": lambda: _openvino(P.openvino_runner(_qdq(twin, x), x, threads),
                                           "openvino_int8"),
    }
    for name, build in builders.items():
        try:
            outputs[name] = build()
            refs[name] = ref
        except Exception as e:  # noqa: BLE001 - a failed peer is reported, not fatal
            errors[name] = f"{type(e).__name__}: {e}"


_PRECISIONS: dict[str, str] = {}  # OpenVINO peer -> the inference precision it chose


def _openvino(built: tuple[Callable[[], Any], str], name: str) -> Callable[[], Any]:
    fn, precision = built
    _PRECISIONS[name] = precision
    return fn


def _qdq(twin: dict, x: Any) -> str:
    """The twin's static-QDQ int8 model, beside the twin's ONNX (made once, then cached)."""
    from abc_tvm.bench.peers import quantize_qdq

    return str(quantize_qdq(twin["onnx"], x, Path(twin["onnx"]).with_suffix(".qdq.onnx")))


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
        _engine_peers(twin, x, twin_ref, threads, outputs, refs, errors)
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
        if name in _PRECISIONS:
            result[name]["precision"] = _PRECISIONS[name]
        if name.endswith("int8") or _PRECISIONS.get(name, "f32") != "f32":
            result[name]["approximate"] = True  # int8/bf16: its error is the engine's choice
    for name, err in errors.items():
        result[name] = {"error": err}
    return result


ABC_KERNEL = re.compile(r"^abc_(?:block|conv|dot)_b(\d+)c(\d+)h(\d+)w(\d+)o(\d+)_k(\d+)x\d+"
                        r"s(\d+)x\d+p.*?_m(\d+)n(\d+)_")


ABC_PACK = re.compile(r"^abc_bitpack")


PROFILE_MIN_S = 2.0  # in-model kernel profile: run the model for at least this long ...


PROFILE_MAX_RUNS = 200  # ... but not more often than this


def profile_kernels(so: str, xpath: str, repeat: int) -> list[dict]:
    """Time every ABC kernel call inside the compiled model (VM instrument, best of runs).

    A bit-pack call's time goes to the ABC conv that follows it (it packs that conv's
    input). The kernel's shape comes from its name (`schedules._conv_name` and the block
    kernel's name); a kernel named otherwise is skipped.
    """
    import numpy as np

    timer = VmCalls(so, np.load(xpath))
    timer.run()  # warm-up
    best: list[dict] = []
    # At least `repeat` runs and PROFILE_MIN_S of them: the best of few runs of a 10 ms model
    # still carries a neighbour's burst on a shared machine.
    t0, runs = time.perf_counter(), 0
    while runs < repeat or (time.perf_counter() - t0 < PROFILE_MIN_S and runs < PROFILE_MAX_RUNS):
        runs += 1
        layers, pack = [], 0.0
        for symbol, secs, _ in timer.run():
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
    target = tvm_target(job.get("target", "x86"))
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
        res = peak_mod.measure_peak(job["threads"], min_repeat_ms=100 if not job["quick"] else 20,
                                    target=tvm_target(job.get("target", "x86")))
        step(f"{job['threads']}T: popcount peak")
        return res

    # The ceiling is measured at the start and again at the end and the higher one is kept: on
    # a shared machine one busy moment would understate it (and push layers above 100%).
    peaks = [measure_peak()]
    out: dict = {"threads": job["threads"], "env_TVM_NUM_THREADS":
                 os.environ.get("TVM_NUM_THREADS")}
    if "models" in job["parts"]:
        out["models"] = _measure_models(job)
        # each float layer against ORT's same op, in this process and at this thread count
        out["float_ops"] = profile_models(job)
    if "layers" in job["parts"]:
        out["layers"] = _measure_layers(job)
        profiles = {}
        for m in job["models"]:
            if m.get("so"):
                try:
                    profiles[m["name"]] = profile_kernels(m["so"], m["x"], job["repeat"])
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
