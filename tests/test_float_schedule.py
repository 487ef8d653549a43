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

from abc_tvm.schedules import _util as simd
from abc_tvm.schedules import cpu
from abc_tvm.schedules import float_default as fd

TARGETS = {
    "znver5": (tvm.target.Target({"kind": "llvm", "mcpu": "znver5"}), simd.AVX512),
    "znver3": (tvm.target.Target({"kind": "llvm", "mcpu": "znver3"}), simd.AVX2),
    "aarch64": (tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                                   "mattr": ["+neon"]}), simd.NEON_A64),
    "armv7": (tvm.target.Target({"kind": "llvm", "mtriple": "armv7a-linux-gnueabihf",
                                 "mattr": ["+neon"]}), simd.NEON_A32),
}


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_register_file_follows_the_target(name):
    target, expected = TARGETS[name]
    assert simd.simd_of(target) == expected
    with target:  # the target in scope, as the compile pipeline sets it
        assert simd.simd_of() == expected


@pytest.mark.parametrize(("isa", "tile"), [
    (simd.AVX512, (16, 2, 7)),  # the Zen 5 measurement: 2 x 7 zmm
    (simd.AVX2, (8, 2, 4)),  # the Zen 3 one: 2 x 4 ymm
    (simd.NEON_A64, (4, 2, 7)),
    (simd.NEON_A32, (4, 2, 4)),
])
def test_stem_tile_fits_the_registers(isa, tile):
    vec, r, px = fd._tile_shape(64, 112, isa)  # the stem: 64 channels, 112 output pixels
    assert (vec, r, px) == tile
    assert vec == isa.fp32_lanes and r * px + r + 1 <= isa.registers  # + weights, input


@pytest.mark.parametrize(("channels", "pixels"), [(1000, 1), (128, 28), (512, 7), (256, 14)])
def test_avx512_tiles_are_the_ones_measured_on_zen5(channels, pixels):
    """The register-file rule keeps the tiles the Zen 5 figures were measured with: the most
    accumulators within 14, ties to more vectors (the dense head at batch 1: 5 x 1)."""
    vec, r, px = fd._tile_shape(channels, pixels, simd.AVX512)
    expected = {(1000, 1): (8, 5, 1)}.get((channels, pixels), (16, 2, 7))
    assert (vec, r, px) == expected


def test_few_pixels_take_more_vectors_on_avx2():
    # 14 output pixels (a 1x1 projection at 14x14): 4 x 2 ymm 0.19-0.22 ms, 2 x 2 0.31 ms
    assert fd._tile_shape(256, 14, simd.AVX2) == (8, 4, 2)


def test_tile_divides_odd_shapes():
    # 1000 classes (dense head): not a multiple of 16 lanes; 7 pixels: prime
    vec, r, px = fd._tile_shape(1000, 7, simd.AVX512)
    assert 1000 % (vec * r) == 0 and 7 % px == 0 and r * px <= fd.accumulators(simd.AVX512)


def test_abc_conv_tile_follows_the_register_file():
    """The ABC conv's default pixels: N * pixels accumulators of 8-word vectors (2 ymm each
    on AVX2) within the budget of the target's registers."""
    from abc_tvm.schedules import _geometry

    geo = _geometry(1, 64, 56, 56, 64, 3, 1, 1, 3, 3, 64)  # ResNet-18 64->64, M = N = 3
    assert cpu.conv_candidates(geo, simd.AVX512)["pixels"][0] == 8
    assert cpu.conv_candidates(geo, simd.AVX2)["pixels"][0] == 4
    with TARGETS["znver3"][0]:
        assert cpu.default_conv_knobs(geo).pixels == 4


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


@pytest.mark.parametrize("isa", [simd.AVX512, simd.AVX2, simd.NEON_A64], ids=lambda i: i.name)
def test_tiled_stem_matches_numpy(isa):
    func = _stem(h=20, w=28, cin=3, cout=32, k=7, stride=2)
    sch = tvm.s_tir.Schedule(func)
    assert fd._tiled_reduction(sch, isa), "the conv was not register-tiled"
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


def test_float_only_model_runs_nhwc_and_matches_ort(tmp_path, ort_run, max_rel_err):
    """A model with no binary layer still gets the x86 float layout: BatchNorm folded into
    the conv, convs in NHWC with output-channel-blocked weights (what the tiled schedule is
    written for), and ORT's result."""
    from onnx import TensorProto, helper, numpy_helper

    from abc_tvm.blocks import front
    from abc_tvm.compiler import compile_model
    from abc_tvm.relay_passes.abc_rewrite import rewrite
    from abc_tvm.runtime import load

    rng = np.random.default_rng(0)
    c = 32
    inits = [numpy_helper.from_array(rng.normal(0, 0.2, (c, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.1, (c, c, 3, 3)).astype(np.float32), "w2")]
    for n, v in (("s", rng.uniform(0.5, 1.5, c)), ("b", rng.normal(0, 1, c)),
                 ("m", rng.normal(0, 1, c)), ("v", rng.uniform(0.5, 2, c))):
        inits.append(numpy_helper.from_array(v.astype(np.float32), n))
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["a", "s", "b", "m", "v"], ["n"]),
             helper.make_node("Relu", ["n"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("MaxPool", ["c"], ["y"], kernel_shape=[2, 2], strides=[2, 2])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     [2, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, c, 4, 4])],
                          inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    host = tvm.target.Target.from_device("cpu")
    mod, done, _ = rewrite(front(model).mod, host, 64)
    text = mod.script()
    # both convs NHWC with blocked weights (schedules.float_conv), the BatchNorm folded
    assert not done and text.count("float_conv_nhwc_b2") >= 2 and "batch_norm" not in text
    compile_model(model, "x86", tmp_path / "f.so", quiet=True)
    x = rng.normal(0, 1, (2, 3, 16, 16)).astype(np.float32)
    assert max_rel_err(load(tmp_path / "f.so", workers=1)(x), ort_run(model, x)) < 1e-5


@pytest.mark.parametrize(("stride", "residual"), [(1, True), (2, False)])
def test_chunked_conv_matches_ort(tmp_path, ort_run, max_rel_err, stride, residual):
    """Few output pixels, large weights: the input channels are chunked outside the rows
    (`float_default._chunked`), bias / residual / ReLU applied after the last chunk."""
    from onnx import TensorProto, helper, numpy_helper

    from abc_tvm.compiler import compile_model
    from abc_tvm.runtime import load
    from abc_tvm.schedules import float_conv

    c, o, hw = 128, 64, 8
    out = hw // stride
    rng = np.random.default_rng(3)
    host = tvm.target.Target.from_device("cpu")
    block = fd.conv_block(o, out, fd.simd_of(host))
    func = float_conv.conv_func((1, hw, hw, c), (o // block, 3, 3, c, block), (stride,) * 2,
                                (1, 1, 1, 1), (out, out))
    assert fd.default_knobs(tvm.s_tir.Schedule(func), fd.simd_of(host)).chunk == fd.CHUNK
    # the kernel alone, against NumPy: chunked (the chunk loop sits above the rows)
    stem = _stem(h=hw, w=hw, cin=c, cout=o, k=3, stride=stride)
    sch = tvm.s_tir.Schedule(stem)
    assert fd._tiled_reduction(sch, fd.simd_of(host))
    update = max(sch.get_child_blocks(sch.get_sblock("root")),
                 key=lambda blk: len(sch.get_loops(blk)))
    extents = [int(sch.get(lp).extent) for lp in sch.get_loops(update)]
    # [co blocks, chunks, rows, pixel tiles, ry, rx, chunk, pixels, vectors, lanes]
    assert extents[1:3] == [c // fd.CHUNK, out] and extents[6] == fd.CHUNK, extents
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"]}), target=host)
    xs = rng.standard_normal((1, hw, hw, c)).astype(np.float32)
    wt = rng.standard_normal((3, 3, c, o)).astype(np.float32)
    b = rng.standard_normal((1, 1, 1, o)).astype(np.float32)
    dev = tvm.cpu()
    y = tvm.runtime.tensor(np.zeros((1, out, out, o), np.float32), dev)
    lib["main"](*(tvm.runtime.tensor(a, dev) for a in (xs, wt, b)), y)
    np.testing.assert_allclose(y.numpy(), _numpy_stem(xs, wt, b, stride), rtol=1e-4, atol=1e-3)
    # and in a model, with the epilogue fused, against ONNX Runtime
    inits = [numpy_helper.from_array(rng.normal(0, 0.1, (o, c, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 1, o).astype(np.float32), "b")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["a"], pads=[1, 1, 1, 1],
                              strides=[stride, stride])]
    if residual:
        inputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, o, out, out]))
        nodes.append(helper.make_node("Add", ["a", "s"], ["a2"]))
    nodes.append(helper.make_node("Relu", ["a2" if residual else "a"], ["y"]))
    g = helper.make_graph(nodes, "g", inputs[:1], [helper.make_tensor_value_info(
        "y", TensorProto.FLOAT, [1, o, out, out])], inits)
    if residual:  # the residual is a constant input here: a second graph input is not needed
        g.initializer.append(numpy_helper.from_array(
            rng.normal(0, 1, (1, o, out, out)).astype(np.float32), "s"))
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    compile_model(model, "x86", tmp_path / "c.so", quiet=True)
    x = rng.normal(0, 1, (1, c, hw, hw)).astype(np.float32)
    assert max_rel_err(load(tmp_path / "c.so", workers=1)(x), ort_run(model, x)) < 1e-5


def test_elementwise_chain_is_one_pass_and_a_concat_stays_a_stage():
    """concat -> add -> relu: the add inlines into the relu (one pass over memory); the
    concat, which picks a source per element, stays a stage of its own."""
    a = te.placeholder((1, 4, 4, 16), "float32", name="a")
    b = te.placeholder((1, 4, 4, 16), "float32", name="b")
    c = te.placeholder((1, 1, 1, 32), "float32", name="c")
    cat = topi.concatenate([a, b], axis=3)
    y = topi.nn.relu(cat + c)
    func = te.create_prim_func([a, b, c, y])
    host = tvm.target.Target.from_device("cpu")
    scheduled = fd.schedule_func(func, host)
    sch = tvm.s_tir.Schedule(scheduled)
    names = [sch.get(blk).name_hint for blk in sch.get_child_blocks(sch.get_sblock("root"))]
    assert len(names) == 2 and "concat" in names[0], names
    lib = tvm.compile(tvm.IRModule({"main": scheduled}), target=host)
    rng = np.random.default_rng(0)
    shapes = [(1, 4, 4, 16), (1, 4, 4, 16), (1, 1, 1, 32)]
    xs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros((1, 4, 4, 32), np.float32), dev)
    lib["main"](*(tvm.runtime.tensor(v, dev) for v in xs), out)
    np.testing.assert_array_equal(out.numpy(), np.maximum(np.concatenate(xs[:2], 3) + xs[2], 0))
