"""`abc_tvm.bench.float_ops`: abc-tvm's float kernel calls paired with ONNX Runtime's nodes of
the same op and shapes (synthetic names and profiler events: repeated shapes, ops without a
peer on either side, ORT convs that abc-tvm ran binary), and one real compiled model profiled
on both sides."""

from __future__ import annotations

import numpy as np
import pytest

from abc_tvm.bench import float_ops as fo
from abc_tvm.bench.tables import Tables, targets

STEM = "fused_float_conv_nhwc_b1h32w32c3o16k3x3s1x1p1_1_1_1_add_relu"
BLOCK = "abc_block_b1c16h32w32o16_k3x3s1x1p1_1_1_1_m1n2_biu64v8_alp1"
PROJ = "fused_float_conv_nhwc_b1h32w32c16o32k1x1s2x2p0_0_0_0_add1"


def _call(symbol: str, ms: float, *shapes: list[int]) -> dict:
    return {"symbol": symbol, "shapes": [list(s) for s in shapes], "ms": ms}


def _node(op: str, ms: float, inputs: list[list[int]], outputs: list[list[int]]) -> dict:
    return {"name": f"n{ms}", "op": op, "inputs": inputs, "outputs": outputs, "ms": ms}


CALLS = [
    _call("vm.builtin.alloc_tensor", 0.001),
    _call("transpose", 0.01, [1, 3, 32, 32], [1, 32, 32, 3]),
    _call(STEM, 0.20, [1, 32, 32, 3], [1, 3, 3, 3, 16], [1, 1, 1, 16], [1, 32, 32, 16]),
    _call("max_pool2d", 0.05, [1, 32, 32, 16], [1, 32, 32, 16]),
    _call("abc_bitpack_nhwc_b1h32w32c16n2u64", 0.01),
    _call(BLOCK, 0.03),
    _call(PROJ, 0.07, [1, 32, 32, 16], [2, 1, 1, 16, 16], [1, 1, 1, 32], [1, 16, 16, 32]),
    _call(PROJ, 0.09, [1, 32, 32, 16], [2, 1, 1, 16, 16], [1, 1, 1, 32], [1, 16, 16, 32]),
    _call("mean", 0.004, [1, 16, 16, 32], [1, 1, 1, 32]),
    _call("fused_transpose1_reshape", 0.002, [1, 1, 1, 32], [1, 32]),
    _call("fused_matmul_add9", 0.03, [1, 32], [32, 10], [10], [1, 10]),
    _call("fused_tanh", 0.001, [1, 10], [1, 10]),
]

NODES = [
    _node("Conv", 0.10, [[1, 3, 32, 32], [16, 3, 3, 3], [16]], [[1, 16, 32, 32]]),
    _node("MaxPool", 0.04, [[1, 16, 32, 32]], [[1, 16, 32, 32]]),
    _node("Clip", 0.002, [[1, 16, 32, 32], [], []], [[1, 16, 32, 32]]),
    _node("Clip", 0.003, [[1, 16, 32, 32], [], []], [[1, 16, 32, 32]]),
    _node("Conv", 0.30, [[1, 16, 32, 32], [16, 16, 3, 3]], [[1, 16, 32, 32]]),  # N = 2 planes
    _node("Conv", 0.31, [[1, 16, 32, 32], [16, 16, 3, 3]], [[1, 16, 32, 32]]),
    _node("FusedConv", 0.06, [[1, 16, 32, 32], [32, 16, 1, 1], [32]], [[1, 32, 16, 16]]),
    _node("Conv", 0.08, [[1, 16, 32, 32], [32, 16, 1, 1], [32]], [[1, 32, 16, 16]]),
    _node("GlobalAveragePool", 0.008, [[1, 32, 16, 16]], [[1, 32, 1, 1]]),
    _node("Flatten", 0.004, [[1, 32, 1, 1]], [[1, 32]]),
    _node("Gemm", 0.02, [[1, 32], [10, 32], [10]], [[1, 10]]),
]


def test_kernel_names_give_the_logical_conv_and_the_fused_ops():
    kind, op = fo.describe_call(STEM, [], 1.0)
    assert kind == "float" and op.label == "conv+add+relu"
    assert op.key == ("Conv", 1, 3, 32, 32, 16, 3, 3, 3, 32, 32)
    assert op.macs == 32 * 32 * 16 * 3 * 9 and op.shape == "3x32x32 -> 16x32x32 k3x3 s1"
    _, proj = fo.describe_call(PROJ, [], 1.0)
    assert proj.key[-2:] == (16, 16) and proj.shape.endswith("k1x1 s2")
    kind, blk = fo.describe_call(BLOCK, [], 1.0)
    assert kind == "binary" and blk.key == ("Conv", 1, 16, 32, 32, 16, 16, 3, 3, 32, 32)
    assert fo.describe_call("vm.builtin.null_value", [], 0.0) is None
    assert fo._relax_ops("fused_matmul_add9") == ["matmul", "add"]
    assert fo._relax_ops("max_pool2d") == ["max_pool2d"]
    assert fo._relax_ops("fused_conv2d1_add3_relu") == ["conv2d", "add", "relu"]
    # a Relax NCHW conv (a path other than float_conv_nhwc) is keyed from its shapes
    _, nchw = fo.describe_call("fused_conv2d_add", [[1, 16, 32, 32], [32, 16, 1, 1], [1, 32, 1, 1],
                                                    [1, 32, 16, 16]], 1.0)
    assert nchw.key == proj.key
    # a flatten fused in front of the FC, layout ops around a BatchNorm (QONNX MLPs)
    _, fc = fo.describe_call("fused_reshape_matmul_add", [[1, 32, 1, 1], [32, 10], [1, 10]], 1.0)
    assert fc.key == ("FC", 1, 32, 10) and fc.macs == 320
    _, bn = fo.describe_call("fused_transpose_reshape_batch_norm_reshape_transpose",
                             [[64, 1, 1, 64], [64], [64, 1, 1, 64]], 1.0)
    assert bn.key == fo.describe_node(_node("BatchNormalization", 1.0, [[64, 64], [64]],
                                            [[64, 64]])).key


def test_calls_pair_with_ort_nodes_by_key_in_order_and_leftovers_are_kept():
    m = fo.match(CALLS, NODES)
    got = [(o.label, None if t is None else t.ms) for o, t in m.pairs]
    assert got == [("transpose", None), ("conv+add+relu", 0.10), ("max_pool2d", 0.04),
                   ("conv+add", 0.06), ("conv+add", 0.08),  # same shape: in model order
                   ("mean", 0.008), ("transpose+reshape", 0.004), ("matmul+add", 0.02),
                   ("tanh", None)]
    # the binarizer's Clips are ORT's own; its two 3x3 convs (one per activation plane) are
    # the ops abc-tvm ran as its binary kernel
    assert [t.label for t in m.ort_only] == ["ORT Clip", "ORT Clip"]
    assert [t.ms for t in m.ort_binary] == [0.30, 0.31]


def test_table_rows_and_sums():
    prof = {"abc": CALLS, "ort": NODES, "runs": 5}
    rows = fo.rows(prof)
    assert all(len(r) == len(fo.HEAD) for r in rows)
    by = {r[0]: r for r in rows}
    stem = by["conv+add+relu"]
    assert stem[3:6] == ["0.200", "0.100", "2.00x"] and stem[2] == "0.4"
    assert by["transpose"][4] == "-" and by["transpose"][5] == "-"
    assert by["ORT Clip x2 (ORT only)"][4] == "0.005"
    assert by["ORT Clip x2 (ORT only)"][1] == "1x16x32x32 -> 1x16x32x32"
    matched = by["sum: matched (7)"]
    assert matched[3] == f"{0.2 + 0.05 + 0.07 + 0.09 + 0.004 + 0.002 + 0.03:.3f}"
    assert matched[4] == f"{0.1 + 0.04 + 0.06 + 0.08 + 0.008 + 0.004 + 0.02:.3f}"
    assert by["sum: abc-tvm only (2)"][3] == "0.011"
    assert by["sum: ORT only (2)"][4] == "0.005"
    assert by["sum: ORT nodes abc-tvm runs as binary kernels (2)"][4] == "0.610"
    hi = fo.worst(prof)
    assert hi is not None and hi[0] == pytest.approx(2.0) and hi[2] == 7
    assert hi[1].startswith("conv+add+relu 3x32x32")
    tabs = Tables()
    tabs.add("t", fo.HEAD, rows)
    assert "sum: matched (7)" in tabs.text()


def test_ort_profile_events_give_each_node_once_with_its_best_time():
    def ev(name: str, dur: int, cat: str = "Node") -> dict:
        return {"cat": cat, "name": name, "dur": dur,
                "args": {"op_name": "Conv", "input_type_shape": [{"float": [1, 3, 8, 8]},
                                                                 {"float": [4, 3, 3, 3]}],
                         "output_type_shape": [{"float": [1, 4, 8, 8]}]}}

    events = [ev("model_run", 900, "Session"), ev("a_kernel_time", 50), ev("a_fence_before", 1),
              ev("b_kernel_time", 30), ev("a_kernel_time", 40), ev("b_kernel_time", 35)]
    nodes = fo.ort_nodes(events)
    assert [(n["name"], n["ms"]) for n in nodes] == [("a", 0.040), ("b", 0.030)]
    assert nodes[0]["inputs"] == [[1, 3, 8, 8], [4, 3, 3, 3]]
    assert nodes[0]["outputs"] == [[1, 4, 8, 8]]


def test_targets_name_the_slowest_float_layer():
    results = {"meta": {"models": ["1x1"], "topi_tuned": []},
               "runs": {"1": {"float_ops": {"abc1x1": {"abc": CALLS, "ort": NODES, "runs": 5}}}}}
    (row,) = [r for r in targets(results) if "float layer" in r[0]]
    assert row[1].startswith("max 2.00x (conv+add+relu") and row[2] == "**not met**"


def _tiny_float_net(tmp_path):
    """Two convs (BatchNorm + ReLU, stride 2 without), a max pool, global pool and FC."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    c = 16
    arrays = {"w1": rng.normal(0, 0.2, (c, 3, 3, 3)), "w2": rng.normal(0, 0.1, (c, c, 3, 3)),
              "s": rng.uniform(0.5, 1.5, c), "b": rng.normal(0, 1, c), "m": rng.normal(0, 1, c),
              "v": rng.uniform(0.5, 2, c), "fw": rng.normal(0, 0.1, (10, c)),
              "fb": rng.normal(0, 0.1, 10), "shape": np.array([1, -1])}
    inits = [numpy_helper.from_array(a.astype(np.int64 if k == "shape" else np.float32), k)
             for k, a in arrays.items()]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["a", "s", "b", "m", "v"], ["n"]),
             helper.make_node("Relu", ["n"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("GlobalAveragePool", ["p"], ["g"]),
             helper.make_node("Reshape", ["g", "shape"], ["f"]),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     [1, 3, 32, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
                          inits)
    path = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    xpath = tmp_path / "x.npy"
    np.save(xpath, rng.normal(0, 1, (1, 3, 32, 32)).astype(np.float32))
    return path, xpath


def test_a_compiled_float_net_is_profiled_and_every_conv_pairs_with_ort(tmp_path, monkeypatch):
    from abc_tvm.compiler import compile_model

    onnx_path, xpath = _tiny_float_net(tmp_path)
    so = tmp_path / "tiny.so"
    compile_model(onnx_path, "x86", so, quiet=True)
    monkeypatch.setattr(fo, "MIN_S", 0.2)
    prof = fo.profile_pair(str(so), str(onnx_path), str(xpath), threads=1, repeat=3)
    assert prof["runs"] >= 3 and prof["ort"] and prof["abc"]
    m = fo.match(prof["abc"], prof["ort"])
    convs = [(o, t) for o, t in m.pairs if o.key and o.key[0] == "Conv"]
    assert [o.key[1:] for o, _ in convs] == [(1, 3, 32, 32, 16, 3, 3, 3, 32, 32),
                                             (1, 16, 32, 32, 16, 16, 3, 3, 16, 16)]
    for o, t in convs:
        assert t is not None and o.ms > 0 and t.ms > 0, (o, t)
    fc = [(o, t) for o, t in m.pairs if o.key and o.key[0] == "FC"]
    assert len(fc) == 1 and fc[0][1] is not None
    pool = [(o, t) for o, t in m.pairs if o.key and o.key[0] == "MaxPool"]
    assert len(pool) == 1 and pool[0][1] is not None
    assert not m.ort_binary
    assert any(r[0].startswith("sum: matched (") for r in fo.rows(prof))


def test_a_fused_elementwise_chain_is_paired_with_ort_whole_chain():
    """`concatenate+add+prelu+add` is ORT's Concat, Add, PRelu and Add of that output (in
    its execution order, a binarizer's Add of the same shape after them left alone)."""
    x, y = [1, 8, 8, 16], [1, 8, 8, 32]
    calls = [_call("fused_concatenate_add1_prelu_add1", 0.05, x, x, [1, 1, 1, 32], [32],
                   [1, 1, 1, 32], y)]
    nchw = [[1, 32, 8, 8]]
    nodes = [_node("Concat", 0.02, [[1, 16, 8, 8], [1, 16, 8, 8]], nchw),
             _node("Add", 0.03, nchw, nchw), _node("PRelu", 0.04, nchw, nchw),
             _node("Add", 0.05, nchw, nchw), _node("Add", 0.06, nchw, nchw)]
    m = fo.match(calls, nodes)
    ((ours, peer),) = m.pairs
    assert peer.label == "ORT Concat+Add+PRelu+Add"
    assert peer.ms == pytest.approx(0.02 + 0.03 + 0.04 + 0.05)
    assert [t.ms for t in m.ort_only] == [0.06]
