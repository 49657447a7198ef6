"""DeiT-style ViTs with ctxagg affinities: the softmax ablation (§4.2, Table 2) and depth-wise ViTs
(§4.3, Table 3) of "Vision Transformers are Dynamic Convolutions" (vit_as_dynamic_conv.txt).

Names are ``<base>_<norm>_<pos>[_gap]``: ``deit_s_scale_relu_rel``; ``deit_s``/``deit_b`` are softmax with
absolute position embeddings, ``*_dw_<pos>`` the depth-wise self-attention of Eq. 5. The Swin rows of the
same tables live in :mod:`ctxagg.models.swin`, with their own ``PAPER_NUMBERS``; the two modules share only
:mod:`ctxagg.layers.pos_embed_rel` and import nothing from each other.

Relative position embedding for DeiT ("Rel"): §4.2 "swap[s] the positional embedding methods between the
ViT and Swin Transformer", so it is Swin's — a learned bias table of (2·14−1)² entries per head per block,
indexed by the 2-D offset between patch tokens and added to the scaled scores (Eq. 4:
``(q_i kᵀ/√C_h + p_i) v``), replacing the absolute embedding. Paper-silent details, fixed by Table 3:
one table per block, and the class token gets no bias (zero row and column): DeiT-S
22.051 − 197·384 + 12·6·729 = 22.028M, DeiT-B 86.568 − 197·768 + 12·12·729 = 86.521M (BEiT-style extra
class-token entries would give 86.522M); the activations 10.351M (scaling) and 8.241M (depth-wise) need
``p`` on the 196 patch tokens only (a 196×196 ``P·V`` or ``P·K``).

Measures: GFLOPs are ``ctxagg.bench.count_gmacs`` (matmuls, convolutions, fused attention). The paper's
counter (fvcore) also charges LayerNorm 5 FLOPs an element (DeiT-S: 9.5M), so ours read 0.2-0.8% lower;
neither counts element-wise ops such as depth-wise attention's ``q ⊙ k̄`` and mean (DeiT-S depth-wise abs
3.902 = 4.608 − the value projection − both attention matmuls, exactly). Activations are
:func:`ctxagg.bench.activations.count_activations`; they match Table 3 to the thousand.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import to_2tuple
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ..affinity.attention import ATTENTION_NORMS, SelfAttentionAffinity
from ..affinity.base import Affinity, merge_heads, split_heads, token_count
from ..affinity.dw_attention import DepthwiseSelfAttention
from ..blocks.aggregation import TokenAggregationBlock
from ..checks import add_input_checks, state_fixed_input_size
from ..tracing import fx_leaf, is_symbolic
from ..layers.pos_embed_rel import POS_EMBED_KINDS, RelativePositionBias

__all__ = ["AffinityViT", "NoMaskVisionTransformer", "ViTBlock", "RelPosSelfAttention", "TokenGrid", "PAPER_NUMBERS",
           "checkpoint_filter_fn", "small_input_kwargs"]

# --- the published numbers: GFLOPs (fvcore MACs), parameters (M), activations (M) at 224² -----------------
# ``unmatched``: measures no consistent construction reproduces, with what this implementation gives and ``note`` why.
_T3 = dict(source="ViT-as-DynConv Table 3", params_tol=0.01, gflops_tol=0.03, activations_tol=0.05)
_T2 = dict(source="ViT-as-DynConv Table 2")


def _t3(gflops: float, params: float, activations: float, **extra: Any) -> dict[str, Any]:
    return {"gflops": gflops, "params": params, "activations": activations, **_T3, **extra}


PAPER_NUMBERS: dict[str, dict[str, Any]] = {
    "deit_s": _t3(4.608, 22.051, 11.947),
    "deit_s_none_abs": dict(_T2),
    "deit_s_scale_abs": _t3(4.366, 22.051, 9.448),
    "deit_s_scale_relu_abs": dict(_T2),
    "deit_s_softmax_rel": _t3(4.608, 22.028, 11.947),
    "deit_s_scale_rel": _t3(4.543, 22.028, 10.351),
    "deit_s_scale_relu_rel": dict(_T2),
    "deit_s_layernorm_rel": dict(_T2),
    "deit_s_layernorm_rel_gap": dict(_T2),
    "deit_s_ln_relu_rel_gap": dict(_T2),
    "deit_s_dw_abs": _t3(3.902, 20.277, 7.337),
    "deit_s_dw_rel": _t3(4.079, 20.253, 8.241),
    "deit_b": _t3(17.582, 86.568, 23.895),
    "deit_b_softmax_rel": _t3(17.582, 86.521, 23.895),
    "deit_b_dw_rel": _t3(15.830, 79.434, 16.481),
}


_resample_abs_pos_embed = fx_leaf(resample_abs_pos_embed)  # branches on the sizes: one torch.fx graph node


class TokenGrid:
    """The (H, W) patch grid of the current forward pass, shared by a ViT and its blocks (the blocks see
    flattened tokens only; relative positions need the grid, which changes with ``dynamic_img_size``)."""

    def __init__(self, size: Sequence[int]):
        self.size = tuple(size)


class RelPosSelfAttention(SelfAttentionAffinity):
    """:class:`SelfAttentionAffinity` with a relative position bias ``p`` on the *last* N_b tokens
    (leading class tokens get none), in token layout (B, N, C).

    For the linear normalisers (``none``, ``scale``) it computes Eq. 4 the linear-time way,
    ``norm(QKᵀ/√d + P)·V = Q(KᵀV)·c + norm(P)·V``, never forming QKᵀ — as the paper's DeiT-S scaling-rel
    row counts it (4.543 GFLOPs, 10.351M activations). ``matrix()`` is the same N×N affinity either way.
    """

    def _padded(self, attn_bias: Tensor, n: int) -> Tensor:
        pad = n - attn_bias.shape[-1]
        return F.pad(attn_bias, (pad, 0, pad, 0))  # zero rows/columns for the class tokens (none: a copy)

    def forward(self, v: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None,
                attn_bias: Optional[Tensor] = None) -> Tensor:
        if attn_bias is None:
            return super().forward(v, q, k)
        if not is_symbolic(v) and v.ndim != 3:
            raise ValueError("RelPosSelfAttention works on (B, N, C) tokens")
        n, nb = v.shape[1], attn_bias.shape[-1]
        if self.normaliser in ("none", "scale") and not (self.training and self.attn_drop > 0):
            out = super().forward(v, q, k)  # the Q(KᵀV) fast path
            # the normaliser is linear here: norm(S + P) = norm(S) + norm(P), with norm(P) = P or P / N
            p = attn_bias / (n if self.normaliser == "scale" else 1)
            rel = merge_heads(p.to(v.dtype) @ split_heads(v[:, n - nb:], self.heads), (0, nb, 0))
            return out + F.pad(rel, (0, 0, n - nb, 0))  # class tokens first: zero term (no branch for torch.fx)
        return super().forward(v, q, k, attn_bias=self._padded(attn_bias, n).to(v.dtype))

    def matrix(self, v_shape: Sequence[int], q: Optional[Tensor] = None, k: Optional[Tensor] = None,
               attn_bias: Optional[Tensor] = None) -> Tensor:
        bias = None if attn_bias is None else self._padded(attn_bias, token_count(v_shape)).to(q.dtype)
        return super().matrix(v_shape, q, k, attn_bias=bias)

    def macs(self, tokens: int) -> int:
        if self.normaliser in ("none", "scale"):
            return super().macs(tokens) + tokens * tokens * self.dim  # plus P·V
        return super().macs(tokens)


class ViTBlock(TokenAggregationBlock):
    """The DeiT block (LN → qkv → affinity → proj, LN → MLP) with any token affinity and an optional
    relative position bias (vit_as_dynamic_conv.txt Eq. 2, 4, 5). With a value-free affinity (depth-wise
    self-attention, Eq. 5) the input projection makes only q and k, and the keys are aggregated."""

    def __init__(self, dim: int, affinity: Affinity, rel_pos: Optional[RelativePositionBias] = None,
                 grid: Optional[TokenGrid] = None, qkv_bias: bool = True, **kwargs: Any):
        super().__init__(dim, affinity, qkv_bias=qkv_bias, **kwargs)
        self.uses_value = getattr(affinity, "uses_value", True)
        if not self.uses_value:
            self.proj_in = nn.Linear(dim, 2 * dim, bias=qkv_bias)  # Eq. 5 discards the value kernel bank
        self.rel_pos = rel_pos
        self.grid = grid

    def affinity_inputs(self, x: Tensor) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """The affinity's positional inputs in the order of its ``forward``: (v, q, k), or (k, q, None) for
        depth-wise self-attention, whose first input is the keys it aggregates (Eq. 5)."""
        if self.uses_value:
            return super().affinity_inputs(x)
        q, k = self.proj_in(self.norm1(x)).chunk(2, dim=-1)
        return k, q, None  # Eq. 5: the keys are what the affinity aggregates (its first input)

    def forward(self, x: Tensor) -> Tensor:
        v, q, k = self.affinity_inputs(x)
        extra = {} if self.rel_pos is None else {"attn_bias": self.rel_pos(self.grid.size if self.grid else None)}
        x = x + self.drop_path1(self.proj_drop(self.proj_out(self.affinity(v, q, k, **extra))))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def _vit_block(dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_drop: float = 0.0,
               attn_drop: float = 0.0, drop_path: float = 0.0, norm_layer=nn.LayerNorm, act_layer=nn.GELU,
               attn_norm: str = "softmax", depthwise: bool = False, grid: Optional[TokenGrid] = None,
               **_: Any) -> ViTBlock:
    """timm ``block_fn``: the extra timm arguments (qk_norm, init_values, ...) are not used by DeiT."""
    if depthwise:
        affinity: Affinity = DepthwiseSelfAttention(dim, num_heads)
    else:
        affinity = RelPosSelfAttention(dim, num_heads, normaliser=attn_norm, attn_drop=attn_drop)
    rel_pos = RelativePositionBias(num_heads, grid.size) if grid is not None else None
    return ViTBlock(dim, affinity, rel_pos=rel_pos, grid=grid, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                    norm_layer=norm_layer, act_layer=act_layer, drop=proj_drop, drop_path=drop_path)


class NoMaskVisionTransformer(VisionTransformer):
    """timm's ``VisionTransformer`` with ctxagg blocks, which take no attention mask: ``forward(x)`` and
    ``forward_features(x)`` take the images only (timm's also take ``attn_mask``/``is_causal``, which torch.fx
    would trace as extra graph inputs and pass to every block). With ``dynamic_img_size`` the position table is
    resampled by a torch.fx leaf (timm's ``resample_abs_pos_embed`` branches on the sizes). Everything else is timm's.
    """

    def _pos_embed(self, x: Tensor) -> Tensor:
        if not self.dynamic_img_size or self.pos_embed is None:
            return super()._pos_embed(x)
        b, h, w, c = x.shape  # timm's dynamic branch, its resampling one graph node
        prefix = [t.expand(b, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        pos = _resample_abs_pos_embed(self.pos_embed, new_size=(h, w), old_size=self.patch_embed.grid_size,
                                      num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens)
        x = x.view(b, -1, c)
        if self.no_embed_class:  # the table has no class-token rows: add, then prepend
            return self.pos_drop(torch.cat(prefix + [x + pos], dim=1))
        return self.pos_drop(torch.cat(prefix + [x], dim=1) + pos)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return self.norm(checkpoint_seq(self.blocks, x))
        return self.norm(self.blocks(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class AffinityViT(NoMaskVisionTransformer):
    """DeiT (patch 16, class token or global average pooling) whose blocks mix tokens with a ctxagg affinity:
    self-attention with the normaliser ``attn_norm`` (vit_as_dynamic_conv.txt §4.2) or, with
    ``depthwise=True``, depth-wise self-attention (§4.3, Eq. 5); ``pos`` is ``"abs"`` (learned absolute
    embedding, DeiT) or ``"rel"`` (per-block relative position bias, see the module docstring).

    Built on timm's ``VisionTransformer``: ``dynamic_img_size=True`` (the registered rows' default) resamples the
    absolute embedding and re-indexes the relative bias for the input's grid; ``forward_intermediates``/
    ``features_only`` as timm.
    """

    def __init__(self, attn_norm: str = "softmax", depthwise: bool = False, pos: str = "abs", **kwargs: Any):
        if attn_norm not in ATTENTION_NORMS:
            raise ValueError(f"unknown attn_norm {attn_norm!r}; choose one of {ATTENTION_NORMS}")
        if pos not in POS_EMBED_KINDS:
            raise ValueError(f"unknown pos {pos!r}; choose one of {POS_EMBED_KINDS}")
        img, patch = to_2tuple(kwargs.get("img_size", 224)), to_2tuple(kwargs.get("patch_size", 16))
        grid = TokenGrid((img[0] // patch[0], img[1] // patch[1]))
        kwargs["block_fn"] = partial(_vit_block, attn_norm=attn_norm, depthwise=depthwise,
                                     grid=grid if pos == "rel" else None)
        if pos == "rel":
            kwargs["pos_embed"] = "none"
        super().__init__(**kwargs)
        self.attn_norm, self.depthwise, self.pos = attn_norm, depthwise, pos
        self.token_grid = grid

    def _pos_embed(self, x: Tensor) -> Tensor:
        # record the grid for the blocks' relative bias: (B, H, W, C) with dynamic_img_size, else the built one
        self.token_grid.size = (x.shape[1], x.shape[2]) if self.dynamic_img_size else tuple(self.patch_embed.grid_size)
        return super()._pos_embed(x)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {n for n, _ in self.named_parameters() if n.endswith("rel_pos.table")}


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Load a timm/DeiT ``VisionTransformer`` state dict: ``attn.qkv`` -> ``proj_in``, ``attn.proj`` -> ``proj_out``
    (a value-free model keeps the q and k rows); absolute embeddings are resampled by timm's filter."""
    from timm.models.vision_transformer import checkpoint_filter_fn as timm_filter
    state_dict = state_dict.get("model", state_dict)
    own = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        key = key.replace(".attn.qkv.", ".proj_in.").replace(".attn.proj.", ".proj_out.")
        if key.endswith(("proj_in.weight", "proj_in.bias")) and key in own and own[key].shape[0] < value.shape[0]:
            value = value[: own[key].shape[0]]  # q, k rows of a q, k, v projection
        out[key] = value
    if getattr(model, "pos_embed", None) is None:
        out.pop("pos_embed", None)
    return timm_filter(out, model)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
            "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0", **kwargs}


def small_input_kwargs(model_name: str, img_size: int) -> dict[str, Any]:
    """Model arguments for training a DeiT row at ``img_size``: at ≤ 64² the 16×16 patches become 4×4
    (8×8 tokens at 32²; paper-silent, the paper trains at 224² only). ``img_size`` sizes the absolute
    embedding and the relative tables. The same for every DeiT name."""
    return dict(img_size=img_size, **(dict(patch_size=4) if img_size <= 64 else {}))


def _create_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> AffinityViT:
    """Build a DeiT row with timm's builder (pretrained cfg, features_only) and the package's input checks."""
    out_indices = kwargs.pop("out_indices", 3)
    kwargs.setdefault("dynamic_img_size", True)  # any input size (a detector's 800×1333), as timm allows
    model = build_model_with_cfg(AffinityViT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                 feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)
    add_input_checks(model)  # one forward-pre-hook, as every family
    return state_fixed_input_size(model)


default_cfgs = generate_default_cfgs({
    "deit_s": _cfg(),
    "deit_s_none_abs": _cfg(),
    "deit_s_scale_abs": _cfg(),
    "deit_s_scale_relu_abs": _cfg(),
    "deit_s_softmax_rel": _cfg(),
    "deit_s_scale_rel": _cfg(),
    "deit_s_scale_relu_rel": _cfg(),
    "deit_s_layernorm_rel": _cfg(),
    "deit_s_layernorm_rel_gap": _cfg(),
    "deit_s_ln_relu_rel_gap": _cfg(),
    "deit_s_dw_abs": _cfg(),
    "deit_s_dw_rel": _cfg(),
    "deit_b": _cfg(),
    "deit_b_softmax_rel": _cfg(),
    "deit_b_dw_rel": _cfg(),
})

# DeiT-S/B (Touvron et al.): patch 16, 12 blocks; stochastic depth 0.1 as Table 4 (DeiT models share its
# hyper-parameters). "_gap": "replace the class embedding ... with global average pooling" (§4.2).


@register_model
def deit_s(pretrained: bool = False, **kwargs: Any) -> AffinityViT:
    """DeiT-S: softmax attention, absolute position embedding, class token (ViT-as-DynConv Table 3)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.1)
    return _create_vit("deit_s", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_s_none_abs(pretrained: bool = False, **kwargs: Any) -> AffinityViT:
    """DeiT-S with unnormalised attention (§4.2), absolute position embedding (ViT-as-DynConv Table 2)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.1, attn_norm="none")
    return _create_vit("deit_s_none_abs", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_s_scale_abs(pretrained: bool = False, **kwargs: Any) -> AffinityViT:
    """DeiT-S with scaling attention (§4.2), absolute position embedding (ViT-as-DynConv Table 3)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.1, attn_norm="scale")
    return _create_vit("deit_s_scale_abs", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_s_scale_relu_abs(pretrained: bool = False, **kwargs: Any) -> AffinityViT:
    """DeiT-S with scaling + ReLU attention (§4.2), absolute position embedding (ViT-as-DynConv Table 2)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.1,
                      attn_norm="scale_relu")
    return _create_vit("deit_s_scale_relu_abs", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_s_softmax_rel(pretrained: bool = False, **kwargs: Any) -> AffinityViT:
    """DeiT-S with softmax attention (§4.2), relative position bias (ViT-as-DynConv Table 3)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.1, pos="rel")
    return _create_vit("deit_s_softmax_rel", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_s_scale_rel(pretrained: bool = False, **kwargs: Any) -> AffinityViT:
    """DeiT-S with scaling attention (§4.2), relative position bias (ViT-as-DynConv Table 3)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.1, attn_norm="scale",
                      pos="rel")
    return _create_vit("deit_s_scale_rel", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_s_scale_relu_rel(pretrained: bool = False, **kwargs: Any) -> AffinityViT:
    """DeiT-S with scaling + ReLU attention (§4.2), relative position bias (ViT-as-DynConv Table 2)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.1,
                      attn_norm="scale_relu", pos="rel")
    return _create_vit("deit_s_scale_relu_rel", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_s_layernorm_rel(pretrained: bool = False, **kwargs: Any) -> AffinityViT:
    """DeiT-S with LayerNorm attention (§4.2), relative position bias (ViT-as-DynConv Table 2)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.1,
                      attn_norm="layernorm", pos="rel")
    return _create_vit("deit_s_layernorm_rel", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_s_layernorm_rel_gap(pretrained: bool = False, **kwargs: Any) -> AffinityViT:
    """DeiT-S with LayerNorm attention (§4.2), relative position bias, global average pooling
    (ViT-as-DynConv Table 2)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.1,
                      attn_norm="layernorm", pos="rel", class_token=False, global_pool="avg")
    return _create_vit("deit_s_layernorm_rel_gap", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_s_ln_relu_rel_gap(pretrained: bool = False, **kwargs: Any) -> AffinityViT:
    """DeiT-S with LayerNorm + ReLU attention (§4.2), relative position bias, global average pooling
    (ViT-as-DynConv Table 2)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.1,
                      attn_norm="ln_relu", pos="rel", class_token=False, global_pool="avg")
    return _create_vit("deit_s_ln_relu_rel_gap", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_s_dw_abs(pretrained: bool = False, **kwargs: Any) -> AffinityViT:
    """DeiT-S with depth-wise self-attention (Eq. 5), absolute position embedding (ViT-as-DynConv Table 3)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.1, depthwise=True)
    return _create_vit("deit_s_dw_abs", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_s_dw_rel(pretrained: bool = False, **kwargs: Any) -> AffinityViT:
    """DeiT-S with depth-wise self-attention (Eq. 5), relative position bias (ViT-as-DynConv Table 3)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.1, depthwise=True,
                      pos="rel")
    return _create_vit("deit_s_dw_rel", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_b(pretrained: bool = False, **kwargs: Any) -> AffinityViT:
    """DeiT-B: softmax attention, absolute position embedding, class token (ViT-as-DynConv Table 3)."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, drop_path_rate=0.1)
    return _create_vit("deit_b", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_b_softmax_rel(pretrained: bool = False, **kwargs: Any) -> AffinityViT:
    """DeiT-B with softmax attention (§4.2), relative position bias (ViT-as-DynConv Table 3)."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, drop_path_rate=0.1, pos="rel")
    return _create_vit("deit_b_softmax_rel", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_b_dw_rel(pretrained: bool = False, **kwargs: Any) -> AffinityViT:
    """DeiT-B with depth-wise self-attention (Eq. 5), relative position bias (ViT-as-DynConv Table 3)."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, drop_path_rate=0.1, depthwise=True,
                      pos="rel")
    return _create_vit("deit_b_dw_rel", pretrained, **dict(model_args, **kwargs))
