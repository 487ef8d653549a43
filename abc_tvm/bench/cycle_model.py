"""An ARM cycle model for a compiled bundle, without a board: a model, not a measurement.

    bundle under qemu-aarch64 (block_counts plugin: executions of every translated block)
      × llvm-mca (steady-state cycles of each block on the board's core model)
      + a memory term (a kernel's buffers at the board's DRAM bandwidth, where that is longer)
    = modelled cycles per kernel and per inference.

What it ignores: caches (llvm-mca assumes every load hits L1; the memory term counts each
buffer once, which under-counts re-reads of tensors larger than L2), branch mispredictions,
the cost of the first execution of a block (llvm-mca gives the loop's steady state), and code
outside the compiled model (TVM runtime, libc), which is costed at 1 cycle per instruction.
The peaks it reports percentages of come from the same core model (`peaks`), so a kernel at
100% issues its inner loop as fast as the model allows.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from abc_tvm.errors import UserError

PLUGIN_SRC = Path(__file__).resolve().parent.parent / "deploy" / "block_counts.c"
CACHE_PLUGIN_SRC = PLUGIN_SRC.with_name("cache_misses.c")
LINE = 64  # bytes per cache line in the cache simulation
MARKER = 0xD42B4B40  # brk #0x5a5a: separates the words handed to one llvm-mc call
MCA_ITERATIONS = 100


@dataclass(frozen=True)
class Core:
    """A board's CPU as the model sees it."""

    board: str
    core: str  # what the board has
    mca_cpu: str  # the llvm-mca scheduling model used for it
    mca: str  # the llvm-mca binary that has that model
    ghz: float
    dram_gbs: float  # sustained DRAM bandwidth assumed for the memory term
    note: str  # how faithful the model is, in one sentence
    # for whole processes (`process_estimate`): the CPU qemu reports, so that a peer's
    # runtime dispatch picks the board's code paths (fp16, dot product), and the data caches
    # (bytes, ways) the memory term's simulation uses
    qemu_cpu: str = "max"
    caches: tuple[tuple[int, int], ...] = ()


CORES = {
    "rpi4": Core("Raspberry Pi 4B", "Cortex-A72 @ 1.8 GHz", "cortex-a72", "llvm-mca-19", 1.8, 4.0,
                 "LLVM has no Cortex-A72 model: -mcpu=cortex-a72 uses its Cortex-A57 model, "
                 "which issues one 128-bit FMLA per cycle where the A72 issues two",
                 # BCM2711: 32 KB 2-way L1D per core, 1 MB 16-way L2 shared
                 "cortex-a72", ((32 << 10, 2), (1 << 20, 16))),
    "rpi5": Core("Raspberry Pi 5", "Cortex-A76 @ 2.4 GHz", "neoverse-n1", "llvm-mca-19", 2.4, 8.0,
                 "LLVM 19's Neoverse-N1 model (the N1 is the A76's server sibling) stands in "
                 "for the A76",
                 # BCM2712: 64 KB 4-way L1D, 512 KB 8-way L2 per core, 2 MB 16-way L3 shared
                 "cortex-a76", ((64 << 10, 4), (512 << 10, 8), (2 << 20, 16))),
}
CORES["arm"] = CORES["rpi4"]


def core_of(target: str) -> Core:
    if target not in CORES:
        raise UserError(f"the cycle model knows {', '.join(sorted(CORES))}, not {target!r}")
    return CORES[target]


def _tool(name: str, why: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise UserError(f"the cycle model needs {name} ({why}): make setup installs it "
                        "(Debian: apt-get install llvm-19 qemu-user)")
    return path


def plugin(source: Path = PLUGIN_SRC) -> Path:
    """The block_counts qemu plugin (or another plugin `source`), built once per source
    version with the host cc."""
    src = source.read_bytes()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "abc-tvm"
    so = cache / f"{source.stem}-{hashlib.sha256(src).hexdigest()[:12]}.so"
    if not so.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        cc = shutil.which("cc") or _tool("gcc", "to build the qemu plugin")
        tmp = so.with_suffix(".tmp")
        subprocess.run([cc, "-shared", "-fPIC", "-O2", "-fvisibility=hidden", "-o", str(tmp),
                        str(source)], check=True, capture_output=True)
        os.replace(tmp, so)
    return so


# -- counting -------------------------------------------------------------------------------

@dataclass
class Block:
    """One translated block: its code, executions per inference, and the blocks after it."""

    vaddr: int
    words: tuple[int, ...]
    count: float = 0.0
    succ: dict[int, float] = field(default_factory=dict)  # next block's vaddr -> times


def _read_counts(path: Path) -> dict[int, Block]:
    blocks: dict[int, Block] = {}
    for line in path.read_text().splitlines():
        f = line.split()
        va = int(f[0], 16)
        b = blocks.setdefault(va, Block(va, tuple(int(w, 16) for w in f[3:])))
        b.count += int(f[1])
        for item in f[2].split(",") if f[2] != "-" else []:
            s, n = item.split(":")
            b.succ[int(s, 16)] = b.succ.get(int(s, 16), 0) + int(n)
    return blocks


def block_counts(bundle: Path, x: np.ndarray, repeat: int = 2) -> dict[int, Block]:
    """Each block's executions (and successors) in one inference: runs with `--repeat 0`
    and `--repeat R` under qemu (1 thread), differenced, over R (loading and I/O cancel)."""
    from abc_tvm.deploy import emulator

    qemu = emulator()
    if not qemu:
        raise UserError("the cycle model runs the bundle under qemu-aarch64 on an x86 host "
                        "(apt-get install qemu-user)")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        xin = Path(tmp) / "in.npy"
        np.save(xin, np.ascontiguousarray(x))
        for r in (0, repeat):
            out = Path(tmp) / f"c{r}.txt"
            cmd = [*qemu, "-plugin", f"{plugin()},out={out}", str(bundle / "bin" / "abc-run"),
                   str(next(bundle.glob("*.so"))), str(xin), str(Path(tmp) / "y.npy"),
                   *(["--repeat", str(r)] if r else [])]
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env={**os.environ, "TVM_NUM_THREADS": "1"})
            if proc.returncode != 0 or not out.is_file():
                raise UserError(f"running {bundle} under qemu failed: {proc.stderr.strip()}")
            runs.append(_read_counts(out))
    return _difference(*runs, repeat)


def _difference(base: dict[int, Block], full: dict[int, Block], repeat: int
                ) -> dict[int, Block]:
    """Per-repetition counts of `full` over `base` (a run with `repeat` more repetitions)."""
    out = {}
    for va, b in full.items():
        b0 = base.get(va, Block(va, b.words))
        n = (b.count - b0.count) / repeat
        if n > 0:
            succ = {s: (k - b0.succ.get(s, 0)) / repeat for s, k in b.succ.items()}
            out[va] = Block(va, b.words, n, {s: k for s, k in succ.items() if k > 0})
    return out


# -- where each block lives -----------------------------------------------------------------

@dataclass
class Symbols:
    """The model .so's function symbols, and where qemu loaded it."""

    starts: list[int]
    names: list[str]
    text_end: int
    base: int | None = None

    def name(self, vaddr: int) -> str | None:
        if self.base is None:
            return None
        off = vaddr - self.base
        i = int(np.searchsorted(self.starts, off, side="right")) - 1
        # the nearest symbol before: LLVM's outlined loop bodies follow their kernel's
        # symbol without one of their own (its st_size covers only the entry)
        return self.names[i] if i >= 0 and off < self.text_end else None


def symbols(so: Path, blocks: dict[int, Block]) -> Symbols:
    """Function symbols of `so` (aarch64 nm) and its load address, found by locating the
    most executed blocks' bytes in the file (.text is mapped at its file offset)."""
    nm = _tool("aarch64-linux-gnu-nm", "to read the model's symbols")
    rows = []
    for line in subprocess.run([nm, "-S", "--defined-only", str(so)], capture_output=True,
                               text=True, check=True).stdout.splitlines():
        f = line.split()
        if len(f) == 4 and f[2] in "tTwW":
            rows.append((int(f[0], 16), int(f[1], 16), f[3].removeprefix("__tvm_ffi_")))
    rows.sort()
    sym = Symbols([r[0] for r in rows], [r[2] for r in rows],
                  max((r[0] + r[1] for r in rows), default=0))
    data = so.read_bytes()
    votes: dict[int, int] = defaultdict(int)
    for b in sorted(blocks.values(), key=lambda b: -b.count * len(b.words))[:40]:
        if len(b.words) < 4:
            continue
        raw = np.asarray(b.words, "<u4").tobytes()
        at = data.find(raw)
        if at >= 0 and data.find(raw, at + 1) < 0:
            votes[b.vaddr - at] += 1
    if votes:
        sym.base = max(votes, key=votes.get)
    return sym


# -- costing --------------------------------------------------------------------------------

def disassemble(words: set[int]) -> dict[int, str]:
    """Instruction text of each 32-bit word (llvm-mc, one call; unknown words are absent)."""
    mc = shutil.which("llvm-mc-19") or _tool("llvm-mc", "to disassemble the blocks")
    order = sorted(words)
    text = "\n".join(" ".join(f"0x{b:02x}" for b in np.asarray([w, MARKER], "<u4").tobytes())
                     for w in order)
    out = subprocess.run([mc, "--disassemble", "-triple=aarch64",
                          "-mattr=+neon,+dotprod,+fullfp16,+crc,+rcpc,+lse"],
                         input=text, capture_output=True, text=True).stdout
    insns = [ln.strip() for ln in out.splitlines() if ln.strip() and not ln.strip().startswith(".")]
    result: dict[int, str] = {}
    i = 0
    for w in order:  # each word is followed by its marker; a word llvm-mc refused has none
        if i < len(insns) and not insns[i].startswith("brk\t#0x5a5a"):
            result[w] = insns[i]
            i += 1
        if i < len(insns) and insns[i].startswith("brk\t#0x5a5a"):
            i += 1
    return result


_TOTAL = re.compile(r"^Total Cycles:\s+(\d+)", re.M)


def _mca(core: Core, regions: list[list[str]]) -> list[float] | None:
    mca = _tool(core.mca, f"LLVM's {core.mca_cpu} scheduling model")
    src = "".join(f"# LLVM-MCA-BEGIN r{i}\n" + "\n".join(r) + f"\n# LLVM-MCA-END r{i}\n"
                  for i, r in enumerate(regions))
    proc = subprocess.run([mca, "-mtriple=aarch64", f"-mcpu={core.mca_cpu}",
                           f"-iterations={MCA_ITERATIONS}", "-summary-view",
                           "-instruction-info=false", "-resource-pressure=false"],
                          input=src, capture_output=True, text=True)
    totals = [int(t) for t in _TOTAL.findall(proc.stdout)]
    return [t / MCA_ITERATIONS for t in totals] if proc.returncode == 0 \
        and len(totals) == len(regions) else None


def region_cycles(core: Core, blocks: list[tuple[int, ...]]) -> list[float]:
    """Steady-state cycles of each region (a list of words) on `core`; a region llvm-mca
    cannot cost (an instruction without a model) counts one cycle per instruction."""
    text = disassemble({w for b in blocks for w in b})
    regions = [[text.get(w, "nop") for w in b] for b in blocks]
    out: list[float] = [float(len(b)) for b in blocks]
    todo = [list(range(i, min(i + 400, len(blocks)))) for i in range(0, len(blocks), 400)]
    while todo:  # halve a chunk llvm-mca refuses until the refusing block is alone
        idx = todo.pop()
        got = _mca(core, [regions[i] for i in idx])
        if got is not None:
            for i, c in zip(idx, got, strict=True):
                out[i] = c
        elif len(idx) > 1:
            todo += [idx[: len(idx) // 2], idx[len(idx) // 2:]]
    return out


LOOP_SHARE = 0.8  # a successor taken this often continues the loop body
MAX_LOOP_BLOCKS = 16


def loops(blocks: dict[int, Block]) -> list[list[int]]:
    """Loop bodies that qemu split into several blocks (at a branch inside the body): cycles
    of each block's dominant successor. Costed alone, the piece of a body holding a chain's
    tail looks latency-bound; costed together, the body is what the core runs."""
    nxt = {}
    for b in blocks.values():
        if b.succ:
            s, k = max(b.succ.items(), key=lambda kv: kv[1])
            if k >= LOOP_SHARE * b.count and s in blocks:
                nxt[b.vaddr] = s
    found, seen = [], set()
    for start in nxt:
        if start in seen:
            continue
        path, v = [start], nxt[start]
        while v != start and v in nxt and v not in path and len(path) < MAX_LOOP_BLOCKS:
            path.append(v)
            v = nxt[v]
        if v == start and len(path) > 1:
            found.append(path)
            seen.update(path)
    return found


def block_cycles(core: Core, blocks: dict[int, Block]) -> dict[int, float]:
    """Cycles per execution of each block: a block of a split loop body gets the body's
    cycles in proportion to its instructions; any other block its own steady state."""
    bodies = loops(blocks)
    member = {v for body in bodies for v in body}
    alone = [v for v in blocks if v not in member]
    regions = [blocks[v].words for v in alone] + \
        [tuple(w for v in body for w in blocks[v].words) for body in bodies]
    cyc = region_cycles(core, regions)
    out = dict(zip(alone, cyc[: len(alone)], strict=True))
    for body, c in zip(bodies, cyc[len(alone):], strict=True):
        size = sum(len(blocks[v].words) for v in body)
        for v in body:
            out[v] = c * len(blocks[v].words) / size
    return out


def peaks(core: Core) -> dict[str, float]:
    """The core model's peaks: bit-MACs per cycle of 128-bit AND + CNT + UADALP (four
    independent chains), FMAs per cycle of 128-bit FMLA (eight independent chains)."""
    pop = [f"and v{i}.16b, v{16 + i}.16b, v24.16b\ncnt v{i}.16b, v{i}.16b\n"
           f"uadalp v{8 + i}.8h, v{i}.16b" for i in range(4)]
    fma = [f"fmla v{i}.4s, v{16 + i}.4s, v24.4s" for i in range(8)]
    got = _mca(core, ["\n".join(pop).split("\n"), fma])
    if got is None:
        raise UserError(f"{core.mca} cannot cost NEON code for {core.mca_cpu}")
    return {"bitmacs_per_cycle": 4 * 128 / got[0], "fmas_per_cycle": 8 * 4 / got[1]}


# -- per kernel -----------------------------------------------------------------------------

_ABC = re.compile(r"^abc_(?:block|conv|dot)_b(\d+)c(\d+)h(\d+)w(\d+)o(\d+)_k(\d+)x(\d+)s(\d+)x(\d+)"
                  r"p(\d+)_(\d+)_(\d+)_(\d+)_m(\d+)n(\d+)")


def kernel_work(name: str, buffers: list[dict]) -> tuple[str, int, int]:
    """(kind, work, bytes): kind "binary" (work in bit-MACs), "float-conv" / "dense"
    (work in MACs) or "other" (0); bytes = the kernel's buffers, each once."""
    nbytes = sum(int(np.prod(b["shape"])) * np.dtype(b["dtype"]).itemsize for b in buffers)
    if m := _ABC.match(name):
        b, c, h, w, o, kh, kw, sh, sw, pt, pl, pb, pr, M, N = (int(g) for g in m.groups())
        oh, ow = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
        return "binary", b * o * oh * ow * c * kh * kw * M * N, nbytes
    shapes = [b["shape"] for b in buffers]
    core = name.removeprefix("fused_")
    if core.startswith("conv2d") and len(shapes) >= 3 and len(shapes[0]) == 4 \
            and len(shapes[1]) == 4:
        y = shapes[-1]
        o, cg, kh, kw = shapes[1]
        return "float-conv", y[0] * y[1] * y[2] * y[3] * cg * kh * kw, nbytes
    if core.startswith("float_conv_nhwc") and len(shapes) >= 3:
        y, wt = shapes[-1], shapes[1]
        return "float-conv", int(np.prod(y)) * int(np.prod(wt)) // max(1, int(y[-1])), nbytes
    if core.startswith(("matmul", "dense")) and len(shapes) >= 3:
        x, y = shapes[0], shapes[-1]
        return "dense", int(np.prod(y)) * int(x[-1]), nbytes
    return "other", 0, nbytes


@dataclass
class KernelRow:
    name: str
    kind: str
    cycles: float  # compute, from the block costs
    work: int
    nbytes: int
    memory_cycles: float
    pct_peak: float | None = None
    calls: int = 1  # one name, several calls (ReActNet's five 512@14 blocks): work x calls

    @property
    def modelled(self) -> float:
        return max(self.cycles, self.memory_cycles)


@dataclass
class Estimate:
    core: Core
    peaks: dict[str, float]
    kernels: list[KernelRow]
    outside_cycles: float  # runtime, libc: 1 cycle per instruction
    instructions: float
    notes: list[str] = field(default_factory=list)

    @property
    def cycles(self) -> float:
        return sum(k.modelled for k in self.kernels) + self.outside_cycles

    @property
    def ms(self) -> float:
        return self.cycles / (self.core.ghz * 1e6)

    def by_kind(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for k in self.kernels:
            out[k.kind] += k.modelled
        out["outside the model (runtime, libc)"] += self.outside_cycles
        return dict(out)

    def as_dict(self) -> dict:
        return {"board": self.core.board, "core": self.core.core, "mca_cpu": self.core.mca_cpu,
                "ghz": self.core.ghz, "dram_gbs": self.core.dram_gbs, "peaks": self.peaks,
                "cycles": self.cycles, "ms": self.ms, "instructions": self.instructions,
                "outside_cycles": self.outside_cycles, "by_kind": self.by_kind(),
                "kernels": [{**k.__dict__, "modelled": k.modelled} for k in self.kernels]}


def _calls(sym: Symbols, counts: dict[int, Block]) -> dict[str, int]:
    """Calls per inference of each function: executions of the block at its entry."""
    if sym.base is None:
        return {}
    return {name: max(1, round(counts[sym.base + start].count))
            for start, name in zip(sym.starts, sym.names, strict=True)
            if sym.base + start in counts}


def estimate(bundle: str | os.PathLike, x: np.ndarray, target: str = "rpi4",
             repeat: int = 2) -> Estimate:
    """Model one inference of a bundle on the board `target` names."""
    core = core_of(target)
    bundle = Path(bundle)
    so = next(bundle.glob("*.so"))
    kernels = json.loads(Path(str(so) + ".json").read_text()).get("kernels", {})
    counts = block_counts(bundle, x, repeat)
    sym = symbols(so, counts)
    inside = {v: b for v, b in counts.items() if sym.name(v) is not None}
    costs = block_cycles(core, inside)
    per: dict[str, float] = defaultdict(float)
    for v, b in inside.items():
        name = sym.name(v)
        assert name is not None
        # parallel bodies are their own functions: `<kernel>_compute_`
        per[name.removesuffix("_compute_")] += b.count * costs[v]
    pk = peaks(core)
    hz = core.ghz * 1e9
    calls = _calls(sym, counts)
    rows = []
    for name, cyc in sorted(per.items(), key=lambda kv: -kv[1]):
        kind, work, nbytes = kernel_work(name, kernels.get(name, []))
        n = calls.get(name, 1)
        work, nbytes = work * n, nbytes * n
        mem = nbytes / (core.dram_gbs * 1e9) * hz
        rate = pk["bitmacs_per_cycle"] if kind == "binary" else pk["fmas_per_cycle"]
        pct = 100 * work / rate / cyc if work and cyc else None
        rows.append(KernelRow(name, kind if name in kernels or kind != "other" else "runtime",
                              cyc, work, nbytes, mem, pct, n))
    outside = sum(b.count * len(b.words) for v, b in counts.items() if v not in inside)
    insns = sum(b.count * len(b.words) for b in counts.values())
    notes = [] if sym.base is not None else ["the model .so was not found in qemu's blocks"]
    return Estimate(core, pk, rows, outside, insns, notes)


# -- a whole process (a peer engine) --------------------------------------------------------

@dataclass
class ProcessEstimate:
    """One repetition of a whole aarch64 process's loop: every executed block costed (there
    is no 'outside' here), and the DRAM traffic a simulation of the board's caches finds."""

    core: Core
    cycles: float  # compute: executions x llvm-mca cycles of every block
    instructions: float
    blocks: int
    levels: list[dict[str, float]]  # per cache level: accesses, misses, writebacks
    notes: list[str] = field(default_factory=list)

    @property
    def dram_bytes(self) -> float:
        """Lines the last level fetches or writes back, per repetition."""
        if not self.levels:
            return 0.0
        last = self.levels[-1]
        return (last["misses"] + last["writebacks"]) * LINE

    @property
    def memory_cycles(self) -> float:
        return self.dram_bytes / (self.core.dram_gbs * 1e9) * self.core.ghz * 1e9

    @property
    def ms(self) -> float:
        """The raw model: compute only, every load an L1 hit (as `estimate` costs kernels)."""
        return self.cycles / (self.core.ghz * 1e6)

    @property
    def memory_ms(self) -> float:
        return self.memory_cycles / (self.core.ghz * 1e6)

    def as_dict(self) -> dict:
        return {"board": self.core.board, "core": self.core.core, "mca_cpu": self.core.mca_cpu,
                "qemu_cpu": self.core.qemu_cpu, "ghz": self.core.ghz,
                "dram_gbs": self.core.dram_gbs, "cycles": self.cycles, "ms": self.ms,
                "instructions": self.instructions, "blocks": self.blocks,
                "levels": self.levels, "dram_bytes": self.dram_bytes,
                "memory_ms": self.memory_ms, "notes": self.notes}


def _run_plugin(qemu: list[str], so: Path, args: str, argv: list[str], env: dict[str, str],
                out: Path) -> None:
    proc = subprocess.run([*qemu, "-plugin", f"{so},out={out}{args}", *argv],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise UserError(f"running {' '.join(argv[:3])} under qemu failed: {' / '.join(tail)}")


def _process_env(env: dict[str, str] | None) -> dict[str, str]:
    # one thread, and a fixed hash seed so that the runs with 0 and R loops take the same
    # path through the interpreter up to the loops (their difference is the loops alone)
    return {**os.environ, "OMP_NUM_THREADS": "1", "TVM_NUM_THREADS": "1",
            "PYTHONHASHSEED": "0", **(env or {})}


def process_counts(argv_for: Callable[[int], list[str]], core: Core, qemu: list[str],
                   repeat: int = 2, env: dict[str, str] | None = None) -> dict[int, Block]:
    """Each block's executions in one repetition of a process's loop: `argv_for(n)` is the
    command that runs the loop n times; it runs with 0 and `repeat`, differenced, over
    `repeat`, so that start-up, loading and warm-up cancel."""
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in (0, repeat):
            out = Path(tmp) / f"c{r}.txt"
            _run_plugin([*qemu, "-cpu", core.qemu_cpu], plugin(), "", argv_for(r),
                        _process_env(env), out)
            runs.append(_read_counts(out))
    return _difference(*runs, repeat)


def process_traffic(argv_for: Callable[[int], list[str]], core: Core, qemu: list[str],
                    repeat: int = 2, env: dict[str, str] | None = None
                    ) -> list[dict[str, float]]:
    """Per cache level of `core`, accesses, misses and write-backs in one repetition (the
    `cache_misses` plugin, differenced like `process_counts`)."""
    if not core.caches:
        return []
    caches = "".join(f",l{i + 1}={size}:{ways}" for i, (size, ways) in enumerate(core.caches))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in (0, repeat):
            out = Path(tmp) / f"m{r}.txt"
            _run_plugin([*qemu, "-cpu", core.qemu_cpu], plugin(CACHE_PLUGIN_SRC), caches,
                        argv_for(r), _process_env(env), out)
            runs.append([[int(v) for v in ln.split()[1:]]
                         for ln in out.read_text().splitlines()])
    base, full = runs
    return [{k: (f - b) / repeat for k, f, b in zip(("accesses", "misses", "writebacks"), fl, bl,
                                                    strict=True)}
            for fl, bl in zip(full, base, strict=True)]


def process_estimate(argv_for: Callable[[int], list[str]], target: str = "rpi4",
                     qemu: list[str] | None = None, repeat: int = 2,
                     env: dict[str, str] | None = None, traffic: bool = True
                     ) -> ProcessEstimate:
    """Model one repetition of a whole aarch64 process's loop on the board `target` names:
    for a peer engine (ncnn, ONNX Runtime) all code is its own, so every executed block is
    costed with llvm-mca (the bundle `estimate` costs only the model .so's). `qemu` is the
    emulator command with its sysroot (`[qemu-aarch64, -L, root]`; default: the bundles')."""
    core = core_of(target)
    if qemu is None:
        from abc_tvm.deploy import emulator

        qemu = emulator()
    if not qemu:
        raise UserError("the cycle model runs aarch64 processes under qemu-aarch64 on an x86 "
                        "host (apt-get install qemu-user)")
    counts = process_counts(argv_for, core, qemu, repeat, env)
    costs = block_cycles(core, counts)
    cycles = sum(b.count * costs[v] for v, b in counts.items())
    insns = sum(b.count * len(b.words) for b in counts.values())
    levels = process_traffic(argv_for, core, qemu, repeat, env) if traffic else []
    return ProcessEstimate(core, cycles, insns, len(counts), levels)
