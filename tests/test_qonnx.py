"""QONNX: each quantizer's lowering against QONNX's own executor, bit for bit; FINN's bnn_pynq
networks (every shipped configuration) and a network of our own compile to bit-serial
kernels and match Brevitas' PyTorch forward; unknown custom ops are one-line errors."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnx_builders as ob
import pytest
from onnx import TensorProto, helper, numpy_helper

from abc_tvm import deploy, finn_models
from abc_tvm.canonical import canonicalize
from abc_tvm.compiler import compile_model
from abc_tvm.errors import UserError
from abc_tvm.runtime import load

brevitas = pytest.importorskip("brevitas")
torch = pytest.importorskip("torch")
QONNX = "qonnx.custom_op.general"


def _single(op: str, inputs: dict[str, np.ndarray], attrs: dict, shape) -> onnx.ModelProto:
    """One QONNX node on input x (NCHW float32), its other operands initializers."""
    vi = helper.make_tensor_value_info
    names = ["x", *inputs]
    node = helper.make_node(op, names, ["y"], domain=QONNX, **attrs)
    g = helper.make_graph([node], "q", [vi("x", TensorProto.FLOAT, shape)],
                          [vi("y", TensorProto.FLOAT, shape)],
                          [numpy_helper.from_array(np.asarray(v, np.float32), k)
                           for k, v in inputs.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                               helper.make_opsetid(QONNX, 1)])


def _qonnx_exec(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    return execute_onnx(ModelWrapper(model), {"x": x})["y"]


QUANTS = [  # (bits, signed, narrow, rounding, scale shape, zero point)
    (1, 1, 0, "ROUND", (), 0.0), (2, 1, 1, "ROUND", (), 0.0), (2, 1, 0, "ROUND", (), 0.0),
    (2, 0, 0, "ROUND", (), 0.0), (3, 1, 1, "FLOOR", (), 0.0), (4, 0, 1, "CEIL", (), 1.0),
    (8, 1, 0, "HALF_UP", (), 0.0), (5, 1, 0, "HALF_DOWN", (), -2.0), (6, 1, 1, "UP", (), 0.0),
    (7, 0, 0, "DOWN", (), 3.0), (2, 1, 1, "HALF_EVEN", (1, 3, 1, 1), 0.0),
    (3, 0, 0, "ROUND", (1, 3, 1, 1), 0.0),
]


@pytest.mark.parametrize("bits,signed,narrow,mode,sshape,zp", QUANTS,
                         ids=lambda v: str(v).replace(" ", ""))
def test_quant_lowering_matches_qonnx_executor(bits, signed, narrow, mode, sshape, zp, ort_run):
    shape = [2, 3, 5, 7]
    scale = np.full(sshape, 0.25, np.float32) if sshape == () else \
        np.array([0.25, 0.5, 0.125], np.float32).reshape(sshape)
    m = _single("Quant", {"s": scale, "z": np.float32(zp), "b": np.float32(bits)},
                {"signed": signed, "narrow": narrow, "rounding_mode": mode}, shape)
    rng = np.random.default_rng(bits)
    ks = rng.integers(-2 ** bits, 2 ** bits, shape).astype(np.float32)
    x = np.where(rng.random(shape) < 0.5, (ks + np.float32(0.5)) * scale,
                 rng.uniform(-2.0 ** bits, 2.0 ** bits, shape) * scale).astype(np.float32)
    lowered, notes = canonicalize(m)
    assert {n.domain for n in lowered.graph.node} == {""}
    assert [o.domain for o in lowered.opset_import] == [""]
    assert [n.rule for n in notes] == ["lower_qonnx"]
    np.testing.assert_array_equal(ort_run(lowered, x), _qonnx_exec(m, x))


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_bipolar_quant_lowering_matches_qonnx_executor(scale, ort_run):
    m = _single("BipolarQuant", {"s": np.float32(scale)}, {}, [1, 2, 3, 4])
    x = np.random.default_rng(1).uniform(-1, 1, (1, 2, 3, 4)).astype(np.float32)
    x[0, 0, 0, :2] = [0.0, -0.0]  # QONNX: 0 maps to +1
    lowered, _ = canonicalize(m)
    np.testing.assert_array_equal(ort_run(lowered, x), _qonnx_exec(m, x))


@pytest.mark.parametrize("version", [1, 2])
def test_trunc_lowering_matches_qonnx_executor(version, ort_run):
    ins = {"s": np.float32(0.125), "z": np.float32(0.0), "ib": np.float32(8)}
    if version == 2:
        ins["os"] = np.float32(0.5)
    ins["ob"] = np.float32(4)
    attrs = {"rounding_mode": "FLOOR"} if version == 1 else \
        {"rounding_mode": "ROUND", "signed": 1, "narrow": 0}
    m = _single("Trunc", ins, attrs, [1, 2, 4, 4])
    m.opset_import[1].version = version
    x = (np.random.default_rng(2).integers(-128, 128, (1, 2, 4, 4)) * 0.125).astype(np.float32)
    lowered, _ = canonicalize(m)
    np.testing.assert_array_equal(ort_run(lowered, x), _qonnx_exec(m, x))


def test_unknown_custom_op_is_a_one_line_error(tmp_path):
    m = _single("MultiThreshold", {"t": np.zeros((3, 2), np.float32)}, {}, [1, 3, 2, 2])
    with pytest.raises(UserError, match="MultiThreshold of domain 'qonnx.custom_op.general'"):
        canonicalize(m)
    path = tmp_path / "mt.onnx"
    onnx.save(m, path)
    r = subprocess.run([sys.executable, "-m", "abc_tvm.cli", "compile", str(path), "-o",
                        str(tmp_path / "m.so")], capture_output=True, text=True)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "MultiThreshold" in r.stderr


# ----------------------------------------------------------------- bnn_pynq, end to end

BINARY = {"cnv": 8, "lfc": 4, "sfc": 4, "tfc": 4}  # every conv and FC but CNV's 8-bit first


def _compile_and_compare(model, x: torch.Tensor, path, tmp_path, dynamo: bool = True):
    finn_models.export(model, x, path, dynamo=dynamo)
    report = compile_model(path, "x86", tmp_path / "m.so", quiet=True, require_binary=True)
    with torch.no_grad():
        ref = model(x).numpy()
    got = load(tmp_path / "m.so", workers=1)(x.numpy())
    return report, got, ref


@pytest.mark.parametrize("config", finn_models.CONFIGS)
def test_bnn_pynq_compiles_bit_serial_and_matches_brevitas(config, tmp_path, max_rel_err):
    model = finn_models.build(config, seed=3)
    x = torch.rand(2, *finn_models.input_shape(config), generator=torch.Generator().manual_seed(4))
    report, got, ref = _compile_and_compare(model, x, tmp_path / f"{config}.onnx", tmp_path)
    assert (tmp_path / f"{config}.onnx.data").exists()  # weights as external data
    assert len(report.abc_layers) == BINARY[config[:3]]
    w_bits, a_bits = int(config[4]), int(config[6])
    for layer in report.abc_layers:
        assert "AND/popcount" in layer["kernel_impl"]
        assert layer["M"] == w_bits and layer["N"] == a_bits
        assert "lower_qonnx" in layer["rules"]
    floats = [f for f in report.float_ops if f["op"] in ("Conv", "Gemm", "MatMul")]
    if config.startswith("cnv"):  # the 8-bit input layer, with the reason
        assert len(floats) == 1 and "-128..127" in floats[0]["reason"]
        pooled = [a for a in report.abc_layers if "MaxPool runs on packed bits" in
                  a["kernel_impl"]]
        assert len(pooled) == 2  # both MaxPools: an OR of the producer's planes
        assert not any(f["op"] == "MaxPool" for f in report.float_ops)
    else:
        assert floats == []
    assert max_rel_err(got, ref) <= 1e-5  # integer sums: only the float glue rounds
    assert got.argmax(1).tolist() == ref.argmax(1).tolist()


def test_qonnx_executor_agrees_on_the_same_file(tmp_path):
    """qonnx's reference executor on Brevitas' file gives what the compiled model gives."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    model = finn_models.build("tfc_2w2a", seed=5)
    x = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(6))
    path = tmp_path / "tfc.onnx"
    report, got, _ = _compile_and_compare(model, x, path, tmp_path)
    w = ModelWrapper(str(path))
    ref = execute_onnx(w, {w.graph.input[0].name: x.numpy()})[w.graph.output[0].name]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_torchscript_qonnx_export_compiles_too(tmp_path, max_rel_err):
    model = finn_models.build("sfc_1w2a", seed=7)
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(8))
    report, got, ref = _compile_and_compare(model, x, tmp_path / "s.onnx", tmp_path, False)
    assert len(report.abc_layers) == 4
    assert max_rel_err(got, ref) <= 1e-5


def _binary_per_channel():
    """Brevitas' binary weight quantizer with one scale per output channel (max |W|; the
    mean would move: the quantizer clamps the weight in place): Brevitas ships only the
    per-tensor constant one."""
    from brevitas.inject.enum import ScalingImplType, StatsOp
    from brevitas.quant.binary import SignedBinaryWeightPerTensorConst

    class BinaryPerChannel(SignedBinaryWeightPerTensorConst):
        scaling_impl_type = ScalingImplType.STATS
        scaling_stats_op = StatsOp.MAX
        scaling_per_output_channel = True

    return BinaryPerChannel


class PerChannelNet(torch.nn.Module):
    """Our own: per-output-channel weight scales (binary, and 2-bit narrow), Brevitas'
    default signed 2-bit input quantizer (full range -2..1), an unsigned 2-bit ReLU quantizer
    (unipolar planes), a narrow signed one after a MaxPool, a conv bias, a QuantLinear."""

    def __init__(self) -> None:
        super().__init__()
        from brevitas import nn as qnn

        binary = _binary_per_channel()
        self.inp = qnn.QuantIdentity(bit_width=2, return_quant_tensor=False)
        self.c1 = qnn.QuantConv2d(3, 16, 3, padding=1, bias=False, weight_quant=binary)
        self.bn1 = torch.nn.BatchNorm2d(16)
        self.a1 = qnn.QuantReLU(bit_width=2)
        self.c2 = qnn.QuantConv2d(16, 32, 3, padding=1, bias=True, weight_bit_width=2,
                                  weight_scaling_per_output_channel=True)
        self.bn2 = torch.nn.BatchNorm2d(32)
        self.pool = torch.nn.MaxPool2d(2)
        self.a2 = qnn.QuantIdentity(bit_width=2, narrow_range=True)
        self.fc = qnn.QuantLinear(32 * 4 * 4, 10, bias=False, weight_quant=binary)

    def forward(self, x):
        x = self.a1(self.bn1(self.c1(self.inp(x))))
        x = self.a2(self.pool(self.bn2(self.c2(x))))
        return self.fc(x.flatten(1))


def test_own_network_with_per_channel_weight_scales(tmp_path, max_rel_err):
    torch.manual_seed(9)
    net = PerChannelNet()
    gen = torch.Generator().manual_seed(10)
    for bn in (net.bn1, net.bn2):
        c = bn.num_features
        bn.running_mean.data = torch.randn(c, generator=gen)
        bn.running_var.data = torch.rand(c, generator=gen) + 0.5
        bn.weight.data = torch.randn(c, generator=gen)
    net.eval()
    x = torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1
    report, got, ref = _compile_and_compare(net, x, tmp_path / "own.onnx", tmp_path)
    layers = {a["name"]: a for a in report.abc_layers}
    assert len(layers) == 3, report.float_ops
    assert {a["alpha"] for a in layers.values()} == {"channel"}
    assert {a["act"] for a in layers.values()} == {"unipolar", "bipolar"}
    assert max_rel_err(got, ref) <= 1e-4
    assert got.argmax(1).tolist() == ref.argmax(1).tolist()


@pytest.mark.parametrize("form", ["bipolar", "narrow2", "full2", "unsigned2"])
def test_quantized_conv_integer_output_bit_exact(form, tmp_path):
    """One QONNX conv with zero padding, unit scales: the output is integers, equal to
    NumPy's conv of the quantized values exactly (the full-range form's constant plane
    included: 0 in the padding)."""
    rng = np.random.default_rng(11)
    w = np.where(rng.random((8, 70, 3, 3)) < 0.5, -1.0, 1.0).astype(np.float32)
    x = rng.uniform(-3, 3, (2, 70, 6, 5)).astype(np.float32)
    x[0, :, 0, 0] = 0.0
    x[1, :, 1, 1] = np.float32(0.5)  # a rounding edge: half to even
    one = {"s": np.float32(1), "z": np.float32(0), "b": np.float32(2)}
    act = {"bipolar": ("BipolarQuant", {"s": np.float32(1)}, {}),
           "narrow2": ("Quant", one, {"signed": 1, "narrow": 1}),
           "full2": ("Quant", one, {"signed": 1, "narrow": 0}),
           "unsigned2": ("Quant", one, {"signed": 0, "narrow": 0})}[form]
    op, operands, attrs = act
    names = {k: f"a_{k}" for k in operands}
    vi = helper.make_tensor_value_info
    nodes = [helper.make_node(op, ["x", *names.values()], ["q"], domain=QONNX, **attrs),
             helper.make_node("BipolarQuant", ["w", "ws"], ["wq"], domain=QONNX),
             helper.make_node("Conv", ["q", "wq"], ["y"], pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array(v, names[k]) for k, v in operands.items()] + [
        numpy_helper.from_array(w * 0.3, "w"), numpy_helper.from_array(np.float32(1), "ws")]
    g = helper.make_graph(nodes, "q", [vi("x", TensorProto.FLOAT, list(x.shape))],
                          [vi("y", TensorProto.FLOAT, [2, 8, 6, 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                            helper.make_opsetid(QONNX, 1)])
    report = compile_model(m, "x86", tmp_path / "q.so", quiet=True)
    assert len(report.abc_layers) == 1
    q = {"bipolar": np.where(x >= 0, 1.0, -1.0), "narrow2": np.clip(np.round(x), -1, 1),
         "full2": np.clip(np.round(x), -2, 1), "unsigned2": np.clip(np.round(x), 0, 3)}[form]
    want = ob.conv2d(q, w, stride=(1, 1), pads=(1, 1, 1, 1))
    np.testing.assert_array_equal(load(tmp_path / "q.so", workers=1)(x), want)


needs_qemu = pytest.mark.skipif(
    shutil.which("aarch64-linux-gnu-g++") is None or deploy.emulator() is None,
    reason="qemu-aarch64 or g++-aarch64-linux-gnu missing: `make setup` installs them")


@needs_qemu
@pytest.mark.parametrize("config", finn_models.CONFIGS)
def test_bnn_pynq_on_aarch64_under_qemu(config, tmp_path, max_rel_err):
    model = finn_models.build(config, seed=12)
    x = torch.rand(1, *finn_models.input_shape(config), generator=torch.Generator().manual_seed(1))
    path = finn_models.export(model, x, tmp_path / f"{config}.onnx")
    report = compile_model(path, "arm", tmp_path / "m.so", quiet=True)
    assert len(report.abc_layers) == BINARY[config[:3]]
    deploy.make_bundle(tmp_path / "m.so", tmp_path / "bundle")
    with torch.no_grad():
        ref = model(x).numpy()
    got = deploy.run_bundle(tmp_path / "bundle", x.numpy())
    assert max_rel_err(got, ref) <= 1e-5
    assert got.argmax(1).tolist() == ref.argmax(1).tolist()


def test_zoo_writes_bnn_pynq_as_qonnx_and_says_when_brevitas_is_missing(tmp_path, monkeypatch,
                                                                         capsys):
    from abc_tvm.cli import main

    out = tmp_path / "tfc.onnx"
    assert main(["zoo", "finn_tfc_1w1a", "-o", str(out), "--batch", "2"]) == 0
    m = onnx.load(out)
    assert {n.op_type for n in m.graph.node if n.domain == QONNX} == {"BipolarQuant"}
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    monkeypatch.setitem(sys.modules, "brevitas_examples.bnn_pynq.models", None)
    assert main(["zoo", "finn_cnv_1w1a", "-o", str(tmp_path / "c.onnx")]) == 2
    assert "pip install 'abc-tvm[qonnx]'" in capsys.readouterr().err
