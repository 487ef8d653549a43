"""Load a compiled abc-tvm module (.so + manifest) and run it on this host, or on the board.

`load(path)` checks the manifest against its own digest (`manifest_sha256`) and the .so
against the sha256 in the manifest before TVM sees it, so a corrupt or changed file is
refused with a clear message instead of being dlopen'ed. The hashes detect accidents and
mismatched copies, not an attacker: anyone who can write the files can rewrite the hashes
too (docs/reliability.md, "Tampered artifacts").

Only the TVM runtime is needed here (no ONNX, no compiler), so the module also works on an
aarch64 board that has Python and the apache-tvm wheel.

Concurrency: one Relax VM is not safe for concurrent use, so a model keeps a pool of VMs
(created on demand, at most `workers`, default one per usable CPU). All VMs share the
executable and its weights; each holds only its own registers and scratch memory. TVM's
function calls release the GIL, so the pool runs calls truly in parallel. Measured on the
2-core AMD EPYC dev box with ABC-ResNet-20 (CIFAR, M=N=3, batch 1, x86), calls/s with 2
calling threads: one VM behind a lock 1077, a pool of 2 VMs 2161 (TVM_NUM_THREADS=1); with
TVM's default of 2 threads per call, 345 vs 669. The pool wins by 2x, so it is kept
(`benchmarks/serve_load.py` repeats the measurement into docs/benchmarks.md, "## Serving").
On this small model one thread per call is also 3x faster than TVM's default of all cores,
so when several threads call at once set TVM_NUM_THREADS to cores / workers (it is read
when a thread first runs a kernel): `abc-tvm serve` does that by default.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine

from abc_tvm import targets
from abc_tvm.errors import UserError

# Same value as abc_tvm.compiler.MANIFEST_SUFFIX; not imported from there because the
# compiler pulls in ONNX and the Relax frontend, which a board need not have.
MANIFEST_SUFFIX = ".json"

# The manifest's digest of its own other fields (manifest_digest); older manifests have none.
MANIFEST_DIGEST_KEY = "manifest_sha256"

# platform.machine() spellings of the architectures targets.arch_of names.
_MACHINE_ALIASES = {"amd64": "x86_64", "arm64": "aarch64", "armv7l": "armv7"}


@dataclass(frozen=True)
class TensorInfo:
    """Name, static shape and dtype of a model input or output, as in the manifest."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def as_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def usable_cpus() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's core count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own digest field: a change to
    any field (a shape, the target, the CPU features, the .so's sha256) changes it, so a
    manifest edited after compilation is caught even where the .so is intact; whitespace
    and key order do not count."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _tensor_infos(manifest: dict, key: str, mpath: Path) -> list[TensorInfo]:
    try:
        return [TensorInfo(str(t["name"]), tuple(int(d) for d in t["shape"]), str(t["dtype"]))
                for t in manifest[key]]
    except (KeyError, TypeError, ValueError):
        raise UserError(f"manifest {mpath} has no valid {key!r} list: recompile the model "
                        "with abc-tvm compile") from None


class CompiledModel:
    """A compiled model: metadata from its manifest, and `__call__(array) -> array`.

    Thread-safe: concurrent calls each take a VM from a pool of at most `workers` VMs and
    wait only when all of them are busy.
    """

    def __init__(self, path: Path, manifest: dict, workers: int | None = None) -> None:
        self.path = path
        self.name = path.name.removesuffix(".so")
        self.manifest = manifest
        mpath = Path(str(path) + MANIFEST_SUFFIX)
        self.inputs = _tensor_infos(manifest, "inputs", mpath)
        self.outputs = _tensor_infos(manifest, "outputs", mpath)
        try:
            self.target = str(manifest["target"]["name"])
        except (KeyError, TypeError):
            raise UserError(f"manifest {mpath} names no target: recompile the model") from None
        self.workers = usable_cpus() if workers is None else workers
        if not isinstance(self.workers, int) or self.workers < 1:
            raise UserError(f"workers must be a positive integer (got {workers!r})")
        self.device = self._device(path)
        try:
            self._lib = tvm.runtime.load_module(str(path))
        except Exception as e:
            raise UserError(f"cannot load {path}: {str(e).splitlines()[0]}") from None
        self._slots = threading.BoundedSemaphore(self.workers)
        self._idle_lock = threading.Lock()
        self._idle: list[VirtualMachine] = []
        self.vms_created = 0
        self._idle.append(self._new_vm())  # one now: a module that cannot start fails at load

    def _device(self, path: Path) -> tvm.runtime.Device:
        if self.target == "cuda":
            dev = tvm.cuda(0)
            if not dev.exist:
                raise UserError(f"{path} was compiled for CUDA but this machine has no CUDA GPU")
            return dev
        machine = platform.machine().lower()
        machine = _MACHINE_ALIASES.get(machine, machine)
        tvm_target = str(self.manifest["target"].get("tvm", ""))
        wanted = targets.arch_of(self.target, tvm_target)
        if wanted != machine:
            hint = ("run it on the board (see `abc-tvm compile --bundle`), or compile with "
                    "--target x86 to run it here" if machine == "x86_64"
                    else "compile it for this machine's target (e.g. --target arm)")
            raise UserError(f"{path} was compiled for {wanted} (--target {self.target}) and "
                            f"cannot run on this {machine} host: {hint}")
        check_cpu_features(self.manifest, path)
        return tvm.cpu(0)

    def _new_vm(self) -> VirtualMachine:
        try:
            vm = VirtualMachine(self._lib, self.device)
        except Exception as e:
            raise UserError(f"{self.path} is not an abc-tvm module (no Relax VM in it): "
                            f"{str(e).splitlines()[0]}") from None
        self.vms_created += 1
        return vm

    @property
    def batch_size(self) -> int:
        """The leading dimension every input was compiled for (1 when there is none)."""
        dims = {i.shape[0] if i.shape else 1 for i in self.inputs}
        return dims.pop() if len(dims) == 1 else 1

    def check(self, *arrays: np.ndarray, finite: bool = False) -> list[np.ndarray]:
        """The inputs as contiguous arrays, or a UserError naming the first one that is wrong.

        `finite` also refuses NaN and Inf: the binarisation maps NaN to bit 0 without a word.
        """
        if len(arrays) != len(self.inputs):
            raise UserError(f"model takes {len(self.inputs)} input(s), got {len(arrays)}")
        out = []
        for a, info in zip(arrays, self.inputs, strict=True):
            a = np.asarray(a)
            if a.shape != info.shape:
                raise UserError(f"input {info.name!r} must have shape {list(info.shape)}, "
                                f"got {list(a.shape)}")
            if a.dtype != np.dtype(info.dtype):
                raise UserError(f"input {info.name!r} must be {info.dtype}, got {a.dtype}")
            if finite and not np.isfinite(a).all():
                raise UserError(f"input {info.name!r} holds NaN or Inf, which the model's "
                                "binarisation cannot take")
            out.append(np.ascontiguousarray(a))
        return out

    def run(self, *arrays: np.ndarray, finite: bool = False) -> list[np.ndarray]:
        """All outputs, in manifest order, for one set of inputs."""
        args = [tvm.runtime.tensor(a, self.device) for a in self.check(*arrays, finite=finite)]
        with self._slots:
            with self._idle_lock:
                vm = self._idle.pop() if self._idle else self._new_vm()
            try:
                out = vm["main"](*args)
            finally:
                with self._idle_lock:
                    self._idle.append(vm)
        if isinstance(out, tvm.runtime.Tensor):
            return [out.numpy()]
        return [t.numpy() for t in out]

    def __call__(self, *arrays: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        """The output array (a tuple of them for a model with several outputs)."""
        outs = self.run(*arrays)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def __repr__(self) -> str:
        return (f"CompiledModel({self.name!r}, target={self.target}, inputs="
                f"{[i.as_dict() for i in self.inputs]}, workers={self.workers})")


def check_cpu_features(manifest: dict, path: str | os.PathLike) -> None:
    """Refuse, in one line, a .so whose instructions this CPU does not have (it would die
    with SIGILL and no message), naming the missing features and the target to rebuild for.
    Manifests from before abc-tvm recorded features are not checked."""
    from abc_tvm.hostcpu import host_cpu

    needed = (manifest.get("target") or {}).get("cpu_features") or []
    cpu = host_cpu()
    missing = sorted(set(needed) - cpu.flags)
    if not missing:
        return
    name = manifest["target"].get("name", "?")
    level = targets.x86_level(cpu.flags) if cpu.machine == "x86_64" else None
    rebuild = (f"--target {level} (or --target x86 on this machine)" if level
               else "--target x86 (or arm) on this machine")
    raise UserError(f"{Path(path).name} was compiled for --target {name} and needs CPU "
                    f"features this CPU ({cpu.model}) lacks: {', '.join(missing)}; "
                    f"recompile with {rebuild}")


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest beside a .so, checked against the file's sha256."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such module: {path}")
    mpath = Path(str(path) + MANIFEST_SUFFIX)
    if not mpath.is_file():
        raise UserError(f"{path} has no manifest {mpath.name} beside it: copy both files")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"manifest {mpath} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise UserError(f"manifest {mpath} is not a JSON object")
    digest = manifest.get(MANIFEST_DIGEST_KEY)
    if digest is not None and digest != manifest_digest(manifest):
        raise UserError(f"manifest {mpath.name} does not match its own {MANIFEST_DIGEST_KEY}: "
                        "it was edited or corrupted after compilation; recompile the model")
    if sha256(path) != manifest.get("sha256"):
        raise UserError(f"{path} does not match the sha256 in {mpath.name}: the file was "
                        "changed or corrupted after compilation; recompile it")
    return manifest


def load(path: str | os.PathLike, workers: int | None = None) -> CompiledModel:
    """Load a compiled .so after checking it against its manifest.

    `workers` bounds how many calls run at once (one VM each); default: usable CPUs.
    """
    return CompiledModel(Path(path), read_manifest(path), workers=workers)
