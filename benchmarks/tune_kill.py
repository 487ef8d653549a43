"""Tuning survives kill -9 (issue 22, item 4): `abc-tvm tune` killed with SIGKILL at random
points, then: the database loads, a rerun continues from it, and a compile with it gives
the same answer as the untuned build; the last record line cut at a random byte (what a
kill in the middle of a write leaves) is skipped with a warning.

    .venv/bin/python benchmarks/tune_kill.py --seeds 0 1 2      # ~3 min per seed (2 cores)

Prints one line per seed and a JSON summary (`--json PATH` writes it); exit 1 on a failure.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import onnx_builders as ob  # noqa: E402

from abc_tvm import tuning  # noqa: E402
from abc_tvm.compiler import compile_model  # noqa: E402
from abc_tvm.runtime import load  # noqa: E402


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "abc_tvm.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def records(log: Path) -> int:
    path = log / tuning.RECORDS
    return len(path.read_text().splitlines()) if path.is_file() else 0


def kill_tuner(model: Path, log: Path, trials: int, rng: random.Random) -> dict:
    """Start the tuner, SIGKILL it once it has written a random number of records (0 to
    trials - 1) plus a random 0-3 s, or after 240 s."""
    wait_for = rng.randrange(trials)
    extra = rng.uniform(0, 3)
    proc = subprocess.Popen([sys.executable, "-m", "abc_tvm.cli", "tune", str(model),
                             "--trials", str(trials), "--kernels", "abc", "--log", str(log)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = time.monotonic()
    while records(log) < wait_for and proc.poll() is None and time.monotonic() - start < 240:
        time.sleep(0.05)
    time.sleep(extra)
    finished = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return {"waited_for_records": wait_for, "extra_s": round(extra, 2),
            "killed_after_s": round(time.monotonic() - start, 1), "had_finished": finished}


def one_seed(seed: int, work: Path, model: Path, x: np.ndarray, want: np.ndarray,
             trials: int) -> dict:
    rng = random.Random(seed)
    log = work / f"log{seed}"
    out: dict = {"seed": seed, **kill_tuner(model, log, trials, rng)}
    out["records_after_kill"] = records(log)
    if seed % 2 == 1 and (log / tuning.RECORDS).is_file():  # also cut the last line short
        path = log / tuning.RECORDS
        data = path.read_bytes()
        last = data.rstrip(b"\n").rfind(b"\n") + 1
        if len(data) - last > 2:
            path.write_bytes(data[:rng.randrange(last + 1, len(data) - 1)])
            out["cut_last_line"] = True
    held = len(tuning.open_database(log, repair=False))  # loads (a clean copy if needed)
    out["records_loadable"] = held
    rerun = cli("tune", str(model), "--trials", str(held + 2), "--kernels", "abc",
                "--log", str(log))
    out["rerun_rc"] = rerun.returncode
    out["rerun_warned"] = "warning: tuning database" in rerun.stderr
    out["records_after_rerun"] = len(tuning.open_database(log))
    so = work / f"tuned{seed}.so"
    comp = cli("compile", str(model), "-o", str(so), "--tuning-log", str(log))
    out["compile_rc"] = comp.returncode
    ok = rerun.returncode == 0 and comp.returncode == 0 and \
        out["records_after_rerun"] >= held + 1
    if comp.returncode == 0:
        y = load(so, workers=1)(x)
        out["same_answer"] = bool(np.array_equal(y, want))
        ok = ok and out["same_answer"]
    if out.get("cut_last_line"):
        ok = ok and out["rerun_warned"]
    out["ok"] = ok
    if not ok:
        out["stderr"] = (rerun.stderr + comp.stderr)[-2000:]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="abc-tune-kill-") as tmp:
        work = Path(tmp)
        model_proto, expected = ob.canonical(batch=1, in_channels=16, out_channels=16,
                                             height=8, width=8, M=2, N=2, seed=3)
        model = work / "tiny.onnx"
        onnx.save(model_proto, model)
        x = ob.random_input(expected.input_shape, seed=1)
        compile_model(model, "x86", work / "default.so", quiet=True, tuning_log=False)
        want = load(work / "default.so", workers=1)(x)
        results = []
        for seed in args.seeds:
            r = one_seed(seed, work, model, x, want, args.trials)
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "stderr"}), flush=True)
            if not r["ok"]:
                print(r.get("stderr", ""), file=sys.stderr)
    summary = {"seeds": len(results), "failures": sum(not r["ok"] for r in results),
               "results": results}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    print(f"{len(results)} kills, {summary['failures']} failures")
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
