"""Named compile targets: what `--target x86|arm|rpi4|...|cuda` means, and the word size each
packs with.

ARM names are presets of one LLVM target: the triple fixes the instruction set (aarch64 or
32-bit armv7 NEON) and `mcpu` the board's core, so LLVM schedules instructions for that
pipeline. Every ARM preset needs a cross compiler to link the .so (it cannot run here).
"""

from __future__ import annotations

import os
import platform
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
    arch: str = "host"  # "aarch64" or "armv7" for ARM presets (what the .so runs on)

    @property
    def kind(self) -> str:
        return str(self.target.kind.name)


@dataclass(frozen=True)
class ArmPreset:
    """An ARM board or core: the LLVM target attributes and the toolchain it needs."""

    arch: str  # "aarch64" | "armv7"
    mcpu: str | None
    description: str
    cores: int = 4  # only MetaSchedule reads it (it sizes parallel loops when tuning)

    @property
    def triple(self) -> str:
        return "aarch64-linux-gnu" if self.arch == "aarch64" else "armv7a-linux-gnueabihf"

    @property
    def cross_compiler(self) -> str:
        return "aarch64-linux-gnu-g++" if self.arch == "aarch64" else "arm-linux-gnueabihf-g++"

    @property
    def apt_package(self) -> str:
        return "g++-aarch64-linux-gnu" if self.arch == "aarch64" else "g++-arm-linux-gnueabihf"

    def target(self) -> tvm.target.Target:
        attrs: dict = {"kind": "llvm", "mtriple": self.triple,
                       "mattr": ["+neon"] if self.arch == "aarch64" else ["+neon", "+vfp4"]}
        if self.mcpu:
            attrs["mcpu"] = self.mcpu
        attrs["num-cores"] = self.cores
        if self.arch == "armv7":
            attrs["mfloat-abi"] = "hard"
        return tvm.target.Target(attrs)


AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
AARCH64_CXX = "aarch64-linux-gnu-g++"
ARM_PRESETS: dict[str, ArmPreset] = {
    "arm": ArmPreset("aarch64", None, "any aarch64 (ARMv8-A) CPU with NEON"),
    "rpi4": ArmPreset("aarch64", "cortex-a72", "Raspberry Pi 4 (Cortex-A72), 64-bit OS"),
    "rpi5": ArmPreset("aarch64", "cortex-a76", "Raspberry Pi 5 (Cortex-A76), 64-bit OS"),
    "jetson-nano": ArmPreset("aarch64", "cortex-a57", "Jetson Nano / TX1 CPU (Cortex-A57)"),
    "jetson-orin": ArmPreset("aarch64", "cortex-a78ae", "Jetson Orin CPU (Cortex-A78AE)", 8),
    "armv7": ArmPreset("armv7", None, "32-bit ARMv7-A with NEON (e.g. a 32-bit Raspberry Pi OS)"),
}
NAMES = ("x86", *ARM_PRESETS, "cuda")


def host_target() -> tvm.target.Target:
    """The LLVM target of this machine, with its CPU model (so AVX-512 VPOPCNTDQ is used)
    and the cores this process may use (MetaSchedule needs `num-cores` to tune for it)."""
    host = tvm.target.Target.from_device("cpu")
    return tvm.target.Target({**host.export(), "num-cores": len(os.sched_getaffinity(0))})


def arch_of(name: str, tvm_target: str | None = None) -> str:
    """The CPU a target name's .so runs on: "aarch64", "armv7", "cuda" or this host's.

    `tvm_target` (the manifest's target string) settles names this version does not know.
    """
    if name in ARM_PRESETS:
        return ARM_PRESETS[name].arch
    if name == "cuda":
        return "cuda"
    text = tvm_target or ""
    if "aarch64" in text:
        return "aarch64"
    if "armv7" in text:
        return "armv7"
    return platform.machine()


def is_cross(name: str) -> bool:
    """Whether a .so compiled for this target name cannot run on this machine."""
    return name in ARM_PRESETS and ARM_PRESETS[name].arch != platform.machine()


def _resolve_arm(name: str) -> TargetSpec:
    preset = ARM_PRESETS[name]
    cxx = preset.cross_compiler
    if shutil.which(cxx) is None:
        how = (f"run `make setup` (installs Debian's {preset.apt_package}) or `apt-get install "
               f"{preset.apt_package}`" if preset.arch == "aarch64"
               else f"`apt-get install {preset.apt_package}` (Debian)")
        raise UserError(f"--target {name} needs the cross compiler {cxx}: {how}")
    return TargetSpec(name, preset.target(), 64, cross_compiler=cxx,
                      runs_on_host=not is_cross(name), arch=preset.arch)


def resolve(name: str, cuda_arch: str = "sm_80") -> TargetSpec:
    """Turn a user-facing target name into a TargetSpec, checking the toolchain it needs."""
    if name == "x86":
        return TargetSpec("x86", host_target(), 64, arch=platform.machine())
    if name in ARM_PRESETS:
        return _resolve_arm(name)
    if name == "cuda":
        if shutil.which("nvcc") is None:
            raise UserError("--target cuda needs nvcc on PATH (the CUDA toolkit); none was found")
        target = tvm.target.Target({"kind": "cuda", "arch": cuda_arch}, host=host_target())
        return TargetSpec("cuda", target, 32, arch="cuda")
    raise UserError(f"unknown target {name!r}: choose one of {', '.join(NAMES)}")
