"""Container, Container-Light and the Container Table 2 variants (container.txt §3.3-3.5, §4.1).

Every model is the 4-stage base architecture of Container §3.4 with one affinity spec per stage:
``("dw5", "dw5", "dw5", "mix(sa,dw5)")`` is Container-Light (Eq. 12).
"""
from __future__ import annotations

import re
from functools import partial
from typing import Any, Optional, Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import calculate_drop_path_rates, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._registry import register_model_deprecations
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ..affinity import Affinity, AffinityMixture, SelfAttentionAffinity, TokenMlpAffinity, build_affinity
from ..affinity.registry import split_arguments
from ..blocks import AggregationBlock, TokenAggregationBlock
from ..checks import add_input_checks, state_fixed_input_size
from ..layers import ConvDownsample
from .staged import Stage, StagedBackbone, stage_info
from .vit import NoMaskVisionTransformer

__all__ = ["ContainerNet", "checkpoint_filter_fn", "to_official_state_dict", "PAPER_NUMBERS", "DEPRECATED_NAMES"]

# What the papers report (params in M, GFLOPs = GMACs at 224²) and the parameter tolerance we hold ourselves
# to (the README's stated 3% for Table 2): the targets of the tests and of `ctxagg models`.
_T2 = dict(source="Container Table 2", params_tol=0.03)
PAPER_NUMBERS: dict[str, dict[str, Any]] = {
    # the released container_v1_light (MLP ratios 8, 8, 4, 4): 20,633,643 params, 3.85 GMACs — not the paper's
    # 20.0M / 3.2G, which describe container_light_paper (ratio 4 everywhere)
    "container_light": dict(source="official container_v1_light release", params_exact=20_633_643),
    "container_light_paper": dict(params=20.0, gflops=3.2, source="Container Table 1", params_exact=20_008_235),
    "container": dict(params=22.1, gflops=8.1, source="Container Table 1/2", params_tol=0.03),
    "container_hdeit_s": dict(params=22.1, **_T2),
    "container_conv3": dict(params=33.8, **_T2),
    "container_group_conv3": dict(params=20.5, **_T2),
    "container_dw3": dict(params=18.7, **_T2),
    "container_mh_dw3": dict(params=18.6, **_T2),
    "container_mlp": dict(params=50.9, **_T2),
    "container_mlp_lr": dict(params=36.5, **_T2),
    "container_mh_mlp_lr": dict(params=41.6, **_T2),
    "container_pam": dict(source="Container §4.1 (DeiT-S + static MLP affinity; no count given)"),
    # design-space compositions in the Light base (no paper count: exact regression pins of our own build)
    "container_swin": dict(source="Swin mixers in the Container base (ours)", params_exact=22_334_766),
    "container_axial": dict(source="axial mixers in the Container base (ours)", params_exact=22_309_416),
    "container_cswin": dict(source="CSWin mixers in the Container base (ours)", params_exact=22_309_416),
    # container (22,434,234) + one switch logit per mixture block (18); its learned pattern deploys without them
    "container_auto": dict(source="Container with learned dynamic-path switches (ours; Container §5 Limitations)",
                           params_exact=22_434_252),
}

# Table 2 variants registered before the family prefix; the old names warn and build the new model.
DEPRECATED_NAMES = {name: f"container_{name}" for name in (
    "hdeit_s", "conv3", "group_conv3", "dw3", "mh_dw3", "mlp", "mlp_lr", "mh_mlp_lr")}


class ContainerNet(StagedBackbone):
    """The Container base network (Container §3.4) with a chosen affinity per stage.

    Layout follows the official ``container_v1_light`` release: p×p patch embeddings with LayerNorm
    (p = 4, 2, 2, 2), :class:`~ctxagg.blocks.AggregationBlock` blocks (BatchNorm, 3×3 depthwise
    positional conv, 1×1 projections, 1×1-conv MLP), a final BatchNorm, average pooling and a linear head.

    Args:
        mixers: one affinity spec per stage (see :func:`ctxagg.affinity.build_affinity`), or a sequence of specs
            that the stage's blocks take in turn (Swin's ``("window7", "shifted_window7")``).
        head_dim: channels per head C/M (Container Table 2 uses 32 for attention and multi-head mixers).
        img_size: only used by fixed-size affinities (token MLPs), which are built for its grid.
        switch: give every mixture ``mix(dynamic,static)`` a learned on/off switch of its dynamic path
            (:class:`~ctxagg.affinity.mixture.HardConcreteSwitch`; trained under ``ctxagg train --dynamic-budget``).
        mlp_rank: rank of low-rank token MLPs, as a fraction of N (float) or an absolute rank (int).
        proj: every block's input projection, ``"linear"`` (1×1) or ``"conv<k>"`` (CvT's depth-wise convolutional
            projection, :class:`~ctxagg.layers.conv_proj.ConvProjection`).
    """

    def __init__(self, mixers: Sequence[str | Sequence[str]] = ("dw5", "dw5", "dw5", "mix(sa,dw5)"),
                 dims: Sequence[int] = (64, 128, 320, 512), depths: Sequence[int] = (3, 4, 8, 3),
                 patch_sizes: Sequence[int] = (4, 2, 2, 2), mlp_ratios: Sequence[float] = (8, 8, 4, 4),
                 head_dim: int = 32, img_size: Any = 224, in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = "avg", drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, attn_norm: str = "softmax",
                 gate: str = "convex", switch: bool = False, mlp_rank: float | int = 0.25, pos_kernel: int = 3,
                 mlp_rank_stages: Optional[Sequence[bool]] = None, model_name: str = "container_light",
                 proj: str = "linear", **kwargs):
        super().__init__()
        if kwargs:
            raise TypeError(f"unexpected arguments for {model_name}: {sorted(kwargs)}")
        if not len(mixers) == len(dims) == len(depths) == len(patch_sizes) == len(mlp_ratios):
            raise ValueError("mixers, dims, depths, patch_sizes and mlp_ratios need one entry per stage")
        self.model_name = model_name
        self.mixers = tuple(m if isinstance(m, str) else tuple(m) for m in mixers)
        img_size = to_2tuple(img_size)
        dp_rates = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        block_args = dict(pos_kernel=pos_kernel, drop=proj_drop_rate, proj=proj)
        affinity_args = dict(attn_norm=attn_norm, attn_drop=attn_drop_rate, gate=gate, switch=switch)
        self.stem = ConvDownsample(in_chans, dims[0], patch_sizes[0])
        stages, self.feature_info, stride = [], [], 1
        for i, (spec, dim, patch, ratio) in enumerate(zip(mixers, dims, patch_sizes, mlp_ratios)):
            downsample = nn.Identity() if i == 0 else ConvDownsample(dims[i - 1], dim, patch)
            stride *= patch
            rank = mlp_rank if mlp_rank_stages is None or mlp_rank_stages[i] else None  # None: dense
            context = dict(affinity_args, dim=dim, heads=max(1, dim // head_dim), mlp_rank=rank,
                           grid=(img_size[0] // stride, img_size[1] // stride))
            specs = (spec,) if isinstance(spec, str) else tuple(spec)
            blocks = [AggregationBlock(dim, build_affinity(specs[j % len(specs)], **context), ratio, drop_path=rate,
                                       **block_args) for j, rate in enumerate(dp_rates[i])]
            stages.append(Stage(downsample, blocks))
            self.feature_info.append(stage_info(i, dim, stride))
        self.stages = nn.Sequential(*stages)
        fixed = any(isinstance(m, Affinity) and m.fixed_tokens is not None for m in self.stages.modules())
        self.fixed_img_size = img_size if fixed else None
        self.finish_init(nn.BatchNorm2d(dims[-1]), dims[-1], num_classes, global_pool, drop_rate)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Mixture gates and switches are not decayed (their value is the model's choice between A_dyn and
        A_static)."""
        return {n for n, _ in self.named_parameters() if n.endswith(("gate_logit", ".alpha", ".beta", ".log_alpha"))}

    def dynamic_pattern(self) -> list[list[bool]]:
        """Per stage, per block: whether the block's dynamic path runs (in evaluation): False for a static mixer or
        a mixture whose learned switch is off."""
        return [[bool(b.affinity.dynamic) and (b.switch is None or b.affinity.dynamic_on()) for b in stage.blocks]
                for stage in self.stages]

    def learned_mixers(self) -> tuple:
        """The ``mixers`` argument of the fixed architecture this model is (in evaluation): each mixture whose
        switch is off becomes its static part; a stage whose blocks differ gets one spec per block."""
        out = []
        for spec, stage in zip(self.mixers, self.stages):
            specs = (spec,) if isinstance(spec, str) else spec
            blocks = tuple(_settled_spec(specs[j % len(specs)], b) for j, b in enumerate(stage.blocks))
            out.append(blocks[0] if len(set(blocks)) == 1 else blocks)
        return tuple(out)


def _settled_spec(spec: str, block: AggregationBlock) -> str:
    """``mix(<dynamic>,<static>)`` -> ``<static>`` when the block's dynamic path is off (or already removed)."""
    compact = spec.replace(" ", "")
    if not (compact.startswith("mix(") and compact.endswith(")")):
        return spec
    off = not isinstance(block.affinity, AffinityMixture) or (
        block.switch is not None and not block.affinity.dynamic_on())
    return split_arguments(compact[4:-1])[1] if off else spec


# Official container_v1_light key -> ours, as (official pattern, ours pattern) regex pairs.
_OFFICIAL_KEY_RULES: list[tuple[str, str]] = [
    (r"^patch_embed1\.", r"stem."),
    (r"^patch_embed([2-4])\.", r"stages.{\1-1}.downsample."),
    (r"^blocks([1-4])\.(\d+)\.conv1\.", r"stages.{\1-1}.blocks.\2.proj_in."),
    (r"^blocks([1-4])\.(\d+)\.conv2\.", r"stages.{\1-1}.blocks.\2.proj_out."),
    (r"^blocks([1-4])\.(\d+)\.conv\.", r"stages.{\1-1}.blocks.\2.affinity.static_affinity."),
    (r"^blocks([1-4])\.(\d+)\.attn\.", r"stages.{\1-1}.blocks.\2.affinity."),
    (r"^blocks([1-4])\.(\d+)\.sa_weight$", r"stages.{\1-1}.blocks.\2.affinity.gate_logit"),
    (r"^blocks([1-4])\.(\d+)\.", r"stages.{\1-1}.blocks.\2."),
]


def _rename_official(key: str) -> str:
    for pattern, target in _OFFICIAL_KEY_RULES:
        match = re.match(pattern, key)
        if match:
            out = match.expand(target.replace("{\\1-1}", str(int(match.group(1)) - 1) if match.groups() else ""))
            return out + key[match.end():]
    return key


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Map an official allenai/container checkpoint (``patch_embed1..4``, ``blocks1..4.N``, ``norm``,
    ``head``; optionally wrapped in ``{"model": ...}``) onto :class:`ContainerNet` keys."""
    state_dict = state_dict.get("model", state_dict)
    if not any(k.startswith(("patch_embed1.", "blocks1.")) for k in state_dict):
        return state_dict  # already in our layout
    return {_rename_official(k): v for k, v in state_dict.items()}


def to_official_state_dict(model: ContainerNet) -> dict[str, Tensor]:
    """Our state dict in the official release's key layout (the inverse of :func:`checkpoint_filter_fn`)."""
    out = {}
    for key, value in model.state_dict().items():
        new = re.sub(r"^stem\.", "patch_embed1.", key)
        new = re.sub(r"^stages\.(\d)\.downsample\.", lambda m: f"patch_embed{int(m[1]) + 1}.", new)
        new = re.sub(r"^stages\.(\d)\.blocks\.", lambda m: f"blocks{int(m[1]) + 1}.", new)
        new = (new.replace(".proj_in.", ".conv1.").replace(".proj_out.", ".conv2.")
               .replace(".affinity.static_affinity.", ".conv.").replace(".affinity.gate_logit", ".sa_weight")
               .replace(".affinity.", ".attn."))
        out[new] = value
    return out


def _cfg(**kwargs) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.proj", "classifier": "head", "license": "apache-2.0", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "container_light": _cfg(),
    "container_light_paper": _cfg(),
    "container": _cfg(),
    "container_auto": _cfg(),
    "container_hdeit_s": _cfg(),
    "container_swin": _cfg(),
    "container_axial": _cfg(),
    "container_cswin": _cfg(),
    "container_conv3": _cfg(),
    "container_group_conv3": _cfg(),
    "container_dw3": _cfg(),
    "container_mh_dw3": _cfg(),
    "container_mlp": _cfg(fixed_input_size=True),
    "container_mlp_lr": _cfg(fixed_input_size=True),
    "container_mh_mlp_lr": _cfg(fixed_input_size=True),
    "container_pam": _cfg(pool_size=None, first_conv="patch_embed.proj", fixed_input_size=True),
})


def small_input_kwargs(model_name: str, img_size: int) -> dict[str, Any]:
    """Model arguments for training at ``img_size``: at ≤ 64² patch sizes (2, 2, 2, 2) instead of (4, 2, 2, 2), so
    the stage grids are 16², 8², 4², 2² at 32² (paper-silent); Container-PAM (a ViT) takes 4×4 patches.
    ``img_size`` sizes the fixed-size token MLPs."""
    if model_name == "container_pam":
        return dict(img_size=img_size, **(dict(patch_size=4) if img_size <= 64 else {}))
    return dict(img_size=img_size, **(dict(patch_sizes=(2, 2, 2, 2)) if img_size <= 64 else {}))


def _create_container(variant: str, pretrained: bool = False, **kwargs) -> ContainerNet:
    return state_fixed_input_size(build_model_with_cfg(
        ContainerNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True), model_name=variant, **kwargs))


@register_model
def container_light(pretrained: bool = False, **kwargs) -> ContainerNet:
    """Container-Light as released (official ``container_v1_light``; container.txt §3.5, Eq. 12): static 5×5
    depthwise affinities in stages 1-3, α·A_sa + β·A_dw5 in stage 4, MLP ratios (8, 8, 4, 4).

    Structurally identical to the official code (its checkpoints load): 20,633,643 parameters, 3.85 GMACs.
    The paper's Table 1 (20.0M, 3.2G) describes :func:`container_light_paper`.
    """
    model_args = dict(mixers=("dw5", "dw5", "dw5", "mix(sa,dw5)"), mlp_ratios=(8, 8, 4, 4))
    return _create_container("container_light", pretrained, **dict(model_args, **kwargs))


@register_model
def container_light_paper(pretrained: bool = False, **kwargs) -> ContainerNet:
    """Container-Light as the paper counts it (container.txt Table 1: 20.0M params, 3.2 GFLOPs): the official
    structure with MLP ratio 4 in every stage — exactly 20,008,235 parameters and 3.12 GMACs at 224²."""
    model_args = dict(mixers=("dw5", "dw5", "dw5", "mix(sa,dw5)"), mlp_ratios=(4, 4, 4, 4))
    return _create_container("container_light_paper", pretrained, **dict(model_args, **kwargs))


@register_model
def container(pretrained: bool = False, **kwargs) -> ContainerNet:
    """Container: α·A_sa + β·A_dw5 in all four stages (container.txt §3.3-3.4; Table 1: 22.1M, 8.1G).

    Built on the released Light base (dims 64/128/320/512, depths 3/4/8/3, patches 4/2/2/2), not on the
    paper's §3.4 text (128/256/320/512, 2/3/8/3, patches 4/4/2/2: a total stride of 64, inconsistent with a
    7×7 final map at 224²); heads of C/M = 32 channels as Table 2.
    """
    model_args = dict(mixers=("mix(sa,dw5)",) * 4)
    return _create_container("container", pretrained, **dict(model_args, **kwargs))


@register_model
def container_auto(pretrained: bool = False, **kwargs) -> ContainerNet:
    """Container whose every α·A_sa + β·A_dw5 block carries a learned on/off switch of its dynamic path
    (:class:`~ctxagg.affinity.mixture.HardConcreteSwitch`): it starts as :func:`container` (every path on; the
    same weights plus one switch logit per block) and learns its own Container-Light pattern under
    ``ctxagg train --dynamic-budget GMACS`` — the learning the paper leaves to future work (container.txt §5,
    "Limitations"). ``learned_mixers()`` gives the fixed architecture (``container`` with those ``mixers``);
    ``timm.utils.reparameterize_model`` removes the switched-off paths' weights and compute."""
    model_args = dict(mixers=("mix(sa,dw5)",) * 4, switch=True)
    return _create_container("container_auto", pretrained, **dict(model_args, **kwargs))


@register_model
def container_swin(pretrained: bool = False, **kwargs) -> ContainerNet:
    """Swin's mixer in the Container-Light base: blocks alternate 7×7 windows and shifted windows in every stage
    (Swin §3.2; at the 7×7 last stage the shift is skipped, as Swin does). The design space's Swin row with
    everything else equal: 22,334,766 parameters, 4.46 GMACs at 224² (measured; H-DeiT-S, the same base with global
    attention, has 22.31M and 8.91 GMACs)."""
    model_args = dict(mixers=(("window7", "shifted_window7"),) * 4)
    return _create_container("container_swin", pretrained, **dict(model_args, **kwargs))


@register_model
def container_axial(pretrained: bool = False, **kwargs) -> ContainerNet:
    """Axial attention (row then column, Ho et al. §3) in every stage of the Container-Light base: 22,309,416
    parameters, 4.51 GMACs at 224² (measured)."""
    model_args = dict(mixers=("axial",) * 4)
    return _create_container("container_axial", pretrained, **dict(model_args, **kwargs))


@register_model
def container_cswin(pretrained: bool = False, **kwargs) -> ContainerNet:
    """CSWin's cross-shaped windows in the Container-Light base, with CSWin-T's stripe widths 1, 2, 7, 7
    (CSWin §3.2, Table 1): 22,309,416 parameters, 4.52 GMACs at 224² (measured)."""
    model_args = dict(mixers=("cswin1", "cswin2", "cswin7", "cswin7"))
    return _create_container("container_cswin", pretrained, **dict(model_args, **kwargs))


@register_model
def container_hdeit_s(pretrained: bool = False, **kwargs) -> ContainerNet:
    """H-DeiT-S: self-attention only (α=1, β=0) in every stage of the base (container.txt Table 2: 22.1M)."""
    model_args = dict(mixers=("sa",) * 4)
    return _create_container("container_hdeit_s", pretrained, **dict(model_args, **kwargs))


@register_model
def container_conv3(pretrained: bool = False, **kwargs) -> ContainerNet:
    """Conv-3: a full 3×3 convolution between the block's 1×1 projections (container.txt Table 2: 33.8M)."""
    model_args = dict(mixers=("conv3",) * 4)
    return _create_container("container_conv3", pretrained, **dict(model_args, **kwargs))


@register_model
def container_group_conv3(pretrained: bool = False, **kwargs) -> ContainerNet:
    """Group Conv-3: grouped 3×3 convolution, 32 channels a group (the C/M = 32 grouping of the other variants;
    container.txt Table 2: 20.5M)."""
    model_args = dict(mixers=("gconv3",) * 4)
    return _create_container("container_group_conv3", pretrained, **dict(model_args, **kwargs))


@register_model
def container_dw3(pretrained: bool = False, **kwargs) -> ContainerNet:
    """DW-3: 3×3 depthwise static affinity, M = C (container.txt Table 2: 18.7M)."""
    model_args = dict(mixers=("dw3",) * 4)
    return _create_container("container_dw3", pretrained, **dict(model_args, **kwargs))


@register_model
def container_mh_dw3(pretrained: bool = False, **kwargs) -> ContainerNet:
    """MH-DW-3: 3×3 kernels shared inside 32-channel heads (container.txt §3.3, Table 2: 18.6M)."""
    model_args = dict(mixers=("mhdw3",) * 4)
    return _create_container("container_mh_dw3", pretrained, **dict(model_args, **kwargs))


@register_model
def container_mlp(pretrained: bool = False, **kwargs) -> ContainerNet:
    """MLP: one dense N×N token MLP per block, M = 1, fixed 224² input (container.txt Eq. 8, Table 2: 50.9M)."""
    model_args = dict(mixers=("mlp",) * 4)
    return _create_container("container_mlp", pretrained, **dict(model_args, **kwargs))


@register_model
def container_mlp_lr(pretrained: bool = False, **kwargs) -> ContainerNet:
    """MLP-LR: low-rank transposed MLP A = U Vᵀ, fixed 224² input (container.txt Table 2: 36.5M).

    Paper-silent: low rank only in stage 1, whose dense 3136² matrix dominates (9.8M params a block), at rank
    N/4 = 784; stages 2-4 stay dense. Lands at 36.46M (-0.1%); rank N/4 everywhere would give 35.1M (-3.9%).
    """
    model_args = dict(mixers=("mlp_lr",) * 4, mlp_rank=0.25, mlp_rank_stages=(True, False, False, False))
    return _create_container("container_mlp_lr", pretrained, **dict(model_args, **kwargs))


@register_model
def container_mh_mlp_lr(pretrained: bool = False, **kwargs) -> ContainerNet:
    """MH-MLP-LR: multi-head low-rank transposed MLP, fixed 224² input (container.txt Table 2: 41.6M).

    Paper-silent: 32-channel heads (C/M = 32), each head its own matrix; rank 256 per head in stage 1, dense per
    head in stages 2-4. Lands at 41.58M (-0.05%).
    """
    model_args = dict(mixers=("mh_mlp_lr",) * 4, mlp_rank=256, mlp_rank_stages=(True, False, False, False))
    return _create_container("container_mh_mlp_lr", pretrained, **dict(model_args, **kwargs))


def _pam_block(dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_drop: float = 0.0,
               attn_drop: float = 0.0, drop_path: float = 0.0, norm_layer=nn.LayerNorm, act_layer=nn.GELU,
               tokens: int = 197, gate: str = "convex", **_: Any) -> TokenAggregationBlock:
    """timm ``block_fn`` of Container-PAM: the extra timm arguments (qk_norm, init_values, ...) are unused."""
    affinity = AffinityMixture(SelfAttentionAffinity(dim, num_heads, attn_drop=attn_drop),
                               TokenMlpAffinity(dim, tokens, heads=1), gate=gate)
    return TokenAggregationBlock(dim, affinity, mlp_ratio, qkv_bias=qkv_bias, norm_layer=norm_layer,
                                 act_layer=act_layer, drop=proj_drop, drop_path=drop_path)


@register_model
def container_pam(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Container-PAM: DeiT-S with a learned static N×N (MLP) affinity mixed into every attention
    (container.txt §3.3 "Pay Attention to MLP", §4.1 "Emergence of locality").

    Built on timm's ``VisionTransformer`` (patch 16, dim 384, depth 12, 6 heads, class token) with a
    block whose affinity is α·A_sa + β·A_mlp; the static matrix covers all 197 tokens (class token
    included, paper-silent choice), so the input size is fixed at 224². DeiT-S has 22,050,664 params;
    the 12 static 197×197 matrices and gates add 465,720.
    """
    model_args = dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6)
    args = dict(model_args, **kwargs)
    img_size, patch = to_2tuple(args["img_size"]), args["patch_size"]
    tokens = (img_size[0] // patch) * (img_size[1] // patch) + 1
    args["block_fn"] = partial(_pam_block, tokens=tokens, gate=args.pop("gate", "convex"))
    model = build_model_with_cfg(NoMaskVisionTransformer, "container_pam", pretrained,
                                 feature_cfg=dict(out_indices=3, feature_cls="getter"), **args)
    add_input_checks(model)  # one forward-pre-hook, as every family
    return state_fixed_input_size(model)


register_model_deprecations(__name__, DEPRECATED_NAMES)
