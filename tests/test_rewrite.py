"""The Relax pass, variant by variant: every form of the ONNX contract is found and rewritten
with its M, N, α kind and activation, compiles for x86 and matches ONNX Runtime and the NumPy
reference; every near miss stays float, is reported with its reason, and still runs right.

Graphs come from `onnx_builders` (built with onnx.helper, independent of the exporter).
"""

from __future__ import annotations

import json

import onnx_builders as ob
import pytest
import tvm

from abc_tvm import compiler, frontend, targets
from abc_tvm.blocks import front
from abc_tvm.errors import UserError
from abc_tvm.relay_passes.abc_rewrite import rewrite
from abc_tvm.runtime import load

SPEC = targets.resolve("x86")
CONFIGS = {
    "m2n3-layer-s1p1": dict(M=2, N=3, in_channels=5, out_channels=8, height=7, width=6),
    "m3n2-channel-s2p0": dict(M=3, N=2, channelwise=True, stride=2, pads=0, in_channels=70,
                              out_channels=12, height=9, width=9),
}


def _config(variant: str, cfg: dict) -> dict:
    cfg = {**cfg, "batch": 1}
    if variant == "single_base":
        cfg["M"] = 1
    if variant == "single_plane":
        cfg["N"] = 1
    return cfg


CASES = [pytest.param(name, _config(name, cfg), id=f"{name}-{cid}")
         for name in ob.VARIANTS for cid, cfg in CONFIGS.items()]


def _relax_ops(mod) -> str:
    return mod["main"].script()


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("variant,cfg", CASES)
def test_variant_rewritten_with_its_numbers(variant, cfg, fuse):
    model, e = ob.VARIANTS[variant](**cfg)
    mod = frontend.to_relax(model)
    assert "R.nn.conv2d" in _relax_ops(mod)
    out, done, misses = rewrite(mod, SPEC.target, SPEC.word_bits, fuse_glue=fuse)
    assert misses == []
    (r,) = done
    assert (r.block.M, r.block.N, r.block.alpha_kind, r.block.act) == (
        e.M, e.N, e.alpha_kind, e.act)
    assert "R.nn.conv2d" not in _relax_ops(out)  # every conv of the block is gone
    assert "abc_" in _relax_ops(out)


@pytest.mark.parametrize("variant,cfg", CASES)
def test_variant_compiles_and_matches_ort_and_reference(variant, cfg, tmp_path, ort_run,
                                                        max_rel_err):
    model, e = ob.VARIANTS[variant](**cfg)
    so, rep = tmp_path / "m.so", tmp_path / "r.json"
    compiler.compile_model(model, "x86", so, report_path=rep, quiet=True)
    report = json.loads(rep.read_text())
    (layer,) = report["abc_layers"]
    assert (layer["M"], layer["N"], layer["alpha"], layer["act"]) == (
        e.M, e.N, e.alpha_kind, e.act)
    assert "AND/popcount" in layer["kernel_impl"]
    assert not [f for f in report["float_ops"] if f["op"] == "Conv"]
    x = ob.random_input(e.input_shape, seed=7)
    y = load(so, workers=1)(x)
    assert max_rel_err(y, ort_run(model, x)) <= 1e-4
    assert max_rel_err(y, ob.reference_output(e, x)) <= 1e-4


@pytest.mark.parametrize("name", list(ob.NEAR_MISSES))
def test_near_miss_stays_float_is_reported_and_runs_right(name, tmp_path, ort_run, max_rel_err,
                                                         capfd):
    model, e = ob.NEAR_MISSES[name](M=2, N=2, batch=1)
    fr = front(model)
    out, done, misses = rewrite(fr.mod, SPEC.target, SPEC.word_bits, blocks=fr.blocks)
    # the conv stays a float conv (x86: the blocked-weight NHWC kernel of the float path)
    assert fr.blocks == [] and done == []
    assert "R.nn.conv2d" in _relax_ops(out) or "float_conv_nhwc" in out.script()
    so, rep = tmp_path / "m.so", tmp_path / "r.json"
    compiler.compile_model(model, "x86", so, report_path=rep, quiet=True)
    # one warning line: how many binary-looking layers stay float, and why; a conv whose
    # input is never thresholded does not look binary, so the model is simply float
    err = capfd.readouterr().err
    if name == "miss_unbinarised":
        assert "no ABC convolution found" in err, err
    else:
        assert f"{e.n_convs} of {e.n_convs} layers that look binary stay float" in err, err
        assert e.miss in err, err
    report = json.loads(rep.read_text())
    assert report["abc_layers"] == []
    convs = [f for f in report["float_ops"] if f["op"] == "Conv"]
    assert len(convs) == e.n_convs
    assert all(e.miss in f["reason"] for f in convs), convs
    x = ob.random_input(e.input_shape, seed=7)
    assert max_rel_err(load(so, workers=1)(x), ort_run(model, x)) <= 1e-4


def test_abc_blocks_that_all_stay_float_fail_the_compile(tmp_path, monkeypatch):
    """If the Relax pass rewrote none of the blocks the ONNX matcher found, the compile fails
    instead of shipping a model whose ABC layers run as float convs."""
    model, _ = ob.canonical(M=2, N=2, batch=1)

    def rewrite_nothing(mod, *args, **kwargs):
        _, _, misses = rewrite(mod, *args, **kwargs)
        return mod, [], misses

    monkeypatch.setattr(compiler, "rewrite", rewrite_nothing)
    with pytest.raises(UserError, match="none could be turned into binary kernels"):
        compiler.compile_model(model, "x86", tmp_path / "m.so", quiet=True)
    assert not (tmp_path / "m.so").exists()


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_explicit_block_the_kernels_refuse_runs_as_float(fuse, ort_run, max_rel_err):
    """A block decided on the ONNX graph but refused by the rewrite is still computed, as
    float ops from its own facts (thresholds, Σ α B, β), never left as a dangling call."""
    model, e = ob.canonical(M=2, N=3, seed=4, batch=2)
    fr = front(model)
    assert len(fr.blocks) == 1 and "abc_tvm.block.0" in _relax_ops(fr.mod)
    out, done, misses = rewrite(fr.mod, SPEC.target, SPEC.word_bits, blocks=fr.blocks,
                                fuse_glue=fuse, accept=lambda b: "refused by the test")
    assert done == [] and [m.reason for m in misses] == ["refused by the test"]
    assert "abc_tvm.block" not in _relax_ops(out)
    assert "R.nn.conv2d" in _relax_ops(out) or "float_conv_nhwc" in out.script()
    from tvm import relax

    ex = tvm.compile(out, target=SPEC.target)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    x = ob.random_input(e.input_shape, seed=9)
    y = vm["main"](tvm.runtime.tensor(x)).numpy()
    assert max_rel_err(y, ort_run(model, x)) <= 1e-5
