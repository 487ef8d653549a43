"""Load a compiled abc-tvm module (.so + manifest) and run it on this host."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from abc_tvm.compiler import MANIFEST_SUFFIX, sha256
from abc_tvm.errors import UserError
from abc_tvm.frontend import TensorInfo


class CompiledModel:
    """A compiled model: metadata from its manifest and `__call__(array) -> array`.

    Calls are serialised by a lock: one Relax VM is not safe for concurrent use.
    """

    def __init__(self, path: Path, manifest: dict) -> None:
        self.path = path
        self.manifest = manifest
        self.inputs = [TensorInfo(t["name"], tuple(t["shape"]), t["dtype"])
                       for t in manifest["inputs"]]
        self.outputs = [TensorInfo(t["name"], tuple(t["shape"]), t["dtype"])
                        for t in manifest["outputs"]]
        kind = manifest["target"]["name"]
        self.device = tvm.cuda(0) if kind == "cuda" else tvm.cpu(0)
        if kind == "cuda" and not self.device.exist:
            raise UserError(f"{path} was compiled for CUDA but this machine has no CUDA GPU")
        if kind == "arm":
            raise UserError(f"{path} was compiled for aarch64 (--target arm); run it on the "
                            "board, or compile with --target x86 to run it here")
        try:
            lib = tvm.runtime.load_module(str(path))
        except Exception as e:
            raise UserError(f"cannot load {path}: {str(e).splitlines()[0]}") from None
        self._vm = relax.VirtualMachine(lib, self.device)
        self._lock = threading.Lock()

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        if len(arrays) != len(self.inputs):
            raise UserError(f"model takes {len(self.inputs)} input(s), got {len(arrays)}")
        args = []
        for a, info in zip(arrays, self.inputs, strict=True):
            a = np.asarray(a)
            if a.shape != info.shape:
                raise UserError(f"input {info.name!r} must have shape {list(info.shape)}, "
                                f"got {list(a.shape)}")
            if a.dtype != np.dtype(info.dtype):
                raise UserError(f"input {info.name!r} must be {info.dtype}, got {a.dtype}")
            args.append(tvm.runtime.tensor(np.ascontiguousarray(a), self.device))
        with self._lock:
            out = self._vm["main"](*args)
        if isinstance(out, tvm.runtime.Tensor):
            return out.numpy()
        return out[0].numpy()


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
    except json.JSONDecodeError as e:
        raise UserError(f"manifest {mpath} is not valid JSON: {e}") from None
    if sha256(path) != manifest.get("sha256"):
        raise UserError(f"{path} does not match the sha256 in {mpath.name}: the file was "
                        "changed or corrupted after compilation; recompile it")
    return manifest


def load(path: str | os.PathLike) -> CompiledModel:
    """Load a compiled .so after checking it against its manifest."""
    return CompiledModel(Path(path), read_manifest(path))
