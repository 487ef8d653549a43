"""This machine's AND + popcount + add peak, measured by a TVM kernel over L1-resident words.

Why a kernel of our own: the "% of peak" figures of `abc-tvm bench` need a ceiling that was
measured on the same core, with the same compiler (TVM's LLVM) and the same instruction mix as
the ABC conv's hot loop (`schedules/cpu.py`): a 64-bit activation word broadcast, ANDed with a
vector of 8 weight words, VPOPCNTQ, VPADDQ into a register accumulator (on a CPU without
AVX-512 VPOPCNTDQ, LLVM's AVX2 fallback: the VPSHUFB nibble table and VPSADBW).

Shape of the kernel, per thread p (the outer loop is parallel, so T threads measure T cores):

    acc[r, t] += popcount(a[p, l, (r + i) % R] & b[p, l, t])   for i < reps, l < L

a (L x R words) and b (L x T words) are 17 KiB per thread, well inside a 48 KiB L1D; the
register tile is R x T/8 = 16 zmm accumulators, so loads (R broadcasts + T/8 vectors per
R*T/8 vector ops) never limit the ALU. The (r + i) term makes each repetition read other rows,
so no compiler can hoist the repeated work out of the loop.

Convention (the one `abc-tvm bench` uses for layers too): one **bit-op** is one bit pair
through AND + popcount + accumulate, i.e. one binary multiply-accumulate. A 64-bit word
operation is 64 bit-ops, a 512-bit VPOPCNTQ with its AND and ADD is 512.

Run alone: `python benchmarks/popcount_peak.py [--threads 1]` (sets TVM_NUM_THREADS itself).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import asdict, dataclass

ROWS = 4  # R: broadcast activation words per step (accumulator rows)
COLS = 32  # T: weight words per row = 4 zmm vectors of 8 uint64
WORDS = 64  # L: words along the reduction per repetition
VECTOR = 8  # uint64 lanes of a 512-bit register


@dataclass
class PeakResult:
    """The measured ceiling: bit-ops per second, total and per thread, and how it was got."""

    threads: int
    gbitops_per_s: float  # all threads together
    gbitops_per_s_per_core: float
    seconds_per_call: float
    bitops_per_call: int
    vpopcntq: bool  # the kernel's asm uses VPOPCNTQ (AVX-512 VPOPCNTDQ)
    popcount_insns: list[str]  # popcount mnemonics seen in the asm
    target: str

    def as_dict(self) -> dict:
        return asdict(self)


def peak_func(threads: int, reps: int):
    """The microbenchmark as a scheduled PrimFunc (a, b) -> out, parallel over `threads`."""
    import tvm
    from tvm import s_tir, te

    a = te.placeholder((threads, WORDS, ROWS), "uint64", name="a")
    b = te.placeholder((threads, WORDS, COLS), "uint64", name="b")
    i = te.reduce_axis((0, reps), name="i")
    l = te.reduce_axis((0, WORDS), name="l")

    def _body(p, r, t):
        word = a[p, l, (r + i) % ROWS] & b[p, l, t]
        return te.sum(tvm.tirx.popcount(word), axis=[i, l])

    out = te.compute((threads, ROWS, COLS), _body, name="acc")
    sch = s_tir.Schedule(te.create_prim_func([a, b, out]))
    blk = sch.get_sblock("acc")
    local = sch.cache_write(blk, 0, "local")
    p, r, t, ri, rl = sch.get_loops(blk)
    to, ti = sch.split(t, [None, VECTOR])
    sch.reorder(p, ri, rl, r, to, ti)
    sch.parallel(p)
    sch.reverse_compute_at(local, p)
    sch.vectorize(ti)
    sch.unroll(to)
    sch.unroll(r)
    sch.decompose_reduction(blk, ri)
    return sch.mod["main"].with_attr("global_symbol", "popcount_peak")


# Without AVX-512 VPOPCNTDQ, LLVM lowers a vector popcount to the nibble table (Mula's
# algorithm): VPSHUFB looks up two 4-bit counts per byte, VPSADBW sums the bytes per lane.
NIBBLE_TABLE = "vpshufb+vpsadbw"


def popcount_mnemonics(asm: str) -> list[str]:
    """How x86 asm text counts bits: popcount instructions (vpopcntq/vpopcntd/popcnt...),
    else the AVX2 nibble-table sequence (`NIBBLE_TABLE`), else nothing."""
    found = sorted(set(re.findall(r"\b(v?popcnt[a-z]*)\b", asm)))
    if not found and re.search(r"\bvpshufb\b", asm) and re.search(r"\bvpsadbw\b", asm):
        found = [NIBBLE_TABLE]
    return found


def measure_peak(threads: int = 1, reps: int = 1024, repeat: int = 7,
                 min_repeat_ms: int = 100, target=None) -> PeakResult:
    """Build and time the kernel on `threads` threads; the best of `repeat` runs is the peak.

    TVM's thread pool must already be sized (TVM_NUM_THREADS) to at least `threads`.
    """
    import numpy as np
    import tvm

    target = target or tvm.target.Target.from_device("cpu")
    lib = tvm.compile(tvm.IRModule({"popcount_peak": peak_func(threads, reps)}), target=target)
    asm = lib.mod.inspect_source("asm")
    insns = popcount_mnemonics(asm)
    rng = np.random.default_rng(0)
    dev = tvm.cpu()
    a = tvm.runtime.tensor(rng.integers(0, 2**63, (threads, WORDS, ROWS), dtype=np.uint64), dev)
    b = tvm.runtime.tensor(rng.integers(0, 2**63, (threads, WORDS, COLS), dtype=np.uint64), dev)
    out = tvm.runtime.tensor(np.zeros((threads, ROWS, COLS), np.uint64), dev)
    fn = lib["popcount_peak"]
    fn(a, b, out)
    if not np.array_equal(out.numpy(), _reference(a.numpy(), b.numpy(), reps)):
        raise RuntimeError("popcount peak kernel computed a wrong result")
    timer = lib.mod.time_evaluator("popcount_peak", dev, number=1, repeat=repeat,
                                   min_repeat_ms=min_repeat_ms)
    best = float(min(timer(a, b, out).results))
    bitops = threads * reps * WORDS * ROWS * COLS * 64
    total = bitops / best / 1e9
    return PeakResult(threads=threads, gbitops_per_s=total, gbitops_per_s_per_core=total / threads,
                      seconds_per_call=best, bitops_per_call=bitops,
                      vpopcntq="vpopcntq" in insns, popcount_insns=insns, target=str(target))


def _reference(a, b, reps: int):
    """NumPy result of the kernel: row r of repetition i reads a's row (r + i) % R."""
    import numpy as np

    from abc_tvm.reference import popcount

    pc = popcount(a[:, :, :, None] & b[:, :, None, :]).sum(axis=1).astype(np.uint64)  # [p, r', t]
    times = np.array([(reps - k + ROWS - 1) // ROWS for k in range(ROWS)], np.uint64)
    expect = np.zeros_like(pc)
    for r in range(ROWS):
        for k in range(ROWS):  # repetitions i with i % R == k read row (r + k) % R
            expect[:, r, :] += pc[:, (r + k) % ROWS, :] * times[k]
    return expect


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=1024)
    args = ap.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    res = measure_peak(args.threads, args.reps)
    print(json.dumps(res.as_dict(), indent=1))


if __name__ == "__main__":
    main()
