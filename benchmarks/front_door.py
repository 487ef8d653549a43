"""ReActNet-A and Bi-Real-Net-18 as their research code exports them: abc-tvm against ONNX
Runtime fp32 and PyTorch eager on the same network (1 thread, batch 1, 224², interleaved).

Run alone: `python benchmarks/front_door.py [--models reactnet_a,bireal18] [--repeat 15]`.
Prints a Markdown table: best and median times, speed-up over ORT, the binary MACs, and the
bound those MACs set at this CPU's measured AND+popcount peak (1 bit-op = AND + popcount of
one bit pair, the peak's unit).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _time(fn, repeat: int) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3, float(np.median(times)) * 1e3


def main() -> None:
    import onnx
    import onnxruntime as ort
    import torch
    from popcount_peak import measure_peak

    from abc_tvm.bnn_models import RESEARCH_ZOO
    from abc_tvm.compiler import compile_model
    from abc_tvm.runtime import load

    p = argparse.ArgumentParser()
    p.add_argument("--models", default="reactnet_a,bireal18")
    p.add_argument("--repeat", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(1)
    peak = measure_peak(threads=1).gbitops_per_s
    print(f"AND+popcount peak, 1 thread: {peak:.0f} Gbit-ops/s")
    print("| model | abc-tvm best / median ms | ORT fp32 best / median ms | PyTorch eager best ms "
          "| vs ORT | binary layers | binary GMAC | binary bound ms |")
    print("|---|---|---|---|---|---|---|---|")
    tmp = Path(tempfile.mkdtemp())
    layer_lines: list[str] = []
    for name in args.models.split(","):
        build, size = RESEARCH_ZOO[name]
        net = build(seed=0)
        x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        path = tmp / f"{name}.onnx"
        torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=17)
        so = tmp / f"{name}.so"
        report = compile_model(path, "x86", so, quiet=True)
        geo = _out_pixels(onnx.load(str(path)), report)
        macs = sum(geo.values())
        xn = x.numpy()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: xn}
        mod = load(so, workers=1)
        y, ref = mod(xn), sess.run(None, feed)[0]
        err = float(np.abs(y - ref).max() / np.abs(ref).max())
        runs = {"abc": lambda mod=mod, xn=xn: mod(xn),
                "ort": lambda sess=sess, feed=feed: sess.run(None, feed)}
        with torch.no_grad():
            runs["torch"] = lambda net=net, x=x: net(x)
            res = {k: [] for k in runs}
            for _ in range(3):  # interleaved rounds: a noisy moment hits all three
                for k, fn in runs.items():
                    res[k].append(_time(fn, max(1, args.repeat // 3)))
        best = {k: min(b for b, _ in v) for k, v in res.items()}
        med = {k: float(np.median([m for _, m in v])) for k, v in res.items()}
        bound = macs / (peak * 1e9) * 1e3
        per_layer = in_model_layers(so, xn)
        pct = [geo[a["name"]] / (peak * 1e6) / ms * 100
               for a, ms in zip(report.abc_layers, per_layer, strict=True)]
        worst = sorted(zip(pct, report.abc_layers, strict=True), key=lambda t: t[0])[:3]
        layer_lines.append(
            f"{name}: binary layers in the model at {min(pct):.0f}-{max(pct):.0f}% of peak "
            f"(median {float(np.median(pct)):.0f}%), {sum(per_layer):.2f} ms in all; lowest: "
            + "; ".join(f"{a['out_channels']}x{a['in_channels']}x{a['kernel'][0]}x"
                        f"{a['kernel'][1]} s{a['strides'][0]} {p:.0f}%" for p, a in worst))
        print(f"| {name} | {best['abc']:.1f} / {med['abc']:.1f} | {best['ort']:.1f} / "
              f"{med['ort']:.1f} | {best['torch']:.1f} | {best['ort'] / best['abc']:.2f}x | "
              f"{len(report.abc_layers)} | {macs / 1e9:.2f} | {bound:.2f} |  (max rel err "
              f"{err:.1e})")
    print()
    for line in layer_lines:
        print(line)


def in_model_layers(so: Path, x: np.ndarray) -> list[float]:
    """Best time (ms) of each binary kernel call inside the model, in call order, with the
    bit-pack before it counted in: the profile `abc-tvm bench` takes."""
    from abc_tvm.bench import profile_kernels

    xpath = so.with_suffix(".x.npy")
    np.save(xpath, x)
    return [layer["ms"] for layer in profile_kernels(str(so), str(xpath), repeat=30)]


def _out_pixels(model, report) -> dict[str, int]:
    """Binary MACs per layer from the ONNX shapes (output H·W of each binary conv)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.value_info, *inferred.graph.output]}
    outs = {n.name: n.output[0] for n in inferred.graph.node}
    macs = {}
    for a in report.abc_layers:
        shape = shapes.get(outs.get(a["name"], ""), [])
        hw = shape[2] * shape[3] if len(shape) == 4 else 1
        o, i, (kh, kw) = a["out_channels"], a["in_channels"], a["kernel"]
        macs[a["name"]] = a["M"] * a["N"] * o * i * kh * kw * hw
    return macs


if __name__ == "__main__":
    main()
