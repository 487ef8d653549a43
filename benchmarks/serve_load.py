"""Load test for `abc-tvm serve`, written into docs/benchmarks.md under "## Serving".

    .venv/bin/python benchmarks/serve_load.py [--workdir DIR] [--no-write]

What it does, in a couple of minutes on a small machine:
1. exports ABC-ResNet-20 (CIFAR, M=N=3) with `abc-tvm zoo` at batch 1 and batch 4 and
   compiles both for x86 (skipped when DIR already holds them);
2. runtime only, in subprocesses (TVM reads TVM_NUM_THREADS once per thread pool): one VM
   behind a lock against a pool of VMs, with 1/2/4 calling threads, for TVM_NUM_THREADS=1
   and TVM's default;
3. starts `abc-tvm serve` on a free loopback port and drives it with Triton's HTTP client
   (binary tensors, one client per thread) at a few concurrency levels, each bounded by a
   request count and a time limit, checking every answer;
4. reads the server's resident memory before and after 10,000 requests.
Client and server share the machine, so on few cores the client's own CPU use caps the
numbers: they are a floor for what the server does alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## Serving"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "abc_tvm.cli", *args], check=True,
                   stdout=subprocess.DEVNULL)


def build(workdir: Path) -> dict[int, Path]:
    """ABC-ResNet-20 compiled for x86 at batch 1 and 4 (reused when already there)."""
    out = {}
    for batch in (1, 4):
        stem = "abc_resnet20" if batch == 1 else f"abc_resnet20_b{batch}"
        so = workdir / f"{stem}.so"
        if not (so.exists() and Path(str(so) + ".json").exists()):
            onnx_path = workdir / f"{stem}.onnx"
            cli("zoo", "abc_resnet20", "-M", "3", "-N", "3", "--batch", str(batch), "-o",
                str(onnx_path))
            cli("compile", str(onnx_path), "--target", "x86", "-o", str(so))
        out[batch] = so
    return out


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


# ---------------------------------------------------------------------------------------------
# 2. Runtime: lock vs pool


def timed_calls(model: object, x: np.ndarray, threads: int, seconds: float) -> dict:
    """`threads` threads calling `model(x)` back to back for `seconds`."""
    lat: list[float] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def loop() -> None:
        mine = []
        while time.perf_counter() < stop:
            t = time.perf_counter()
            model(x)  # type: ignore[operator]
            mine.append(time.perf_counter() - t)
        with lock:
            lat.extend(mine)

    ts = [threading.Thread(target=loop) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    elapsed = time.perf_counter() - t0
    return {"rps": len(lat) / elapsed, "p50": pct(lat, 50) * 1e3, "p99": pct(lat, 99) * 1e3}


def runtime_worker(so: str, seconds: float, rounds: int) -> None:
    """(In a subprocess.) Throughput of one VM (= a lock) against a pool, as JSON lines.

    Lock and pool alternate within each round, so that load from other jobs on a shared
    machine hits both alike; the best round of each configuration is kept.
    """
    from abc_tvm.runtime import load

    x = np.random.default_rng(0).uniform(0, 1, (1, 3, 32, 32)).astype(np.float32)
    configs = [(threads, workers) for threads in (1, 2, 4) for workers in sorted({1, threads})]
    models = {w: load(so, workers=w) for w in {w for _, w in configs}}
    for m in models.values():  # workers=1: one VM, calls wait for it as for a lock
        for _ in range(20):
            m(x)
    best: dict[tuple[int, int], dict] = {}
    for _ in range(rounds):
        for threads, workers in configs:
            row = timed_calls(models[workers], x, threads, seconds)
            if row["rps"] > best.get((threads, workers), {"rps": -1.0})["rps"]:
                best[(threads, workers)] = row
    for (threads, workers), row in best.items():
        print(json.dumps({"threads": threads, "vms": workers, **row}), flush=True)


def call_cost(paths: list[str], seconds: float) -> None:
    """(In a subprocess.) One thread's ms per call of each model: what batching can save."""
    from abc_tvm.runtime import load

    for path in paths:
        m = load(path, workers=1)
        x = np.random.default_rng(0).uniform(0, 1, m.inputs[0].shape).astype(np.float32)
        for _ in range(20):
            m(x)
        row = timed_calls(m, x, 1, seconds)
        print(json.dumps({"cost": Path(path).name, "batch": m.batch_size,
                          "ms": 1e3 / row["rps"]}), flush=True)


def runtime_bench(so: Path, seconds: float, rounds: int) -> list[dict]:
    """Lock vs pool rows (and, with TVM_NUM_THREADS=1, `cost` rows from call_cost)."""
    rows = []
    for tvm_threads in ("1", None):
        env = dict(os.environ)
        env.pop("TVM_NUM_THREADS", None)
        if tvm_threads:
            env["TVM_NUM_THREADS"] = tvm_threads
        extra = ["--cost", str(so.with_name("abc_resnet20_b4.so"))] if tvm_threads else []
        proc = subprocess.run([sys.executable, __file__, "--runtime-worker", str(so),
                               "--runtime-seconds", str(seconds), "--rounds", str(rounds),
                               *extra], env=env, check=True,
                              capture_output=True, text=True)
        for line in proc.stdout.splitlines():
            row = json.loads(line)
            row["tvm_threads"] = tvm_threads or f"default ({usable_cpus()})"
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# 3-4. HTTP


class Server:
    """`abc-tvm serve` as a subprocess on a free loopback port; stopped with SIGTERM."""

    def __init__(self, models: list[Path], *extra: str) -> None:
        self.argv = [sys.executable, "-m", "abc_tvm.cli", "serve", *map(str, models),
                     "--port", "0", "--log-level", "warning", *extra]
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        match = re.search(r"http://(127\.0\.0\.1:\d+)", line)
        if not match:
            self.stop()
            raise RuntimeError(f"server did not start: {line!r}")
        self.address = match.group(1)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def drive(address: str, model: str, x: np.ndarray, expected: np.ndarray, concurrency: int,
          max_requests: int, seconds: float) -> dict:
    """`concurrency` client threads until `max_requests` or `seconds`; every answer checked."""
    import tritonclient.http as triton

    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    budget = [max_requests]
    stop = time.perf_counter() + seconds

    def take() -> bool:
        with lock:
            if budget[0] <= 0 or time.perf_counter() > stop:
                return False
            budget[0] -= 1
            return True

    def worker() -> None:
        c = triton.InferenceServerClient(address, network_timeout=60)
        inp = triton.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        out = [triton.InferRequestedOutput("output", binary_data=True)]
        mine = []
        try:
            while take():
                t = time.perf_counter()
                try:
                    y = c.infer(model, [inp], outputs=out).as_numpy("output")
                except Exception as e:  # counted and reported, the run goes on
                    errors.append(repr(e))
                    continue
                mine.append(time.perf_counter() - t)
                if not np.allclose(y, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()):
                    errors.append("wrong answer")
        finally:
            c.close()
            with lock:
                lat.extend(mine)

    ts = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    elapsed = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": len(lat) + len(errors),
            "errors": len(errors), "rps": len(lat) / elapsed, "p50": pct(lat, 50) * 1e3,
            "p99": pct(lat, 99) * 1e3, "first_error": errors[0] if errors else ""}


def http_bench(models: dict[int, Path], levels: list[int], max_requests: int, seconds: float,
               memory_requests: int, rounds: int) -> tuple[list[dict], dict, str]:
    from abc_tvm.runtime import load

    rng = np.random.default_rng(0)
    x1 = rng.uniform(0, 1, (1, 3, 32, 32)).astype(np.float32)
    expected1 = load(models[1], workers=1)(x1)
    x4 = np.concatenate([x1, np.zeros((3, 3, 32, 32), np.float32)])
    expected_b = load(models[4], workers=1)(x4)[:1]
    server = Server([models[1], models[4]])
    try:
        drive(server.address, "abc_resnet20", x1, expected1, 2, 200, 10)  # warm-up
        cases = [("abc_resnet20 (batch 1)", "abc_resnet20", expected1, c) for c in levels]
        cases += [("abc_resnet20_b4 (dynamic batching, 1-row requests)", "abc_resnet20_b4",
                   expected_b, c) for c in levels[1:]]
        best: dict[tuple[str, int], dict] = {}
        errors: dict[tuple[str, int], int] = {}
        for _ in range(rounds):  # interleaved, best round kept (see runtime_worker)
            for label, model, expected, c in cases:
                row = {"model": label, **drive(server.address, model, x1, expected, c,
                                               max_requests, seconds)}
                key = (label, c)
                errors[key] = errors.get(key, 0) + row["errors"]
                if key not in best or row["rps"] > best[key]["rps"]:
                    best[key] = row
        rows = [{**row, "errors": errors[key]} for key, row in best.items()]
        before = server.rss_mib()
        run = drive(server.address, "abc_resnet20", x1, expected1, 8, memory_requests, 300)
        after = server.rss_mib()
        memory = {"before": before, "after": after, **run}
    finally:
        rc = server.stop()
    if rc != 0:
        raise RuntimeError(f"server exited with status {rc}")
    shown = [Path(a).name if a.endswith(".so") else a for a in server.argv[3:]]
    return rows, memory, shlex.join(["abc-tvm", *shown])


# ---------------------------------------------------------------------------------------------
# The report


def section(args: argparse.Namespace, runtime_rows: list[dict], http_rows: list[dict],
            memory: dict, serve_cmd: str, seconds_taken: float) -> str:
    import tvm

    workers = usable_cpus()
    lines = [
        SECTION, "",
        f"Measured {datetime.date.today().isoformat()} by `{args.command}` "
        f"({seconds_taken:.0f} s; `--workdir` is where the models are built when absent).",
        "",
        f"The machine is shared with other jobs (1-minute load average {args.loadavg:.1f} at "
        f"the start), so every measurement ran {args.rounds} times (HTTP: "
        f"{max(1, args.rounds - 1)}), interleaved, and the table keeps the best round of "
        "each: an estimate of what the hardware does, not a guarantee under contention.", "",
        f"- Host: {cpu_model()}, {workers} usable core(s), Linux {platform.release()}, "
        f"Python {platform.python_version()}, TVM {tvm.__version__}.",
        "- Model: ABC-ResNet-20 (CIFAR, M=N=3, bipolar, input [1, 3, 32, 32]) from "
        "`abc-tvm zoo`, compiled with `--target x86`; the batch-4 twin for dynamic batching.",
        f"- Server: `{serve_cmd}` (defaults: {workers} worker(s), one VM each, "
        f"TVM_NUM_THREADS={max(1, usable_cpus() // workers)} per call, 2 ms batch window).",
        "- Client: tritonclient[http] 2.x, binary tensors, one client per thread, on the same "
        "machine: client and server share the cores, so these are floors. Every answer is "
        "checked against the model run locally.", "",
        "### Runtime: one VM behind a lock vs a pool of VMs", "",
        "`abc_tvm.runtime` in-process, batch 1, each row "
        f"{args.runtime_seconds:g} s of back-to-back calls (TVM releases the GIL during a call).",
        "",
        "| TVM_NUM_THREADS | calling threads | VMs | calls/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    costs = [r for r in runtime_rows if "cost" in r]
    runtime_rows = [r for r in runtime_rows if "cost" not in r]
    for r in runtime_rows:
        kind = "1 (lock)" if r["vms"] == 1 else f"{r['vms']} (pool)"
        lines.append(f"| {r['tvm_threads']} | {r['threads']} | {kind} | {r['rps']:.0f} | "
                     f"{r['p50']:.2f} | {r['p99']:.2f} |")
    lines += ["", "With several callers the pool wins (the lock serialises calls, so a second "
              "core sits idle); with one thread per call it also avoids oversubscribing cores. "
              "`abc_tvm.runtime` therefore keeps a pool (at most `workers` VMs, default the "
              "usable cores) and `abc-tvm serve` sets TVM_NUM_THREADS = cores / workers.", ""]
    lines += [
        "### HTTP (Open Inference Protocol), loopback", "",
        f"Each row: at most {args.max_requests} requests or {args.seconds:g} s per round; "
        "errors (failed or wrong answers) summed over all rounds.", "",
        "| model | concurrency | requests | errors | req/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in http_rows:
        lines.append(f"| {r['model']} | {r['concurrency']} | {r['requests']} | {r['errors']} | "
                     f"{r['rps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} |")
    if len(costs) == 2:
        one, four = sorted(costs, key=lambda r: r["batch"])
        saving = 100 * (1 - four["ms"] / four["batch"] / one["ms"])
        lines += ["", f"Dynamic batching merges 1-row requests into calls of the batch-"
                  f"{four['batch']} executable. Its cost on one thread: "
                  f"{four['ms']:.2f} ms per call = {four['ms'] / four['batch']:.2f} ms per row, "
                  f"against {one['ms']:.2f} ms for the batch-1 executable: a full batch "
                  f"saves {saving:.0f}% of the compute per row."]
        if saving < 15:
            lines[-1] += (" Waiting for a batch to fill adds latency, so on this CPU batching "
                          "is a way to serve models compiled for batch > 1, not a speed-up; it "
                          "pays where a call costs much more than its rows (e.g. on a GPU).")
    lines += [
        "", "### Memory", "",
        f"Server resident memory (VmRSS) before and after {memory['requests']} requests at "
        f"concurrency 8 ({memory['rps']:.0f} req/s, {memory['errors']} errors): "
        f"{memory['before']:.1f} MiB before, {memory['after']:.1f} MiB after "
        f"({memory['after'] - memory['before']:+.1f} MiB). About 200 MiB of it is PyTorch, "
        "which tvm_ffi imports whenever it is installed (it is here, for the dev tools); a "
        "serving install without the `torch` extra leaves it out.", "",
    ]
    return "\n".join(lines)


def write_section(text: str, doc: Path = DOC) -> None:
    """Replace (or append) the "## Serving" section, keeping every other section."""
    old = doc.read_text() if doc.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\s*$.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(old):
        new = pattern.sub(lambda _: text.rstrip() + "\n\n", old, count=1).rstrip() + "\n"
    else:
        new = old.rstrip() + "\n\n" + text.rstrip() + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(new)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the models are built (default: a temporary directory)")
    p.add_argument("--levels", default="1,4,16", help="client concurrency levels")
    p.add_argument("--max-requests", type=int, default=3000, help="per level")
    p.add_argument("--seconds", type=float, default=10.0, help="time limit per level")
    p.add_argument("--memory-requests", type=int, default=10_000)
    p.add_argument("--runtime-seconds", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=3,
                   help="repeat every measurement, keep the best (shared machines are noisy)")
    p.add_argument("--no-write", action="store_true", help="print, do not edit the doc")
    p.add_argument("--runtime-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cost", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.runtime_worker:
        runtime_worker(args.runtime_worker, args.runtime_seconds, args.rounds)
        if args.cost:
            call_cost([args.runtime_worker, args.cost], max(1.0, args.runtime_seconds))
        return 0
    args.command = shlex.join(["python", "benchmarks/serve_load.py", *sys.argv[1:]])
    args.loadavg = os.getloadavg()[0]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        models = build(workdir)
        print("runtime: lock vs pool ...", flush=True)
        runtime_rows = runtime_bench(models[1], args.runtime_seconds, args.rounds)
        print("http load ...", flush=True)
        levels = [int(c) for c in args.levels.split(",")]
        http_rows, memory, serve_cmd = http_bench(models, levels, args.max_requests,
                                                  args.seconds, args.memory_requests,
                                                  max(1, args.rounds - 1))
    text = section(args, runtime_rows, http_rows, memory, serve_cmd,
                   time.perf_counter() - t0)
    print(text)
    if not args.no_write:
        write_section(text)
        print(f"wrote the {SECTION!r} section of {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
