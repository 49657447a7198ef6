"""Swin Transformers with ctxagg affinities: the Swin rows of "Vision Transformers are Dynamic
Convolutions" Table 2 (softmax ablation, §4.2) and Table 3 (depth-wise Swin, §4.3).

Built on timm's ``SwinTransformer`` (patch merging, shifted 7×7 windows, masks, dynamic image size,
``forward_intermediates`` and ``features_only`` come from it); each block's window attention is replaced
by :class:`WindowAffinityAttention`, whose token mixing is a ctxagg affinity applied per window.
Names: ``swin_t``/``swin_b`` (softmax, relative bias), ``swin_t_<norm>_<pos>``, ``swin_t_dw``/``swin_b_dw``.

Depth-wise Swin: a query selects the keys of its window — in a shifted window, of its own region (as the
attention mask does). Unshifted windows average with a mean; shifted ones with a normalised N×N matmul,
whose (B·windows, 49, C) output the paper's activation counts include (Swin-T 14.112M, Swin-B 30.256M:
exactly one N·C tensor more per shifted block). Paper targets: :data:`PAPER_NUMBERS`.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock
from torch import Tensor, nn

from ..affinity.attention import ATTENTION_NORMS, SelfAttentionAffinity
from ..affinity.base import apply_matrix
from ..affinity.dw_attention import DepthwiseSelfAttention
from ..checks import add_input_checks, state_fixed_input_size
from ..layers.pos_embed import resize_pos_embed
from ..tracing import fx_leaf, is_symbolic
from ..layers.pos_embed_rel import POS_EMBED_KINDS, RelativePositionBias

__all__ = ["AffinitySwin", "FxSwinBlock", "WindowAffinityAttention", "AbsPosPatchEmbed", "PAPER_NUMBERS",
           "checkpoint_filter_fn", "small_input_kwargs"]

# --- the published numbers: GFLOPs (fvcore MACs), parameters (M), activations (M) at 224² -----------------
# ``unmatched``: measures no consistent construction reproduces, with what this implementation gives and ``note`` why.
_T3 = dict(source="ViT-as-DynConv Table 3", params_tol=0.01, gflops_tol=0.03, activations_tol=0.05)
_T2 = dict(source="ViT-as-DynConv Table 2")


def _t3(gflops: float, params: float, activations: float, **extra: Any) -> dict[str, Any]:
    return {"gflops": gflops, "params": params, "activations": activations, **_T3, **extra}


PAPER_NUMBERS: dict[str, dict[str, Any]] = {
    "swin_t": _t3(4.508, 28.288, 17.054),
    "swin_t_none_rel": dict(_T2),
    "swin_t_scale_rel": _t3(4.508, 28.288, 17.054),
    "swin_t_scale_relu_rel": dict(_T2),
    "swin_t_layernorm_rel": dict(_T2),
    "swin_t_ln_relu_rel": dict(_T2),
    "swin_t_softmax_abs": dict(_T2),
    "swin_t_scale_abs": dict(_T2),
    "swin_t_scale_relu_abs": dict(_T2),
    "swin_t_dw": _t3(4.141, 26.850, 14.112, unmatched={"params": 26.127394}, note=(
        "26.850M is not reachable with the construction that reproduces Swin-B depth-wise exactly (80.777M) "
        "and both depth-wise activation counts: dropping the value projection from Swin-T gives 26.127M")),
    "swin_b": _t3(15.467, 87.768, 36.625),
    "swin_b_scale_rel": _t3(15.468, 87.768, 38.930, unmatched={"activations": 36.625344}, note=(
        "38.930M exceeds softmax Swin-B (36.625M) by exactly one extra window-attention-sized tensor per "
        "shifted block (2.305M), while Swin-T scaling equals Swin-T softmax (17.054M): the two rows were "
        "measured on different code; we count the explicit attention once, as for Swin-T")),
    "swin_b_dw": _t3(14.192, 80.777, 30.256),
}


@fx_leaf  # sizes from the batch (torch.fx: one graph node)
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
                         else SelfAttentionAffinity(dim, num_heads, normaliser=attn_norm, attn_drop=attn_drop))
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
            elif self.affinity.normaliser == "softmax":
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
        return x + resize_pos_embed(self.pos_embed, x, mode="bicubic", channels_last=True)


@fx_leaf  # timm builds the mask by item assignment, which a torch.fx Proxy cannot take: one graph node
def _shift_mask(block: SwinTransformerBlock, x: Tensor) -> Optional[Tensor]:
    return SwinTransformerBlock.get_attn_mask(block, x)


class FxSwinBlock(SwinTransformerBlock):
    """timm's ``SwinTransformerBlock`` whose per-input shift mask (``strict_img_size=False``) is built by a torch.fx
    leaf when traced; otherwise unchanged (:class:`AffinitySwin` gives its blocks this class)."""

    def get_attn_mask(self, x: Optional[Tensor] = None, device: Optional[torch.device] = None,
                      dtype: Optional[torch.dtype] = None) -> Optional[Tensor]:
        if is_symbolic(x) and any(self.shift_size):  # unshifted blocks have no mask (None, known while tracing)
            return _shift_mask(self, x)
        return super().get_attn_mask(x, device, dtype)


class AffinitySwin(SwinTransformer):
    """Swin Transformer (Liu et al.) whose window attention is a ctxagg affinity: self-attention with the
    normaliser ``attn_norm`` (vit_as_dynamic_conv.txt §4.2) or, with ``depthwise=True``, depth-wise
    self-attention (§4.3, Eq. 5); ``pos`` is ``"rel"`` (Swin's relative bias) or ``"abs"`` (absolute embedding
    after the patch embedding, no relative bias). Everything else is timm's ``SwinTransformer``.
    """

    def __init__(self, attn_norm: str = "softmax", depthwise: bool = False, pos: str = "rel", **kwargs: Any):
        if attn_norm not in ATTENTION_NORMS:
            raise ValueError(f"unknown attn_norm {attn_norm!r}; choose one of {ATTENTION_NORMS}")
        if pos not in POS_EMBED_KINDS:
            raise ValueError(f"unknown pos {pos!r}; choose one of {POS_EMBED_KINDS}")
        if pos == "abs":
            kwargs["embed_layer"] = AbsPosPatchEmbed
        super().__init__(**kwargs)
        self.attn_norm, self.depthwise, self.pos = attn_norm, depthwise, pos
        for stage in self.layers:
            for block in stage.blocks:
                block.__class__ = FxSwinBlock  # no new state: a method override only
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


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.9,
            "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj", "classifier": "head.fc",
            "license": "mit", **kwargs}


default_cfgs = generate_default_cfgs({
    "swin_t": _cfg(),
    "swin_t_none_rel": _cfg(),
    "swin_t_scale_rel": _cfg(),
    "swin_t_scale_relu_rel": _cfg(),
    "swin_t_layernorm_rel": _cfg(),
    "swin_t_ln_relu_rel": _cfg(),
    "swin_t_softmax_abs": _cfg(),
    "swin_t_scale_abs": _cfg(),
    "swin_t_scale_relu_abs": _cfg(),
    "swin_t_dw": _cfg(),
    "swin_b": _cfg(),
    "swin_b_scale_rel": _cfg(),
    "swin_b_dw": _cfg(),
})


def small_input_kwargs(model_name: str, img_size: int) -> dict[str, Any]:
    """Model arguments for training a Swin row at ``img_size``: at ≤ 64² 2×2 patches and 4×4 windows instead
    of 4×4 and 7×7 (paper-silent, the paper trains at 224² only). The same for every Swin name."""
    return dict(img_size=img_size, **(dict(patch_size=2, window_size=4) if img_size <= 64 else {}))


def _create_swin(variant: str, pretrained: bool = False, **kwargs: Any) -> AffinitySwin:
    """Build a Swin row with timm's builder (pretrained cfg, features_only) and the package's input checks."""
    out_indices = kwargs.pop("out_indices", tuple(range(len(kwargs["depths"]))))
    kwargs.setdefault("strict_img_size", False)  # any input size (padded windows, masks per input), as timm allows
    model = build_model_with_cfg(AffinitySwin, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                 feature_cfg=dict(flatten_sequential=True, out_indices=out_indices), **kwargs)
    add_input_checks(model)  # one forward-pre-hook, as every family
    return state_fixed_input_size(model)

# Swin-T/B (Liu et al.) at 224², window 7; stochastic depth 0.2 / 0.5 as Table 4.


@register_model
def swin_t(pretrained: bool = False, **kwargs: Any) -> AffinitySwin:
    """Swin-T: softmax window attention, relative position bias (ViT-as-DynConv Table 3)."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                      drop_path_rate=0.2)
    return _create_swin("swin_t", pretrained, **dict(model_args, **kwargs))


@register_model
def swin_t_none_rel(pretrained: bool = False, **kwargs: Any) -> AffinitySwin:
    """Swin-T with unnormalised attention (§4.2), relative position bias (ViT-as-DynConv Table 2)."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                      drop_path_rate=0.2, attn_norm="none")
    return _create_swin("swin_t_none_rel", pretrained, **dict(model_args, **kwargs))


@register_model
def swin_t_scale_rel(pretrained: bool = False, **kwargs: Any) -> AffinitySwin:
    """Swin-T with scaling attention (§4.2), relative position bias (ViT-as-DynConv Table 3)."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                      drop_path_rate=0.2, attn_norm="scale")
    return _create_swin("swin_t_scale_rel", pretrained, **dict(model_args, **kwargs))


@register_model
def swin_t_scale_relu_rel(pretrained: bool = False, **kwargs: Any) -> AffinitySwin:
    """Swin-T with scaling + ReLU attention (§4.2), relative position bias
    (ViT-as-DynConv Table 2)."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                      drop_path_rate=0.2, attn_norm="scale_relu")
    return _create_swin("swin_t_scale_relu_rel", pretrained, **dict(model_args, **kwargs))


@register_model
def swin_t_layernorm_rel(pretrained: bool = False, **kwargs: Any) -> AffinitySwin:
    """Swin-T with LayerNorm attention (§4.2), relative position bias (ViT-as-DynConv Table 2)."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                      drop_path_rate=0.2, attn_norm="layernorm")
    return _create_swin("swin_t_layernorm_rel", pretrained, **dict(model_args, **kwargs))


@register_model
def swin_t_ln_relu_rel(pretrained: bool = False, **kwargs: Any) -> AffinitySwin:
    """Swin-T with LayerNorm + ReLU attention (§4.2), relative position bias
    (ViT-as-DynConv Table 2)."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                      drop_path_rate=0.2, attn_norm="ln_relu")
    return _create_swin("swin_t_ln_relu_rel", pretrained, **dict(model_args, **kwargs))


@register_model
def swin_t_softmax_abs(pretrained: bool = False, **kwargs: Any) -> AffinitySwin:
    """Swin-T with softmax attention (§4.2), absolute position embedding (ViT-as-DynConv Table 2)."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                      drop_path_rate=0.2, pos="abs")
    return _create_swin("swin_t_softmax_abs", pretrained, **dict(model_args, **kwargs))


@register_model
def swin_t_scale_abs(pretrained: bool = False, **kwargs: Any) -> AffinitySwin:
    """Swin-T with scaling attention (§4.2), absolute position embedding (ViT-as-DynConv Table 2)."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                      drop_path_rate=0.2, attn_norm="scale", pos="abs")
    return _create_swin("swin_t_scale_abs", pretrained, **dict(model_args, **kwargs))


@register_model
def swin_t_scale_relu_abs(pretrained: bool = False, **kwargs: Any) -> AffinitySwin:
    """Swin-T with scaling + ReLU attention (§4.2), absolute position embedding
    (ViT-as-DynConv Table 2)."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                      drop_path_rate=0.2, attn_norm="scale_relu", pos="abs")
    return _create_swin("swin_t_scale_relu_abs", pretrained, **dict(model_args, **kwargs))


@register_model
def swin_t_dw(pretrained: bool = False, **kwargs: Any) -> AffinitySwin:
    """Swin-T with depth-wise self-attention (Eq. 5), relative position bias (ViT-as-DynConv Table 3)."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                      drop_path_rate=0.2, depthwise=True)
    return _create_swin("swin_t_dw", pretrained, **dict(model_args, **kwargs))


@register_model
def swin_b(pretrained: bool = False, **kwargs: Any) -> AffinitySwin:
    """Swin-B: softmax window attention, relative position bias (ViT-as-DynConv Table 3)."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                      drop_path_rate=0.5)
    return _create_swin("swin_b", pretrained, **dict(model_args, **kwargs))


@register_model
def swin_b_scale_rel(pretrained: bool = False, **kwargs: Any) -> AffinitySwin:
    """Swin-B with scaling attention (§4.2), relative position bias (ViT-as-DynConv Table 3)."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                      drop_path_rate=0.5, attn_norm="scale")
    return _create_swin("swin_b_scale_rel", pretrained, **dict(model_args, **kwargs))


@register_model
def swin_b_dw(pretrained: bool = False, **kwargs: Any) -> AffinitySwin:
    """Swin-B with depth-wise self-attention (Eq. 5), relative position bias (ViT-as-DynConv Table 3)."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                      drop_path_rate=0.5, depthwise=True)
    return _create_swin("swin_b_dw", pretrained, **dict(model_args, **kwargs))
