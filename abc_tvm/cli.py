"""The `abc-tvm` command line: zoo, compile, inspect, run, tune, bench, serve.

Bad input (a UserError or ValueError) becomes one line on stderr and exit code 2, never a
traceback; an InternalError (abc-tvm's own inconsistency) one line asking for a bug report
and exit code 3; heavy imports happen inside the subcommands so `--help` is instant.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from abc_tvm.errors import InternalError, UserError


def _zoo(args: argparse.Namespace) -> None:
    import torch

    from abc_tvm import finn_models
    from abc_tvm.bnn_models import RESEARCH_ZOO
    from abc_tvm.export import to_onnx
    from abc_tvm.models import ZOO

    if args.name not in ZOO and args.name not in RESEARCH_ZOO and args.name not in finn_models.ZOO:
        raise UserError(f"unknown model {args.name!r}: choose one of "
                        f"{', '.join([*ZOO, *RESEARCH_ZOO, *finn_models.ZOO])}")
    if args.name in finn_models.ZOO:
        _finn_zoo(args, finn_models.ZOO[args.name])
        return
    if args.name in RESEARCH_ZOO:
        _research_zoo(args, *RESEARCH_ZOO[args.name])
        return
    build, default_size = ZOO[args.name]
    size = default_size if args.image_size is None else args.image_size
    _check_zoo_sizes(args, size)
    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    model = build(args.M, args.N, seed=args.seed, act=args.act, channelwise=args.channelwise,
                  **kwargs)
    example = torch.rand(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    to_onnx(model, example, args.output)
    print(f"wrote {args.output}: {args.name} M={args.M} N={args.N} act={args.act} "
          f"input [{args.batch}, 3, {size}, {size}]")


def _check_zoo_sizes(args: argparse.Namespace, size: int) -> None:
    if size < 8:
        raise UserError(f"--image-size must be at least 8 (got {size})")
    for flag, value in (("--num-classes", args.num_classes), ("--batch", args.batch)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1 (got {value})")


def _research_zoo(args: argparse.Namespace, build, default_size: int) -> None:
    """A BNN as its research code exports it (torch.onnx.export, TorchScript, opset 17)."""
    import torch

    size = default_size if args.image_size is None else args.image_size
    _check_zoo_sizes(args, size)
    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    model = build(seed=args.seed, **kwargs)
    example = torch.rand(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    torch.onnx.export(model, (example,), str(args.output), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"])
    print(f"wrote {args.output}: {args.name} as its research code exports it "
          f"(-M/-N/--act do not apply), input [{args.batch}, 3, {size}, {size}]")


def _finn_zoo(args: argparse.Namespace, config: str) -> None:
    """FINN's bnn_pynq network as Brevitas ships it, exported as QONNX (brevitas needed)."""
    import torch

    from abc_tvm import finn_models

    if args.image_size is not None:
        raise UserError(f"{args.name} has a fixed input size: leave out --image-size")
    _check_zoo_sizes(args, 32)
    model = finn_models.build(config, seed=args.seed)
    shape = finn_models.input_shape(config)
    example = torch.rand(args.batch, *shape, generator=torch.Generator().manual_seed(0))
    finn_models.export(model, example, args.output)
    print(f"wrote {args.output} (+ {args.output.name}.data): {args.name}, FINN's bnn_pynq "
          f"{config} as QONNX (untrained, random BatchNorm statistics), input "
          f"[{args.batch}, {', '.join(map(str, shape))}]")


def _compile(args: argparse.Namespace) -> None:
    from abc_tvm.compiler import compile_model

    if args.bundle is not None and args.target.startswith("x86"):
        raise UserError("--bundle makes a deploy directory for a board: use it with an arm "
                        "target (e.g. --target arm)")
    if args.output is None and args.bundle is None:
        raise UserError("say where the model goes: -o MODEL.so, or --bundle DIR")
    tuning = False if args.no_tuning_log else args.tuning_log
    if args.output is not None:
        compile_model(args.model, args.target, args.output, report_path=args.report,
                      tuning_log=tuning, require_binary=args.require_binary)
        if args.bundle is not None:
            from abc_tvm.deploy import make_bundle

            make_bundle(args.output, args.bundle)
        return
    from abc_tvm.deploy import make_bundle

    with tempfile.TemporaryDirectory() as tmp:  # the bundle keeps its own copy
        so = Path(tmp) / (Path(args.model).stem + ".so")
        compile_model(args.model, args.target, so, report_path=args.report, tuning_log=tuning,
                      require_binary=args.require_binary)
        make_bundle(so, args.bundle)
    print(f"wrote {args.bundle}/{so.name} (in the bundle only)")


def _inspect(args: argparse.Namespace) -> None:
    from abc_tvm.explain import format_rows, inspect_model

    rows, notes = inspect_model(args.model, args.output)
    print(format_rows(rows, notes))
    if args.output is not None:
        print(f"wrote the canonical model to {args.output}")


def _tune(args: argparse.Namespace) -> None:
    from abc_tvm.tuning import tune_model

    log = args.log or args.model.with_name(f"{args.model.stem}.tuning-{args.target}")
    tune_model(args.model, args.target, args.trials, log, rpc_tracker=args.rpc_tracker,
               rpc_key=args.rpc_key, kernels=args.kernels)


def _bench(args: argparse.Namespace) -> None:
    from abc_tvm.bench import bench_from_args

    bench_from_args(args)


def _serve(args: argparse.Namespace) -> None:
    from abc_tvm.serving import serve_from_args

    serve_from_args(args)


def _run(args: argparse.Namespace) -> None:
    from abc_tvm.runtime import load

    model = load(args.module)
    try:
        x = np.load(args.input, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read input {args.input}: {e}") from None
    y = model(x)
    if args.output:
        np.save(args.output, y)
        print(f"wrote {args.output}: shape {list(y.shape)} {y.dtype}")
    else:
        flat = y.reshape(y.shape[0], -1)
        print(f"output shape {list(y.shape)} {y.dtype}; min {y.min():.6g} max {y.max():.6g} "
              f"mean {y.mean():.6g}; argmax per batch item {flat.argmax(1).tolist()}")


_TARGET_HELP = ("x86 (this CPU) | x86-64-v2 | x86-64-v3 (AVX2) | x86-64-v4 (AVX-512) | "
                "x86:MCPU (an LLVM CPU name: x86:znver3, x86:icelake-server, ...) | "
                "arm (any aarch64 with NEON) | rpi4 | rpi5 | jetson-nano | "
                "jetson-orin | armv7 (32-bit NEON, compile only) | cuda (default: x86)")


def version_text() -> str:
    """abc-tvm's version, the TVM it compiles with, and what this CPU popcounts with."""
    from abc_tvm.hostcpu import host_cpu
    from abc_tvm.hostcpu import package_version as of

    cpu = host_cpu()
    return (f"abc-tvm {of('abc-tvm')}\n"
            f"apache-tvm {of('apache-tvm')} (apache-tvm-ffi {of('apache-tvm-ffi')}), "
            f"Python {sys.version.split()[0]}\n"
            f"this CPU: {cpu.model}; popcount: {cpu.popcount}")


class _Version(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="abc-tvm",
        description="Compile ABC-Net binary neural networks to AND/popcount kernels with TVM.",
    )
    p.add_argument("--version", action=_Version, nargs=0,
                   help="print abc-tvm's and TVM's versions and this CPU's popcount, and exit")
    sub = p.add_subparsers(dest="command", required=True)

    z = sub.add_parser("zoo", help="write a bundled ABC model as ONNX")
    z.add_argument("name", help="abc_resnet18 | abc_resnet20 (ABC export) | reactnet_a | "
                                "bireal18 (as their research code exports them) | "
                                "finn_cnv_1w1a, finn_lfc_1w2a, ... (FINN's bnn_pynq as QONNX; "
                                "needs brevitas)")
    z.add_argument("-M", type=int, default=3, help="weight bases (1-8)")
    z.add_argument("-N", type=int, default=3, help="activation planes (1-8)")
    z.add_argument("-o", "--output", required=True, type=Path)
    z.add_argument("--image-size", type=int, default=None, help="default: 224 / 32")
    z.add_argument("--batch", type=int, default=1)
    z.add_argument("--num-classes", type=int, default=None)
    z.add_argument("--act", choices=["bipolar", "unipolar"], default="bipolar")
    z.add_argument("--channelwise", action="store_true", help="one α per output channel")
    z.add_argument("--seed", type=int, default=0)
    z.set_defaults(func=_zoo)

    c = sub.add_parser("compile", help="compile an ONNX ABC model to a shared library")
    c.add_argument("model", type=Path)
    c.add_argument("--target", default="x86", help=_TARGET_HELP)
    c.add_argument("-o", "--output", type=Path, default=None,
                   help="the .so to write (its manifest goes beside it); with --bundle it may "
                        "be left out: the model is written into the bundle only")
    c.add_argument("--report", type=Path, default=None, help="write the JSON report here")
    c.add_argument("--require-binary", action="store_true",
                   help="fail (exit 2) when a layer that looks binary (a Sign or threshold "
                        "before it) stays a float op, e.g. in CI pipelines")
    c.add_argument("--bundle", type=Path, default=None,
                   help="write a self-contained deploy directory (runner + runtime libs) "
                        "holding the model")
    c.add_argument("--tuning-log", type=Path, default=None,
                   help="MetaSchedule database dir (default: matching shipped tuning_logs/)")
    c.add_argument("--no-tuning-log", action="store_true",
                   help="apply no tuning database: the hand-written default schedules only")
    c.set_defaults(func=_compile)

    i = sub.add_parser("inspect", help="show which convs/FCs become binary kernels, and why")
    i.add_argument("model", type=Path)
    i.add_argument("-o", "--output", type=Path, default=None,
                   help="also write the canonicalized model (e.g. to view in Netron)")
    i.set_defaults(func=_inspect)

    t = sub.add_parser("tune", help="tune a model's kernels with MetaSchedule (XGBoost)")
    t.add_argument("model", type=Path)
    t.add_argument("--target", default="x86",
                   help="x86 (measured here) | arm or a board preset (measured on the board: "
                        "needs --rpc-tracker)")
    t.add_argument("--trials", type=int, required=True, help="total trials (a rerun resumes)")
    t.add_argument("--log", type=Path, default=None,
                   help="database directory (default: MODEL.tuning-TARGET beside the model)")
    t.add_argument("--kernels", choices=["all", "abc", "float"], default="all",
                   help="tune every kernel (default), only the ABC kernels, or only the "
                        "float ones (convs, dense layers and pools search their register "
                        "tile; the untuned tile is always among the candidates)")
    t.add_argument("--rpc-tracker", default=None, help="HOST:PORT of a TVM RPC tracker")
    t.add_argument("--rpc-key", default=None, help="device key registered at the tracker")
    t.set_defaults(func=_tune)

    r = sub.add_parser("run", help="run a compiled host-target .so on an .npy input")
    r.add_argument("module", type=Path)
    r.add_argument("--input", required=True, type=Path)
    r.add_argument("--output", type=Path, default=None)
    r.set_defaults(func=_run)

    b = sub.add_parser("bench", help="benchmark abc-tvm against its float and binary peers")
    from abc_tvm.bench_args import add_bench_arguments

    add_bench_arguments(b)
    b.set_defaults(func=_bench)

    s = sub.add_parser("serve", help="serve compiled models over the Open Inference Protocol")
    from abc_tvm.serving_args import add_serve_arguments

    add_serve_arguments(s)
    s.set_defaults(func=_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except InternalError as e:
        print(f"abc-tvm {args.command}: internal error (a bug in abc-tvm, not in your model: "
              f"please report it with the model): {e}", file=sys.stderr)
        return 3
    except (UserError, ValueError, FileNotFoundError) as e:
        from abc_tvm.limits import tvm_error  # a ValueError from TVM may span 50 lines

        print(f"abc-tvm {args.command}: error: {e if isinstance(e, UserError) else tvm_error(e)}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
