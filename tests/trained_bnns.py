"""Bi-Real-Net- and XNOR-Net-style nets as their training code writes them, for digits.

Own code after the papers and their public PyTorch code, not abc-tvm's layers:

- Bi-Real-Net (Liu et al., ECCV 2018): every binary conv wrapped by a real-valued shortcut,
  `x + BN(conv(sign(x), mean|W_o|·sign(W)))`, the activation's gradient by the paper's
  piecewise-quadratic approximation of sign, the weight's straight through; a downsampling
  block with an AvgPool + 1×1 float conv shortcut, as the paper's ResNet-18 has.
- XNOR-Net (Rastegari et al., ECCV 2016): BN → sign → binary conv scaled by mean|W_o| →
  ReLU → pool, the first conv and the classifier float, the sign's gradient clipped
  straight through.

Both train on scikit-learn's digits (`abc_paper.digits`, `abc_paper.train`) in seconds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


class _ApproxSign(torch.autograd.Function):
    """sign(x) forward; Bi-Real's gradient 2 − 2|x| on |x| < 1, 0 elsewhere."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205 - torch API
        ctx.save_for_backward(x)
        return torch.sign(x)

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205 - torch API
        (x,) = ctx.saved_tensors
        return g * (2 - 2 * x.abs()).clamp(min=0)


class _ClippedSTE(torch.autograd.Function):
    """sign(x) forward; the gradient passed where |x| ≤ 1 (XNOR-Net, BinaryConnect)."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205 - torch API
        ctx.save_for_backward(x)
        return torch.sign(x)

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205 - torch API
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1).to(g.dtype)


def _scaled_sign(w: torch.Tensor) -> torch.Tensor:
    """mean|W_o| · sign(W), the sign's gradient straight through (W's latent values)."""
    alpha = w.abs().mean(dim=(1, 2, 3), keepdim=True)
    return alpha * (w + (torch.sign(w) - w).detach())


class BinConv(nn.Conv2d):
    """conv(sign(x), mean|W_o|·sign(W)), no bias; `act` picks the activation's STE."""

    def __init__(self, cin: int, cout: int, stride: int = 1, act: str = "approx") -> None:
        super().__init__(cin, cout, 3, stride, 1, bias=False)
        self.act = _ApproxSign if act == "approx" else _ClippedSTE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.act.apply(x), _scaled_sign(self.weight), None, self.stride,
                        self.padding)


class BiRealBlock(nn.Module):
    """x + BN(BinConv(x)); downsampling: AvgPool(2) → 1×1 float conv → BN on the shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv, self.bn = BinConv(cin, cout, stride), nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(cin, cout, 1, bias=False),
                                       nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + (x if self.short is None else self.short(x))


class BiRealDigits(nn.Module):
    """Float stem, four Bi-Real blocks (one downsampling), mean pool, float classifier."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        c = width
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.blocks = nn.Sequential(BiRealBlock(c, c), BiRealBlock(c, c),
                                    BiRealBlock(c, 2 * c, stride=2), BiRealBlock(2 * c, 2 * c))
        self.fc = nn.Linear(2 * c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class XnorDigits(nn.Module):
    """Float first conv + ReLU, three [BN → sign → binary conv → ReLU (→ MaxPool)] blocks,
    mean pool, float classifier, in XNOR-Net's block order."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        c = width
        self.first = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU())
        layers: list[nn.Module] = []
        for cin, cout, pool in ((c, c, False), (c, 2 * c, True), (2 * c, 2 * c, False)):
            layers += [nn.BatchNorm2d(cin), BinConv(cin, cout, act="ste"), nn.ReLU()]
            if pool:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(2 * c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.first(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
