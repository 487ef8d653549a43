"""AVX2 popcount with byte counters: the measured case for the next AVX2 kernel.

Without AVX-512 VPOPCNTDQ, LLVM counts the bits of each 64-bit lane with the nibble table
(VPSHUFB) and then sums the 8 byte counts of every lane with VPSADBW, once per word: 9 vector
ops per 256 bits with the AND. A byte counter holds up to 255, and one word adds at most 8 to
each byte, so 31 words can be accumulated in bytes (VPADDB) before a single VPSADBW: 8 ops.

Both kernels below do the same AND + popcount + accumulate over L1-resident words with the same
register tile (`rows` broadcast activation words x `cols` weight words); `plain` is what the ABC
kernels emit today, `bytes_` the deferred one. Run: `python benchmarks/popcount_bytes.py`.
On the Zen 3 box (1 thread, six runs): bytes 1.09-1.25x plain (e.g. 2 x 8 words: 304 vs 358
Gbit-ops/s; 4 x 8: 297 vs 350). Not yet used by the ABC kernels (`schedules/cpu.py`).
"""

from __future__ import annotations

import argparse

MAX_CHUNK = 31  # words per byte-counter round: 31 * 8 = 248 <= 255


def kernels(rows: int, cols: int, words: int, reps: int, chunk: int = MAX_CHUNK):
    """(plain, bytes_) PrimFuncs: (a u64[reps, words, rows], b u64[words, cols]) -> u64[rows, cols],
    out[r, t] = sum over reps, words of popcount(a[., l, r] & b[l, t])."""
    from tvm.script import tirx as T

    if not 1 <= chunk <= MAX_CHUNK:
        raise ValueError(f"chunk must be 1..{MAX_CHUNK} words (a byte counter holds 255)")
    if cols % 4 or words % chunk:
        raise ValueError("cols must be a multiple of 4 (one ymm), words of chunk")
    vecs = cols // 4
    rounds = words // chunk
    psadbw = "llvm.x86.avx2.psad.bw"

    @T.prim_func(s_tir=True)
    def plain(a: T.Buffer((reps, words, rows), "uint64"), b: T.Buffer((words, cols), "uint64"),
              out: T.Buffer((rows, cols), "uint64")):
        T.func_attr({"global_symbol": "plain", "tirx.noalias": True})
        acc = T.alloc_buffer((rows * cols,), "uint64", scope="local")
        for i in T.unroll(rows * vecs):
            acc[T.ramp(i * 4, 1, 4)] = T.broadcast(T.uint64(0), 4)
        for rep, l in T.grid(reps, words):
            for r in T.unroll(rows):
                for v in T.unroll(vecs):
                    acc[T.ramp((r * vecs + v) * 4, 1, 4)] = (
                        acc[T.ramp((r * vecs + v) * 4, 1, 4)]
                        + T.popcount(T.broadcast(a[rep, l, r], 4) & b[l, T.ramp(v * 4, 1, 4)]))
        for r, v in T.grid(rows, vecs):
            out[r, T.ramp(v * 4, 1, 4)] = acc[T.ramp((r * vecs + v) * 4, 1, 4)]

    @T.prim_func(s_tir=True)
    def bytes_(a: T.Buffer((reps, words, rows), "uint64"), b: T.Buffer((words, cols), "uint64"),
               out: T.Buffer((rows, cols), "uint64")):
        T.func_attr({"global_symbol": "bytes_", "tirx.noalias": True})
        acc = T.alloc_buffer((rows * cols,), "uint64", scope="local")
        acc8 = T.alloc_buffer((rows * vecs * 32,), "uint8", scope="local")
        for i in T.unroll(rows * vecs):
            acc[T.ramp(i * 4, 1, 4)] = T.broadcast(T.uint64(0), 4)
        for rep, c in T.grid(reps, rounds):
            for i in T.unroll(rows * vecs):
                acc8[T.ramp(i * 32, 1, 32)] = T.broadcast(T.uint8(0), 32)
            for l in range(chunk):
                for r in T.unroll(rows):
                    for v in T.unroll(vecs):
                        word = T.broadcast(a[rep, c * chunk + l, r], 4) & \
                            b[c * chunk + l, T.ramp(v * 4, 1, 4)]
                        acc8[T.ramp((r * vecs + v) * 32, 1, 32)] = (
                            acc8[T.ramp((r * vecs + v) * 32, 1, 32)]
                            + T.popcount(T.reinterpret(word, dtype="uint8x32")))
            for i in T.unroll(rows * vecs):
                acc[T.ramp(i * 4, 1, 4)] = acc[T.ramp(i * 4, 1, 4)] + T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(psadbw), acc8[T.ramp(i * 32, 1, 32)],
                    T.broadcast(T.uint8(0), 32), dtype="uint64x4")
        for r, v in T.grid(rows, vecs):
            out[r, T.ramp(v * 4, 1, 4)] = acc[T.ramp((r * vecs + v) * 4, 1, 4)]

    return plain, bytes_


def reference(a, b):
    """NumPy: out[r, t] = sum over reps, words of popcount(a[., l, r] & b[l, t])."""
    import numpy as np

    from abc_tvm.reference import popcount

    return popcount(a[:, :, :, None] & b[None, :, None, :]).sum(axis=(0, 1)).astype(np.uint64)


def measure(rows: int = 2, cols: int = 8, words: int = 62, reps: int = 512) -> dict[str, float]:
    """Gbit-ops/s of both kernels on this CPU (1 thread, best of 9), each checked first."""
    import numpy as np
    import tvm

    target = tvm.target.Target.from_device("cpu")
    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**63, (reps, words, rows), dtype=np.uint64)
    b = rng.integers(0, 2**63, (words, cols), dtype=np.uint64)
    expect = reference(a, b)
    out = {}
    for func in kernels(rows, cols, words, reps):
        lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
        args = [tvm.runtime.tensor(x, dev) for x in (a, b, np.zeros((rows, cols), np.uint64))]
        lib["main"](*args)
        if not np.array_equal(args[2].numpy(), expect):
            raise RuntimeError(f"{func.attrs['global_symbol']} computed a wrong result")
        t = min(lib.mod.time_evaluator("main", dev, number=3, repeat=9)(*args).results)
        out[str(func.attrs["global_symbol"])] = reps * words * rows * cols * 64 / t / 1e9
    return out


def main() -> None:
    import os

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--cols", type=int, default=8)
    args = ap.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    res = measure(args.rows, args.cols)
    print(f"{args.rows} x {args.cols} words, 1 thread: plain {res['plain']:.0f} Gbit-ops/s, "
          f"bytes {res['bytes_']:.0f} ({res['bytes_'] / res['plain']:.2f}x)")


if __name__ == "__main__":
    main()
