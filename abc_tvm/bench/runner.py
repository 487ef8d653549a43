"""Runs the jobs in worker processes with progress, caching their results in the work dir.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from abc_tvm.bench.common import (
    COMPILE_EXCLUDE,
    COMPILE_SOURCES,
    EXPORT_SOURCES,
    ROOT,
    STEP,
    Config,
    dir_hash,
    load_benchmark,
    machine_info,
    sources_hash,
)
from abc_tvm.errors import UserError


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
        per_thread += 1 + cfg.repeat + n_models + 1  # + the float ops of each model, twin
    if "layers" in cfg.parts:
        per_thread += (n_layers + 1) * n_models + 1  # + the second peak measurement
    return steps + per_thread * len(cfg.threads)


def _topi_db_dir(cfg: Config, layer: dict, M: int, N: int) -> Path:  # noqa: N803
    topi = load_benchmark("topi_bitserial")
    lay = topi.Layer(**layer)
    light = "-light" if cfg.quick else ""
    at = "" if cfg.target == "x86" else "-" + cfg.target.replace(":", "_")
    return cfg.work_dir / "topi_tuning" / f"{lay.key()}-m{M}n{N}-uint64{light}{at}"


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
            "target": cfg.target,
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
            key = f"{info['key']}-{src}-{cfg.target}"
            so = comp_dir / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.so"
            # The float twin is the untuned float row: no shipped database (the zoo's float
            # records would match its stem) unless --tuning-log names one.
            log = str(cfg.tuning_log) if cfg.tuning_log else (False if name == "float_twin"
                                                              else None)
            job = {"kind": "compile", "name": name, "onnx": info["onnx"], "so": str(so),
                   "key": key, "tuning_log": log, "target": cfg.target}
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
                        "trials": cfg.trials, "dir": str(d), "light": cfg.quick,
                        "target": cfg.target})
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
                   "target": cfg.target,
                   "parts": sorted(cfg.parts), "repeat": cfg.repeat,
                   "min_sample_s": cfg.min_sample_s, "layer_repeat_ms": cfg.layer_repeat_ms,
                   "twin": model_entry("float_twin"),
                   "models": [model_entry(f"abc{m}x{n}") for m, n in cfg.models],
                   "layers": measure_layers}
            env = {k: str(t) for k in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                       "OPENBLAS_NUM_THREADS")}
            steps = 1 + (2 + cfg.repeat + len(cfg.models) if "models" in cfg.parts else 0) + (
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
