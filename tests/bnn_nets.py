"""BNNs as their research code writes them, for the front-door tests (own code, after the
papers and their public PyTorch code): an XNOR-Net-style VGG, an IR-Net ResNet-20 and a
DoReFa W1A2 CNN. ReActNet-A and Bi-Real-Net-18 live in `abc_tvm.bnn_models` (the zoo's).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from abc_tvm.bnn_models import randomize


class XnorConv(nn.Module):
    """XNOR-Net: conv(sign(x), sign(W)) * alpha_o, alpha_o = mean|W_o| (Rastegari et al.)."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, pad: int = 1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k) * 0.05)
        self.stride, self.pad = stride, pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.weight.abs().mean(dim=(1, 2, 3)).view(1, -1, 1, 1)
        y = F.conv2d(torch.sign(x), torch.sign(self.weight), stride=self.stride,
                     padding=self.pad)
        return y * alpha


class XnorVGG(nn.Module):
    """BatchNorm -> Sign -> binary conv (per-channel alpha) -> ReLU -> MaxPool, float first
    conv and classifier, as XNOR-Net's block order."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        w = width
        self.first = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1), nn.ReLU())
        cfg = [(w, 2 * w, True), (2 * w, 2 * w, False), (2 * w, 4 * w, True), (4 * w, 4 * w, True)]
        layers: list[nn.Module] = []
        for cin, cout, pool in cfg:
            layers += [nn.BatchNorm2d(cin), XnorConv(cin, cout), nn.ReLU()]
            if pool:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.first(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class IRConv2d(nn.Conv2d):
    """IR-Net's conv: the weight balanced (zero mean) and standardised per output channel,
    binarized, scaled by a power of two; sign(x) activations (Qin et al., CVPR 2020)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        bw = w - w.view(w.size(0), -1).mean(-1).view(w.size(0), 1, 1, 1)
        bw = bw / bw.view(bw.size(0), -1).std(-1).view(bw.size(0), 1, 1, 1)
        sw = torch.pow(torch.tensor([2.0] * bw.size(0)),
                       (torch.log(bw.abs().view(bw.size(0), -1).mean(-1)) / math.log(2)).round()
                       ).view(bw.size(0), 1, 1, 1).detach()
        bw = torch.sign(bw) * sw
        return F.conv2d(torch.sign(x), bw, self.bias, self.stride, self.padding)


class IRBlock(nn.Module):
    """IR-Net's CIFAR BasicBlock: each binary conv with BN, its own residual and hardtanh;
    option-A shortcut (strided slice + channel zero-padding, `F.pad`)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = IRConv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = IRConv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = (cout - cin) // 2 if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        short = x if self.pad is None else F.pad(x[:, :, ::2, ::2],
                                                 (0, 0, 0, 0, self.pad, self.pad), "constant", 0)
        out = F.hardtanh(self.bn1(self.conv1(x)) + short)
        return F.hardtanh(self.bn2(self.conv2(out)) + out)


class IRResNet20(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(3, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        blocks, cin = [], w
        for i, c in enumerate((w, 2 * w, 4 * w)):
            for j in range(3):
                blocks.append(IRBlock(cin, c, 2 if i > 0 and j == 0 else 1))
                cin = c
        self.layers = nn.Sequential(*blocks)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.hardtanh(self.bn1(self.conv1(x))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def _quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa's k-bit quantizer with its straight-through residue: x + (q - x).detach()."""
    n = float(2 ** bits - 1)
    return x + (torch.round(x * n) / n - x).detach()


class DorefaConv(nn.Conv2d):
    """DoReFa W1: sign(W / E) * E with E = mean|W| (one per layer), straight-through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.weight.abs().mean().detach()
        w = self.weight + (torch.sign(self.weight / e) * e - self.weight).detach()
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class DorefaW1A2(nn.Module):
    """An SVHN-style DoReFa CNN: float first conv and classifier, binary weights, 2-bit
    activations clip(x, 0, 1) quantized to {0, 1/3, 2/3, 1} before every binary conv."""

    def __init__(self, num_classes: int = 10, width: int = 16, abits: int = 2) -> None:
        super().__init__()
        w = width
        self.abits = abits
        self.first = nn.Conv2d(3, w, 5, 1, 2)
        self.convs = nn.ModuleList([DorefaConv(w, 2 * w, 3, 1, 1, bias=False),
                                    DorefaConv(2 * w, 2 * w, 3, 2, 1, bias=False),
                                    DorefaConv(2 * w, 4 * w, 3, 1, 1, bias=False)])
        self.bns = nn.ModuleList([nn.BatchNorm2d(c) for c in (w, 2 * w, 2 * w, 4 * w)])
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bns[0](self.first(x))
        for conv, bn in zip(self.convs, self.bns[1:], strict=True):
            x = bn(conv(_quantize(torch.clamp(x, 0, 1), self.abits)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(x), 1), 1))


class BinaryMLP(nn.Module):
    """Binary fully-connected layers (Gemm with sign(x) and sign(W) * alpha), float first
    and last layers: a BNN classifier head as the research code writes it."""

    def __init__(self, cin: int = 48, hidden: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.first = nn.Linear(cin, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.hidden = nn.Parameter(torch.randn(hidden, hidden) * 0.05)
        self.last = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.first(torch.flatten(x, 1)))
        alpha = self.hidden.abs().mean()
        h = F.linear(torch.sign(h), torch.sign(self.hidden) * alpha)
        return self.last(h)


def _bn1d(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
    return model


def _seeded(make, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # the latent weights the modules draw themselves
    return randomize(_bn1d(make(), seed), seed)


# name -> (constructor(seed), input shape without the batch)
NETS = {
    "xnor_vgg": (lambda seed=0: _seeded(XnorVGG, seed), (3, 16, 16)),
    "irnet_resnet20": (lambda seed=0: _seeded(IRResNet20, seed), (3, 16, 16)),
    "dorefa_w1a2": (lambda seed=0: _seeded(DorefaW1A2, seed), (3, 16, 16)),
    "binary_mlp": (lambda seed=0: _seeded(BinaryMLP, seed), (3, 4, 4)),
}
