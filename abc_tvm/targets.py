"""Named compile targets: what `--target x86|arm|rpi4|...|cuda` means, and the word size each
packs with.

ARM names are presets of one LLVM target: the triple fixes the instruction set (aarch64 or
32-bit armv7 NEON) and `mcpu` the board's core, so LLVM schedules instructions for that
pipeline. Every ARM preset needs a cross compiler to link the .so (it cannot run here).
"""

from __future__ import annotations

import difflib
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
X86_LEVELS = {
    "x86-64-v2": "SSE4.2 + POPCNT (any x86-64 CPU since about 2009)",
    "x86-64-v3": "AVX2 + FMA + BMI2 (Haswell, Zen 1 and later: current client and edge CPUs)",
    "x86-64-v4": "AVX-512 F/BW/CD/DQ/VL (Skylake-SP, Ice Lake, Zen 4 and later)",
}
NAMES = ("x86", *X86_LEVELS, "x86:MCPU", *ARM_PRESETS, "cuda")

# LLVM's name of an instruction-set feature -> Linux's (/proc/cpuinfo flags on x86, the
# Features line and AT_HWCAP on aarch64): what a .so compiled with it needs from its CPU.
# Tuning hints (fast-*, slow-*, fuse-*) and privileged features are not instructions a
# kernel of ours executes, and are left out.
_LINUX_NAMES = {
    "x86_64": {
        "sse3": "pni", "ssse3": "ssse3", "sse4.1": "sse4_1", "sse4.2": "sse4_2",
        "popcnt": "popcnt", "cx16": "cx16", "sahf": "lahf_lm", "avx": "avx", "avx2": "avx2",
        "fma": "fma", "bmi": "bmi1", "bmi2": "bmi2", "f16c": "f16c", "lzcnt": "abm",
        "movbe": "movbe", "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512cd": "avx512cd",
        "avx512dq": "avx512dq", "avx512vl": "avx512vl", "avx512vpopcntdq": "avx512_vpopcntdq",
        "avx512bitalg": "avx512_bitalg", "avx512vnni": "avx512_vnni",
        "avx512vbmi": "avx512vbmi", "avx512vbmi2": "avx512_vbmi2", "avx512ifma": "avx512ifma",
        "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16", "avxvnni": "avx_vnni",
        "gfni": "gfni", "vaes": "vaes", "vpclmulqdq": "vpclmulqdq", "pclmul": "pclmulqdq",
        "aes": "aes", "sha": "sha_ni", "adx": "adx",
    },
    "aarch64": {
        "fp-armv8": "fp", "neon": "asimd", "aes": "aes", "sha2": "sha2", "crc": "crc32",
        "lse": "atomics", "fullfp16": "asimdhp", "rdm": "asimdrdm", "rcpc": "lrcpc",
        "dotprod": "asimddp", "sve": "sve",
    },
}


def host_target() -> tvm.target.Target:
    """The LLVM target of this machine, with its CPU model (so AVX-512 VPOPCNTDQ is used)
    and the cores this process may use (MetaSchedule needs `num-cores` to tune for it)."""
    host = tvm.target.Target.from_device("cpu")
    return tvm.target.Target({**host.export(), "num-cores": len(os.sched_getaffinity(0))})


def arch_of(name: str, tvm_target: str | None = None) -> str:
    """The CPU a target name's .so runs on: "aarch64", "armv7", "cuda", "x86_64" or this
    host's.

    `tvm_target` (the manifest's target string) settles names this version does not know.
    """
    if name in ARM_PRESETS:
        return ARM_PRESETS[name].arch
    if name == "cuda":
        return "cuda"
    if name == "x86" or name in X86_LEVELS or name.startswith("x86:"):
        return "x86_64"
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


def cpu_features(target: tvm.target.Target) -> list[str]:
    """The CPU features (Linux's names) a .so built for an LLVM CPU target needs."""
    from tvm.target import codegen

    triple = str(target.attrs.get("mtriple", ""))
    arch = "aarch64" if triple.startswith("aarch64") else "x86_64" \
        if triple.startswith(("x86_64", "i686")) or not triple else None
    if arch is None:
        return []
    names = _LINUX_NAMES[arch]
    return sorted({names[str(f)] for f in codegen.llvm_get_cpu_features(target)
                   if str(f) in names})


def x86_target(mcpu: str) -> tvm.target.Target:
    """An x86 LLVM target for a CPU or psABI level other than (or equal to) this host's."""
    triple = str(tvm.target.Target.from_device("cpu").attrs.get("mtriple", "x86_64-linux-gnu"))
    if not triple.startswith("x86_64"):
        triple = "x86_64-linux-gnu"
    return tvm.target.Target({"kind": "llvm", "mtriple": triple, "mcpu": mcpu,
                              "num-cores": len(os.sched_getaffinity(0))})


def x86_level(flags: frozenset[str] | set[str]) -> str | None:
    """The highest x86-64 psABI level whose features a CPU with these flags has."""
    for level in reversed(X86_LEVELS):
        if set(cpu_features(x86_target(level))) <= set(flags):
            return level
    return None


def _resolve_x86(name: str) -> TargetSpec:
    """x86-64-v2/v3/v4, or x86:MCPU with MCPU one of LLVM's x86 CPU names."""
    from tvm.target import codegen

    from abc_tvm.hostcpu import host_cpu

    mcpu = name.removeprefix("x86:")
    if name.startswith("x86:"):
        triple = "x86_64-linux-gnu"
        if not mcpu or not codegen.llvm_is_valid_cpu(mcpu, triple):
            known = [str(c) for c in codegen.llvm_get_cpu_archlist(x86_target("x86-64"))]
            close = difflib.get_close_matches(mcpu, known, n=4, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else \
                "LLVM's x86 CPU names are e.g. znver3, icelake-server, alderlake, skylake"
            raise UserError(f"--target {name}: {mcpu!r} is not an x86 CPU LLVM knows: {hint}")
    target = x86_target(mcpu)
    runs = set(cpu_features(target)) <= host_cpu().flags and platform.machine() == "x86_64"
    return TargetSpec(name, target, 64, runs_on_host=runs, arch="x86_64")


def resolve(name: str, cuda_arch: str = "sm_80") -> TargetSpec:
    """Turn a user-facing target name into a TargetSpec, checking the toolchain it needs."""
    if name == "x86":
        return TargetSpec("x86", host_target(), 64, arch=platform.machine())
    if name in X86_LEVELS or name.startswith("x86:"):
        return _resolve_x86(name)
    if name in ARM_PRESETS:
        return _resolve_arm(name)
    if name == "cuda":
        if shutil.which("nvcc") is None:
            raise UserError("--target cuda needs nvcc on PATH (the CUDA toolkit); none was found")
        target = tvm.target.Target({"kind": "cuda", "arch": cuda_arch}, host=host_target())
        return TargetSpec("cuda", target, 32, arch="cuda")
    raise UserError(f"unknown target {name!r}: choose one of {', '.join(NAMES)}")
