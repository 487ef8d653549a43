"""Binary networks written the way their research code writes them (not abc-tvm's pattern).

ReActNet-A (Liu et al., ECCV 2020) and Bi-Real-Net-18 (Liu et al., ECCV 2018), after the
structure of their public PyTorch code: `sign(x)` activations with the polynomial
straight-through residue kept in eval (`sign.detach() - p.detach() + p`), binary weights
computed at run time from the latent weight (`mean|W| * sign(W)`, with its own clipped
straight-through residue), learnable biases (RSign / RPReLU) and PReLU. Exported with
`torch.onnx.export`, they are what a user of that code brings to `abc-tvm compile`: the
front door's canonicalization stage, not the exporter, has to find the binary layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


class BinaryActivation(nn.Module):
    """sign(x) forward; Bi-Real's piecewise-quadratic approximation for the gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_forward = torch.sign(x)
        mask1 = (x < -1).float()
        mask2 = (x < 0).float()
        mask3 = (x < 1).float()
        out1 = -1 * mask1 + (x * x + 2 * x) * (1 - mask1)
        out2 = out1 * mask2 + (-x * x + 2 * x) * (1 - mask2)
        out3 = out2 * mask3 + 1 * (1 - mask3)
        return out_forward.detach() - out3.detach() + out3


class HardBinaryConv(nn.Module):
    """conv(x, mean|W|_o * sign(W)), the weight binarized from the latent one at run time."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1) -> None:
        super().__init__()
        self.stride, self.padding = stride, padding
        self.shape = (cout, cin, kernel_size, kernel_size)
        self.weight = nn.Parameter(torch.randn(self.shape) * 0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        real = self.weight
        scale = real.abs().mean(dim=3, keepdim=True).mean(dim=2, keepdim=True).mean(
            dim=1, keepdim=True).detach()
        binary = scale * torch.sign(real)
        clipped = torch.clamp(real, -1.0, 1.0)
        w = binary.detach() - clipped.detach() + clipped
        return F.conv2d(x, w, stride=self.stride, padding=self.padding)


class LearnableBias(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias.expand_as(x)


class ReActBlock(nn.Module):
    """ReActNet-A's block: RSign, binary 3×3 (+ AvgPool shortcut when strided), RPReLU,
    then RSign, binary 1×1 (two of them, concatenated, where the width doubles), RPReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.move11, self.move12, self.move13 = (LearnableBias(cin) for _ in range(3))
        self.binary_3x3 = HardBinaryConv(cin, cin, stride=stride)
        self.bn1 = nn.BatchNorm2d(cin)
        self.prelu1 = nn.PReLU(cin)
        self.move21 = LearnableBias(cin)
        if cin == cout:
            self.binary_pw = HardBinaryConv(cin, cout, 1, 1, 0)
            self.bn2 = nn.BatchNorm2d(cout)
        else:
            assert cout == 2 * cin
            self.binary_pw_down1 = HardBinaryConv(cin, cin, 1, 1, 0)
            self.binary_pw_down2 = HardBinaryConv(cin, cin, 1, 1, 0)
            self.bn2_1, self.bn2_2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cin)
        self.move22, self.move23 = LearnableBias(cout), LearnableBias(cout)
        self.prelu2 = nn.PReLU(cout)
        self.binary_activation = BinaryActivation()
        self.stride, self.cin, self.cout = stride, cin, cout
        if stride == 2:
            self.pooling = nn.AvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out1 = self.bn1(self.binary_3x3(self.binary_activation(self.move11(x))))
        if self.stride == 2:
            x = self.pooling(x)
        out1 = self.move13(self.prelu1(self.move12(x + out1)))
        out2 = self.binary_activation(self.move21(out1))
        if self.cin == self.cout:
            out2 = self.bn2(self.binary_pw(out2)) + out1
        else:
            out2 = torch.cat([self.bn2_1(self.binary_pw_down1(out2)) + out1,
                              self.bn2_2(self.binary_pw_down2(out2)) + out1], dim=1)
        return self.move23(self.prelu2(self.move22(out2)))


REACTNET_A_WIDTHS = [32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]


class ReActNetA(nn.Module):
    """ReActNet-A: MobileNet-V1 layout, 13 binary blocks, float 3×3 stem and classifier."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0) -> None:
        super().__init__()
        ch = [max(8, int(c * width)) for c in REACTNET_A_WIDTHS]
        self.stem = nn.Sequential(nn.Conv2d(3, ch[0], 3, 2, 1, bias=False), nn.BatchNorm2d(ch[0]))
        blocks = []
        for i in range(1, len(ch)):
            stride = 2 if ch[i - 1] != ch[i] and REACTNET_A_WIDTHS[i] != 64 else 1
            blocks.append(ReActBlock(ch[i - 1], ch[i], stride))
        self.feature = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.feature(self.stem(x))), 1))


class BiRealBlock(nn.Module):
    """Bi-Real-Net's block: sign, binary 3×3, BN, plus the real-valued shortcut
    (AvgPool + 1×1 float conv + BN where it downsamples)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.binary_activation = BinaryActivation()
        self.binary_conv = HardBinaryConv(cin, cout, stride=stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.AvgPool2d(2, stride),
                                            nn.Conv2d(cin, cout, 1, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.binary_conv(self.binary_activation(x)))
        return out + (x if self.downsample is None else self.downsample(x))


class BiRealNet18(nn.Module):
    """Bi-Real-Net-18: float 7×7 stem + MaxPool, 4 stages of 4 binary blocks, float FC."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0) -> None:
        super().__init__()
        ch = [max(8, int(c * width)) for c in (64, 128, 256, 512)]
        self.stem = nn.Sequential(nn.Conv2d(3, ch[0], 7, 2, 3, bias=False), nn.BatchNorm2d(ch[0]),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], ch[0]
        for i, c in enumerate(ch):
            for j in range(4):
                blocks.append(BiRealBlock(cin, c, 2 if i > 0 and j == 0 else 1))
                cin = c
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Deterministic random weights, non-trivial BatchNorm statistics, PReLU slopes and
    learnable biases (zero at init in the research code, which would hide their handling)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5)
            elif isinstance(m, LearnableBias):
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, HardBinaryConv):
                m.weight.copy_(torch.randn(m.shape, generator=g) * 0.05)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, generator=g)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


def reactnet_a(num_classes: int = 1000, width: float = 1.0, seed: int = 0) -> ReActNetA:
    return randomize(ReActNetA(num_classes, width), seed)


def bireal18(num_classes: int = 1000, width: float = 1.0, seed: int = 0) -> BiRealNet18:
    return randomize(BiRealNet18(num_classes, width), seed)


# name -> (builder(num_classes=..., seed=...), default image size), for `abc-tvm zoo`
RESEARCH_ZOO = {"reactnet_a": (reactnet_a, 224), "bireal18": (bireal18, 224)}
