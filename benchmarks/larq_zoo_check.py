"""The Larq Zoo through tf2onnx, compiled by abc-tvm (`make larq-zoo`).

Two steps in two environments, because TensorFlow 2.15 + Larq 0.14 need numpy 1.26 and
protobuf 3.20, which the compiler's environment does not use:

    .venv-larq/bin/python benchmarks/larq_zoo_check.py export --out out/larq   # TF env
    .venv/bin/python benchmarks/larq_zoo_check.py check out/larq               # abc-tvm env

`export` builds each zoo model with `weights=None` (random weights) and random BatchNorm
statistics, and writes `tf2onnx.convert.from_keras(opset=13)` of it. `check` compiles each
with `--require-binary` semantics, counts its binary kernels, and compares the compiled
output with ONNX Runtime's on one random input (relative error of the logits, top-1).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# model: (larq_zoo module, input size); AlexNet and XNOR-Net flatten a fixed-size map
MODELS = {
    "QuickNetSmall": ("sota", 64), "QuickNet": ("sota", 64), "QuickNetLarge": ("sota", 64),
    "BiRealNet": ("literature", 64), "BinaryResNetE18": ("literature", 64),
    "BinaryDenseNet28": ("literature", 64), "MeliusNet22": ("literature", 64),
    "RealToBinaryNet": ("literature", 64), "DoReFaNet": ("literature", 64),
    "XNORNet": ("literature", 224), "BinaryAlexNet": ("literature", 224),
}


def export(out: Path, names: list[str]) -> None:
    """Keras models of the zoo (random weights and BatchNorm statistics) to ONNX."""
    import importlib

    import numpy as np
    import tensorflow as tf
    import tf2onnx

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        module, size = MODELS[name]
        t0 = time.time()
        zoo = importlib.import_module(f"larq_zoo.{module}")
        model = getattr(zoo, name)(weights=None, input_shape=(size, size, 3))
        for layer in model.layers:  # non-trivial statistics, as a trained model has
            if isinstance(layer, tf.keras.layers.BatchNormalization):
                draw = {"gamma": lambda s: rng.uniform(0.5, 1.5, s),
                        "beta": lambda s: rng.normal(0, 0.3, s),
                        "moving_mean": lambda s: rng.normal(0, 0.3, s),
                        "moving_variance": lambda s: rng.uniform(0.5, 2.0, s)}
                layer.set_weights([draw[w.name.split("/")[-1].split(":")[0]](w.shape)
                                   .astype(np.float32) for w in layer.weights])
        spec = (tf.TensorSpec((1, size, size, 3), tf.float32, name="input"),)
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=13)
        (out / f"{name}.onnx").write_bytes(proto.SerializeToString())
        print(f"exported {name} ({size}x{size}) in {time.time() - t0:.0f} s", flush=True)


def logits(path: Path, to: Path) -> Path:
    """The model without its final Softmax: random weights saturate it to one-hot
    probabilities, which would hide any error but the top-1's; the logits show it."""
    import onnx

    m = onnx.load(path)
    out = m.graph.output[0]
    last = next((n for n in m.graph.node if out.name in n.output), None)
    if last is None or last.op_type != "Softmax":
        return path
    m.graph.node.remove(last)
    for n in m.graph.node:
        n.output[:] = [out.name if o == last.input[0] else o for o in n.output]
    onnx.save(m, to)
    return to


def check(src: Path, names: list[str]) -> list[dict]:
    """Compile each export (its logits) for this CPU and compare it with ONNX Runtime."""
    import tempfile

    import numpy as np
    import onnxruntime as ort

    from abc_tvm.compiler import compile_model
    from abc_tvm.runtime import load

    rows = []
    for name in names:
        path = src / f"{name}.onnx"
        if not path.is_file():
            rows.append({"model": name, "error": "not exported"})
            continue
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            so = Path(tmp) / "m.so"
            path = logits(path, Path(tmp) / "logits.onnx")
            try:
                report = compile_model(path, "x86", so, quiet=True)
            except Exception as e:  # noqa: BLE001 - every failure is a row of the table
                rows.append({"model": name, "error": f"{type(e).__name__}: {e}"})
                print(f"{name}: {rows[-1]['error']}", flush=True)
                continue
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            inp = sess.get_inputs()[0]
            x = np.random.default_rng(1).normal(0, 1, inp.shape).astype(np.float32)
            ref = sess.run(None, {inp.name: x})[0]
            got = load(so, workers=1)(x)
        err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))
        rows.append({
            "model": name, "binary": len(report.abc_layers),
            "planes": sorted({a["N"] for a in report.abc_layers}),
            "looks_binary_but_float": len(report.binary_looking_float),
            "first_float": (report.binary_looking_float or [{}])[0].get("reason", ""),
            "rel_err": err, "top1_same": bool((got.argmax(-1) == ref.argmax(-1)).all()),
            "seconds": round(time.time() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | binary kernels | planes | binary-looking left float | max rel. err vs ORT "
             "| same top-1 |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['binary']} | {r['planes']} | "
                     f"{r['looks_binary_but_float']} | {r['rel_err']:.1e} | {r['top1_same']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="step", required=True)
    e = sub.add_parser("export", help="Larq Zoo -> ONNX (needs tensorflow, larq_zoo, tf2onnx)")
    e.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("check", help="compile each export and compare it with ONNX Runtime")
    c.add_argument("dir", type=Path)
    c.add_argument("--json", type=Path, default=None, help="write the rows here")
    for q in (e, c):
        q.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    args = p.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(MODELS)}")
    if args.step == "export":
        export(args.out, names)
        return 0
    rows = check(args.dir, names)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    print(markdown(rows))
    bad = [r for r in rows if "error" in r or r["looks_binary_but_float"] or not r["top1_same"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
