"""Exact algebraic folds used to re-parameterise trained models for deployment (eval-mode statistics)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["bn_scale_shift", "norm_scale_shift", "fold_bn_into_next_conv", "fold_bn_into_prev_conv",
           "add_identity_to_depthwise"]


def norm_scale_shift(weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, var: Tensor, eps: float
                     ) -> tuple[Tensor, Tensor]:
    """(a, b) with ``γ·(x − μ)/√(σ² + ε) + β == a·x + b`` per channel (γ = 1, β = 0 where not given)."""
    a = (weight if weight is not None else torch.ones_like(var)) / torch.sqrt(var + eps)
    return a, (bias if bias is not None else torch.zeros_like(var)) - mean * a


def bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """(a, b) with ``bn(x) == a·x + b`` per channel in eval mode."""
    return norm_scale_shift(bn.weight if bn.affine else None, bn.bias if bn.affine else None, bn.running_mean,
                            bn.running_var, bn.eps)


@torch.no_grad()
def fold_bn_into_next_conv(bn: nn.BatchNorm2d, conv: nn.Conv2d) -> None:
    """``conv(bn(x))`` -> ``conv'(x)``; exact for 1×1, stride-free-padding convs (a k×k conv's zero padding
    would see the BN shift at the border, so only 1×1 convs are accepted)."""
    if conv.kernel_size != (1, 1) or conv.groups != 1:
        raise ValueError("only a dense 1×1 conv can absorb a preceding BatchNorm exactly")
    a, b = bn_scale_shift(bn)
    w = conv.weight
    extra = w[:, :, 0, 0] @ b
    conv.weight.copy_(w * a.view(1, -1, 1, 1))
    if conv.bias is None:
        conv.bias = nn.Parameter(extra)
    else:
        conv.bias.add_(extra)


@torch.no_grad()
def fold_bn_into_prev_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """``bn(conv(x))`` -> ``conv'(x)``; always exact."""
    a, b = bn_scale_shift(bn)
    conv.weight.mul_(a.view(-1, 1, 1, 1))
    if conv.bias is None:
        conv.bias = nn.Parameter(b.clone())
    else:
        conv.bias.mul_(a).add_(b)


@torch.no_grad()
def add_identity_to_depthwise(conv: nn.Conv2d) -> None:
    """``x + dw(x)`` -> ``dw'(x)``: add 1 to the centre tap of an odd, same-padded depthwise kernel."""
    k = conv.kernel_size
    if conv.groups != conv.in_channels or conv.in_channels != conv.out_channels or k[0] % 2 == 0 or k[1] % 2 == 0:
        raise ValueError("only an odd, same-size depthwise conv can absorb its residual")
    conv.weight[:, 0, k[0] // 2, k[1] // 2] += 1
