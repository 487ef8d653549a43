"""`abc-tvm bench`: abc-tvm against its float and binary peers, measured side by side.

One module per concern: `common` (configuration, hashes, stats), `jobs` (what each worker
process runs), `runner` (workers, caching, progress), `tables` and `doc` (the results as
tables, the Markdown section, the chart), `remote` (timing on a board over TVM RPC).

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
import sys
from pathlib import Path

from abc_tvm.bench.common import config_from_args, load_benchmark
from abc_tvm.bench.doc import report, section_title, write_doc
from abc_tvm.bench.jobs import profile_kernels, run_worker
from abc_tvm.bench.runner import collect
from abc_tvm.errors import UserError

__all__ = ["bench_from_args", "collect", "config_from_args", "load_benchmark", "main",
           "profile_kernels", "report", "section_title", "write_doc"]


def bench_from_args(args: argparse.Namespace) -> dict:
    """`abc-tvm bench`: collect, print, write doc/plot/JSON. Returns the results."""
    if getattr(args, "cycle_model", False):
        return {"cycle_model": _cycle_model(args)}
    if getattr(args, "rpc_tracker", None):
        from abc_tvm.bench.remote import bench_remote_from_args

        return {"remote": bench_remote_from_args(args)}
    from abc_tvm.bench import research

    abc_models, names = research.split_models(args.models)
    out: dict = {}
    if names:  # research BNN exports: their own peers (ORT, PyTorch eager on the same ONNX)
        from abc_tvm.bench.common import check_local_target

        target = check_local_target(getattr(args, "target", None))
        found = research.run(names, args.repeat or 15, args.image_size, args.work_dir, target)
        print(research.table(found))
        if not args.no_doc:
            for sec in research.sections(found):
                write_doc(args.doc, sec)
                print(f"wrote '{sec.splitlines()[0][3:]}' in {args.doc}")
        out["research"] = found
        if abc_models is None:
            return out
        args.models = abc_models
    cfg = config_from_args(args)
    results = collect(cfg)
    print(report(results, cfg))
    return {**results, **out}


def _cycle_model(args: argparse.Namespace) -> list[dict]:
    """`--cycle-model`: the ARM cycle model of each model's bundle (no board)."""
    from abc_tvm.bench import arm_model
    from abc_tvm.bench.common import command_line

    target = args.target or "rpi4"
    models = [m if not m[:1].isdigit() else f"abc_resnet18:{m}"
              for m in (args.models.split(",") if args.models else arm_model.DEFAULT_MODELS)]
    found = arm_model.run(models, target, args.image_size or 224, args.work_dir)
    print(arm_model.table(found))
    if not args.no_doc:
        sec = arm_model.section(found, command_line())
        write_doc(args.doc, sec)
        print(f"wrote '{sec.splitlines()[0][3:]}' in {args.doc}")
    return found


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
