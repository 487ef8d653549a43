"""The ARM cycle model's whole-process mode (`cycle_model.process_estimate`, used for peer
engines such as ncnn): on a tiny aarch64 C program whose loop is known, the counted
instructions per repetition and the simulated DRAM lines are what the program does. Counts,
not timings: nothing here asserts a speed. Skips when the cross compiler, qemu or llvm-mca
is missing (`make setup` installs them).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from abc_tvm import deploy
from abc_tvm.bench import cycle_model as cm

GCC = shutil.which("aarch64-linux-gnu-gcc")
pytestmark = pytest.mark.skipif(
    GCC is None or deploy.emulator() is None or shutil.which("llvm-mca-19") is None,
    reason="needs aarch64-linux-gnu-gcc, qemu-aarch64 and llvm-mca-19 (`make setup`)")

ITERS = 100_000  # per repetition: 3 instructions each (subs, fmla, b.ne)
BUF = 8 << 20  # streamed once per repetition, 64-byte stride: 8x the Pi 4's 1 MB L2

SRC = r"""
#include <stdlib.h>
#include <string.h>
static char buf[%(buf)d];
int main(int argc, char **argv)
{
    long loops = atol(argv[1]);
    int stream = strcmp(argv[2], "stream") == 0;
    unsigned sink = 0;  /* a register: the buffer's loads are the only accesses */
    for (long r = 0; r < loops; r++) {
        if (stream) {
            for (long i = 0; i < (long)sizeof buf; i += 64)
                sink += ((volatile char *)buf)[i];
        } else {
            long n = %(iters)d;
            __asm__ volatile("1: subs %%0, %%0, #1\n\tfmla v0.4s, v1.4s, v2.4s\n\tb.ne 1b"
                             : "+r"(n) : : "v0", "cc");
        }
    }
    return (int)(sink & 1);
}
"""


@pytest.fixture(scope="module")
def prog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("proc")
    (d / "loop.c").write_text(SRC % {"buf": BUF, "iters": ITERS})
    exe = d / "loop"
    subprocess.run([GCC, "-O2", "-static", "-o", str(exe), str(d / "loop.c")], check=True)
    return exe


def test_process_mode_counts_the_known_loop(prog: Path) -> None:
    est = cm.process_estimate(lambda n: [str(prog), str(n), "spin"], "rpi4", traffic=False)
    assert abs(est.instructions - 3 * ITERS) < 0.01 * 3 * ITERS, est.instructions
    # every block is costed (no 1-cycle-per-instruction 'outside'): the FMLA chain through
    # v0 is latency-bound, so the loop costs more than one cycle per iteration
    assert est.cycles > ITERS
    assert est.levels == []


def test_process_mode_simulates_dram_lines_of_a_stream(prog: Path) -> None:
    est = cm.process_estimate(lambda n: [str(prog), str(n), "stream"], "rpi4")
    lines = BUF // cm.LINE
    assert [lv.keys() for lv in est.levels] == [{"accesses", "misses", "writebacks"}] * 2
    l1, l2 = est.levels
    assert abs(l1["accesses"] - lines) < 0.01 * lines
    assert abs(l2["misses"] - lines) < 0.01 * lines  # 8 MB does not stay in a 1 MB L2
    assert abs(est.dram_bytes - BUF) < 0.02 * BUF
    assert est.memory_ms > 0


@pytest.mark.parametrize(("target", "part"), [("rpi4", "0xd08"), ("rpi5", "0xd0b")])
def test_peers_see_the_modelled_cores_cpuinfo(tmp_path: Path, target: str, part: str) -> None:
    """Under qemu-user the host's x86 /proc/cpuinfo would reach the peers (LiteRT's cpuinfo
    library dies on it); qemu's -L prefix serves the sysroot's copy of the modelled core."""
    from abc_tvm.bench import arm_peers

    src = tmp_path / "cat.c"
    src.write_text('#include <stdio.h>\nint main(int argc, char **argv) { FILE *f = '
                   'fopen(argv[1], "r"); int c; while ((c = fgetc(f)) != EOF) putchar(c); '
                   'return 0; }\n')
    exe = tmp_path / "cat"
    subprocess.run([GCC, "-O1", "-static", "-o", str(exe), str(src)], check=True)
    sysroot = tmp_path / "sysroot"
    arm_peers.write_cpuinfo(sysroot, target)

    def cat(path: str) -> str:
        return subprocess.run([*arm_peers.qemu_for(sysroot), str(exe), path],
                              capture_output=True, text=True, check=True).stdout

    out = cat("/proc/cpuinfo")
    assert f"CPU part\t: {part}" in out and "Features\t: fp asimd" in out, out
    assert "GenuineIntel" not in out and "AuthenticAMD" not in out
    assert cat("/sys/devices/system/cpu/possible") == "0\n"  # one core, as described
