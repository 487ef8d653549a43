"""ABC ResNets: ImageNet ResNet-18 and CIFAR ResNet-20 with every residual 3×3 conv as ABC.

The stem, the 1×1 projection shortcuts and the classifier stay float, as in the paper.
Initialisation is deterministic from a seed, and BatchNorm statistics are set to non-trivial
values so that exported models exercise every path (scales, shifts, both bit values).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from abc_tvm.nn import ABCConv2d


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus shortcut, then ReLU; both 3×3 convs are ABC."""

    def __init__(self, cin: int, cout: int, stride: int, M: int, N: int, **abc) -> None:
        super().__init__()
        self.conv1 = ABCConv2d(cin, cout, 3, stride=stride, padding=1, M=M, N=N, **abc)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = ABCConv2d(cout, cout, 3, stride=1, padding=1, M=M, N=N, **abc)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ABCResNet(nn.Module):
    """A ResNet of BasicBlocks with a float stem and a float classifier."""

    def __init__(self, stem: nn.Module, widths: list[int], depths: list[int], num_classes: int,
                 M: int, N: int, **abc) -> None:
        super().__init__()
        self.stem = stem
        blocks: list[nn.Module] = []
        cin = widths[0]
        for i, (w, d) in enumerate(zip(widths, depths, strict=True)):
            for j in range(d):
                blocks.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1, M, N, **abc))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected a 4-D NCHW image batch, got shape {tuple(x.shape)}")
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _init(model: nn.Module, seed: int) -> nn.Module:
    """Deterministic weights, and BN statistics far from the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear | ABCConv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.01)
            if isinstance(m, ABCConv2d):
                m.beta.copy_((0.5 + torch.rand(m.N, generator=g)) / m.N)
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g) + 0.3)
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return model.eval()


def abc_resnet18(M: int = 3, N: int = 3, num_classes: int = 1000, seed: int = 0,
                 **abc) -> ABCResNet:
    """ImageNet ResNet-18: 7×7 float stem, 16 ABC 3×3 convs, float projections and FC."""
    stem = nn.Sequential(
        nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64),
        nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1),
    )
    return _init(ABCResNet(stem, [64, 128, 256, 512], [2, 2, 2, 2], num_classes, M, N, **abc),
                 seed)


def abc_resnet20(M: int = 3, N: int = 3, num_classes: int = 10, seed: int = 0,
                 **abc) -> ABCResNet:
    """CIFAR ResNet-20: 3×3 float stem, 18 ABC 3×3 convs in three stages of 16/32/64."""
    stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
    return _init(ABCResNet(stem, [16, 32, 64], [3, 3, 3], num_classes, M, N, **abc), seed)


ZOO: dict[str, tuple[Callable[..., ABCResNet], int]] = {
    # name: (builder, default image size)
    "abc_resnet18": (abc_resnet18, 224),
    "abc_resnet20": (abc_resnet20, 32),
}


def float_twin(model: nn.Module) -> nn.Module:
    """The same network with every ABC conv replaced by an ordinary float conv.

    The float conv takes the ABC layer's approximated weight Σ α_m B_m; this is the float peer
    that benchmarks compare against (same architecture, same FLOPs).
    """
    import copy

    twin = copy.deepcopy(model).eval()
    for m in list(twin.modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, ABCConv2d):
                conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size,
                                 stride=child.stride, padding=child.padding, bias=False)
                with torch.no_grad():
                    conv.weight.copy_(child._eval_weight())
                setattr(m, child_name, conv)
    return twin.eval()
