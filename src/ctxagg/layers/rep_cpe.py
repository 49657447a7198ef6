"""Residual parallel conditional positional encoding, RP-CPE (LinGlos §3.2, Fig. 2, Table 6)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["RepConditionalPosEnc", "CPE_MODES"]

# Table 6 ablation: CPE (one branch), R-CPE (+ skip), P-CPE (parallel branches), RP-CPE (both).
CPE_MODES = ("cpe", "r_cpe", "p_cpe", "rp_cpe")


class ConvBnBranch(nn.Module):
    """One k×k depthwise convolution followed by BatchNorm: a branch that folds into (kernel, bias)."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=False)
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))

    def fused(self) -> tuple[Tensor, Tensor]:
        """Kernel (C, 1, k, k) and bias (C,) of the single conv equal to this branch in eval mode."""
        std = (self.bn.running_var + self.bn.eps).sqrt()
        scale = self.bn.weight / std
        return self.conv.weight * scale.view(-1, 1, 1, 1), self.bn.bias - self.bn.running_mean * scale


class RepConditionalPosEnc(nn.Module):
    """RP-CPE (LinGlos §3.2, Fig. 2(b)): ``x + Σ_b BN_b(DWConv3×3_b(x))`` with four parallel branches in
    training, re-parameterised into one depthwise conv by :meth:`reparameterize` (the method
    ``timm.models.reparameterize_model`` looks for, as in timm's fastvit).

    ``mode`` selects the Table 6 ablation: ``"cpe"`` (one branch, no skip), ``"r_cpe"`` (one branch +
    skip), ``"p_cpe"`` (parallel branches, no skip), ``"rp_cpe"`` (parallel branches + skip).

    Paper-silent choices:
    - every branch is conv + BatchNorm, the re-parameterisation of [13] (DBB) / RepVGG: batch statistics
      make the branches differ in training — without a per-branch normaliser the parallel convs are one
      conv with a summed kernel and the "parallel" ablation would be a no-op;
    - the single-branch modes keep that BN too, so the Table 6 ablation changes one thing at a time;
    - the skip is a plain identity (the paper "adds a skip connection"), not RepVGG's BN-on-identity.
    """

    def __init__(self, dim: int, mode: str = "rp_cpe", branches: int = 4, kernel_size: int = 3):
        super().__init__()
        if mode not in CPE_MODES:
            raise ValueError(f"unknown CPE mode {mode!r}; choose one of {CPE_MODES}")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.dim, self.mode, self.kernel_size = dim, mode, kernel_size
        self.skip = mode in ("r_cpe", "rp_cpe")
        count = branches if mode in ("p_cpe", "rp_cpe") else 1
        self.branches = nn.ModuleList(ConvBnBranch(dim, kernel_size) for _ in range(count))
        self.reparam_conv: Optional[nn.Conv2d] = None

    def extra_repr(self) -> str:
        state = "deployed" if self.reparam_conv is not None else f"branches={len(self.branches)}"
        return f"dim={self.dim}, mode={self.mode}, {state}"

    def forward(self, x: Tensor) -> Tensor:
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        out = sum(branch(x) for branch in self.branches)
        return x + out if self.skip else out

    @torch.no_grad()
    def fused_kernel(self) -> tuple[Tensor, Tensor]:
        """(kernel, bias) of the one depthwise conv equal to this module in eval mode."""
        kernels, biases = zip(*(branch.fused() for branch in self.branches))
        kernel, bias = torch.stack(kernels).sum(0), torch.stack(biases).sum(0)
        if self.skip:
            kernel = kernel.clone()
            kernel[:, 0, self.kernel_size // 2, self.kernel_size // 2] += 1  # identity = centre tap 1
        return kernel, bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold branches, BNs (running statistics) and skip into one depthwise conv, in place."""
        if self.reparam_conv is not None:
            return
        kernel, bias = self.fused_kernel()
        conv = nn.Conv2d(self.dim, self.dim, self.kernel_size, padding=self.kernel_size // 2, groups=self.dim,
                         bias=True).to(device=kernel.device, dtype=kernel.dtype)
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
        self.branches = nn.ModuleList()
        self.reparam_conv = conv
