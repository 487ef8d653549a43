"""The default schedule of the float ops (`schedules/float_default.py`): its register tile
fits each target's register file, and every tile it picks computes what NumPy computes.

The stem of ABC-ResNet-18 (7x7 stride-2 conv of 3 channels, bias, ReLU) is the float op that
weighs most; a tile of more accumulators than the target has registers spills and ran 3x
slower on Zen 3. The tiles for other targets are built for this host too (LLVM splits a wide
vector into the host's registers), so each one is checked for correctness here.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import te, topi

from abc_tvm.schedules import float_default as fd

TARGETS = {
    "znver5": (tvm.target.Target({"kind": "llvm", "mcpu": "znver5"}), fd.AVX512),
    "znver3": (tvm.target.Target({"kind": "llvm", "mcpu": "znver3"}), fd.AVX2),
    "aarch64": (tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                                   "mattr": ["+neon"]}), fd.NEON_AARCH64),
    "armv7": (tvm.target.Target({"kind": "llvm", "mtriple": "armv7a-linux-gnueabihf",
                                 "mattr": ["+neon"]}), fd.NEON_ARMV7),
}


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_register_file_follows_the_target(name):
    target, expected = TARGETS[name]
    assert fd.register_file(target) == expected


@pytest.mark.parametrize(("regs", "tile"), [
    (fd.AVX512, (16, 2, 7)),  # the Zen 5 measurement: 2 x 7 zmm
    (fd.AVX2, (8, 2, 4)),  # the Zen 3 one: 2 x 4 ymm
    (fd.NEON_AARCH64, (4, 2, 7)),
])
def test_stem_tile_fits_the_registers(regs, tile):
    vec, r, px = fd._tile_shape(64, 112, regs)  # the stem: 64 channels, 112 output pixels
    assert (vec, r, px) == tile
    assert vec <= regs.lanes and r * px <= regs.accumulators


def test_tile_divides_odd_shapes():
    # 1000 classes (dense head): not a multiple of 16 lanes; 7 pixels: prime
    vec, r, px = fd._tile_shape(1000, 7, fd.AVX512)
    assert 1000 % (vec * r) == 0 and 7 % px == 0 and r * px <= fd.AVX512.accumulators


def _stem(h: int, w: int, cin: int, cout: int, k: int, stride: int):
    x = te.placeholder((1, h, w, cin), "float32", name="x")
    wt = te.placeholder((k, k, cin, cout), "float32", name="w")
    b = te.placeholder((1, 1, 1, cout), "float32", name="b")
    y = topi.nn.relu(topi.nn.conv2d_nhwc(x, wt, stride, k // 2, 1) + b)
    return te.create_prim_func([x, wt, b, y])


def _numpy_stem(x, wt, b, stride):
    k = wt.shape[0]
    p = k // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    oh = (x.shape[1] + 2 * p - k) // stride + 1
    ow = (x.shape[2] + 2 * p - k) // stride + 1
    out = np.zeros((1, oh, ow, wt.shape[3]), np.float64)
    for ky in range(k):
        for kx in range(k):
            patch = xp[:, ky:ky + stride * oh:stride, kx:kx + stride * ow:stride, :]
            out += patch.astype(np.float64) @ wt[ky, kx].astype(np.float64)
    return np.maximum(out + b, 0)


@pytest.mark.parametrize("regs", [fd.AVX512, fd.AVX2, fd.NEON_AARCH64],
                         ids=["avx512", "avx2", "neon"])
def test_tiled_stem_matches_numpy(regs):
    func = _stem(h=20, w=28, cin=3, cout=32, k=7, stride=2)
    sch = tvm.s_tir.Schedule(func)
    assert fd._tiled_reduction(sch, regs), "the conv was not register-tiled"
    host = tvm.target.Target.from_device("cpu")
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"]}), target=host)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 20, 28, 3)).astype(np.float32)
    wt = rng.standard_normal((7, 7, 3, 32)).astype(np.float32)
    b = rng.standard_normal((1, 1, 1, 32)).astype(np.float32)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros((1, 10, 14, 32), np.float32), dev)
    lib["main"](*(tvm.runtime.tensor(a, dev) for a in (x, wt, b)), out)
    np.testing.assert_allclose(out.numpy(), _numpy_stem(x, wt, b, 2), rtol=1e-5, atol=1e-4)


def test_default_pass_uses_the_target_in_scope():
    """The pass schedules under the target of the compile, not the host's register file."""
    func = _stem(h=16, w=16, cin=3, cout=64, k=7, stride=2)  # 8 output pixels
    scripts = {}
    for name in ("znver5", "znver3"):
        target, _ = TARGETS[name]
        with target:
            mod = fd.default_cpu_schedule(tvm.IRModule({"main": func}))
        scripts[name] = mod["main"].script()
    assert "T.vectorized(16)" in scripts["znver5"] and "T.vectorized(16)" not in scripts["znver3"]
    assert "T.vectorized(8)" in scripts["znver3"]
