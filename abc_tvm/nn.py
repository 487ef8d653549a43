"""PyTorch ABC-Net layers (Lin et al., NIPS 2017): M weight bases and N activation planes.

Training uses straight-through estimators; `eval()` freezes the bases, α, v and β into float32
constants so that the eval forward, the exported ONNX graph and the compiled kernels all see
the very same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ACTS = ("bipolar", "unipolar")


def _check_mn(M: int, N: int) -> None:
    for name, val in (("M", M), ("N", N)):
        if not isinstance(val, int) or not 1 <= val <= 8:
            raise ValueError(f"{name} must be an integer from 1 to 8 (got {val!r})")


def _check_act(act: str) -> None:
    if act not in ACTS:
        raise ValueError(f"act must be one of {ACTS} (got {act!r})")


def base_shifts(M: int) -> torch.Tensor:
    """u_m spread evenly over [-1, 1] (the paper's u_m = -1 + (m-1)·2/(M-1)); u = 0 for M = 1."""
    if M == 1:
        return torch.zeros(1)
    return torch.linspace(-1.0, 1.0, M)


def sign_pos(x: torch.Tensor) -> torch.Tensor:
    """sign() with sign(0) = +1, so every base entry is ±1."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def weight_bases(w: torch.Tensor, M: int, channelwise: bool) -> torch.Tensor:
    """B_m = sign(W − mean(W) + u_m·std(W)), stacked as [M, *w.shape].

    Statistics are over the whole tensor, or per output channel when `channelwise`.
    """
    dims = tuple(range(1, w.dim())) if channelwise else tuple(range(w.dim()))
    mean = w.mean(dim=dims, keepdim=True)
    std = w.std(dim=dims, keepdim=True, unbiased=False)
    u = base_shifts(M).to(w).view(M, *([1] * w.dim()))
    return sign_pos(w.unsqueeze(0) - mean.unsqueeze(0) + u * std.unsqueeze(0))


def least_squares_alpha(w: torch.Tensor, bases: torch.Tensor, channelwise: bool) -> torch.Tensor:
    """α minimising ‖W − Σ α_m B_m‖², shape [M] or [M, O] (min-norm when bases coincide)."""
    M = bases.shape[0]
    if channelwise:
        O = w.shape[0]
        A = bases.reshape(M, O, -1).permute(1, 2, 0)  # [O, K, M]
        b = w.reshape(O, -1, 1)
        sol = torch.linalg.pinv(A) @ b  # [O, M, 1]
        return sol[..., 0].T.contiguous()
    A = bases.reshape(M, -1).T  # [K, M]
    return (torch.linalg.pinv(A) @ w.reshape(-1, 1))[:, 0]


def _alpha_view(alpha: torch.Tensor, ndim: int) -> torch.Tensor:
    """Broadcast α ([M] or [M, O]) against stacked bases [M, O, ...] of `ndim` dims."""
    if alpha.dim() == 1:
        return alpha.view(-1, *([1] * (ndim - 1)))
    return alpha.view(*alpha.shape, *([1] * (ndim - 2)))


class _ABCBase(nn.Module):
    """Weight approximation and activation binarisation shared by the conv and linear layers."""

    weight: nn.Parameter

    def _init_abc(self, M: int, N: int, channelwise: bool, act: str) -> None:
        _check_mn(M, N)
        _check_act(act)
        self.M, self.N, self.channelwise, self.act = M, N, channelwise, act
        shifts = torch.linspace(-0.3, 0.3, N) if N > 1 else torch.zeros(1)
        self.shift = nn.Parameter(shifts)  # v_n
        self.beta = nn.Parameter(torch.full((N,), 1.0 / N))  # β_n
        self._frozen: FrozenABC | None = None
        self._frozen_at: tuple[int, ...] = ()

    # -- weights ---------------------------------------------------------------------------
    def bases_and_alpha(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current ±1 bases [M, *weight.shape] and their least-squares α (no gradient)."""
        with torch.no_grad():
            bases = weight_bases(self.weight, self.M, self.channelwise)
            alpha = least_squares_alpha(self.weight, bases, self.channelwise)
        return bases, alpha

    def approx_weight(self) -> torch.Tensor:
        """Σ α_m B_m with a straight-through gradient from each B_m to the latent weight."""
        bases, alpha = self.bases_and_alpha()
        ste = bases + (self.weight - self.weight.detach()).unsqueeze(0)
        return (_alpha_view(alpha, bases.dim()) * ste).sum(0)

    # -- activations -----------------------------------------------------------------------
    def binarize(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """A_n = H_{v_n}(x) with the STE gradient of clip(x + v_n, 0, 1)."""
        h = torch.clamp(x + self.shift[n], 0.0, 1.0)
        bits = (h >= 0.5).to(x.dtype)
        if self.act == "bipolar":
            h, bits = 2 * h - 1, 2 * bits - 1
        return h + (bits - h).detach()

    # -- eval mode: frozen constants ---------------------------------------------------------
    def train(self, mode: bool = True):  # noqa: D102 - torch API
        super().train(mode)
        self._frozen = None
        if not mode:
            self.frozen()  # snapshot now, outside any trace (export traces the eval forward)
        return self

    def _versions(self) -> tuple[int, ...]:
        """In-place change counters of the parameters (load_state_dict and optimiser steps
        bump them), so the eval-mode snapshot is retaken whenever a parameter changed."""
        return tuple(p._version for p in (self.weight, self.shift, self.beta))

    def freeze(self) -> FrozenABC:
        """Snapshot bases, α, v and β as float32 constants for eval and export."""
        bases, alpha = self.bases_and_alpha()
        f32 = [torch.tensor(np.float32(t.item())) for t in self.shift.detach()]
        b32 = [torch.tensor(np.float32(t.item())) for t in self.beta.detach()]
        return FrozenABC(bases.float(), alpha.float().contiguous(), f32, b32)

    def frozen(self) -> FrozenABC:
        """The frozen constants: cached in eval mode until a parameter changes."""
        if self.training:
            return self.freeze()
        if self._frozen is None or self._frozen_at != self._versions():
            self._frozen, self._frozen_at = self.freeze(), self._versions()
        return self._frozen

    def _eval_planes(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The N activation planes exactly as the canonical ONNX pattern writes them."""
        fz = self.frozen()
        planes = []
        for v in fz.shift:
            bits = (torch.clamp(x + v, 0.0, 1.0) >= 0.5).float()
            planes.append(bits * 2.0 - 1.0 if self.act == "bipolar" else bits)
        return planes

    def _eval_weight(self) -> torch.Tensor:
        """ReduceSum(Mul(α, B), axis 0): the stacked form the importer recognises."""
        fz = self.frozen()
        return (_alpha_view(fz.alpha, fz.bases.dim()) * fz.bases).sum(0)

    def report(self) -> dict:
        """Bases, α, v and β as NumPy arrays (what a compiler or a person inspects)."""
        fz = self.frozen()
        return {
            "bases": fz.bases.numpy(),
            "alpha": fz.alpha.numpy(),
            "shift": np.array([float(v) for v in fz.shift], np.float32),
            "beta": np.array([float(b) for b in fz.beta], np.float32),
            "act": self.act,
        }


@dataclass
class FrozenABC:
    """Float32 constants of an ABC layer in eval mode."""

    bases: torch.Tensor  # [M, *weight.shape], ±1
    alpha: torch.Tensor  # [M] or [M, O]
    shift: list[torch.Tensor]  # N 0-d float32 tensors (v_n)
    beta: list[torch.Tensor]  # N 0-d float32 tensors (β_n)


class ABCConv2d(_ABCBase):
    """Conv2d with ABC weights (M bases) and activations (N planes); no bias, as in the paper."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int = 0,
        M: int = 3,
        N: int = 3,
        channelwise: bool = False,
        act: str = "bipolar",
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError("in_channels and out_channels must be positive")
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = (kh, kw), stride, padding
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kh, kw))
        nn.init.kaiming_normal_(self.weight, nonlinearity="relu")
        self._init_abc(M, N, channelwise, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"ABCConv2d expects a 4-D NCHW input, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"ABCConv2d expects {self.in_channels} input channels, got {x.shape[1]}"
            )
        if self.training:
            w = self.approx_weight()
            planes = [self.binarize(x, n) for n in range(self.N)]
            betas = list(self.beta)
            return sum(F.conv2d(a, w, None, self.stride, self.padding) * b
                       for a, b in zip(planes, betas, strict=True))
        w = self._eval_weight()
        out = None
        for a, b in zip(self._eval_planes(x), self.frozen().beta, strict=True):
            z = F.conv2d(a, w, None, self.stride, self.padding) * b
            out = z if out is None else out + z
        return out

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, M={self.M}, N={self.N}, "
                f"channelwise={self.channelwise}, act={self.act!r}")


class ABCLinear(_ABCBase):
    """Linear layer with ABC weights and activations (no bias)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        M: int = 3,
        N: int = 3,
        channelwise: bool = False,
        act: str = "bipolar",
    ) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError("in_features and out_features must be positive")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_normal_(self.weight, nonlinearity="relu")
        self._init_abc(M, N, channelwise, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"ABCLinear expects {self.in_features} input features, got {x.shape[-1]}"
            )
        if self.training:
            w = self.approx_weight()
            return sum(F.linear(self.binarize(x, n), w) * self.beta[n] for n in range(self.N))
        w = self._eval_weight()
        out = None
        for a, b in zip(self._eval_planes(x), self.frozen().beta, strict=True):
            z = F.linear(a, w) * b
            out = z if out is None else out + z
        return out

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, M={self.M}, N={self.N}, "
                f"channelwise={self.channelwise}, act={self.act!r}")


def abc_layers(model: nn.Module) -> list[tuple[str, _ABCBase]]:
    """All ABC layers of a model, with their qualified names."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _ABCBase)]
