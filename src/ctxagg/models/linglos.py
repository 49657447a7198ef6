"""LinGlos: key-only attention in every stage, RP-CPE in every FFN (linglos.txt §3.3-3.4, §5).

Registered: ``linglo_b0/b1/b2`` (§3.4, Table 2), the vertical-layout ablations ``linglo_b0_chhh`` and
``linglo_b0_cchh`` (§5.1, Table 5), the inductive-bias ablations ``linglo_b0_wo_c`` and ``linglo_wo_ch``
(§5.4, Fig. 5) and ``linglo_b0_dotprod`` (§5.2, Fig. 4: every key-only attention -> dot-product).
RP-CPE ablations (Table 6) are one argument away: ``create_model("linglo_b0", cpe="r_cpe")``.

Parameter counts: the paper calls RP-CPE cost-free because its branches are re-parameterised "when
testing and deploying" (§3.2, §5.3), so the counts it reports are compared with the deployed network
(``timm.models.reparameterize_model``); the training-time branches add 4 kernels + BN per channel.
The paper's three counts are not jointly consistent with regular 3×3 downsampling convs: b2 − b1 pins
each block's size, which leaves b1 only ~0.4M for its downsampling layers where 3×3 convs take 1.9M.
The choices below land all three within 5% (see ``PAPER_NUMBERS`` and tests/test_linglos.py).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm2d, SEModule, calculate_drop_path_rates, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from ..affinity.attention import SelfAttentionAffinity
from ..affinity.key_only import KeyOnlyAttention
from ..layers.rep_cpe import CPE_MODES, RepConditionalPosEnc
from .staged import Stage, StagedBackbone

__all__ = ["LinGloNet", "LinGloBlock", "ConvSEBlock", "LINGLO_VARIANTS", "PAPER_NUMBERS"]

_LN_EPS = 1e-6  # paper-silent: PVT's LayerNorm eps

_T2 = dict(source="LinGlos Table 2", params_tol=0.05, params_deployed=True)
_T5 = dict(source="LinGlos Table 5", params_tol=0.05, params_deployed=True)
# Params in M as the paper reports them (no FLOPs are given). ``params_deployed``: compare after
# re-parameterisation (RP-CPE branches folded), see the module docstring.
PAPER_NUMBERS: dict[str, dict[str, Any]] = {
    "linglo_b0": dict(params=3.4, **_T2),
    "linglo_b1": dict(params=13.1, **_T2),
    "linglo_b2": dict(params=25.4, **_T2),
    "linglo_b0_cchh": dict(params=3.3, **_T5),
    "linglo_b0_chhh": dict(params=3.4, **_T5),
    "linglo_b0_wo_c": dict(source="LinGlos §5.4, Fig. 5 (no count given)"),
    "linglo_wo_ch": dict(source="LinGlos §5.4, Fig. 5 (no count given; 'similar to LinGlo-b0')"),
    "linglo_b0_dotprod": dict(source="LinGlos §5.2, Fig. 4 (no count given)"),
}


class ConvDownsample(nn.Module):
    """Downsampling conv + LayerNorm (LinGlos §3.3: "Layer normalizations are added wherever spatial
    resolution is changed"); (k, s, p) = (7, 4, 3) first, (3, 2, 1) after (§3.4), or k = s, p = 0 for
    the non-overlapping patch embeddings of the §5.4 ablations."""

    def __init__(self, in_chans: int, dim: int, kernel_size: int, stride: int, padding: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size, stride=stride, padding=padding)
        self.norm = LayerNorm2d(dim, eps=_LN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x))


class AbsolutePosEmbed(nn.Module):
    """Learned absolute position embedding added to a feature map, as PVT [10] (LinGlos §5.4, w/o-C).
    Built for one grid; other input sizes get a bilinearly resized copy (PVT does the same for dense tasks)."""

    def __init__(self, dim: int, grid: tuple[int, int]):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, *grid))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        pos = self.pos_embed
        if pos.shape[-2:] != x.shape[-2:]:
            pos = F.interpolate(pos, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return x + pos


class TokenMixer(nn.Module):
    """Spatial mixing of a LinGlo block on tokens (B, N, C).

    Key-only (§3.1): ``proj_in`` = [W_K; W_V], the affinity adds W_saliency, U1 and the K skip,
    ``proj_out`` = U2, so the output is Eq. 4's Y. Dot-product (Eq. 1, §5.2 ablation): ``proj_in`` =
    [W_Q; W_K; W_V], softmax(QKᵀ/√d)V, ``proj_out`` the usual output projection.
    """

    def __init__(self, dim: int, heads: int, attention: str = "key_only", qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if attention == "key_only":
            self.affinity = KeyOnlyAttention(dim, heads)
        elif attention == "dot":
            self.affinity = SelfAttentionAffinity(dim, heads, attn_drop=attn_drop)
        else:
            raise ValueError(f"unknown attention {attention!r}; choose 'key_only' or 'dot'")
        self.key_only = attention == "key_only"
        self.proj_in = nn.Linear(dim, dim * (2 if self.key_only else 3), bias=qkv_bias)
        self.proj_out = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        if self.key_only:
            k, v = self.proj_in(x).chunk(2, dim=-1)
            z = self.affinity(k, gate=v, saliency_input=k)  # aggregate K, gated by V, weights from K
        else:
            q, k, v = self.proj_in(x).chunk(3, dim=-1)
            z = self.affinity(v, q, k)
        return self.proj_drop(self.proj_out(z))


class ConvFfn(nn.Module):
    """FFN with RP-CPE (LinGlos §3.2-3.3): ``fc2(GELU(fc1(RP-CPE(x))))`` on tokens of an H×W grid.

    Paper-silent: the positional conv sits at the FFN input on C channels, as the PEG of the CPE papers it
    cites [19, 20]; in the hidden layer (PVTv2 style) the deployed LinGlo-b0 would have 3.60M (+5.8%
    over Table 2), at the input 3.56M. ``cpe=None`` is the plain FFN of the w/o-C ablation.
    """

    def __init__(self, dim: int, hidden: int, cpe: Optional[str] = "rp_cpe", cpe_branches: int = 4,
                 drop: float = 0.0):
        super().__init__()
        self.cpe = RepConditionalPosEnc(dim, cpe, branches=cpe_branches) if cpe else None
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        if self.cpe is not None:
            b, n, c = x.shape
            x = self.cpe(x.transpose(1, 2).reshape(b, c, *grid)).flatten(2).transpose(1, 2)
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class LinGloBlock(nn.Module):
    """LinGlo encoder block (LinGlos §3.3, Fig. 3(b)): pre-norm key-only attention and FFN with RP-CPE,
    each with a skip connection. Takes and returns NCHW feature maps; works on tokens inside."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, attention: str = "key_only",
                 cpe: Optional[str] = "rp_cpe", cpe_branches: int = 4, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = TokenMixer(dim, heads, attention, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = ConvFfn(dim, int(dim * mlp_ratio), cpe, cpe_branches, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = t + self.drop_path1(self.attn(self.norm1(t)))
        t = t + self.drop_path2(self.mlp(self.norm2(t), (h, w)))
        return t.transpose(1, 2).reshape(b, c, h, w)


class ConvSEBlock(nn.Module):
    """The "convolutional block with SE" [25] of the C stages in LinGlos §5.1 (Table 5).

    Paper-silent: an MBConv as in the grafted CoAtNet [24] the section compares with — pre-norm BN,
    1×1 expand ×4, 3×3 depthwise, SE (squeeze to C/4), 1×1 project, residual — with BN and GELU.
    """

    def __init__(self, dim: int, expand_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.norm = nn.BatchNorm2d(dim)
        self.expand = nn.Sequential(nn.Conv2d(dim, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.GELU())
        self.dw = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
                                nn.BatchNorm2d(hidden), nn.GELU())
        self.se = SEModule(hidden, rd_channels=max(8, dim // 4), act_layer=nn.GELU)
        self.project = nn.Conv2d(hidden, dim, 1)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.project(self.se(self.dw(self.expand(self.norm(x))))))


class LinGloNet(StagedBackbone):
    """The LinGlos backbone (LinGlos §3.3-3.4, Fig. 3(a)): four stages, each a downsampling conv + LN and
    a stack of encoder blocks; final LayerNorm, average pooling and a linear head.

    Alternate layout (§1, §5.1): every "H" stage mixes convolution and attention — its convolutions are
    the RP-CPE depthwise convs inside each block's FFN (plus the stage's downsampling conv); no separate
    conv blocks. A "C" stage replaces the encoder blocks with :class:`ConvSEBlock` (Table 5).

    Args:
        stage_types: one "H" (LinGlo blocks) or "C" (conv blocks with SE) per stage.
        attention: ``"key_only"`` (§3.1) or ``"dot"`` (dot-product, §5.2 ablation).
        cpe: one of ``CPE_MODES`` (Table 6 ablation) or None (no positional conv, w/o-C of §5.4).
        patch_sizes: None for the paper's overlapping conv downsampling (7/4/3 then 3/2/1), else
            non-overlapping p×p patch embeddings per stage (§5.4); p = 1 means no downsampling.
        abs_pos_embed: add PVT's learned absolute position embedding after each downsampling (§5.4).
    """

    def __init__(self, dims: Sequence[int] = (64, 128, 320, 512), depths: Sequence[int] = (2, 3, 3, 2),
                 heads: Sequence[int] = (1, 2, 5, 8), mlp_ratios: Sequence[float] = (8, 8, 4, 4),
                 stage_types: str = "HHHH", attention: str = "key_only", cpe: Optional[str] = "rp_cpe",
                 cpe_branches: int = 4, patch_sizes: Optional[Sequence[int]] = None, abs_pos_embed: bool = False,
                 conv_expand_ratio: float = 4.0, qkv_bias: bool = True, img_size: Any = 224, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "avg", drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 stem: Sequence[int] = (7, 4, 3), model_name: str = "linglo", **kwargs):
        super().__init__()
        if kwargs:
            raise TypeError(f"unexpected arguments for {model_name}: {sorted(kwargs)}")
        if not len(dims) == len(depths) == len(heads) == len(mlp_ratios) == len(stage_types):
            raise ValueError("dims, depths, heads, mlp_ratios and stage_types need one entry per stage")
        if cpe is not None and cpe not in CPE_MODES:
            raise ValueError(f"unknown cpe {cpe!r}; choose one of {CPE_MODES} or None")
        self.model_name = model_name  # qkv_bias: paper-silent, biased K/V projections as PVT's qkv
        img_size = to_2tuple(img_size)
        dpr = [r for stage in calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True) for r in stage]
        stages, strides, stride, prev_dim, offset = [], [], 1, in_chans, 0
        for i, (dim, depth, head, ratio, kind) in enumerate(zip(dims, depths, heads, mlp_ratios, stage_types)):
            if patch_sizes is None:
                kernel, step, pad = tuple(stem) if i == 0 else (3, 2, 1)
            else:
                kernel, step, pad = patch_sizes[i], patch_sizes[i], 0
            stride *= step
            strides.append(stride)
            embed = ConvDownsample(prev_dim, dim, kernel, step, pad) if step > 1 or prev_dim != dim else None
            grid = (img_size[0] // stride, img_size[1] // stride)
            pos = AbsolutePosEmbed(dim, grid) if abs_pos_embed and embed is not None else None
            if i == 0:
                self.stem, embed = embed, None
            parts = [m for m in (embed, pos) if m is not None]
            down = nn.Sequential(*parts) if len(parts) == 2 else (parts[0] if parts else nn.Identity())
            if kind == "H":
                blocks = [LinGloBlock(dim, head, ratio, attention, cpe, cpe_branches, qkv_bias, attn_drop_rate,
                                      proj_drop_rate, dpr[offset + j]) for j in range(depth)]
            elif kind == "C":
                blocks = [ConvSEBlock(dim, conv_expand_ratio, dpr[offset + j]) for j in range(depth)]
            else:
                raise ValueError(f"stage type must be 'H' or 'C', got {kind!r}")
            offset += depth
            stages.append(Stage(down, blocks))
            prev_dim = dim
        self.stages = nn.Sequential(*stages)
        self.norm = LayerNorm2d(dims[-1], eps=_LN_EPS)
        self.feature_info = self.feature_info_for(dims, strides)
        self.init_head(dims[-1], num_classes, global_pool, drop_rate)
        self.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Absolute position embeddings are not decayed (as PVT's ``pos_embed``)."""
        return {n for n, _ in self.named_parameters() if n.endswith("pos_embed")}


def _init_weights(module: nn.Module) -> None:
    # Paper-silent: as PVT, truncated-normal (std 0.02) linear layers with zero bias; conv/norm defaults.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


_B0 = dict(dims=(32, 64, 160, 256), depths=(2, 3, 3, 2))
_B1 = dict(dims=(64, 128, 320, 512), depths=(2, 3, 3, 2))
_B2 = dict(dims=(64, 128, 320, 512), depths=(3, 5, 9, 3))

# heads (1, 2, 5, 8) and FFN ratios (8, 8, 4, 4) are the LinGloNet defaults (§3.4).
LINGLO_VARIANTS: dict[str, dict[str, Any]] = {
    "linglo_b0": _B0,
    "linglo_b1": _B1,
    "linglo_b2": _B2,
    # Table 5: C = stage of conv blocks with SE, H = LinGlo blocks (conv + attention); stage 1 / stages 1-2 as C
    "linglo_b0_chhh": dict(_B0, stage_types="CHHH"),
    "linglo_b0_cchh": dict(_B0, stage_types="CCHH"),
    # §5.4 w/o-C: 4×4 then 2×2 non-overlapping patch embeddings, no RP-CPE, PVT absolute position embeddings
    "linglo_b0_wo_c": dict(_B0, patch_sizes=(4, 2, 2, 2), cpe=None, abs_pos_embed=True),
    # §5.4 w/o-CH: one 16×16 patch embedding, 150 channels and 3 heads everywhere; paper-silent: b0's block
    # counts and FFN ratios kept per (now same-resolution) stage, so only the ablated biases change
    "linglo_wo_ch": dict(dims=(150,) * 4, depths=(2, 3, 3, 2), heads=(3,) * 4, patch_sizes=(16, 1, 1, 1), cpe=None,
                         abs_pos_embed=True),
    # §5.2: every key-only attention of LinGlo-b0 replaced with dot-product attention
    "linglo_b0_dotprod": dict(_B0, attention="dot"),
}


def _cfg(**kwargs) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.proj", "classifier": "head", "license": "apache-2.0", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    **{name: _cfg() for name in LINGLO_VARIANTS},
    "linglo_wo_ch": _cfg(pool_size=(14, 14)),
})


def _create_linglo(variant: str, pretrained: bool = False, **kwargs) -> LinGloNet:
    args = {**LINGLO_VARIANTS[variant], "model_name": variant, **kwargs}
    return build_model_with_cfg(LinGloNet, variant, pretrained,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True), **args)


@register_model
def linglo_b0(pretrained: bool = False, **kwargs) -> LinGloNet:
    """LinGlo-b0, C=(32, 64, 160, 256), B=(2, 3, 3, 2) (linglos.txt §3.4; Table 2: 3.4M)."""
    return _create_linglo("linglo_b0", pretrained, **kwargs)


@register_model
def linglo_b1(pretrained: bool = False, **kwargs) -> LinGloNet:
    """LinGlo-b1, C=(64, 128, 320, 512), B=(2, 3, 3, 2) (linglos.txt §3.4; Table 2: 13.1M)."""
    return _create_linglo("linglo_b1", pretrained, **kwargs)


@register_model
def linglo_b2(pretrained: bool = False, **kwargs) -> LinGloNet:
    """LinGlo-b2, C=(64, 128, 320, 512), B=(3, 5, 9, 3) (linglos.txt §3.4; Table 2: 25.4M)."""
    return _create_linglo("linglo_b2", pretrained, **kwargs)


@register_model
def linglo_b0_chhh(pretrained: bool = False, **kwargs) -> LinGloNet:
    """C-H-H-H: LinGlo-b0 with stage 1's encoder blocks replaced by conv blocks with SE (§5.1; Table 5: 3.4M)."""
    return _create_linglo("linglo_b0_chhh", pretrained, **kwargs)


@register_model
def linglo_b0_cchh(pretrained: bool = False, **kwargs) -> LinGloNet:
    """C-C-H-H: LinGlo-b0 with stages 1-2 as conv blocks with SE (§5.1; Table 5: 3.3M)."""
    return _create_linglo("linglo_b0_cchh", pretrained, **kwargs)


@register_model
def linglo_b0_wo_c(pretrained: bool = False, **kwargs) -> LinGloNet:
    """LinGlo-w/o-C-b0: patch embeddings instead of conv downsampling, no RP-CPE, absolute position
    embeddings (§5.4, Fig. 5)."""
    return _create_linglo("linglo_b0_wo_c", pretrained, **kwargs)


@register_model
def linglo_wo_ch(pretrained: bool = False, **kwargs) -> LinGloNet:
    """LinGlo-w/o-CH: w/o-C without the hierarchy — one 16×16 patch embedding, 150 channels, 3 heads (§5.4)."""
    return _create_linglo("linglo_wo_ch", pretrained, **kwargs)


@register_model
def linglo_b0_dotprod(pretrained: bool = False, **kwargs) -> LinGloNet:
    """LinGlo-b0 with dot-product attention in place of every key-only attention (§5.2, Fig. 4)."""
    return _create_linglo("linglo_b0_dotprod", pretrained, **kwargs)
