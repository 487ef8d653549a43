"""TVM's own TOPI `bitserial_conv2d_nhwc` as the binary peer of one ABC conv layer.

Why this peer: it is the bit-serial convolution TVM ships (compute only in 0.27; the x86 and
ARM schedules went with Relay), so the fair comparison is TOPI's compute built (a) with no
schedule at all (`tvm.compile` of the TE PrimFunc: LLVM's loops as written) and (b) scheduled
by MetaSchedule for the same number of trials the benchmark states.

Setup, matching an ABC layer with M weight bases and N activation planes:
- activations: NHWC int32 with N bits, packed inside the kernel by TOPI's `bitpack` (as
  abc-tvm's timed kernel packs its float input), `pack_dtype` uint64 (64-bit words, as
  abc-tvm on x86);
- weights: M bit-planes, packed ahead of time ([KH, KW, C/64, O, M] words), as abc-tvm packs
  its bases at compile time. TOPI's function only packs weights itself (its pre-packed 5-D
  branch reads the filter count from the wrong axis), so its `bitpack` is swapped for a
  placeholder on the weight call only; the conv compute is TOPI's, untouched;
- `unipolar=True`: TOPI's name for {0,1} activations against ±1 weights, the ABC product
  (two popcounts per word pair: a & w and a & ~w); out_dtype int32.
TOPI's bitpack asserts C divisible by the word size: layers where it is not are skipped.
"""

from __future__ import annotations

import json
import os
import unittest.mock
from dataclasses import dataclass
from pathlib import Path

WORD = {"uint64": 64, "uint32": 32}
BUILD_TIMEOUT_S = 300
RUN_TIMEOUT_S = 120


@dataclass(frozen=True)
class Layer:
    """One 3x3 (or k x k) ABC convolution: input NCHW (1, C, H, W) -> O channels."""

    channels: int
    out_channels: int
    height: int
    width: int
    stride: int
    padding: int = 1
    kernel: int = 3
    batch: int = 1

    @property
    def out_height(self) -> int:
        return (self.height + 2 * self.padding - self.kernel) // self.stride + 1

    @property
    def out_width(self) -> int:
        return (self.width + 2 * self.padding - self.kernel) // self.stride + 1

    def macs(self) -> int:
        """Multiply-accumulates of one binary (m, n) pair: B*OH*OW*O*C*KH*KW."""
        return (self.batch * self.out_height * self.out_width * self.out_channels
                * self.channels * self.kernel * self.kernel)

    def key(self) -> str:
        return (f"c{self.channels}o{self.out_channels}h{self.height}w{self.width}"
                f"k{self.kernel}s{self.stride}p{self.padding}b{self.batch}")

    def label(self) -> str:
        s = f" s{self.stride}" if self.stride != 1 else ""
        return f"{self.channels}->{self.out_channels} {self.height}x{self.width}{s}"


def supported(layer: Layer, pack_dtype: str = "uint64") -> bool:
    """TOPI's bitpack needs whole words of input channels."""
    return layer.channels % WORD[pack_dtype] == 0


def topi_func(layer: Layer, M: int, N: int, pack_dtype: str = "uint64"):  # noqa: N803
    """The unscheduled PrimFunc (data int32[B,H,W,C], wq uint[KH,KW,C/w,O,M]) -> int32 NHWC."""
    from tvm import te
    from tvm.topi.nn import bitserial_conv2d as bsc

    if not supported(layer, pack_dtype):
        raise ValueError(f"TOPI bitpack needs C % {WORD[pack_dtype]} == 0 (C={layer.channels})")
    k, c, o = layer.kernel, layer.channels, layer.out_channels
    data = te.placeholder((layer.batch, layer.height, layer.width, c), "int32", name="data")
    kernel = te.placeholder((k, k, c, o), "int32", name="kernel")
    packed_w = te.placeholder((k, k, c // WORD[pack_dtype], o, M), pack_dtype, name="kernel_q")
    topi_bitpack = bsc.bitpack

    def bitpack(x, bits, pack_axis, bit_axis, pack_type, name="QuantizeInput"):
        if x is kernel:
            return packed_w
        return topi_bitpack(x, bits, pack_axis, bit_axis, pack_type, name)

    with unittest.mock.patch.object(bsc, "bitpack", bitpack):
        out = bsc.bitserial_conv2d_nhwc(data, kernel, layer.stride, layer.padding, N, M,
                                        pack_dtype=pack_dtype, out_dtype="int32", unipolar=True)
    func = te.create_prim_func([data, packed_w, out])
    return func.with_attr("global_symbol", "main").with_attr("tirx.noalias", True)


def random_args(layer: Layer, M: int, N: int, pack_dtype: str = "uint64", seed: int = 0):  # noqa: N803
    """NumPy inputs and a zero output for `topi_func`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    k, w = layer.kernel, WORD[pack_dtype]
    data = rng.integers(0, 2**N, (layer.batch, layer.height, layer.width, layer.channels),
                        dtype=np.int32)
    wq = rng.integers(0, 2**w - 1, (k, k, layer.channels // w, layer.out_channels, M),
                      dtype=np.dtype(pack_dtype), endpoint=True)
    out = np.zeros((layer.batch, layer.out_height, layer.out_width, layer.out_channels), np.int32)
    return [data, wq, out]


def reference(layer: Layer, data, wq, pack_dtype: str = "uint64"):
    """NumPy result of `topi_func` on (data, wq): the independent check of every TOPI build.

    TOPI's unipolar form: activation bit-planes b1 of data (zero-padded) against ±1 weights
    (bit set: +1), each (b1, b2) pair weighted 2^(b1 + b2). Its bitpack puts channel j of a
    word in bit w-1-j (MSB first), so a weight word is read in that order.
    """
    import numpy as np

    w = WORD[pack_dtype]
    k, s, p = layer.kernel, layer.stride, layer.padding
    c = np.arange(layer.channels)
    shift = (w - 1 - c % w).astype(wq.dtype)[None, None, :, None, None]
    wpm = 2 * ((wq[:, :, c // w, :, :] >> shift) & 1).astype(np.int64) - 1  # [k,k,C,O,M]
    dpad = np.pad(data.astype(np.int64), ((0, 0), (p, p), (p, p), (0, 0)))
    oh, ow = layer.out_height, layer.out_width
    out = np.zeros((layer.batch, oh, ow, layer.out_channels), np.int64)
    for b1 in range(int(data.max()).bit_length()):
        plane = (dpad >> b1) & 1
        for b2 in range(wq.shape[-1]):
            for ky in range(k):
                for kx in range(k):
                    patch = plane[:, ky:ky + s * oh:s, kx:kx + s * ow:s, :]
                    out += (patch @ wpm[ky, kx, :, :, b2]) << (b1 + b2)
    return out.astype(np.int32)


def search_strategy(light: bool):
    """MetaSchedule's default evolutionary search, or a small one for smoke runs."""
    if not light:
        return "evolutionary"
    from tvm.s_tir import meta_schedule as ms

    return ms.search_strategy.EvolutionarySearch(population_size=32, init_min_unmeasured=8,
                                                 genetic_num_iters=1)


def tuning_target(target):
    """MetaSchedule needs `num-cores` on the target; the host target does not carry it."""
    import tvm

    if target.attrs.get("num-cores") is not None:
        return target
    cfg = dict(target.export())
    cfg["num-cores"] = os.cpu_count() or 1
    return tvm.target.Target(cfg)


def tune(layer: Layer, M: int, N: int, trials: int, work_dir: str | os.PathLike,  # noqa: N803
         target, pack_dtype: str = "uint64", light: bool = False) -> int:
    """Tune TOPI's layer with MetaSchedule until `work_dir` holds `trials` valid records.

    A rerun resumes: only the missing trials are measured. Returns the valid records held.
    """
    from tvm.s_tir import meta_schedule as ms

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    have = records(work_dir)
    if have >= trials:
        return have
    func = topi_func(layer, M, N, pack_dtype)
    # MetaSchedule's 30 s build timeout fails whole batches on a busy 2-core machine.
    ms.tune_tir(func, tuning_target(target), str(work_dir), max_trials_global=trials - have,
                num_trials_per_iter=min(64, trials - have), strategy=search_strategy(light),
                builder=ms.builder.LocalBuilder(timeout_sec=BUILD_TIMEOUT_S),
                runner=ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT_S),
                num_tuning_cores=os.cpu_count() or 1)
    (work_dir / "bench.json").write_text(json.dumps(
        {"layer": layer.key(), "M": M, "N": N, "pack_dtype": pack_dtype, "trials": trials}))
    return records(work_dir)


def _valid(run_secs) -> bool:
    """Whether a record's run times are real: a failed candidate is stored with 1e10 s."""
    return bool(run_secs) and all(float(t) < 1e9 for t in run_secs)


def records(work_dir: str | os.PathLike) -> int:
    """Valid (built and run) tuning records in a MetaSchedule JSON database directory.

    A candidate that failed to build or run is stored with a run time of 1e10 s; it does not
    count, so a rerun measures new candidates in its place (a loaded machine can time out
    builds).
    """
    path = Path(work_dir) / "database_tuning_record.json"
    if not path.is_file():
        return 0
    valid = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            run_secs = json.loads(line)[1][1]
        except (ValueError, IndexError, TypeError):
            continue
        if _valid(run_secs):
            valid += 1
    return valid


def build(layer: Layer, M: int, N: int, target, pack_dtype: str = "uint64"):  # noqa: N803
    """Compile TOPI's unscheduled layer (the tuned ones: `tuned_builds`)."""
    import tvm

    func = topi_func(layer, M, N, pack_dtype)
    return tvm.compile(tvm.IRModule({"main": func}), target=target).mod


TUNED_CANDIDATES = 5  # tuned records tried, fastest first, until one computes the right answer


def tuned_builds(layer: Layer, M: int, N: int, target, work_dir: str | os.PathLike,  # noqa: N803
                 k: int = TUNED_CANDIDATES, pack_dtype: str = "uint64"):
    """The runtime modules of the database's `k` fastest valid records, fastest first.

    Why more than one: TOPI bitserial builds were seen computing wrong answers on Zen 3 (the
    unscheduled one, and tuned records), so the benchmark times the fastest record whose
    output equals `reference`, not the fastest record.
    """
    import tvm
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    func = topi_func(layer, M, N, pack_dtype)
    db = ms.database.JSONDatabase(
        path_workload=str(Path(work_dir) / "database_workload.json"),
        path_tuning_record=str(Path(work_dir) / "database_tuning_record.json"))
    mod = tvm.IRModule({"main": func})
    if not db.has_workload(mod):
        return
    for record in db.get_top_k(db.commit_workload(mod), k):
        if not _valid(record.run_secs):
            continue
        sch = s_tir.Schedule(mod)
        record.trace.apply_to_schedule(sch, remove_postproc=False)
        yield tvm.compile(sch.mod, target=target).mod


def main() -> None:
    """Time one layer untuned: `python benchmarks/topi_bitserial.py 64 64 56 1 3 3`."""
    import sys

    import tvm

    c, o, h, s, m, n = (int(a) for a in sys.argv[1:7])
    layer = Layer(c, o, h, h, s)
    target = tvm.target.Target.from_device("cpu")
    mod = build(layer, m, n, target)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in random_args(layer, m, n)]
    res = mod.time_evaluator("main", dev, number=1, repeat=5, min_repeat_ms=50)(*args)
    print(f"TOPI bitserial_conv2d_nhwc {layer.label()} M={m} N={n} untuned: "
          f"{res.min * 1e3:.3f} ms (TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS', '-')})")


if __name__ == "__main__":
    main()
