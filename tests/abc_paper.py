"""ABC-Net written the paper's way (Lin et al., NIPS 2017), as a user's training code is.

Not abc-tvm's own layers (`abc_tvm.nn`, whose export writes the contract's stacked form):
this is the form public ports train and export with `torch.onnx.export`, so the compiler
meets the weight construction itself.

- weights: B_m = sign(W − mean(W) + u_m·std(W)), u_m = −1 + (m−1)·2/(M−1) (the paper's
  (−1, −0.5, 0, 0.5, 1) for M = 5), mean and std over the layer or per output channel;
  the sign's gradient straight through (clipped), as ports write it (a custom Function);
- α: least squares at run time, `(BᵀB + εI)⁻¹BᵀW` by an unrolled Gauss–Jordan solve
  (`torch.linalg.lstsq`, `solve`, `inv` and `pinv` do not export to ONNX opset 17), or a
  learned parameter (what ports without an in-graph solve do), or frozen buffers;
- activations: A = Σ_n β_n H_{v_n}(x), H_v(x) = 2·[clip(x + v, 0, 1) ≥ 0.5] − 1, with the
  straight-through `h + (bits − h).detach()`, learned v_n and β_n.

`digits()` is scikit-learn's bundled 8×8 digits set, `train()` a few seconds of Adam.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn


def shifts(M: int) -> torch.Tensor:
    """The paper's u_m: M values spread evenly over [−1, 1] (0 for M = 1)."""
    return torch.zeros(1) if M == 1 else torch.linspace(-1.0, 1.0, M)


class _SignSTE(torch.autograd.Function):
    """sign(x) forward, the gradient passed where |x| ≤ 1 (exports as Sign)."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205 - torch API
        ctx.save_for_backward(x)
        return torch.sign(x)

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205 - torch API
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1).to(g.dtype)


def solve_normal(B: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """α minimising ‖w − Bα‖² for B [..., K, M], w [..., K, 1]: (BᵀB + εI)⁻¹Bᵀw by
    Gauss–Jordan, unrolled over M with elementwise ops and MatMul (so it exports)."""
    M = B.shape[-1]  # noqa: N806
    A = B.transpose(-1, -2) @ B + eps * torch.eye(M)  # noqa: N806
    b = B.transpose(-1, -2) @ w
    rows = [A[..., i:i + 1, :] for i in range(M)]
    rhs = [b[..., i:i + 1, :] for i in range(M)]
    for i in range(M):  # BᵀB is symmetric positive definite: no pivoting needed
        piv = rows[i][..., i:i + 1]
        rows[i], rhs[i] = rows[i] / piv, rhs[i] / piv
        for j in range(M):
            if j != i:
                f = rows[j][..., i:i + 1]
                rows[j], rhs[j] = rows[j] - f * rows[i], rhs[j] - f * rhs[i]
    return torch.cat(rhs, dim=-2)[..., 0]  # [..., M]


class PaperABCConv(nn.Module):
    """ABC conv: Σ_n β_n Conv(H_{v_n}(x), Σ_m α_m B_m), no bias (the paper's layer).

    `alpha`: "lstsq" (least squares from W in the forward), "param" (learned), or "frozen"
    (after `freeze()`: bases and α buffers, the forward computes Σ α_m B_m from them).
    `terms`: Σ α_m B_m written as Python's `sum` of M products (else one stacked product
    summed over axis 0); `sign`: "sign" (torch.sign) or "where" (x >= 0 → ±1); `bias`:
    a conv bias, as `nn.Conv2d` has by default."""

    def __init__(self, cin: int, cout: int, k: int = 3, padding: int = 1, M: int = 5,
                 N: int = 3, channelwise: bool = False, alpha: str = "lstsq",
                 terms: bool = False, sign: str = "sign", bias: bool = False) -> None:
        super().__init__()
        self.M, self.N, self.channelwise, self.alpha_mode = M, N, channelwise, alpha
        self.padding, self.terms, self.sign = padding, terms, sign
        self.bias = nn.Parameter(torch.randn(cout) * 0.1) if bias else None
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k) * (2.0 / (cin * k * k)) ** 0.5)
        self.register_buffer("u", shifts(M))
        self.v = nn.Parameter(torch.linspace(-0.3, 0.3, N) if N > 1 else torch.zeros(1))
        self.beta = nn.Parameter(torch.full((N,), 1.0 / N))
        if alpha == "param":
            shape = (M, cout) if channelwise else (M,)
            spread = torch.linspace(0.75, 1.25, shape[-1]) if channelwise else 1.0
            self.alpha = nn.Parameter(torch.full(shape, 1.0 / M) * spread * self.weight.std())

    def _dims(self) -> tuple[int, ...]:
        return (1, 2, 3) if self.channelwise else (0, 1, 2, 3)

    def bases(self) -> torch.Tensor:
        """B_m = sign(W − mean + u_m·std), stacked [M, O, I, kh, kw]."""
        W = self.weight  # noqa: N806
        mean = W.mean(dim=self._dims(), keepdim=True)
        std = W.std(dim=self._dims(), keepdim=True)
        u = self.u.view(-1, 1, 1, 1, 1)
        z = W.unsqueeze(0) - mean.unsqueeze(0) + u * std.unsqueeze(0)
        if self.sign == "where":
            return z + (torch.where(z >= 0, 1.0, -1.0) - z).detach()
        return _SignSTE.apply(z)

    def alphas(self, B: torch.Tensor) -> torch.Tensor:
        """α as [M, O, 1, 1, 1] or [M, 1, 1, 1, 1]."""
        if self.alpha_mode == "param":
            a = self.alpha
        elif self.channelwise:
            O = B.shape[1]  # noqa: N806
            a = solve_normal(B.reshape(self.M, O, -1).permute(1, 2, 0),
                             self.weight.reshape(O, -1, 1)).T  # [M, O]
        else:
            a = solve_normal(B.reshape(self.M, -1).T, self.weight.reshape(-1, 1))
        return a.reshape(self.M, -1, 1, 1, 1)

    def weight_hat(self) -> torch.Tensor:
        """Σ_m α_m B_m."""
        if self.alpha_mode == "frozen":
            a, B = self.alpha_f, self.bases_f  # noqa: N806
        else:
            B = self.bases()  # noqa: N806
            a = self.alphas(B.detach())
        if self.terms:
            return sum(a[m] * B[m] for m in range(self.M))
        return (a * B).sum(0)

    def freeze(self) -> None:
        """Bases and α as buffers (the 'frozen' form): what a port saves for deployment."""
        with torch.no_grad():
            B = self.bases()  # noqa: N806
            self.register_buffer("bases_f", B.clone())
            self.register_buffer("alpha_f", self.alphas(B).clone())
        self.alpha_mode = "frozen"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_hat()
        out = 0
        for n in range(self.N):
            h = torch.clamp(x + self.v[n], 0.0, 1.0)
            h2 = 2 * h - 1
            a = h2 + ((h >= 0.5).float() * 2 - 1 - h2).detach()  # H_{v_n}(x), STE
            out = out + self.beta[n] * F.conv2d(a, w, self.bias, padding=self.padding)
        return out


class PaperABCNet(nn.Module):
    """Digits 8×8: a float stem, three ABC convs (BN after each), a float classifier, as
    the paper keeps the first and last layers in float."""

    def __init__(self, Ms: tuple[int, int, int] = (5, 3, 5), Ns: tuple[int, int, int] = (3, 1, 3),
                 channelwise: tuple[bool, bool, bool] = (False, True, False),
                 alpha: str = "lstsq", width: int = 16) -> None:
        super().__init__()
        c = width
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c))
        self.abc = nn.ModuleList([
            PaperABCConv(c, c, M=Ms[0], N=Ns[0], channelwise=channelwise[0], alpha=alpha),
            PaperABCConv(c, 2 * c, M=Ms[1], N=Ns[1], channelwise=channelwise[1], alpha=alpha),
            PaperABCConv(2 * c, 2 * c, M=Ms[2], N=Ns[2], channelwise=channelwise[2],
                         alpha=alpha)])
        self.bns = nn.ModuleList([nn.BatchNorm2d(c), nn.BatchNorm2d(2 * c),
                                  nn.BatchNorm2d(2 * c)])
        self.fc = nn.Linear(2 * c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i, (conv, bn) in enumerate(zip(self.abc, self.bns, strict=True)):
            x = bn(conv(x))
            if i == 0:
                x = F.max_pool2d(x, 2)
        x = x.mean(dim=(2, 3))
        return self.fc(x.view(x.size(0), -1))

    def freeze(self) -> PaperABCNet:
        for conv in self.abc:
            conv.freeze()
        return self


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits as float32 NCHW in [0, 1]: (x_train, y_train, x_test, y_test),
    a fixed 75/25 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    cut = len(y) * 3 // 4
    return x[:cut], y[:cut], x[cut:], y[cut:]


def train(net: nn.Module, epochs: int = 6, seed: int = 0) -> float:
    """Adam on the digits training split (one thread: the tests share the cores); returns
    the eval-mode test accuracy."""
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(net, epochs)
    finally:
        torch.set_num_threads(threads)


def _train(net: nn.Module, epochs: int) -> float:
    xtr, ytr, xte, yte = digits()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    xtr_t, ytr_t = torch.from_numpy(xtr), torch.from_numpy(ytr)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(ytr)).split(64):
            opt.zero_grad()
            F.cross_entropy(net(xtr_t[idx]), ytr_t[idx]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        pred = net(torch.from_numpy(xte)).argmax(1).numpy()
    return float((pred == yte).mean())


def export(net: nn.Module, x: torch.Tensor, fold: bool = True) -> onnx.ModelProto:
    """`torch.onnx.export(dynamo=False, opset_version=17)`, as a user calls it."""
    buf = io.BytesIO()
    net.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), buf, dynamo=False, opset_version=17,
                          do_constant_folding=fold, input_names=["x"], output_names=["y"])
    return onnx.load_from_string(buf.getvalue())
