"""What this host's CPU has, read from /proc/cpuinfo: independent of TVM's and LLVM's view,
so the tests can check that the compiler used an instruction the CPU offers."""

from __future__ import annotations

from pathlib import Path


def cpu_flags() -> set[str]:
    """The kernel's CPU flags ("avx2", "avx512_vpopcntdq", ...); empty where unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):  # x86, aarch64
            return set(line.split(":", 1)[1].split())
    return set()
