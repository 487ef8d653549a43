"""2-bit activations: threshold planes against binary-digit planes, in the block kernel.

A k-bit quantizer can enter the ABC kernel in two forms (docs/qonnx.md):

- threshold planes: `Round(h) >= j`, one per level step. Signed narrow (−1..1) gives 2
  bipolar planes; unsigned (0..3) gives 3 unipolar planes; full-range signed (−2..1) gives
  3 bipolar planes and a constant plane;
- binary digits: q = Σ 2^i b_i (the top digit negative for two's complement), k = 2
  unipolar planes in every case. Zero in the padding has all digits 0.

The conv's cost depends on the number of planes N and on the plane kind: a unipolar plane
also needs the popcount of the activation window. This script times abc-tvm's fused block
kernel (conv, BatchNorm, pack for the next layer) for each (form, N, kind) on CNV's layers
at batch 64. Bit-packing is left out: threshold planes pack with compares, digits would
pack with compares and bit extraction. The result decides which form ships.

Run: `TVM_NUM_THREADS=1 python benchmarks/plane_forms.py`.
"""

from __future__ import annotations

import numpy as np
import tvm

from abc_tvm import schedules
from abc_tvm.schedules import compute as C

# CNV's 3x3 binary layers (channels in, out, input side) at batch 64
LAYERS = [(64, 64, 30), (64, 128, 14), (128, 128, 12), (128, 256, 5), (256, 256, 3)]
# form -> (planes, bipolar): what a 2-bit quantizer costs in each form
FORMS = {
    "narrow −1..1, thresholds": (2, True),
    "unsigned 0..3, thresholds": (3, False),
    "full −2..1, thresholds + constant": (4, True),
    "any 2-bit, binary digits": (2, False),
}


def time_block(c: int, o: int, side: int, planes: int, bipolar: bool, batch: int = 64,
               bases: int = 2) -> float:
    """Best of 7 timings (ms) of the fused block kernel with BN and one packed next plane."""
    host = tvm.target.Target.from_device("cpu")
    geo = C.ConvGeometry(batch, c, side, side, o, (3, 3), (1, 1), (0, 0, 0, 0), bases,
                         planes, 64)
    spec = C.BlockSpec(geo, bipolar, schedules.block_vector(o, 64, host), True, False, False,
                       False, 1)
    func = schedules.abc_block_func(spec, host)
    mod = tvm.compile(func, target=host).mod
    args = [tvm.runtime.tensor(np.zeros([int(d) for d in t.shape], str(t.dtype)))
            for t in C.abc_block(spec).args]
    ev = mod.time_evaluator(mod.entry_name or "main", tvm.cpu(), number=10, repeat=7)
    return min(ev(*args).results) * 1e3


def main() -> None:
    print("| form | planes | " + " | ".join(f"{c}→{o} {s}²" for c, o, s in LAYERS) + " | sum |")
    print("|---|---|" + "---|" * (len(LAYERS) + 1))
    for form, (planes, bipolar) in FORMS.items():
        ms = [time_block(c, o, s, planes, bipolar) for c, o, s in LAYERS]
        kind = "bipolar" if bipolar else "unipolar"
        print(f"| {form} | {planes} {kind} | " + " | ".join(f"{t:.2f}" for t in ms)
              + f" | **{sum(ms):.2f} ms** |")


if __name__ == "__main__":
    main()
