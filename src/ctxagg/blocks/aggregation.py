"""The generic context-aggregation block (Container Eq. 3 / Eq. 9 followed by a channel MLP)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from timm.layers import ConvMlp, DropPath, Mlp
from torch import Tensor, nn

from ..affinity import Affinity, AffinityMixture
from ..layers.conv_proj import ConvProjection, input_projection
from ..layers.fold import fold_bn_into_next_conv
from ..layers.pos_embed import ConvPosEnc

__all__ = ["AggregationBlock", "TokenAggregationBlock"]


class AggregationBlock(nn.Module):
    """``x += pos(x); x += W_out(A·V); x += MLP(norm2(x))`` on NCHW feature maps (Container §3.3-3.4).

    As in the official Container code: a 3×3 depthwise positional conv with its own residual (``pos_kernel=0``:
    none), a BatchNorm before the spatial aggregation and before the 2-layer 1×1-conv MLP, a 1×1 ``proj_in``
    producing V (and Q, K in that channel order when the affinity is dynamic) and a 1×1 ``proj_out``.
    ``proj="conv<k>"`` replaces the 1×1 ``proj_in`` by CvT's convolutional projection (depth-wise k×k conv,
    BatchNorm, point-wise conv per output; :class:`~ctxagg.layers.conv_proj.ConvProjection`), for any affinity.
    """

    def __init__(self, dim: int, affinity: Affinity, mlp_ratio: float = 4.0, pos_kernel: int = 3,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
                 act_layer: Callable[..., nn.Module] = nn.GELU, drop: float = 0.0, drop_path: float = 0.0,
                 proj: str = "linear"):
        super().__init__()
        self.pos_embed = ConvPosEnc(dim, pos_kernel) if pos_kernel else nn.Identity()  # x + dw(x)
        self.norm1 = norm_layer(dim)
        # a dynamic affinity takes (v, q, k); one that aggregates the keys itself (``uses_value = False``, e.g.
        # ViT-as-DynConv's depth-wise self-attention, Eq. 5) takes only (k, q), so only those are projected; one
        # whose kernels come from the values it convolves (``kernels_from_values``, dynamic convs) takes (v, v)
        self.uses_value = getattr(affinity, "uses_value", True)
        self.kernels_from_values = getattr(affinity, "kernels_from_values", False)
        projected = (3 if self.uses_value else 2) if affinity.dynamic and not self.kernels_from_values else 1
        self.proj_in = input_projection(proj, dim, projected)
        self.affinity = affinity
        self.proj_out = nn.Conv2d(dim, dim, 1)
        self.proj_drop = nn.Dropout(drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def affinity_inputs(self, x: Tensor) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """The affinity's positional inputs, in the order of its ``forward`` (the contract's (v, q, k)),
        from the block input *after* the positional term; q and k are None for a static affinity."""
        y = self.proj_in(self.norm1(x))
        if self.kernels_from_values:
            return y, y, None  # the kernels are generated from the values themselves (no q/k projection)
        if self.affinity.dynamic and not self.uses_value:
            q, k = y.chunk(2, dim=1)
            return k, q, None  # the keys take the values' place (the operator's contract)
        if self.affinity.dynamic:
            q, k, v = y.chunk(3, dim=1)
            return v, q, k
        return y, None, None

    def forward(self, x: Tensor) -> Tensor:
        x = self.pos_embed(x)
        v, q, k = self.affinity_inputs(x)
        x = x + self.drop_path1(self.proj_drop(self.proj_out(self.affinity(v, q, k))))
        return x + self.drop_path2(self.mlp(self.norm2(x)))

    @property
    def switch(self) -> Optional[nn.Module]:
        """The learned on/off switch of the affinity's dynamic path (a switched mixture's), or None."""
        return getattr(self.affinity, "switch", None) if isinstance(self.affinity, AffinityMixture) else None

    def dynamic_macs(self, tokens: int) -> int:
        """MACs per image that switching the dynamic path off removes at ``tokens`` tokens: building and applying
        A_dyn plus the projections only the dynamic path needs (Q and K of ``proj_in``; V stays)."""
        if not isinstance(self.affinity, AffinityMixture):
            raise ValueError(f"{type(self.affinity).__name__} is not a mixture: it has no separate dynamic path")
        outputs, per_output = _projection_outputs(self.proj_in, self.affinity.dim)
        return self.affinity.dynamic_macs(tokens) + (outputs - 1) * per_output * tokens

    @torch.no_grad()
    def settle_switch(self) -> None:
        """Make a learned switch permanent, exactly (same output in eval mode): an on switch folds into the
        mixture's gate; an off one leaves a static-only block — the static affinity, the last output of ``proj_in``
        (V, or K where the keys take the values' place) and β folded into ``proj_out`` — with no dynamic weights
        and no dynamic compute left."""
        if self.switch is None:
            return
        mixture = self.affinity
        if mixture.dynamic_on():
            mixture.fold_switch()
            return
        mixture.switch.eval()  # β' at the switch's evaluation value z = 0 (the mixture is dropped below)
        beta = mixture.weights()[1]  # one entry, or one per head (per_head gate): scale proj_out's input channels
        self.proj_in = _last_output(self.proj_in, mixture.dim)
        self.proj_out.weight.mul_(beta.repeat_interleave(mixture.dim // beta.numel()).view(1, -1, 1, 1))
        self.affinity, self.uses_value, self.kernels_from_values = mixture.static_affinity, True, False

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold for deployment (eval mode; found by ``timm.utils.reparameterize_model``), all exact: a learned
        switch (:meth:`settle_switch`), the BatchNorms into the 1×1 ``proj_in`` and MLP ``fc1`` that follow them,
        and the constant offset the affinity pops (:meth:`~ctxagg.affinity.Affinity.pop_bias`, e.g. a depthwise
        bias times β) into ``proj_out``. The positional conv folds its own residual
        (:class:`~ctxagg.layers.ConvPosEnc`)."""
        self.settle_switch()
        if isinstance(self.norm1, nn.BatchNorm2d) and isinstance(self.proj_in, nn.Conv2d):  # not exact into a
            fold_bn_into_next_conv(self.norm1, self.proj_in)  # zero-padded k×k conv: then norm1 stays
            self.norm1 = nn.Identity()
        if hasattr(self.proj_in, "reparameterize"):
            self.proj_in.reparameterize()
        if isinstance(self.norm2, nn.BatchNorm2d):
            fold_bn_into_next_conv(self.norm2, self.mlp.fc1)
            self.norm2 = nn.Identity()
        bias = self.affinity.pop_bias()
        if bias is not None:
            self.proj_out.bias.add_(self.proj_out.weight[:, :, 0, 0] @ bias)


def _projection_outputs(proj: nn.Module, dim: int) -> tuple[int, int]:
    """(number of dim-channel outputs, MACs per token of one) of a block's input projection."""
    if isinstance(proj, ConvProjection):
        return len(proj.branches), proj.kernel_size ** 2 * dim + dim * dim
    return proj.out_channels // dim, proj.in_channels * dim


def _last_output(proj: nn.Module, dim: int) -> nn.Module:
    """The input projection reduced to its last output (q, k, v order: the values), with the same weights."""
    if isinstance(proj, ConvProjection):
        proj.branches = proj.branches[-1:]
        return proj
    out = nn.Conv2d(dim, dim, 1, bias=proj.bias is not None).to(proj.weight)
    out.weight.copy_(proj.weight[-dim:])
    if proj.bias is not None:
        out.bias.copy_(proj.bias[-dim:])
    return out


class TokenAggregationBlock(nn.Module):
    """The same block in token layout (B, N, C) with LayerNorm and linear projections: the ViT/DeiT
    block (Container Eq. 3 with A = attention) generalised to any affinity that takes tokens."""

    def __init__(self, dim: int, affinity: Affinity, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
                 act_layer: Callable[..., nn.Module] = nn.GELU, drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.proj_in = nn.Linear(dim, dim * (3 if affinity.dynamic else 1), bias=qkv_bias)
        self.affinity = affinity
        self.proj_out = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def affinity_inputs(self, x: Tensor) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """The affinity's positional inputs (v, q, k) in the order of its ``forward``; see AggregationBlock."""
        y = self.proj_in(self.norm1(x))
        if self.affinity.dynamic:
            q, k, v = y.chunk(3, dim=-1)
            return v, q, k
        return y, None, None

    def forward(self, x: Tensor) -> Tensor:
        v, q, k = self.affinity_inputs(x)
        x = x + self.drop_path1(self.proj_drop(self.proj_out(self.affinity(v, q, k))))
        return x + self.drop_path2(self.mlp(self.norm2(x)))
