"""The front door: BNNs as research code exports them compile to binary kernels and match
ONNX Runtime on the same file, on x86 and (reduced) on aarch64 under qemu.

Every network is exported with both torch exporters (TorchScript at batch 1, dynamo at
batch 2); the report must count every binary conv and FC as a binary kernel, and only the
float stems / shortcuts / classifiers may stay float convs.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnx_builders as ob
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from bnn_nets import NETS

from abc_tvm import deploy
from abc_tvm.bnn_models import bireal18, reactnet_a
from abc_tvm.compiler import compile_model
from abc_tvm.runtime import load

# name -> (constructor, input shape without batch, binary layers, float convs left)
MODELS = {
    "reactnet_a": (lambda: reactnet_a(num_classes=10, width=0.25, seed=1), (3, 32, 32), 31, 1),
    "bireal18": (lambda: bireal18(num_classes=10, width=0.25, seed=2), (3, 32, 32), 16, 4),
    "xnor_vgg": (NETS["xnor_vgg"][0], NETS["xnor_vgg"][1], 4, 1),
    "irnet_resnet20": (NETS["irnet_resnet20"][0], NETS["irnet_resnet20"][1], 18, 1),
    "dorefa_w1a2": (NETS["dorefa_w1a2"][0], NETS["dorefa_w1a2"][1], 3, 1),
    "binary_mlp": (NETS["binary_mlp"][0], NETS["binary_mlp"][1], 1, 0),
}
EXPORTS = {"torchscript": (False, 1, 17), "dynamo": (True, 2, 18)}


def export(name: str, exporter: str, path) -> tuple[str, np.ndarray]:
    make, shape, _, _ = MODELS[name]
    dynamo, batch, opset = EXPORTS[exporter]
    model = make()
    torch.onnx.export(model, (torch.rand(batch, *shape),), str(path), dynamo=dynamo,
                      opset_version=opset)
    x = np.random.default_rng(7).uniform(-1, 1, (batch, *shape)).astype(np.float32)
    return str(path), x


def _check(report, name: str) -> None:
    _, _, binary, float_convs = MODELS[name]
    assert len(report.abc_layers) == binary
    assert all("AND/popcount" in a["kernel_impl"] for a in report.abc_layers)
    left = [f for f in report.float_ops if f["op"] in ("Conv", "Gemm", "MatMul")
            and "binar" not in f["reason"]]
    assert left == [], left  # what stays float is float because its input is
    assert sum(f["op"] == "Conv" for f in report.float_ops) == float_convs


@pytest.mark.parametrize("exporter", list(EXPORTS))
@pytest.mark.parametrize("name", list(MODELS))
def test_research_export_compiles_binary_and_matches_ort(name, exporter, tmp_path, ort_run,
                                                         max_rel_err):
    path, x = export(name, exporter, tmp_path / f"{name}.onnx")
    so = tmp_path / "m.so"
    report = compile_model(path, "x86", so, quiet=True)
    _check(report, name)
    y, ref = load(so, workers=1)(x), ort_run(path, x)
    assert max_rel_err(y, ref) <= 1e-2
    assert y.argmax(1).tolist() == ref.argmax(1).tolist()


def test_report_names_the_sign_convention_and_rules(tmp_path):
    path, _ = export("bireal18", "torchscript", tmp_path / "b.onnx")
    report = compile_model(path, "x86", tmp_path / "b.so", quiet=True)
    layer = report.abc_layers[0]
    assert layer["act_form"] == "sign" and "sign(0) read as +1" in layer["binarizer"]
    assert "straight_through" in layer["rules"]
    assert layer["thresholds"] == [0.0]
    assert any(c["rule"] == "fold_constants" for c in report.canonical)


def test_sign_layer_integer_output_bit_exact(tmp_path):
    """conv(sign(x), sign(W)) with no scale: integers, equal to NumPy's exactly, sign(0) and
    tiny negatives at their exact side (x >= 0 is +1)."""
    rng = np.random.default_rng(5)
    w = np.where(rng.random((8, 70, 3, 3)) < 0.5, -1.0, 1.0).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Sign", ["x"], ["s"]),
         onnx.helper.make_node("Conv", ["s", "w"], ["y"], pads=[1, 1, 1, 1])],
        "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 70, 6, 5])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 8, 6, 5])],
        [onnx.numpy_helper.from_array(w, "w")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    report = compile_model(model, "x86", tmp_path / "s.so", quiet=True)
    assert len(report.abc_layers) == 1
    x = rng.uniform(-1, 1, (2, 70, 6, 5)).astype(np.float32)
    x[0, :, 0, 0] = 0.0
    x[1, :, 1, 1] = -1e-30
    want = ob.conv2d(np.where(x >= 0, 1.0, -1.0), w, stride=(1, 1), pads=(1, 1, 1, 1))
    np.testing.assert_array_equal(load(tmp_path / "s.so", workers=1)(x), want)


needs_qemu = pytest.mark.skipif(
    shutil.which("aarch64-linux-gnu-g++") is None or deploy.emulator() is None,
    reason="qemu-aarch64 or g++-aarch64-linux-gnu missing: `make setup` installs them")


@needs_qemu
@pytest.mark.parametrize("name", ["reactnet_a", "bireal18", "xnor_vgg", "irnet_resnet20",
                                  "dorefa_w1a2"])
def test_research_export_on_aarch64_under_qemu(name, tmp_path, ort_run, max_rel_err):
    path, x = export(name, "torchscript", tmp_path / f"{name}.onnx")
    bundle = tmp_path / "bundle"
    report = compile_model(path, "arm", tmp_path / "m.so", quiet=True)
    _check(report, name)
    deploy.make_bundle(tmp_path / "m.so", bundle)
    y, ref = deploy.run_bundle(bundle, x), ort_run(path, x)
    assert max_rel_err(y, ref) <= 1e-2
    assert y.argmax(1).tolist() == ref.argmax(1).tolist()


def test_zoo_and_inspect_cli(tmp_path, capsys, ort_run, max_rel_err):
    """`zoo bireal18` writes the research-code export; `inspect` names every conv/FC's fate
    and writes a canonical model that ONNX Runtime runs to the same output."""
    from abc_tvm.cli import main

    src, canon = tmp_path / "b.onnx", tmp_path / "c.onnx"
    assert main(["zoo", "bireal18", "-o", str(src), "--image-size", "32",
                 "--num-classes", "10"]) == 0
    assert main(["inspect", str(src), "-o", str(canon)]) == 0
    out = capsys.readouterr().out
    assert "16 of 21 conv/FC layer(s) become binary kernels" in out
    assert out.count("  binary  ") == 16 and "sign(0) read as +1" in out
    assert "float   /stem/stem.0/Conv" in out and "straight_through" in out
    x = np.random.default_rng(3).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    assert max_rel_err(ort_run(str(canon), x), ort_run(str(src), x)) <= 1e-5
    assert main(["inspect", str(tmp_path / "missing.onnx")]) == 2


class _LooksBinary(torch.nn.Module):
    """sign(x) into a ±1-weight conv that the kernels do not cover, or a sign whose scale is
    computed from the input: must stay float, with the reason, and still match ORT."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        g = torch.Generator().manual_seed(0)
        groups = 2 if kind == "grouped" else 1
        self.weight = torch.nn.Parameter(torch.randn(8, 8 // groups, 3, 3, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.sign(self.weight) * 0.5
        a = torch.sign(x)
        if self.kind == "grouped":
            return F.conv2d(a, w, padding=1, groups=2)
        if self.kind == "dilated":
            return F.conv2d(a, w, padding=2, dilation=2)
        return F.conv2d(a * x.abs().mean(), w, padding=1)  # scale not a constant


@pytest.mark.parametrize("kind,reason", [("grouped", "grouped conv"), ("dilated", "dilated"),
                                         ("dynamic_scale", "not a binarised activation")])
def test_looks_binary_but_is_not_stays_float(kind, reason, tmp_path, ort_run, max_rel_err):
    path = tmp_path / f"{kind}.onnx"
    torch.onnx.export(_LooksBinary(kind).eval(), (torch.rand(1, 8, 6, 6),), str(path),
                      dynamo=False, opset_version=17)
    report = compile_model(path, "x86", tmp_path / "m.so", quiet=True)
    assert report.abc_layers == []
    (conv,) = [f for f in report.float_ops if f["op"] == "Conv"]
    assert reason in conv["reason"], conv
    x = np.random.default_rng(1).uniform(-1, 1, (1, 8, 6, 6)).astype(np.float32)
    assert max_rel_err(load(tmp_path / "m.so", workers=1)(x), ort_run(str(path), x)) <= 1e-5


def test_xnor_with_negative_batch_norm_scales(tmp_path, ort_run, max_rel_err):
    """Sign(BatchNorm(x)) with some negative scales: the BatchNorm folds into thresholds and
    weight signs (no float BatchNorm left), and the output still matches ORT."""
    net = MODELS["xnor_vgg"][0]()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight[::3] *= -1
    path = tmp_path / "x.onnx"
    torch.onnx.export(net, (torch.rand(2, 3, 16, 16),), str(path), dynamo=False,
                      opset_version=17)
    report = compile_model(path, "x86", tmp_path / "x.so", quiet=True)
    assert len(report.abc_layers) == 4
    assert not [f for f in report.float_ops if f["op"] == "BatchNormalization"]
    x = np.random.default_rng(5).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    y, ref = load(tmp_path / "x.so", workers=1)(x), ort_run(str(path), x)
    assert max_rel_err(y, ref) <= 1e-2 and y.argmax(1).tolist() == ref.argmax(1).tolist()


def test_maxpool_between_sign_and_binary_conv(tmp_path, ort_run, max_rel_err):
    """sign -> MaxPool -> binary conv (a common BNN block order): the pool moves before the
    sign (max commutes with it) and the conv is a binary kernel."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(16, 8, 3, 3,
                                                    generator=torch.Generator().manual_seed(4)))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = F.max_pool2d(torch.sign(x), 2)
            return F.conv2d(a, torch.sign(self.w) * self.w.abs().mean(), padding=1)

    path = tmp_path / "p.onnx"
    torch.onnx.export(Net().eval(), (torch.rand(2, 8, 8, 8),), str(path), dynamo=False,
                      opset_version=17)
    report = compile_model(path, "x86", tmp_path / "p.so", quiet=True)
    assert len(report.abc_layers) == 1
    assert any(c["rule"] == "pool_before_binarizer" for c in report.canonical)
    x = np.random.default_rng(6).uniform(-1, 1, (2, 8, 8, 8)).astype(np.float32)
    assert max_rel_err(load(tmp_path / "p.so", workers=1)(x), ort_run(str(path), x)) <= 1e-5
