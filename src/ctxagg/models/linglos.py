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
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm2d, SEModule, calculate_drop_path_rates, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from ..affinity.attention import SelfAttentionAffinity
from ..checks import state_fixed_input_size
from ..affinity.key_only import KeyOnlyAttention
from ..layers import AbsolutePosEmbed, ConvDownsample
from ..layers.rep_cpe import CPE_MODES, RepConditionalPosEnc
from .staged import Stage, StagedBackbone, stage_info

__all__ = ["LinGloNet", "LinGloBlock", "ConvSEBlock", "PAPER_NUMBERS"]

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
            # K as its own buffer: int8's fused U2·z + K skip (oneDNN qlinear + binary add) takes a minute a batch
            # when K is a strided half of proj_in's output (measured on linglo_b1, b32: a reference-code path)
            k = k.contiguous()
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
                 stem: Sequence[int] = (7, 4, 3), model_name: str = "linglo_b0", **kwargs):
        super().__init__()
        if kwargs:
            raise TypeError(f"unexpected arguments for {model_name}: {sorted(kwargs)}")
        if not len(dims) == len(depths) == len(heads) == len(mlp_ratios) == len(stage_types):
            raise ValueError("dims, depths, heads, mlp_ratios and stage_types need one entry per stage")
        if cpe is not None and cpe not in CPE_MODES:
            raise ValueError(f"unknown cpe {cpe!r}; choose one of {CPE_MODES} or None")
        if set(stage_types) - {"H", "C"}:
            raise ValueError(f"stage types must be 'H' or 'C', got {stage_types!r}")
        self.model_name = model_name  # qkv_bias: paper-silent, biased K/V projections as PVT's qkv
        img_size = to_2tuple(img_size)
        dp_rates = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        block_args = dict(attention=attention, cpe=cpe, cpe_branches=cpe_branches, qkv_bias=qkv_bias,
                          attn_drop=attn_drop_rate, proj_drop=proj_drop_rate)
        convs = [(p, p, 0) for p in patch_sizes] if patch_sizes else [tuple(stem)] + [(3, 2, 1)] * (len(dims) - 1)
        self.stem = ConvDownsample(in_chans, dims[0], *convs[0], eps=_LN_EPS)
        stages, self.feature_info, stride = [], [], 1
        for i, (dim, head, ratio, kind) in enumerate(zip(dims, heads, mlp_ratios, stage_types)):
            stride *= convs[i][1]
            grid = (img_size[0] // stride, img_size[1] // stride)
            downsample = _downsample(i, dims[i - 1] if i else in_chans, dim, convs[i], grid, abs_pos_embed)
            if kind == "H":
                blocks = [LinGloBlock(dim, head, ratio, drop_path=rate, **block_args) for rate in dp_rates[i]]
            else:
                blocks = [ConvSEBlock(dim, conv_expand_ratio, rate) for rate in dp_rates[i]]
            stages.append(Stage(downsample, blocks))
            self.feature_info.append(stage_info(i, dim, stride))
        self.stages = nn.Sequential(*stages)
        self.finish_init(LayerNorm2d(dims[-1], eps=_LN_EPS), dims[-1], num_classes, global_pool, drop_rate)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Absolute position embeddings are not decayed (as PVT's ``pos_embed``)."""
        return {n for n, _ in self.named_parameters() if n.endswith("pos_embed")}


def _downsample(index: int, in_chans: int, dim: int, conv: tuple[int, int, int], grid: tuple[int, int],
                abs_pos_embed: bool) -> nn.Module:
    """A stage's input layer: its downsampling conv + LN (stage 0's is the stem, outside the stage; none when
    the stage keeps resolution and width, as w/o-CH's p = 1 stages) and, for §5.4, PVT's absolute position
    embedding after every conv."""
    has_conv = index > 0 and (conv[1] > 1 or in_chans != dim)
    parts = [ConvDownsample(in_chans, dim, *conv, eps=_LN_EPS)] if has_conv else []
    if abs_pos_embed and (has_conv or index == 0):
        parts.append(AbsolutePosEmbed(dim, grid))
    return nn.Sequential(*parts) if len(parts) == 2 else (parts[0] if parts else nn.Identity())


def _cfg(**kwargs) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.proj", "classifier": "head", "license": "apache-2.0", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "linglo_b0": _cfg(),
    "linglo_b1": _cfg(),
    "linglo_b2": _cfg(),
    "linglo_b0_chhh": _cfg(),
    "linglo_b0_cchh": _cfg(),
    "linglo_b0_wo_c": _cfg(),
    "linglo_wo_ch": _cfg(pool_size=(14, 14)),
    "linglo_b0_dotprod": _cfg(),
})


def small_input_kwargs(model_name: str, img_size: int) -> dict[str, Any]:
    """Model arguments for training at ``img_size``: at ≤ 64² a (3, 2, 1) conv stem instead of (7, 4, 3), which
    keeps the 16², 8², 4², 2² stage grids at 32² (paper-silent); ``img_size`` sizes the position terms."""
    return dict(img_size=img_size, **(dict(stem=(3, 2, 1)) if img_size <= 64 else {}))


def _create_linglo(variant: str, pretrained: bool = False, **kwargs) -> LinGloNet:
    return state_fixed_input_size(build_model_with_cfg(
        LinGloNet, variant, pretrained, model_name=variant,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True), **kwargs))


# heads (1, 2, 5, 8) and FFN ratios (8, 8, 4, 4) are the LinGloNet defaults (§3.4).

@register_model
def linglo_b0(pretrained: bool = False, **kwargs) -> LinGloNet:
    """LinGlo-b0, C=(32, 64, 160, 256), B=(2, 3, 3, 2) (linglos.txt §3.4; Table 2: 3.4M)."""
    model_args = dict(dims=(32, 64, 160, 256), depths=(2, 3, 3, 2))
    return _create_linglo("linglo_b0", pretrained, **dict(model_args, **kwargs))


@register_model
def linglo_b1(pretrained: bool = False, **kwargs) -> LinGloNet:
    """LinGlo-b1, C=(64, 128, 320, 512), B=(2, 3, 3, 2) (linglos.txt §3.4; Table 2: 13.1M)."""
    model_args = dict(dims=(64, 128, 320, 512), depths=(2, 3, 3, 2))
    return _create_linglo("linglo_b1", pretrained, **dict(model_args, **kwargs))


@register_model
def linglo_b2(pretrained: bool = False, **kwargs) -> LinGloNet:
    """LinGlo-b2, C=(64, 128, 320, 512), B=(3, 5, 9, 3) (linglos.txt §3.4; Table 2: 25.4M)."""
    model_args = dict(dims=(64, 128, 320, 512), depths=(3, 5, 9, 3))
    return _create_linglo("linglo_b2", pretrained, **dict(model_args, **kwargs))


@register_model
def linglo_b0_chhh(pretrained: bool = False, **kwargs) -> LinGloNet:
    """C-H-H-H: LinGlo-b0 with stage 1's encoder blocks replaced by conv blocks with SE (§5.1; Table 5: 3.4M).
    C = a stage of conv blocks with SE, H = LinGlo blocks (conv + attention)."""
    model_args = dict(dims=(32, 64, 160, 256), depths=(2, 3, 3, 2), stage_types="CHHH")
    return _create_linglo("linglo_b0_chhh", pretrained, **dict(model_args, **kwargs))


@register_model
def linglo_b0_cchh(pretrained: bool = False, **kwargs) -> LinGloNet:
    """C-C-H-H: LinGlo-b0 with stages 1-2 as conv blocks with SE (§5.1; Table 5: 3.3M)."""
    model_args = dict(dims=(32, 64, 160, 256), depths=(2, 3, 3, 2), stage_types="CCHH")
    return _create_linglo("linglo_b0_cchh", pretrained, **dict(model_args, **kwargs))


@register_model
def linglo_b0_wo_c(pretrained: bool = False, **kwargs) -> LinGloNet:
    """LinGlo-w/o-C-b0: 4×4 then 2×2 non-overlapping patch embeddings instead of conv downsampling, no RP-CPE,
    PVT absolute position embeddings (§5.4, Fig. 5)."""
    model_args = dict(dims=(32, 64, 160, 256), depths=(2, 3, 3, 2), patch_sizes=(4, 2, 2, 2), cpe=None,
                      abs_pos_embed=True)
    return _create_linglo("linglo_b0_wo_c", pretrained, **dict(model_args, **kwargs))


@register_model
def linglo_wo_ch(pretrained: bool = False, **kwargs) -> LinGloNet:
    """LinGlo-w/o-CH: w/o-C without the hierarchy — one 16×16 patch embedding, 150 channels, 3 heads (§5.4).
    Paper-silent: b0's block counts and FFN ratios kept per (now same-resolution) stage, so only the ablated
    biases change."""
    model_args = dict(dims=(150,) * 4, depths=(2, 3, 3, 2), heads=(3,) * 4, patch_sizes=(16, 1, 1, 1), cpe=None,
                      abs_pos_embed=True)
    return _create_linglo("linglo_wo_ch", pretrained, **dict(model_args, **kwargs))


@register_model
def linglo_b0_dotprod(pretrained: bool = False, **kwargs) -> LinGloNet:
    """LinGlo-b0 with dot-product attention in place of every key-only attention (§5.2, Fig. 4)."""
    model_args = dict(dims=(32, 64, 160, 256), depths=(2, 3, 3, 2), attention="dot")
    return _create_linglo("linglo_b0_dotprod", pretrained, **dict(model_args, **kwargs))
