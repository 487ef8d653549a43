"""Fused glue on x86: BatchNorm, residual Add, ReLU and the next layer's bit-packing run inside
the ABC conv kernels, and the float region around them is NHWC.

Checked on the rewritten IR (the fused path is really taken: no BatchNorm or block ReLU left,
packed planes flow from kernel to kernel) and on compiled models against ONNX Runtime:
single blocks within rel 1e-5, chains of blocks where no activation lies within float32
rounding of a binarisation threshold (there a bit may legitimately differ), whole networks
by argmax. The tunable form of the rewrite emits the same kernels unscheduled.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import tvm
from torch import nn
from tvm import relax

from abc_tvm import compiler, frontend, targets
from abc_tvm.export import to_onnx
from abc_tvm.models import BasicBlock, abc_resnet20
from abc_tvm.nn import ABCConv2d
from abc_tvm.relay_passes.abc_rewrite import rewrite

SPEC = targets.resolve("x86")


def ort_run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def rewritten(model: onnx.ModelProto, **kw) -> tvm.IRModule:
    mod, _, _ = rewrite(frontend.to_relax(frontend.load(model)), SPEC.target, SPEC.word_bits,
                        **kw)
    return mod


def build(mod: tvm.IRModule):
    """Compile a rewritten module with the compiler's x86 pipeline; return a callable."""
    with tvm.transform.PassContext(opt_level=3):
        ex = tvm.compile(mod, target=SPEC.target, relax_pipeline=compiler.pipeline(SPEC))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return lambda x: vm["main"](tvm.runtime.tensor(x, tvm.cpu())).numpy()


def calls(mod: tvm.IRModule, prefix: str) -> list[relax.Call]:
    found = []

    def visit(e):
        if isinstance(e, relax.Call) and e.op.name == "relax.call_tir" and \
                e.args[0].name_hint.startswith(prefix):
            found.append(e)

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


def ops(mod: tvm.IRModule) -> list[str]:
    return re.findall(r"R\.([a-z_.0-9]+)\(", mod["main"].script(show_meta=False))


class Residual(nn.Module):
    """One ABC conv + BN + identity residual + ReLU: a single fused kernel."""

    def __init__(self, c: int, M: int, N: int, act: str = "bipolar") -> None:
        super().__init__()
        self.conv = ABCConv2d(c, c, 3, padding=1, M=M, N=N, act=act, channelwise=True)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + x)


def _init_bn(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g) + 0.3)
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return model.eval()


def _margin(model: nn.Module, x: torch.Tensor) -> float:
    """Smallest |a + v - 0.5| over the inputs of every ABC conv after the first, relative."""
    worst = np.inf
    hooks = []

    def hook(layer, inputs, _out):
        nonlocal worst
        a = inputs[0].detach().numpy()
        for v in layer.frozen().shift:
            worst = min(worst, float(np.min(np.abs(a + float(v) - 0.5))) / (np.abs(a).max() + 1))

    convs = [m for m in model.modules() if isinstance(m, ABCConv2d)][1:]
    hooks = [c.register_forward_hook(hook) for c in convs]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return worst


# ------------------------------------------------------------------------------ the IR


@pytest.fixture(scope="module")
def resnet20() -> onnx.ModelProto:
    return to_onnx(abc_resnet20(2, 2, seed=4), torch.rand(1, 3, 32, 32))


def test_resnet20_glue_is_fused(resnet20):
    mod = rewritten(resnet20)
    names = ops(mod)
    assert "nn.batch_norm" not in names  # every BN folded: into ABC kernels or the float convs
    assert names.count("nn.relu") == 1  # the float stem's; every block ReLU is in a kernel
    assert names.count("add") == 4  # biases only: stem, two projections, classifier
    blocks = calls(mod, "abc_block_")
    assert len(blocks) == 18
    assert len(calls(mod, "abc_bitpack")) == 1  # only the stem's output is packed apart
    assert not calls(mod, "abc_conv_")
    # Packed planes come from the previous kernel: a block's first argument is the packed
    # output of another block kernel (directly or as a tuple field), not a bitpack call.
    producers = {}
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            producers[b.var] = b.value
    from_kernel = 0
    for call in blocks:
        src = producers.get(call.args[1].fields[0])
        if isinstance(src, relax.TupleGetItem):
            src = producers.get(src.tuple_value)
        if isinstance(src, relax.Call) and src.args[0].name_hint.startswith("abc_block_"):
            from_kernel += 1
    assert from_kernel == 17
    # NHWC throughout: layout changes only at the input and the classifier head
    assert names.count("permute_dims") <= 2


def test_tunable_rewrite_is_unscheduled_and_named_alike(resnet20):
    scheduled = rewritten(resnet20)
    tunable = rewritten(resnet20, tunable=True)
    kernels = {gv.name_hint: f for gv, f in tunable.functions.items()
               if isinstance(f, tvm.tirx.PrimFunc)}
    assert kernels and {n for n in kernels} == {
        gv.name_hint for gv, f in scheduled.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    for name, func in kernels.items():
        assert "tirx.is_scheduled" not in func.attrs, name
        if name.startswith("float_conv"):  # the float stem: MetaSchedule's generic rules
            continue
        rule = "abc_bitpack" if name.startswith("abc_bitpack") else "abc_conv2d"
        assert f'"schedule_rule": "{rule}"' in func.script(), name


def test_unfused_targets_keep_separate_kernels(resnet20):
    mod = rewritten(resnet20, fuse_glue=False)
    assert len(calls(mod, "abc_conv_")) == 18 and len(calls(mod, "abc_bitpack_")) == 18
    assert "nn.batch_norm" in ops(mod)


# ------------------------------------------------------------------- against ONNX Runtime


@pytest.mark.parametrize(("M", "N", "act"), [(3, 3, "bipolar"), (2, 1, "unipolar")])
def test_single_block_matches_ort(M, N, act):
    """conv + BN + residual + ReLU in one kernel: within rel 1e-5 of ONNX Runtime."""
    torch.manual_seed(M * 10 + N)
    model = _init_bn(Residual(16, M, N, act), seed=1)
    proto = to_onnx(model, torch.rand(1, 16, 9, 9))
    mod = rewritten(proto)
    assert len(calls(mod, "abc_block_")) == 1 and "nn.batch_norm" not in ops(mod)
    run = build(mod)
    x = np.random.default_rng(0).uniform(-0.5, 1.5, (1, 16, 9, 9)).astype(np.float32)
    ref = ort_run(proto, x)
    np.testing.assert_allclose(run(x), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_basic_block_chain_matches_ort():
    """conv1 packs conv2's planes in its epilogue; conv2 writes float (residual) and packs."""
    net = nn.Sequential(BasicBlock(16, 16, 1, M=2, N=2), BasicBlock(16, 32, 2, M=1, N=3))
    net = _init_bn(net, seed=2)
    for seed in range(10):  # an input with no activation on a threshold's rounding edge
        x = torch.from_numpy(np.random.default_rng(seed).uniform(
            0.0, 1.0, (1, 16, 10, 10)).astype(np.float32))
        if _margin(net, x) > 1e-4:
            break
    proto = to_onnx(net, x)
    mod = rewritten(proto)
    kernels = calls(mod, "abc_block_")
    assert len(kernels) == 4 and len(calls(mod, "abc_bitpack")) == 1
    run = build(mod)
    ref = ort_run(proto, x.numpy())
    np.testing.assert_allclose(run(x.numpy()), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_partial_word_output_is_packed_apart():
    """96 channels (a word and a half): the kernel writes float, a bitpack packs it."""
    torch.manual_seed(5)
    net = nn.Sequential(ABCConv2d(33, 96, 3, padding=1, M=2, N=2), nn.BatchNorm2d(96),
                        nn.ReLU(), ABCConv2d(96, 8, 3, padding=1, M=1, N=2))
    net = _init_bn(net, seed=3)
    for seed in range(10):
        x = torch.from_numpy(np.random.default_rng(seed).uniform(
            0.0, 1.0, (1, 33, 6, 6)).astype(np.float32))
        if _margin(net, x) > 1e-4:
            break
    proto = to_onnx(net, x)
    mod = rewritten(proto)
    assert len(calls(mod, "abc_bitpack_nhwc")) == 2
    ref = ort_run(proto, x.numpy())
    np.testing.assert_allclose(build(mod)(x.numpy()), ref, rtol=1e-5,
                               atol=1e-5 * np.abs(ref).max())


def test_resnet20_fused_agrees_with_ort_and_unfused(resnet20):
    fused, unfused = build(rewritten(resnet20)), build(rewritten(resnet20, fuse_glue=False))
    rng = np.random.default_rng(1)
    for _ in range(2):
        x = rng.uniform(0, 1, (1, 3, 32, 32)).astype(np.float32)
        y, ref, plain = fused(x), ort_run(resnet20, x), unfused(x)
        assert y.argmax(1).tolist() == ref.argmax(1).tolist() == plain.argmax(1).tolist()
        assert np.corrcoef(y.ravel(), ref.ravel())[0, 1] > 0.99
