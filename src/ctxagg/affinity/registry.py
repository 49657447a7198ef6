"""Build affinities from short names, so a mixer per stage is one string: ``"dw5"``, ``"mix(sa,dw5)"``."""
from __future__ import annotations

import re
from typing import Callable, Optional

from .attention import SelfAttentionAffinity
from .base import Affinity
from .conv import GroupConvAffinity
from .depthwise import DepthwiseConvAffinity
from .mixture import AffinityMixture
from .token_mlp import TokenMlpAffinity

__all__ = ["AffinityContext", "build_affinity", "register_affinity", "affinity_names"]


class AffinityContext(dict):
    """What a builder may need: ``dim``, ``heads`` (M of dynamic/multi-head operators), ``grid`` (H, W)
    of the stage at the model's img_size (fixed-size operators), plus operator options
    (``attn_norm``, ``attn_drop``, ``gate``, ``mlp_rank``)."""


Builder = Callable[[AffinityContext, Optional[int]], Affinity]
_BUILDERS: dict[str, Builder] = {}


def register_affinity(name: str) -> Callable[[Builder], Builder]:
    """Register ``builder(ctx, kernel_size_or_None) -> Affinity`` under ``name``."""
    def wrap(fn: Builder) -> Builder:
        _BUILDERS[name] = fn
        return fn
    return wrap


def affinity_names() -> list[str]:
    return sorted(_BUILDERS) + ["mix(<dynamic>,<static>)"]


def _tokens(ctx: AffinityContext) -> tuple[int, tuple[int, int]]:
    grid = ctx.get("grid")
    if grid is None:
        raise ValueError("token-MLP affinities need a fixed grid: build the model with an img_size")
    return grid[0] * grid[1], tuple(grid)


def _mlp_rank(ctx: AffinityContext, tokens: int) -> Optional[int]:
    """Rank of a low-rank token MLP: a fraction of N (float), an absolute rank (int) or None (dense)."""
    rank = ctx.get("mlp_rank", 0.25)  # paper-silent: rank N/4 unless given (see models/container.py)
    if rank is None:
        return None
    return min(tokens, max(1, round(tokens * rank))) if isinstance(rank, float) else min(tokens, int(rank))


@register_affinity("sa")
def _sa(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    return SelfAttentionAffinity(ctx["dim"], ctx["heads"], norm=ctx.get("attn_norm", "softmax"),
                                 attn_drop=ctx.get("attn_drop", 0.0))


@register_affinity("dw")
def _dw(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    return DepthwiseConvAffinity(ctx["dim"], k or 3)


@register_affinity("mhdw")
def _mhdw(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    return DepthwiseConvAffinity(ctx["dim"], k or 3, heads=ctx["heads"])


@register_affinity("conv")
def _conv(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    return GroupConvAffinity(ctx["dim"], k or 3, groups=1)


@register_affinity("gconv")
def _gconv(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    return GroupConvAffinity(ctx["dim"], k or 3, groups=ctx["heads"])


@register_affinity("mlp")
def _mlp(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    n, grid = _tokens(ctx)
    return TokenMlpAffinity(ctx["dim"], n, heads=1, grid=grid)


@register_affinity("mlp_lr")
def _mlp_lr(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    n, grid = _tokens(ctx)
    return TokenMlpAffinity(ctx["dim"], n, heads=1, rank=_mlp_rank(ctx, n), grid=grid)


@register_affinity("mh_mlp_lr")
def _mh_mlp_lr(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    n, grid = _tokens(ctx)
    return TokenMlpAffinity(ctx["dim"], n, heads=ctx["heads"], rank=_mlp_rank(ctx, n), grid=grid)


_MIX = re.compile(r"^mix\((?P<dyn>[^,()]+),(?P<static>[^,()]+)\)$")
_NAME = re.compile(r"^(?P<name>[a-z_]+?)(?P<k>\d+)?$")


def build_affinity(spec: str, **ctx) -> Affinity:
    """Build an affinity from ``spec``: a registered name with an optional kernel size
    (``"dw5"``, ``"mhdw3"``, ``"gconv3"``, ``"sa"``, ``"mlp_lr"``) or ``"mix(<dynamic>,<static>)"``."""
    context = AffinityContext(ctx)
    spec = spec.replace(" ", "")
    mix = _MIX.match(spec)
    if mix:
        return AffinityMixture(build_affinity(mix["dyn"], **context), build_affinity(mix["static"], **context),
                               gate=context.get("gate", "convex"))
    match = _NAME.match(spec)
    if not match or match["name"] not in _BUILDERS:
        raise ValueError(f"unknown affinity {spec!r}; known: {', '.join(affinity_names())} "
                         "(conv kernels as a suffix, e.g. dw5)")
    return _BUILDERS[match["name"]](context, int(match["k"]) if match["k"] else None)
