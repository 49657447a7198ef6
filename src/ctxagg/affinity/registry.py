"""Build affinities from short names, so a mixer per stage is one string: ``"dw5"``, ``"mix(sa,dw5)"``.

This module is only the mechanism. Each operator registers its own builder in its own file with
``@register_affinity("name")``; ``ctxagg.affinity`` imports every operator module, so importing the
package fills the registry. ``mix(<dynamic>,<static>)`` is parsed here (AffinityMixture of two parts).
"""
from __future__ import annotations

import re
from typing import Callable, Optional

from .base import Affinity
from .mixture import AffinityMixture  # mixture imports only base: no cycle

__all__ = ["AffinityContext", "build_affinity", "register_affinity", "register_combinator", "affinity_names"]


class AffinityContext(dict):
    """What a builder may need: ``dim``, ``heads`` (M of dynamic/multi-head operators), ``grid`` (H, W)
    of the stage at the model's img_size (fixed-size operators), plus operator options
    (``attn_norm``, ``attn_drop``, ``gate``, ``switch`` (a learned on/off switch of each mixture's dynamic
    path), ``mlp_rank``)."""


Builder = Callable[[AffinityContext, Optional[int]], Affinity]
_BUILDERS: dict[str, Builder] = {}


def register_affinity(name: str) -> Callable[[Builder], Builder]:
    """Register ``builder(ctx, kernel_size_or_None) -> Affinity`` under ``name``."""
    if not re.fullmatch(r"[a-z_]+", name):
        raise ValueError(f"affinity names are lower-case letters and '_' (a digit suffix is the kernel size), "
                         f"got {name!r}")

    def wrap(fn: Builder) -> Builder:
        old = _BUILDERS.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"affinity {name!r} is already registered by {_BUILDERS[name].__module__}")
        _BUILDERS[name] = fn
        return fn
    return wrap


Combinator = Callable[[AffinityContext, list[str]], Affinity]
_COMBINATORS: dict[str, Combinator] = {}


def register_combinator(name: str) -> Callable[[Combinator], Combinator]:
    """Register ``combinator(ctx, argument_specs) -> Affinity``, parsed as ``name(arg, ...)`` (may nest)."""
    def wrap(fn: Combinator) -> Combinator:
        _COMBINATORS[name] = fn
        return fn
    return wrap


def split_arguments(text: str) -> list[str]:
    """Split ``"a,mix(b,c)"`` at its top-level commas: ``["a", "mix(b,c)"]``."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def affinity_names() -> list[str]:
    """Every registered operator name, plus the ``mix(...)`` and registered combinators."""
    return sorted(_BUILDERS) + ["mix(<dynamic>,<static>)"] + [f"{name}(...)" for name in sorted(_COMBINATORS)]


_MIX = re.compile(r"^mix\((?P<dyn>[^,()]+),(?P<static>[^,()]+)\)$")
_NAME = re.compile(r"^(?P<name>[a-z_]+?)(?P<k>\d+)?$")
_CALL = re.compile(r"^(?P<name>[a-z_]+)\((?P<args>.*)\)$")


def build_affinity(spec: str, **ctx) -> Affinity:
    """Build an affinity from ``spec``: a registered name with an optional kernel size
    (``"dw5"``, ``"mhdw3"``, ``"gconv3"``, ``"sa"``, ``"mlp_lr"``) or ``"mix(<dynamic>,<static>)"``."""
    context = AffinityContext(ctx)
    spec = spec.replace(" ", "")
    mix = _MIX.match(spec)
    if mix:
        return AffinityMixture(build_affinity(mix["dyn"], **context), build_affinity(mix["static"], **context),
                               gate=context.get("gate", "convex"), switch=context.get("switch", False))
    call = _CALL.match(spec)
    if call and call["name"] in _COMBINATORS:
        return _COMBINATORS[call["name"]](context, split_arguments(call["args"]))
    match = _NAME.match(spec)
    if not match or match["name"] not in _BUILDERS:
        raise ValueError(f"unknown affinity {spec!r}; known: {', '.join(affinity_names())} "
                         "(conv kernels as a suffix, e.g. dw5)")
    return _BUILDERS[match["name"]](context, int(match["k"]) if match["k"] else None)
