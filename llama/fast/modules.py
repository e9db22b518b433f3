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
    def cat(cls, parts: List[nn.Module], gated: bool = False) -> nn.Module:
        """One layer computing the outputs of `parts` (linear layers) side by side: over one
        joined weight on a GPU (one kernel instead of several); on a CPU over the parts' own
        weights (`SideBySide`: joining would copy them, 1.5x the model's memory there)."""
        weights = [p.weight.detach() for p in parts]
        if weights[0].device.type == "cpu":
            return SideBySide(weights, gated)
        return cls(torch.cat(weights, dim=0), gated)

    def weights(self) -> List[torch.Tensor]:
        return [self.weight]

    def forward(self, x: torch.Tensor, norm=None, residual=None) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.gated, norm, residual)

    def extra_repr(self) -> str:
        out, k = self.weight.shape
        return f"in_features={k}, out_features={out // 2 if self.gated else out}{', gated' if self.gated else ''}"


class SideBySide(nn.Module):
    """The outputs of several linear layers side by side, each product over its own weight;
    `gated`: two parts w1, w3 and y = silu(x @ w1.T) * (x @ w3.T). Takes `norm` and
    `residual` as `Linear` does. On 2 CPU cores (1.1B, bf16) the fast path decoded as fast with
    these as with joined weights (10.6 against 10.4-10.9 tokens/s) in 2.3 GB instead of 3.5."""

    fuses_residual = True

    def __init__(self, weights: List[torch.Tensor], gated: bool = False):
        super().__init__()
        self.parts = nn.ParameterList([nn.Parameter(w, requires_grad=False) for w in weights])
        self.gated = gated

    def forward(self, x: torch.Tensor, norm=None, residual=None) -> torch.Tensor:
        if norm is not None:
            x = kernels.rms_norm(x, *norm)
        y = torch.cat([kernels.linear(x, w) for w in self.parts], dim=-1)
        y = kernels.silu_mul(y) if self.gated else y
        return y if residual is None else residual + y

    def weights(self) -> List[torch.Tensor]:
        return list(self.parts)


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
