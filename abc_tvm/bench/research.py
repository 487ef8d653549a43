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

from abc_tvm.bench import float_ops
from abc_tvm.bench.common import (
    command_line,
    host_mcpu,
    load_benchmark,
    machine_info,
    tvm_target,
)
from abc_tvm.bench.tables import Tables
from abc_tvm.errors import UserError


@dataclass(frozen=True)
class Workload:
    """One benchmarked network: how to build and export it, at which batch sizes, and which
    ONNX the float peer (ONNX Runtime) runs."""

    name: str
    build: Callable  # (seed=...) -> torch.nn.Module in eval mode
    input_shape: tuple[int, int, int]  # (C, H, W); H and W follow --image-size if resizable
    export: Callable  # (model, example, path) -> None
    batches: tuple[int, ...] = (1,)
    resizable: bool = True
    # ORT runs the canonical model: QONNX's quantizers as float ops (it cannot run QONNX).
    float_lowered: bool = False
    peer: str = "PyTorch eager"


def _torch_export(model, example, path) -> None:
    import torch

    torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17)


def workloads() -> dict[str, Workload]:
    """Every research and QONNX workload by name (imports torch: call it when benchmarking)."""
    from abc_tvm import finn_models
    from abc_tvm.bnn_models import RESEARCH_ZOO

    found = {name: Workload(name, build, (3, size, size), _torch_export)
             for name, (build, size) in RESEARCH_ZOO.items()}
    for name, config in finn_models.ZOO.items():
        found[name] = Workload(
            name, lambda seed, config=config: finn_models.build(config, seed=seed),
            finn_models.input_shape(config), finn_models.export, batches=(1, 64),
            resizable=False, float_lowered=True, peer="Brevitas eager")
    return found


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


def run(names: list[str], repeat: int, image_size: int | None, work_dir: Path,
        target: str = "x86") -> dict:
    """Measure the workloads in one child process (1 thread everywhere); the results dict."""
    work_dir.mkdir(parents=True, exist_ok=True)
    out = work_dir / "research.json"
    env = {**os.environ, "TVM_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "abc_tvm.bench.research", "--json", str(out),
           f"--command={command_line()}",
           "--repeat", str(repeat), *(["--image-size", str(image_size)] if image_size else []),
           "--target", target,
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


def measure(names: list[str], repeat: int, image_size: int | None, command: str = "",
            target: str = "x86") -> dict:
    """In this process (threads already fixed): each workload's times, ratios and layers."""
    import torch

    torch.set_num_threads(1)
    registry = workloads()
    peak_mod = load_benchmark("popcount_peak")
    tvm_tgt = tvm_target(target)
    peaks = [peak_mod.measure_peak(threads=1, target=tvm_tgt).gbitops_per_s]
    tmp = Path(tempfile.mkdtemp())
    rows = []
    for name in names:
        wl = registry[name]
        net = wl.build(seed=0)
        for batch in wl.batches:
            rows.append(_measure_one(wl, net, batch, image_size, repeat, tmp, target))
    # a noisy start understates the ceiling: keep the higher
    peaks.append(peak_mod.measure_peak(threads=1, target=tvm_tgt).gbitops_per_s)
    return {"machine": machine_info(), "peak_gbitops": max(peaks), "rows": rows,
            "command": command, "target": target}


def _measure_one(wl: Workload, net, batch: int, image_size: int | None, repeat: int,
                 tmp: Path, target: str = "x86") -> dict:
    """One workload at one batch size: abc-tvm, ORT fp32 and the PyTorch peer, interleaved."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    from abc_tvm.bench.float_ops import profile_pair
    from abc_tvm.bench.jobs import profile_kernels
    from abc_tvm.blocks import match
    from abc_tvm.compiler import compile_model
    from abc_tvm.runtime import load

    c, h, w = wl.input_shape
    if image_size and wl.resizable:
        h = w = image_size
    x = torch.rand(batch, c, h, w, generator=torch.Generator().manual_seed(0))
    stem = f"{wl.name}_b{batch}"
    path = tmp / f"{stem}.onnx"
    wl.export(net, x, path)
    so = tmp / f"{stem}.so"
    report = compile_model(path, target, so, quiet=True)
    proto = match(str(path))[0]
    macs = [m * batch for m in _binary_macs(proto, report.abc_layers)]
    ort_model = str(path)
    if wl.float_lowered:
        ort_model = str(tmp / f"{stem}.float.onnx")
        onnx.save(proto, ort_model)
    xn = x.numpy()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(ort_model, opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: xn}
    mod = load(so, workers=1)
    ref = sess.run(None, feed)[0]
    err = float(np.abs(mod(xn) - ref).max() / np.abs(ref).max())
    peers: dict[str, Callable[[], object]] = {
        "abc-tvm": lambda: mod(xn), "ORT fp32": lambda: sess.run(None, feed),
        wl.peer: lambda: net(x)}
    samples: dict[str, list[float]] = {k: [] for k in peers}
    with torch.no_grad():
        for _ in range(3):  # interleaved rounds: a noisy moment hits every peer
            for k, fn in peers.items():
                samples[k] += _time(fn, max(1, repeat // 3))
    np.save(tmp / f"{stem}.x.npy", xn)
    per_layer = [p["ms"] for p in profile_kernels(str(so), str(tmp / f"{stem}.x.npy"), repeat)]
    try:  # each float layer against ORT's same op, on the ONNX ORT ran above
        float_prof = profile_pair(str(so), ort_model, str(tmp / f"{stem}.x.npy"), 1, repeat)
    except Exception as e:  # noqa: BLE001 - the table is missing, the row stays
        float_prof = {"error": f"{type(e).__name__}: {e}"}
    return {"name": wl.name, "batch": batch, "shape": [c, h, w], "max_rel_err": err,
            "float_lowered": wl.float_lowered, "peer": wl.peer,
            "best_ms": {k: min(v) for k, v in samples.items()},
            "median_ms": {k: float(np.median(v)) for k, v in samples.items()},
            "binary_layers": len(report.abc_layers), "binary_macs": macs,
            "layer_ms": per_layer, "layers": report.abc_layers, "float_ops": float_prof}


def table(results: dict, rows: list[dict] | None = None) -> str:
    """The results as Markdown: one row per workload and batch, then each one's per-layer
    summary (the PyTorch peer's column is named by the first row: eager or Brevitas)."""
    peak = results["peak_gbitops"]
    rows = results["rows"] if rows is None else rows
    peer = rows[0]["peer"] if rows else "PyTorch eager"
    lines = [f"| model | batch | abc-tvm best / median | ORT fp32 best / median | {peer} | "
             "abc-tvm vs ORT | binary layers | binary GMAC | binary layers at peak |",
             "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in rows:
        b, m = r["best_ms"], r["median_ms"]
        gmac = sum(r["binary_macs"]) / 1e9
        shape = "x".join(map(str, r["shape"]))
        lines.append(
            f"| {r['name']} ({shape}) | {r['batch']} | {b['abc-tvm']:.2f} / {m['abc-tvm']:.2f} ms"
            f" | {b['ORT fp32']:.2f} / {m['ORT fp32']:.2f} ms | {b[r['peer']]:.1f} ms | "
            f"**{b['ORT fp32'] / b['abc-tvm']:.2f}x** | {r['binary_layers']} | {gmac:.3f} | "
            f"{gmac / peak * 1e3:.3f} ms |")
        pct = [mac / (peak * 1e6) / ms * 100 for mac, ms in zip(r["binary_macs"], r["layer_ms"],
                                                               strict=False) if ms > 0]
        if pct:
            worst = sorted(zip(pct, r["layers"], strict=False), key=lambda t: t[0])[:3]
            notes.append(
                f"- {r['name']} batch {r['batch']}: binary layers in the model at "
                f"{min(pct):.0f}–{max(pct):.0f}% of peak (median {sorted(pct)[len(pct) // 2]:.0f}%"
                f"), {sum(r['layer_ms']):.2f} ms in all, {sum(r['layer_ms']) / b['abc-tvm']:.0%} "
                "of the model; lowest: " + "; ".join(
                    f"{a['out_channels']}x{a['in_channels']}x{a['kernel'][0]}x{a['kernel'][1]}"
                    f" M{a['M']}N{a['N']} {p:.0f}%" for p, a in worst)
                + f"; max rel. error vs ORT {r['max_rel_err']:.1e}")
        hi = float_ops.worst(r["float_ops"]) if "abc" in r.get("float_ops", {}) else None
        if hi is not None:
            notes.append(f"- {r['name']} batch {r['batch']}: float layers at most {hi[0]:.2f}x "
                         f"ORT's time for the same op ({hi[1]}; {hi[2]} ops matched; target "
                         f"<= 1.5x: {'met' if hi[0] <= 1.5 else 'not met'})")
    floats = float_tables(rows)
    return "\n".join(lines + [""] + notes) + (
        "\n\n" + floats.markdown("###").rstrip() if floats.sections else "")


def float_tables(rows: list[dict]) -> Tables:
    """Each workload's float layers against ORT's time for the same op (1 thread), or why not."""
    tabs = Tables()
    for r in rows:
        prof = r.get("float_ops") or {}
        onnx = "the float-lowered ONNX" if r["float_lowered"] else "the same ONNX"
        title = f"Float layers of {r['name']} batch {r['batch']} vs ONNX Runtime on {onnx}, " \
                "per op, 1 thread"
        if "abc" in prof:
            tabs.add(f"{title}, best of {prof['runs']} runs", float_ops.HEAD,
                     float_ops.rows(prof))
        elif "error" in prof:
            tabs.add(title, ["error"], [[prof["error"][:300]]])
    return tabs


def sections(results: dict) -> list[str]:
    """The `docs/benchmarks.md` sections these results rewrite (one per kind and CPU model):
    research exports, and QONNX exports."""
    mach = results["machine"]
    mcpu = host_mcpu()
    if results.get("target", "x86") != "x86":  # another x86 build timed on this CPU
        mcpu = f"{results['target']} build, run on {mcpu}"
    head = (f"{mach.get('cpu', '?')}, 1 thread, random weights with non-trivial BatchNorm "
            "statistics, interleaved rounds, untuned. AND+popcount peak measured in the same "
            f"run: {results['peak_gbitops']:.0f} Gbit-ops/s. Command: `{results['command']}`. "
            "Float-layer tables: each abc-tvm float kernel call against ORT's node of the same "
            "op and shapes, both profiled in the same process (`abc_tvm/bench/float_ops.py`, "
            "method as in the x86 sections).")
    research = [r for r in results["rows"] if not r["float_lowered"]]
    qonnx = [r for r in results["rows"] if r["float_lowered"]]
    out = []
    if research:
        out.append("\n".join([
            f"## Research BNN exports (x86: {mcpu})", "",
            head + " TorchScript export at opset 17, the same ONNX for every runtime.", "",
            table(results, research), ""]))
    if qonnx:
        out.append("\n".join([
            f"## QONNX exports: FINN's bnn_pynq (x86: {mcpu})", "",
            head + " Brevitas `export_qonnx` (dynamo); abc-tvm compiles that file; ONNX "
            "Runtime, which cannot run QONNX, runs the same model with each quantizer as "
            "float ops (abc-tvm's canonical form); Brevitas eager runs the PyTorch model.", "",
            table(results, qonnx), ""]))
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m abc_tvm.bench.research")
    p.add_argument("names", nargs="+", choices=sorted(workloads()))
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--command", default="", help="the bench command, for the doc")
    p.add_argument("--target", default="x86")
    args = p.parse_args(argv)
    results = measure(args.names, args.repeat, args.image_size, args.command, args.target)
    args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

