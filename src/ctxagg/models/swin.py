"""Swin Transformers with ctxagg affinities: the Swin rows of "Vision Transformers are Dynamic
Convolutions" Table 2 (softmax ablation, §4.2) and Table 3 (depth-wise Swin, §4.3).

Built on timm's ``SwinTransformer`` (patch merging, shifted 7×7 windows, masks, dynamic image size,
``forward_intermediates`` and ``features_only`` come from it); each block's window attention is replaced
by :class:`WindowAffinityAttention`, whose token mixing is a ctxagg affinity applied per window.
Names: ``swin_t``/``swin_b`` (softmax, relative bias), ``swin_t_<norm>_<pos>``, ``swin_t_dw``/``swin_b_dw``.

Depth-wise Swin: a query selects the keys of its window — in a shifted window, of its own region (as the
attention mask does). Unshifted windows average with a mean; shifted ones with a normalised N×N matmul,
whose (B·windows, 49, C) output the paper's activation counts include (Swin-T 14.112M, Swin-B 30.256M:
exactly one N·C tensor more per shifted block). Paper targets: :data:`ctxagg.models.vit.PAPER_NUMBERS`.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models.swin_transformer import SwinTransformer
from torch import Tensor, nn

from ..affinity.attention import ATTENTION_NORMS, SelfAttentionAffinity
from ..affinity.base import apply_matrix
from ..affinity.dw_attention import DepthwiseSelfAttention
from .vit import POSITIONS, RelativePositionBias, register_variants

__all__ = ["AffinitySwin", "WindowAffinityAttention", "AbsPosPatchEmbed", "SWIN_VARIANTS", "checkpoint_filter_fn"]


def _per_window(mask: Tensor, batch_windows: int) -> Tensor:
    """timm's (num_windows, N, N) window mask -> (B·num_windows, 1, N, N), windows ordered as partitioned."""
    nw, n, _ = mask.shape
    return mask.unsqueeze(0).expand(batch_windows // nw, -1, -1, -1).reshape(batch_windows, 1, n, n)


class WindowAffinityAttention(nn.Module):
    """Swin's (shifted-)window attention (Swin §3.2; vit_as_dynamic_conv.txt Table 1 "Hard (local)" kernel
    selection) with the mixing done by :class:`SelfAttentionAffinity` (any ``attn_norm``, relative bias
    as ``attn_bias``) or :class:`DepthwiseSelfAttention` (Eq. 5, ``p`` applied to the window's keys).

    Drop-in for timm's ``WindowAttention`` (``forward(x, mask)``, ``set_window_size``). timm's shifted-window
    mask (0 / −100) is used as is for softmax; for the other normalisers it becomes a multiplicative 0/1 mask
    on the normalised affinity (paper-silent: −100 is not a mask without softmax; LayerNorm statistics still
    run over the whole window), and for depth-wise attention it selects the keys averaged into k̄.
    """

    def __init__(self, dim: int, num_heads: int, window_size: Sequence[int] = (7, 7), qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, attn_norm: str = "softmax",
                 depthwise: bool = False, relative: bool = True):
        super().__init__()
        self.dim, self.num_heads, self.window_size = dim, num_heads, tuple(to_2tuple(window_size))
        self.depthwise = depthwise
        self.affinity = (DepthwiseSelfAttention(dim, num_heads) if depthwise
                         else SelfAttentionAffinity(dim, num_heads, norm=attn_norm, attn_drop=attn_drop))
        self.rel_pos = RelativePositionBias(num_heads, self.window_size) if relative else None
        self.qkv = nn.Linear(dim, dim * (2 if depthwise else 3), bias=qkv_bias)  # Eq. 5: no value bank
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        for linear in (self.qkv, self.proj):  # timm's ViT/Swin init
            trunc_normal_(linear.weight, std=0.02)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def set_window_size(self, window_size: Sequence[int]) -> None:
        self.window_size = tuple(to_2tuple(window_size))
        if self.rel_pos is not None:
            self.rel_pos.set_grid(self.window_size)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """x: (B·num_windows, N, C) window tokens; mask: timm's (num_windows, N, N) 0/−100 shift mask or None."""
        b = x.shape[0]
        y = self.qkv(x)
        bias = self.rel_pos() if self.rel_pos is not None else None
        keep = None if mask is None else _per_window(mask == 0, b)
        if self.depthwise:
            q, k = y.chunk(2, dim=-1)
            out = self.affinity(k, q, attn_bias=bias, select=keep)
        else:
            q, k, v = y.chunk(3, dim=-1)
            if keep is None:
                out = self.affinity(v, q, k, attn_bias=bias)
            elif self.affinity.norm == "softmax":
                shift = _per_window(mask, b).to(x.dtype)
                out = self.affinity(v, q, k, attn_bias=shift if bias is None else bias + shift)
            else:
                a = self.affinity.matrix(x.shape, q, k, attn_bias=bias) * keep
                out = apply_matrix(F.dropout(a, self.affinity.attn_drop, self.training), v)
        return self.proj_drop(self.proj(out))


class AbsPosPatchEmbed(PatchEmbed):
    """timm's ``PatchEmbed`` followed by a learned absolute position embedding (Swin's ``ape`` option: the
    "Abs" Swin rows of Table 2), resampled bicubically when the grid differs from the built one."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.output_fmt.value != "NHWC":
            raise ValueError("AbsPosPatchEmbed is written for Swin's NHWC patch embedding")
        self.pos_embed = nn.Parameter(torch.zeros(1, *self.grid_size, self.proj.out_channels))
        trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        pos = self.pos_embed
        if tuple(x.shape[1:3]) != tuple(pos.shape[1:3]):
            pos = F.interpolate(pos.permute(0, 3, 1, 2), size=x.shape[1:3], mode="bicubic",
                                align_corners=False).permute(0, 2, 3, 1)
        return x + pos


class AffinitySwin(SwinTransformer):
    """Swin Transformer (Liu et al.) whose window attention is a ctxagg affinity: self-attention with the
    normaliser ``attn_norm`` (vit_as_dynamic_conv.txt §4.2) or, with ``depthwise=True``, depth-wise
    self-attention (§4.3, Eq. 5); ``pos`` is ``"rel"`` (Swin's relative bias) or ``"abs"`` (absolute embedding
    after the patch embedding, no relative bias). Everything else is timm's ``SwinTransformer``.
    """

    def __init__(self, attn_norm: str = "softmax", depthwise: bool = False, pos: str = "rel", **kwargs: Any):
        if attn_norm not in ATTENTION_NORMS:
            raise ValueError(f"unknown attn_norm {attn_norm!r}; choose one of {ATTENTION_NORMS}")
        if pos not in POSITIONS:
            raise ValueError(f"unknown pos {pos!r}; choose one of {POSITIONS}")
        if pos == "abs":
            kwargs["embed_layer"] = AbsPosPatchEmbed
        super().__init__(**kwargs)
        self.attn_norm, self.depthwise, self.pos = attn_norm, depthwise, pos
        for stage in self.layers:
            for block in stage.blocks:
                old = block.attn
                block.attn = WindowAffinityAttention(
                    old.dim, old.num_heads, old.window_size, qkv_bias=old.qkv.bias is not None,
                    attn_drop=old.attn_drop.p, proj_drop=old.proj_drop.p, attn_norm=attn_norm,
                    depthwise=depthwise, relative=pos == "rel")

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith(("rel_pos.table", "patch_embed.pos_embed"))}


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Load a timm ``SwinTransformer`` state dict (``attn.relative_position_bias_table`` -> ``attn.rel_pos.table``;
    a value-free model keeps the q and k rows of ``qkv``)."""
    from timm.models.swin_transformer import checkpoint_filter_fn as timm_filter
    own = model.state_dict()
    out = {}
    for key, value in state_dict.get("model", state_dict).items():
        key = key.replace("attn.relative_position_bias_table", "attn.rel_pos.table")
        if key.endswith(("attn.qkv.weight", "attn.qkv.bias")) and key in own and own[key].shape[0] < value.shape[0]:
            value = value[: own[key].shape[0]]  # q, k rows of a q, k, v projection
        out[key] = value
    return timm_filter(out, model)  # buffers dropped, old layouts and patch-embed sizes handled by timm


_SWIN_BASES: dict[str, dict[str, Any]] = {
    # Swin-T/B at 224², window 7; stochastic depth 0.2 / 0.5 as Table 4
    "swin_t": dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                   drop_path_rate=0.2),
    "swin_b": dict(patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                   drop_path_rate=0.5),
}

# name -> model arguments: every Swin row of Tables 2 and 3
SWIN_VARIANTS: dict[str, dict[str, Any]] = {
    "swin_t": dict(base="swin_t"),
    "swin_t_none_rel": dict(base="swin_t", attn_norm="none"),
    "swin_t_scale_rel": dict(base="swin_t", attn_norm="scale"),
    "swin_t_scale_relu_rel": dict(base="swin_t", attn_norm="scale_relu"),
    "swin_t_layernorm_rel": dict(base="swin_t", attn_norm="layernorm"),
    "swin_t_ln_relu_rel": dict(base="swin_t", attn_norm="ln_relu"),
    "swin_t_softmax_abs": dict(base="swin_t", pos="abs"),
    "swin_t_scale_abs": dict(base="swin_t", attn_norm="scale", pos="abs"),
    "swin_t_scale_relu_abs": dict(base="swin_t", attn_norm="scale_relu", pos="abs"),
    "swin_t_dw": dict(base="swin_t", depthwise=True),
    "swin_b": dict(base="swin_b"),
    "swin_b_scale_rel": dict(base="swin_b", attn_norm="scale"),
    "swin_b_dw": dict(base="swin_b", depthwise=True),
}


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.9,
            "interpolation": "bicubic", "fixed_input_size": True, "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj", "classifier": "head.fc",
            "license": "mit", **kwargs}


default_cfgs = generate_default_cfgs({name: _cfg() for name in SWIN_VARIANTS})


def _create_swin(variant: str, pretrained: bool = False, **kwargs: Any) -> AffinitySwin:
    spec = dict(SWIN_VARIANTS[variant])
    args = {**_SWIN_BASES[spec.pop("base")], **spec, **kwargs}
    out_indices = args.pop("out_indices", tuple(range(len(args["depths"]))))
    return build_model_with_cfg(AffinitySwin, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(flatten_sequential=True, out_indices=out_indices), **args)


def _describe(spec: dict[str, Any]) -> str:
    norm = spec.get("attn_norm", "softmax")
    kind = "depth-wise self-attention (Eq. 5)" if spec.get("depthwise") else f"{norm} attention (§4.2)"
    pos = "absolute position embedding" if spec.get("pos") == "abs" else "relative position bias"
    return f"{dict(swin_t='Swin-T', swin_b='Swin-B')[spec['base']]} with {kind}, {pos}"


register_variants(SWIN_VARIANTS, _create_swin, _describe, globals())
