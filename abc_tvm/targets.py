"""Named compile targets: what `--target x86|arm|cuda` means, and the word size each packs with."""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import tvm

from abc_tvm.errors import UserError


@dataclass(frozen=True)
class TargetSpec:
    """A resolved target: the TVM target plus what the kernels and the linker need to know."""

    name: str
    target: tvm.target.Target
    word_bits: int  # packing word: 64 on CPUs (one popcnt per word), 32 on CUDA (__popc)
    cross_compiler: str | None = None  # g++ used to link the exported .so, None for the host
    runs_on_host: bool = True

    @property
    def kind(self) -> str:
        return str(self.target.kind.name)


AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
AARCH64_CXX = "aarch64-linux-gnu-g++"
NAMES = ("x86", "arm", "cuda")


def host_target() -> tvm.target.Target:
    """The LLVM target of this machine, with its CPU model (so AVX-512 VPOPCNTDQ is used)."""
    return tvm.target.Target.from_device("cpu")


def resolve(name: str, cuda_arch: str = "sm_80") -> TargetSpec:
    """Turn a user-facing target name into a TargetSpec, checking the toolchain it needs."""
    if name == "x86":
        return TargetSpec("x86", host_target(), 64)
    if name == "arm":
        if shutil.which(AARCH64_CXX) is None:
            raise UserError(
                f"--target arm needs the cross compiler {AARCH64_CXX}: "
                "run `make setup` (installs Debian's g++-aarch64-linux-gnu) or install it yourself"
            )
        return TargetSpec(
            "arm", tvm.target.Target(AARCH64), 64, cross_compiler=AARCH64_CXX, runs_on_host=False
        )
    if name == "cuda":
        if shutil.which("nvcc") is None:
            raise UserError("--target cuda needs nvcc on PATH (the CUDA toolkit); none was found")
        target = tvm.target.Target({"kind": "cuda", "arch": cuda_arch}, host=host_target())
        return TargetSpec("cuda", target, 32)
    raise UserError(f"unknown target {name!r}: choose one of {', '.join(NAMES)}")
