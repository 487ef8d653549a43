"""`make demo`: compile the bundled ABC-ResNet-20 for this CPU, run it, compare with ONNX Runtime.

Usage: python -m abc_tvm.demo OUT_DIR   (expects OUT_DIR/abc_resnet20.onnx from `abc-tvm zoo`)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from abc_tvm.compiler import compile_model
from abc_tvm.runtime import load


def main(out: Path) -> int:
    import onnxruntime as ort

    onnx_path = out / "abc_resnet20.onnx"
    so_path = out / "abc_resnet20.so"
    t0 = time.perf_counter()
    compile_model(onnx_path, "x86", so_path, report_path=out / "abc_resnet20.report.json")
    print(f"compiled in {time.perf_counter() - t0:.1f} s")

    model = load(so_path)
    shape = model.inputs[0].shape
    x = np.random.default_rng(0).uniform(0, 1, size=shape).astype(np.float32)
    np.save(out / "input.npy", x)
    y = model(x)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    rel = float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-12))
    print(f"abc-tvm vs ONNX Runtime on input {list(shape)}: max rel error {rel:.2e}, "
          f"argmax {y.argmax(1).tolist()} vs {ref.argmax(1).tolist()}")
    print("(deep binary nets amplify float rounding: an activation within an ulp of a "
          "threshold may take the other bit, so whole models are compared on argmax)")
    print(f"try: .venv/bin/abc-tvm run {so_path} --input {out / 'input.npy'}")
    return 0 if (y.argmax(1) == ref.argmax(1)).all() else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "out")))
