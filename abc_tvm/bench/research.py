"""Research BNN workloads of `abc-tvm bench` (`--models reactnet_a,bireal18`): the network
as its research code exports it, compiled by abc-tvm, against ONNX Runtime fp32 and PyTorch
eager on the same ONNX, with each binary layer's share of the popcount peak in the model.

The registry is `abc_tvm.bnn_models.RESEARCH_ZOO` (what `abc-tvm zoo` writes too): a new
research network is one entry there, its builder and input size. Measuring runs in a child
process whose thread settings are fixed before TVM, ONNX Runtime or PyTorch start
(`python -m abc_tvm.bench.research`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from abc_tvm.bench.common import _command_line, load_benchmark, machine_info
from abc_tvm.errors import UserError


@dataclass(frozen=True)
class Workload:
    name: str
    build: Callable  # (num_classes=..., seed=...) -> torch.nn.Module in eval mode
    image_size: int


def workloads() -> dict[str, Workload]:
    """Every research workload by name (imports torch: call it when benchmarking)."""
    from abc_tvm.bnn_models import RESEARCH_ZOO

    return {name: Workload(name, build, size) for name, (build, size) in RESEARCH_ZOO.items()}


def split_models(text: str | None) -> tuple[str | None, list[str]]:
    """`--models` into (the MxN part or None, the research workload names)."""
    if text is None:
        return None, []
    items = [t.strip() for t in text.split(",") if t.strip()]
    known = workloads() if any(not _looks_mn(t) for t in items) else {}
    research = [t for t in items if t in known]
    rest = [t for t in items if t not in known]
    return (",".join(rest) if rest else None), research


def _looks_mn(item: str) -> bool:
    m, _, n = item.lower().partition("x")
    return m.isdigit() and n.isdigit()


def run(names: list[str], repeat: int, image_size: int | None, work_dir: Path) -> dict:
    """Measure the workloads in one child process (1 thread everywhere); the results dict."""
    work_dir.mkdir(parents=True, exist_ok=True)
    out = work_dir / "research.json"
    env = {**os.environ, "TVM_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "abc_tvm.bench.research", "--json", str(out),
           f"--command={_command_line()}",
           "--repeat", str(repeat), *(["--image-size", str(image_size)] if image_size else []),
           *names]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"research workload measurement failed: {tail}")
    return json.loads(out.read_text())


def _time(fn: Callable[[], object], repeat: int) -> list[float]:
    fn()
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    return samples


def _binary_macs(proto, layers: list[dict]) -> list[int]:
    """Binary MACs (M·N·O·I·kh·kw·OH·OW, batch 1) per binary layer, from ONNX shapes."""
    import onnx

    g = onnx.shape_inference.infer_shapes(proto).graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*g.value_info, *g.output]}
    outs = {n.name: n.output[0] for n in g.node}
    macs = []
    for a in layers:
        s = shapes.get(outs.get(a["name"], ""), [])
        hw = s[2] * s[3] if len(s) == 4 else 1
        o, i, (kh, kw) = a["out_channels"], a["in_channels"], a["kernel"]
        macs.append(a["M"] * a["N"] * o * i * kh * kw * hw)
    return macs


def measure(names: list[str], repeat: int, image_size: int | None, command: str = "") -> dict:
    """In this process (threads already fixed): each workload's times, ratios and layers."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from abc_tvm.bench.jobs import profile_kernels
    from abc_tvm.blocks import match
    from abc_tvm.compiler import compile_model
    from abc_tvm.runtime import load

    torch.set_num_threads(1)
    registry = workloads()
    peak_mod = load_benchmark("popcount_peak")
    peaks = [peak_mod.measure_peak(threads=1).gbitops_per_s]
    tmp = Path(tempfile.mkdtemp())
    rows = []
    for name in names:
        wl = registry[name]
        size = image_size or wl.image_size
        net = wl.build(seed=0)
        x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        path = tmp / f"{name}.onnx"
        torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=17)
        so = tmp / f"{name}.so"
        report = compile_model(path, "x86", so, quiet=True)
        proto = match(str(path))[0]
        macs = _binary_macs(proto, report.abc_layers)
        xn = x.numpy()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: xn}
        mod = load(so, workers=1)
        ref = sess.run(None, feed)[0]
        err = float(np.abs(mod(xn) - ref).max() / np.abs(ref).max())
        peers: dict[str, Callable[[], object]] = {
            "abc-tvm": lambda mod=mod, xn=xn: mod(xn),
            "ORT fp32": lambda sess=sess, feed=feed: sess.run(None, feed),
            "PyTorch eager": lambda net=net, x=x: net(x)}
        samples: dict[str, list[float]] = {k: [] for k in peers}
        with torch.no_grad():
            for _ in range(3):  # interleaved rounds: a noisy moment hits every peer
                for k, fn in peers.items():
                    samples[k] += _time(fn, max(1, repeat // 3))
        np.save(tmp / f"{name}.x.npy", xn)
        per_layer = [p["ms"] for p in profile_kernels(str(so), str(tmp / f"{name}.x.npy"),
                                                      repeat)]
        rows.append({"name": name, "image_size": size, "max_rel_err": err,
                     "best_ms": {k: min(v) for k, v in samples.items()},
                     "median_ms": {k: float(np.median(v)) for k, v in samples.items()},
                     "binary_layers": len(report.abc_layers), "binary_macs": macs,
                     "layer_ms": per_layer, "layers": report.abc_layers})
    peaks.append(peak_mod.measure_peak(threads=1).gbitops_per_s)  # noisy start: keep higher
    return {"machine": machine_info(), "peak_gbitops": max(peaks), "rows": rows,
            "command": command}


def table(results: dict) -> str:
    """The results as Markdown: one row per workload, then each one's per-layer summary."""
    peak = results["peak_gbitops"]
    lines = ["| model | abc-tvm best / median | ORT fp32 best / median | PyTorch eager | "
             "abc-tvm vs ORT | binary layers | binary GMAC | binary layers at peak |",
             "|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in results["rows"]:
        b, m = r["best_ms"], r["median_ms"]
        gmac = sum(r["binary_macs"]) / 1e9
        lines.append(
            f"| {r['name']} ({r['image_size']}²) | {b['abc-tvm']:.1f} / {m['abc-tvm']:.1f} ms | "
            f"{b['ORT fp32']:.1f} / {m['ORT fp32']:.1f} ms | {b['PyTorch eager']:.1f} ms | "
            f"**{b['ORT fp32'] / b['abc-tvm']:.2f}x** | {r['binary_layers']} | {gmac:.2f} | "
            f"{gmac / peak * 1e3:.2f} ms |")
        pct = [mac / (peak * 1e6) / ms * 100 for mac, ms in zip(r["binary_macs"], r["layer_ms"],
                                                               strict=False) if ms > 0]
        if pct:
            worst = sorted(zip(pct, r["layers"], strict=False), key=lambda t: t[0])[:3]
            notes.append(
                f"- {r['name']}: binary layers in the model at {min(pct):.0f}–{max(pct):.0f}% of "
                f"peak (median {sorted(pct)[len(pct) // 2]:.0f}%), {sum(r['layer_ms']):.2f} ms "
                "in all; lowest: " + "; ".join(
                    f"{a['out_channels']}x{a['in_channels']}x{a['kernel'][0]}x{a['kernel'][1]}"
                    f" s{a['strides'][0]} {p:.0f}%" for p, a in worst)
                + f"; max rel. error vs ORT {r['max_rel_err']:.1e}")
    return "\n".join(lines + [""] + notes)


def section(results: dict) -> str:
    """The `docs/benchmarks.md` section these results rewrite (one per CPU model)."""
    mach = results["machine"]
    mcpu = _llvm_mcpu()
    return "\n".join([
        f"## Research BNN exports (x86: {mcpu})", "",
        f"{mach.get('cpu', '?')}, 1 thread, batch 1, random weights with non-trivial BatchNorm "
        "statistics, TorchScript export at opset 17, the same ONNX for every runtime, "
        "interleaved rounds, untuned. AND+popcount peak measured in the same run: "
        f"{results['peak_gbitops']:.0f} Gbit-ops/s. Command: `{results['command']}`.", "",
        table(results), ""])


def _llvm_mcpu() -> str:
    import tvm

    return str(tvm.target.Target.from_device("cpu").attrs.get("mcpu", "?"))


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m abc_tvm.bench.research")
    p.add_argument("names", nargs="+", choices=sorted(workloads()))
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--command", default="", help="the bench command, for the doc")
    args = p.parse_args(argv)
    results = measure(args.names, args.repeat, args.image_size, args.command)
    args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

