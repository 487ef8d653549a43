"""Fuzz abc-tvm's front door: mutated ONNX models through `abc-tvm inspect` and `compile`.

    .venv/bin/python benchmarks/fuzz_front_door.py --cases 1000 --seed 0 --out fuzz.json
    (make fuzz; --first K runs cases K.. of the same seed, so a long run can go in chunks)

Seeds: the zoo (ABC-ResNet-20/18 at small image sizes), the research exports (ReActNet-A,
Bi-Real), FINN's bnn_pynq as QONNX (if brevitas is installed) and the tests' own builders
(tests/onnx_builders.py, tests/abc_nets.py). Each case applies 1-3 mutations
(benchmarks/fuzz_mutations.py), sometimes damage to the file's bytes, and runs both commands,
each in a child process with a time limit (60 s). A case's outcome per command:

- `ok`: exit 0; after `compile`, the .so runs on a random input (in another child) and is
  compared with ONNX Runtime on the mutated model when ORT accepts it: max |y - ref| /
  max |ref| <= 1e-2 where ORT's output is finite (where it is not, the model overflowed,
  and where depends on the order of the arithmetic: not compared), else `wrong`; ORT
  refusing a model abc-tvm compiled is `ort_refused` (recorded, read by hand: not a bug by
  itself); a mismatch in a model holding a constant of magnitude >= 1e30 (float32's
  overflow edge within a few terms) is `overflow`, recorded and not a bug;
- `refused`: exit 2 with exactly one error line on stderr (warning lines aside);
- `internal`: exit 3 with one line (abc-tvm's own bug, counted);
- `crash`: a traceback, several error lines, another exit status, or death by a signal;
  `hang`: past the time limit (the child's process group is killed).

The children are forked from a process that has imported abc-tvm and TVM once (`abc-tvm
CMD` is `abc_tvm.cli.main`, so the child runs exactly what the console script runs, minus
~4 s of imports per command); `--spawn` runs the installed `abc-tvm` executable instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TVM_NUM_THREADS", "1")

import fuzz_mutations as fm  # noqa: E402

BIN = Path(sys.executable).parent
TIMEOUT_S = 60.0
RTOL = 1e-2
# name -> `abc-tvm zoo` arguments (small images: each compiles in seconds)
ZOO_SEEDS = {
    "zoo_resnet20_m1n1": ["abc_resnet20", "-M", "1", "-N", "1", "--image-size", "8"],
    "zoo_resnet20_m2n2u": ["abc_resnet20", "-M", "2", "-N", "2", "--image-size", "8",
                           "--act", "unipolar", "--channelwise"],
    "zoo_resnet18_m1n1": ["abc_resnet18", "-M", "1", "-N", "1", "--image-size", "16",
                          "--num-classes", "10"],
    "finn_lfc_1w1a": ["finn_lfc_1w1a"],
    "finn_cnv_1w1a": ["finn_cnv_1w1a"],
}
# research exports at a quarter of their width (as tests/test_front_door.py exports them)
RESEARCH_SEEDS = {"research_bireal18": "bireal18", "research_reactnet_a": "reactnet_a"}
RESEARCH_EXPORT = """import sys, torch
from abc_tvm import bnn_models
model = getattr(bnn_models, sys.argv[1])(num_classes=10, width=0.25, seed=1)
torch.onnx.export(model, (torch.rand(1, 3, 32, 32),), sys.argv[2], dynamo=False,
                  opset_version=17, input_names=["input"], output_names=["logits"])
"""
WARNING = re.compile(r"^abc-tvm[^:]*: warning:|^\s*$")


# -- seeds ------------------------------------------------------------------------------------

def builder_seeds() -> dict[str, onnx.ModelProto]:
    """Small graphs from the tests' builders: every contract variant, a few nets."""
    import onnx_builders as ob
    from abc_nets import BlockForm, Net

    seeds = {f"builder_{k}": ob.VARIANTS[k](batch=1, height=6, width=6)[0] for k in ob.VARIANTS}
    for k, form in enumerate([BlockForm(M=2, N=2), BlockForm(M=1, N=1, binarizer="sign",
                                                               weights="folded"),
                              BlockForm(M=3, N=1, act="unipolar", weights="folded-stacked",
                                        kernel=1)]):
        net = Net(batch=1, channels=4, size=7, seed=k)
        y = net.residual(net.bn(net.abc(net.x, 4, form)), 8, form, stride=2)
        seeds[f"net_{k}"] = net.model(y)
    return seeds


def make_seeds(workdir: Path, names: list[str] | None = None) -> dict[str, Path]:
    """Write every seed model once into workdir/seeds (zoo exports run `abc-tvm zoo`)."""
    out = workdir / "seeds"
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, model in builder_seeds().items():
        if names is None or name in names:
            p = out / f"{name}.onnx"
            if not p.exists():
                onnx.save(model, p)
            paths[name] = p
    commands = {name: [str(BIN / "abc-tvm"), "zoo", *args, "-o"]
                for name, args in ZOO_SEEDS.items()}
    commands.update({name: [sys.executable, "-c", RESEARCH_EXPORT, net]
                     for name, net in RESEARCH_SEEDS.items()})
    for name, argv in commands.items():
        if names is not None and name not in names:
            continue
        p = out / f"{name}.onnx"
        if not p.exists():
            r = subprocess.run([*argv, str(p)], capture_output=True, text=True)
            if r.returncode != 0:
                print(f"seed {name} skipped: {r.stderr.strip().splitlines()[-1:]}",
                      file=sys.stderr)
                continue
        paths[name] = p
    return paths


# -- one case ---------------------------------------------------------------------------------

def mutate_case(seed_path: Path, case_dir: Path, rng: np.random.Generator) -> list[str]:
    """Write case_dir/model.onnx: the seed with 1-3 mutations (and its external data)."""
    model = onnx.load(seed_path, load_external_data=False)
    for f in seed_path.parent.glob(f"{seed_path.name}.data"):
        shutil.copy(f, case_dir / f.name)  # FINN's external weights, by the name it records
    done: list[str] = []
    names = list(fm.MUTATIONS)
    for _ in range(100):
        if len(done) >= int(rng.choice([1, 1, 1, 2, 3])):
            break
        name = names[int(rng.integers(len(names)))]
        try:
            done.append(f"{name}: {fm.MUTATIONS[name](model, rng, case_dir)}")
        except fm.Skip:
            continue
    data = model.SerializeToString()
    if rng.random() < 0.08:
        data, what = fm.damage_file(data, rng, fm.FILE_MUTATIONS[int(rng.integers(2))])
        done.append(what)
    (case_dir / "model.onnx").write_bytes(data)
    return done


def _child_main(argv: list[str]) -> int:
    from abc_tvm import cli

    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        return 1  # what the console script's uncaught exception exits with


def run_child(fn, args: list, log: Path, timeout_s: float, spawn_argv: list[str] | None = None
              ) -> tuple[int | None, str, float]:
    """(exit status or -signal, None on timeout; stderr text; seconds) of fn(*args) in a
    forked child (or of spawn_argv exec'd) writing stdout+stderr to log.out / log.err."""
    t0 = time.monotonic()
    out, err = log.with_suffix(".out"), log.with_suffix(".err")
    if spawn_argv is not None:
        with open(out, "wb") as fo, open(err, "wb") as fe:
            p = subprocess.Popen(spawn_argv, stdout=fo, stderr=fe, start_new_session=True)
            try:
                rc: int | None = p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                rc = None
        return rc, err.read_text(errors="replace"), time.monotonic() - t0
    sys.stdout.flush()
    sys.stderr.flush()
    with warnings.catch_warnings():  # a threaded host (pytest): the child only execs Python
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # child
        rc = 1
        try:
            os.setpgid(0, 0)
            fo = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            fe = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fo, 1)
            os.dup2(fe, 2)
            # a host like pytest replaces sys.stdout/stderr: write to the files instead
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            rc = fn(*args)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc if isinstance(rc, int) and 0 <= rc < 256 else 1)
    deadline = t0 + timeout_s
    status = None
    while time.monotonic() < deadline:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
            break
        time.sleep(0.02)
    if status is None:
        with _suppress():
            os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return None, err.read_text(errors="replace"), time.monotonic() - t0
    rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    return rc, err.read_text(errors="replace"), time.monotonic() - t0


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], OSError)


def classify(rc: int | None, stderr: str, command: str) -> tuple[str, str]:
    """(outcome, the line that explains it)."""
    lines = [ln for ln in stderr.splitlines() if not WARNING.match(ln)]
    if rc is None:
        return "hang", f"no answer within {TIMEOUT_S:g} s"
    if "Traceback (most recent call last)" in stderr:
        last = [ln for ln in stderr.splitlines() if ln.strip()]
        return "crash", f"traceback: {last[-1][:300] if last else ''}"
    if rc < 0:
        return "crash", f"killed by {signal.Signals(-rc).name}"
    if rc == 0:
        return "ok", ""
    if rc in (2, 3) and len(lines) == 1:
        prefix = f"abc-tvm {command}: "
        if not lines[0].startswith(prefix):
            return "crash", f"one line without the '{prefix}' prefix: {lines[0][:300]}"
        return ("refused" if rc == 2 else "internal"), lines[0][:400]
    return "crash", f"exit {rc} with {len(lines)} stderr line(s): " + \
        " | ".join(ln[:120] for ln in lines[:3])


def check_against_ort(model_path: str, so_path: str, result_path: str, seed: int) -> int:
    """In a child: run the .so and ONNX Runtime on one random input; write the verdict."""
    from abc_tvm.runtime import load

    m = load(so_path, workers=1)
    rng = np.random.default_rng(seed)
    xs = [rng.uniform(-1.5, 1.5, i.shape).astype(i.dtype) for i in m.inputs]
    ys = m.run(*xs)
    verdict: dict = {"outputs": [list(y.shape) for y in ys]}
    try:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
        refs = sess.run(None, {i.name: x for i, x in zip(m.inputs, xs, strict=True)})
    except Exception as e:
        verdict.update(outcome="ort_refused", line=f"{type(e).__name__}: "
                       f"{str(e).splitlines()[0][:300] if str(e) else ''}")
    else:
        verdict.update(outcome="ok", line="")
        for k, (y, ref) in enumerate(zip(ys, refs, strict=False)):
            problem = compare(np.asarray(y), np.asarray(ref))
            largest = largest_constant(model_path) if problem else 0.0
            if largest >= OVERFLOW_EDGE:
                verdict.update(outcome="overflow", line=f"output {k}: {problem} (a constant "
                               f"of {largest:.3g})")
                break
            if problem:
                verdict.update(outcome="wrong", line=f"output {k}: {problem}")
                break
        if len(ys) != len(refs):
            verdict.update(outcome="wrong", line=f"{len(ys)} outputs, ORT gives {len(refs)}")
    Path(result_path).write_text(json.dumps(verdict))
    return 0


# A constant this large times an activation near 1 leaves a sum of a few terms at float32's
# overflow edge (3.4e38): which partial sums overflow, and whether a cancellation gives 0
# or inf - inf, is the order of the arithmetic (fuzz seed 1, case 549: ORT 0.0, abc-tvm NaN
# where the exact sum is 0). Such a model's mismatches are recorded as `overflow`.
OVERFLOW_EDGE = 1e30


def largest_constant(model_path: str) -> float:
    """The largest finite magnitude among the model's float initializers and constants."""
    from onnx import numpy_helper

    from abc_tvm.frontend import constant_tensors

    best = 0.0
    for t, _ in constant_tensors(onnx.load(model_path)):
        try:
            a = numpy_helper.to_array(t)
        except Exception:
            continue
        if a.dtype.kind == "f" and a.size:
            fin = a[np.isfinite(a)]
            best = max(best, float(np.abs(fin).max()) if fin.size else 0.0)
    return best


def compare(y: np.ndarray, ref: np.ndarray) -> str:
    """'' when y matches ref where ref is finite (relative error <= RTOL, and no NaN or
    infinity in y there), else why not. Where ref is not finite the model overflowed: the
    input and (checked at the front door) the weights are finite, so a NaN or an infinity in
    ORT's output is float overflow (3e38-sized constants are a mutation), and where it
    happens depends on the order of the arithmetic, which every engine may change (ORT's own
    kernels differ between CPUs): those places are not compared."""
    if y.shape != ref.shape:
        return f"shape {list(y.shape)}, ORT {list(ref.shape)}"
    y, ref = y.astype(np.float64), ref.astype(np.float64)
    fin = np.isfinite(ref)
    if not np.isfinite(y[fin]).all():
        return (f"{int((~np.isfinite(y[fin])).sum())} NaN or infinite values where ORT's are "
                "finite")
    if not fin.any():
        return ""
    scale = float(np.abs(ref[fin]).max())
    err = float(np.abs(y[fin] - ref[fin]).max())
    if err > RTOL * max(scale, 1e-6):
        return f"max |y - ref| = {err:.3g}, max |ref| = {scale:.3g}"
    return ""


def run_case(i: int, seed: int, seeds: dict[str, Path], workdir: Path, spawn: bool,
             keep: bool) -> dict:
    rng = np.random.default_rng([seed, i])
    names = sorted(seeds)
    seed_name = names[int(rng.integers(len(names)))]
    case_dir = workdir / "cases" / f"{i:06d}"
    shutil.rmtree(case_dir, ignore_errors=True)
    case_dir.mkdir(parents=True)
    rec: dict = {"case": i, "seed_model": seed_name,
                 "mutations": mutate_case(seeds[seed_name], case_dir, rng)}
    model, so = case_dir / "model.onnx", case_dir / "model.so"
    worst = "ok"
    for command, argv in (("inspect", ["inspect", str(model)]),
                          ("compile", ["compile", str(model), "-o", str(so)])):
        spawn_argv = [str(BIN / "abc-tvm"), *argv] if spawn else None
        rc, err, secs = run_child(_child_main, [argv], case_dir / command, TIMEOUT_S,
                                  spawn_argv)
        outcome, line = classify(rc, err, command)
        rec[command] = {"rc": rc, "outcome": outcome, "line": line, "s": round(secs, 1)}
        worst = outcome if outcome not in ("ok", "refused") else worst
    if rec["compile"]["outcome"] == "ok":
        verdict_path = case_dir / "verdict.json"
        rc, err, secs = run_child(check_against_ort, [str(model), str(so), str(verdict_path),
                                                      i], case_dir / "check", TIMEOUT_S)
        if rc == 0 and verdict_path.is_file():
            rec["check"] = json.loads(verdict_path.read_text())
        else:
            outcome, line = classify(rc, err, "check")
            rec["check"] = {"outcome": "run_failed" if outcome != "hang" else "hang",
                            "line": line or err.strip().splitlines()[-1:]}
        rec["check"]["s"] = round(secs, 1)
        if rec["check"]["outcome"] not in ("ok", "ort_refused", "overflow"):
            worst = rec["check"]["outcome"]
    rec["bug"] = worst not in ("ok", "refused")
    if not (keep and rec["bug"]):
        shutil.rmtree(case_dir, ignore_errors=True)
    return rec


# -- the run ----------------------------------------------------------------------------------

def preload() -> None:
    """Import what the commands import, once, before forking (threads are not started)."""
    import abc_tvm.cli  # noqa: F401
    import abc_tvm.compiler  # noqa: F401
    import abc_tvm.explain  # noqa: F401
    import abc_tvm.runtime  # noqa: F401


def summarize(records: list[dict]) -> dict:
    by: dict[str, Counter] = {c: Counter() for c in ("inspect", "compile", "check")}
    bugs: Counter = Counter()
    for r in records:
        for c in by:
            if c in r:
                by[c][r[c]["outcome"]] += 1
        for c in ("inspect", "compile", "check"):
            if c in r and r[c]["outcome"] not in ("ok", "refused", "ort_refused", "overflow"):
                key = re.sub(r"'[^']*'|\d+", "_", str(r[c]["line"]))[:160]
                bugs[f"{c} {r[c]['outcome']}: {key}"] += 1
    return {"cases": len(records), "outcomes": {c: dict(v) for c, v in by.items()},
            "bug_cases": sum(r["bug"] for r in records),
            "bug_classes": dict(bugs.most_common())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--first", type=int, default=0, help="index of the first case (chunks)")
    p.add_argument("--out", type=Path, default=Path("out/fuzz.json"))
    p.add_argument("--workdir", type=Path, default=ROOT / "out" / "fuzz")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seeds", nargs="*", default=None, help="only these seed models")
    p.add_argument("--spawn", action="store_true", help="exec abc-tvm instead of forking")
    p.add_argument("--keep", action="store_true", help="keep the cases that found a bug")
    args = p.parse_args(argv)
    seeds = make_seeds(args.workdir, args.seeds)
    if not seeds:
        print("no seed models", file=sys.stderr)
        return 2
    if not args.spawn:
        preload()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cases = range(args.first, args.first + args.cases)
    parts = [args.out.with_suffix(f".part{w}.jsonl") for w in range(args.workers)]
    t0 = time.monotonic()
    pids = []
    for w, part in enumerate(parts):
        pid = os.fork() if args.workers > 1 else 0
        if pid:
            pids.append(pid)
            continue
        with open(part, "w") as f:
            for i in cases[w::args.workers]:
                rec = run_case(i, args.seed, seeds, args.workdir, args.spawn, args.keep)
                f.write(json.dumps(rec) + "\n")
                f.flush()
                flag = "BUG " if rec["bug"] else ""
                print(f"[{time.monotonic() - t0:7.0f}s] case {i} {rec['seed_model']}: "
                      f"{flag}inspect {rec['inspect']['outcome']}, compile "
                      f"{rec['compile']['outcome']}"
                      + (f", check {rec['check']['outcome']}" if "check" in rec else ""),
                      file=sys.stderr, flush=True)
        if args.workers > 1:
            os._exit(0)
    for pid in pids:
        os.waitpid(pid, 0)
    records = [json.loads(ln) for part in parts for ln in part.read_text().splitlines()]
    records.sort(key=lambda r: r["case"])
    summary = summarize(records)
    summary.update(seed=args.seed, first=args.first, seconds=round(time.monotonic() - t0),
                   seed_models=sorted(seeds), mode="spawn" if args.spawn else "fork",
                   command="python benchmarks/fuzz_front_door.py " + " ".join(
                       sys.argv[1:] if argv is None else argv))
    args.out.write_text(json.dumps({"summary": summary, "records": records}, indent=1))
    for part in parts:
        part.unlink()
    print(json.dumps(summary, indent=1))
    return 1 if summary["bug_cases"] else 0


if __name__ == "__main__":
    sys.exit(main())
