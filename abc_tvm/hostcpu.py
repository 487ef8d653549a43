"""This machine's CPU, as Linux reports it (the one place that reads /proc/cpuinfo), and
the versions of the packages installed on it.

`abc-tvm --version` says from it whether binary kernels have a fast popcount here, and the
benchmarks record it beside their figures.
"""

from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class HostCPU:
    model: str
    flags: frozenset[str]  # /proc/cpuinfo's flags (x86) or Features (aarch64)
    machine: str  # platform.machine(): x86_64, aarch64, ...

    @property
    def popcount(self) -> str:
        """How a packed word's bits are counted here, in a phrase."""
        if self.machine in ("aarch64", "arm64"):
            return "NEON cnt (aarch64)"
        if "avx512_vpopcntdq" in self.flags:
            return "fast: AVX-512 VPOPCNTDQ"
        if "avx2" in self.flags:
            return ("AVX2 without VPOPCNTDQ: LLVM's VPSHUFB nibble-table popcount, about half "
                    "the AVX-512 rate")
        return "no AVX2: scalar POPCNT, slow"


def host_cpu(cpuinfo: str | Path | None = None) -> HostCPU:
    """The CPU model and feature flags (empty where /proc/cpuinfo is missing).

    `ABC_TVM_CPUINFO` names another file to read instead: tests use it to show a runtime a
    CPU without AVX2, which no machine here is.
    """
    if cpuinfo is None:
        cpuinfo = os.environ.get("ABC_TVM_CPUINFO", "/proc/cpuinfo")
    model, flags = platform.processor() or "unknown", frozenset()
    with contextlib.suppress(OSError):
        for line in Path(cpuinfo).read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model in ("unknown", "", platform.machine()):
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = frozenset(value.split())
    return HostCPU(model, flags, platform.machine())


def package_version(pkg: str, missing: str = "not installed") -> str:
    """The installed version of a distribution (what `--version` and the bench report)."""
    from importlib import metadata

    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return missing
