"""The fast path's layers: the model's own, with their products in `llama.kernels`."""

from typing import List

import torch
from torch import nn

from llama import kernels
from llama.model import RMSNorm


class Linear(nn.Module):
    """y = x @ weight.T (no bias) through `kernels.linear`; `gated`: weight is [w1; w3] and
    y = silu(x @ w1.T) * (x @ w3.T). Takes `norm` and `residual` as the kernels do."""

    fuses_residual = True

    def __init__(self, weight: torch.Tensor, gated: bool = False):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.gated = gated

    @classmethod
    def cat(cls, parts: List[nn.Module], gated: bool = False) -> "Linear":
        """One layer computing the outputs of `parts` (linear layers) side by side."""
        return cls(torch.cat([p.weight.detach() for p in parts], dim=0), gated)

    def forward(self, x: torch.Tensor, norm=None, residual=None) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.gated, norm, residual)

    def extra_repr(self) -> str:
        out, k = self.weight.shape
        return f"in_features={k}, out_features={out // 2 if self.gated else out}{', gated' if self.gated else ''}"


class Norm(RMSNorm):
    """RMSNorm through `kernels.rms_norm` (the same function)."""

    @classmethod
    def like(cls, norm: RMSNorm) -> "Norm":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.eps, new.weight = norm.eps, norm.weight
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


class NormLinear(nn.Module):
    """linear(RMSNorm(x)): the norm before a projection, done by the projection's kernel."""

    def __init__(self, norm: RMSNorm, linear: nn.Module):
        super().__init__()
        self.norm, self.linear = norm, linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, norm=(self.norm.weight, self.norm.eps))
