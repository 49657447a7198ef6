"""The generic context-aggregation block (Container Eq. 3 / Eq. 9 followed by a channel MLP)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from timm.layers import ConvMlp, DropPath, Mlp
from torch import Tensor, nn

from ..affinity import Affinity
from ..layers.conv_proj import input_projection
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

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold for deployment (eval mode; found by ``timm.utils.reparameterize_model``), all exact: the
        BatchNorms into the 1×1 ``proj_in`` and MLP ``fc1`` that follow them, and the constant offset the
        affinity pops (:meth:`~ctxagg.affinity.Affinity.pop_bias`, e.g. a depthwise bias times β) into
        ``proj_out``. The positional conv folds its own residual (:class:`~ctxagg.layers.ConvPosEnc`)."""
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
