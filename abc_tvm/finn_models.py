"""FINN's binary and few-bit networks as Brevitas ships them (`brevitas_examples.bnn_pynq`):
CNV (CIFAR-10, 3x32x32) and the LFC / SFC / TFC MLPs (MNIST, 1x28x28), in every shipped
weight/activation configuration, untrained (`pretrained=False`: no network) with random
non-trivial BatchNorm statistics, exported as QONNX the way their users ship them.

Needs the optional `brevitas` package (`pip install 'abc-tvm[qonnx]'`); compiling a QONNX
file does not.
"""

from __future__ import annotations

import os
from pathlib import Path

from abc_tvm.errors import UserError

CONFIGS = ("cnv_1w1a", "cnv_1w2a", "cnv_2w2a", "lfc_1w1a", "lfc_1w2a", "sfc_1w1a",
           "sfc_1w2a", "sfc_2w2a", "tfc_1w1a", "tfc_1w2a", "tfc_2w2a")
ZOO = {f"finn_{c}": c for c in CONFIGS}  # `abc-tvm zoo` / `bench --models` names


def input_shape(config: str) -> tuple[int, int, int]:
    """(C, H, W) of one image: CIFAR-10 for CNV, MNIST for the MLPs."""
    return (3, 32, 32) if config.startswith("cnv") else (1, 28, 28)


def _brevitas():
    try:
        from brevitas_examples.bnn_pynq.models import model_with_cfg
    except ImportError:
        raise UserError("FINN's bnn_pynq models need brevitas: pip install 'abc-tvm[qonnx]' "
                        "(or pip install brevitas qonnx onnxoptimizer)") from None
    return model_with_cfg


def build(config: str, seed: int = 0):
    """The bnn_pynq network in eval mode: untrained weights, and BatchNorm statistics drawn
    so that thresholds differ per channel and some BN scales are negative."""
    import torch

    if config not in CONFIGS:
        raise UserError(f"unknown bnn_pynq configuration {config!r}: one of {', '.join(CONFIGS)}")
    torch.manual_seed(seed)
    model, _ = _brevitas()(config, False)
    gen = torch.Generator().manual_seed(seed + 1)
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
            c = mod.num_features
            mod.running_mean.data = torch.randn(c, generator=gen) * 2
            mod.running_var.data = torch.rand(c, generator=gen) * 4 + 0.5
            mod.weight.data = torch.randn(c, generator=gen)
            mod.bias.data = torch.randn(c, generator=gen)
    return model.eval()


def export(model, example, path: str | os.PathLike, dynamo: bool = True) -> Path:
    """`brevitas.export.export_qonnx` of the model at the example's shape (the dynamo
    exporter writes the weights to `<path>.data` beside the model, as users get it)."""
    _brevitas()
    from brevitas.export import export_qonnx

    export_qonnx(model, example, str(path), dynamo=dynamo)
    return Path(path)
