"""Trained Bi-Real- and XNOR-style nets compile to binary kernels and classify as ONNX
Runtime does (issue 21, item 5): the test-set accuracy of the compiled model equals ORT's
and every test image gets ORT's class, on x86 and (a subset) on aarch64 under qemu.

The nets are tests/trained_bnns.py's, trained on scikit-learn's digits in seconds; the
trained state is cached in pytest's cache (keyed by the sources and torch's version), so a
rerun exports without training again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from abc_paper import digits, export, train
from test_arm import needs_qemu
from trained_bnns import BiRealDigits, XnorDigits

from abc_tvm import deploy
from abc_tvm.compiler import compile_model
from abc_tvm.runtime import load

TOL = 1e-4  # float32 rounding; a flipped bit of a binary activation would be far above it
# name: (class, kwargs, epochs, binary convs, accuracy the training reaches at least)
NETS = {"bireal": (BiRealDigits, {}, 6, 4, 0.9),
        "xnor": (XnorDigits, {"width": 48}, 12, 3, 0.85)}
ARM_IMAGES = 32


def _key(name: str) -> str:
    here = Path(__file__).parent
    src = b"".join((here / f).read_bytes() for f in ("trained_bnns.py", "abc_paper.py"))
    return hashlib.sha256(src + torch.__version__.encode() + name.encode()).hexdigest()[:16]


@pytest.fixture(scope="session", params=sorted(NETS))
def trained(request) -> tuple[str, torch.nn.Module, float]:
    """(name, the trained net in eval mode, its torch test accuracy), cached."""
    name = request.param
    cls, kwargs, epochs, _, floor = NETS[name]
    torch.manual_seed(0)
    net = cls(**kwargs)
    cache = Path(request.config.cache.mkdir("abc_tvm_trained_bnns")) / f"{name}-{_key(name)}.pt"
    if cache.is_file():
        state = torch.load(cache, weights_only=True)
        net.load_state_dict(state["net"])
        acc = float(state["acc"])
    else:
        acc = train(net, epochs=epochs)
        torch.save({"net": net.state_dict(), "acc": acc}, cache)
    net.eval()
    assert acc >= floor, f"{name} trained to only {acc:.3f}"
    return name, net, acc


def test_trained_bnn_is_binary_and_classifies_as_ort(trained, tmp_path, ort_run, max_rel_err):
    """Every binary conv a binary kernel (--require-binary), the compiled output within
    float rounding of ORT's, the same class for every test image, the same accuracy."""
    name, net, acc = trained
    xte, yte = digits()[2:]
    model = export(net, torch.from_numpy(xte))
    report = compile_model(model, "x86", tmp_path / "m.so", quiet=True, require_binary=True)
    assert len(report.abc_layers) == NETS[name][3]
    assert all((a["M"], a["N"], a["act"]) == (1, 1, "bipolar") for a in report.abc_layers)
    y, ref = load(tmp_path / "m.so", workers=1)(xte), ort_run(model, xte)
    assert max_rel_err(y, ref) <= TOL
    assert (y.argmax(1) == ref.argmax(1)).all()
    assert (y.argmax(1) == yte).mean() == (ref.argmax(1) == yte).mean()
    assert abs((ref.argmax(1) == yte).mean() - acc) <= 0.01  # ORT is the net torch trained


@needs_qemu
def test_trained_bnn_bundle_under_qemu_classifies_as_ort(trained, tmp_path, ort_run,
                                                         max_rel_err):
    """The same net for aarch64 (a bundle run under qemu) on the first test images."""
    _, net, _ = trained
    x = digits()[2][:ARM_IMAGES]
    model = export(net, torch.from_numpy(x))
    onnx.save(model, tmp_path / "m.onnx")
    compile_model(tmp_path / "m.onnx", "arm", tmp_path / "m.so", quiet=True,
                  require_binary=True)
    bundle = tmp_path / "bundle"
    deploy.make_bundle(tmp_path / "m.so", bundle)
    y, ref = deploy.run_bundle(bundle, x), ort_run(model, x)
    assert y.shape == ref.shape == (ARM_IMAGES, 10)
    assert max_rel_err(y, ref) <= TOL
    np.testing.assert_array_equal(y.argmax(1), ref.argmax(1))
