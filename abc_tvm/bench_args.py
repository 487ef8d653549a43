"""Arguments of `abc-tvm bench` (apart from the benchmark, so `--help` imports nothing heavy)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """Add the bench options to `p` (the `abc-tvm bench` subparser, or the parser of
    `python -m abc_tvm.bench`)."""
    p.add_argument("--threads", default=None,
                   help="thread counts, comma-separated; each runs in its own child process "
                        "(default: 1,2; --quick: 1)")
    p.add_argument("--models", default=None,
                   help="ABC configurations MxN and/or research BNN exports (reactnet_a, "
                        "bireal18), comma-separated (default: 1x1,3x3,5x5; --quick: 1x1)")
    p.add_argument("--topi-tuned", default=None,
                   help="MxN configurations whose layers also get TOPI tuned with MetaSchedule "
                        "(default: 3x3 when benchmarked, else the first; 'none' skips tuning)")
    p.add_argument("--trials", type=int, default=None,
                   help="MetaSchedule trials per TOPI layer (default: 64; --quick: 2); tuning "
                        "databases are cached in the work dir and resumed")
    p.add_argument("--image-size", type=int, default=None, help="default: 224 (--quick: 32)")
    p.add_argument("--repeat", type=int, default=None,
                   help="timing samples per peer, interleaved between peers (default: 10)")
    p.add_argument("--parts", default="models,layers",
                   help="what to measure: models, layers or both (default: models,layers)")
    p.add_argument("--work-dir", type=Path, default=Path("out/bench"),
                   help="cache of exports, compiled models and tuning databases; results.json")
    p.add_argument("--plot", type=Path, default=None, help="write a bar chart (PNG) here")
    p.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"),
                   help="Markdown file whose section of this CPU ('## x86: <mcpu>') is rewritten "
                        "(default: docs/benchmarks.md)")
    p.add_argument("--no-doc", action="store_true", help="do not write the Markdown section")
    p.add_argument("--tuning-log", type=Path, default=None,
                   help="MetaSchedule database dir passed to compile for the whole models "
                        "(default: the compiler's choice: a matching shipped tuning_logs/ entry)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: ABC-ResNet-20 at 32x32, 1 thread, 2 trials, light search")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--cycle-model", action="store_true",
                   help="ARM without a board: model each bundle's cycles on the --target board "
                        "(rpi4 default, rpi5) from qemu block counts and llvm-mca; --models "
                        "abc_resnet18:MxN, bireal18, reactnet_a (default: all three)")
    remote = p.add_argument_group(
        "on a board over TVM RPC (abc-tvm models and TVM's float twin, compiled here, timed "
        "there, checked against ONNX Runtime here)")
    remote.add_argument("--rpc-tracker", default=None, metavar="HOST:PORT",
                        help="time on the device behind this TVM RPC tracker instead of here")
    remote.add_argument("--rpc-key", default=None, help="device key registered at the tracker")
    p.add_argument("--target", default=None,
                   help="what abc-tvm (and TVM's peers) compile for: x86 (this CPU, default), or "
                        "an x86 level or CPU this machine runs (x86-64-v3 measures the AVX2 "
                        "build here, marked as run on a newer CPU); with --rpc-tracker a board "
                        "target (default there: arm)")
