"""Model families, registered in timm's registry on import (one file per family)."""
from __future__ import annotations

import difflib
from typing import Any, Optional, Sequence

import timm
import torch
from torch import nn

from ..errors import ConfigError

from . import container, dwnet, lesa, linglos, swin, vit
from .container import ContainerNet

__all__ = ["ContainerNet", "container", "dwnet", "lesa", "linglos", "swin", "vit", "model_names", "paper_numbers",
           "resolve_model_name", "torchscript_unsupported", "unscriptable_models"]

_FAMILIES = (container, dwnet, lesa, linglos, swin, vit)


def _family_key(family) -> str:
    return family.__name__.rsplit(".", 1)[-1]  # timm keys its module index by the last name component


def model_names() -> list[str]:
    """Every model this package registers in timm (deprecated aliases excluded), family by family."""
    names: list[str] = []
    for family in _FAMILIES:
        names += [n for n in timm.list_models(module=_family_key(family))
                  if timm.models.model_entrypoint(n).__module__ == family.__name__]
    return names


def torchscript_unsupported(model: nn.Module) -> Optional[str]:
    """Why ``torch.jit.script(model)`` is refused (the first part declaring ``torchscript_unsupported``), or None."""
    for module in model.modules():
        reason = getattr(module, "torchscript_unsupported", None)
        if isinstance(reason, str) and reason:
            return f"{type(module).__name__}: {reason}"
    return None


def unscriptable_models(names: Optional[Sequence[str]] = None) -> dict[str, str]:
    """{name: reason} of the registered models (or ``names``) that TorchScript refuses, read from models built on the
    meta device: ctxagg's counterpart of the name filters timm's own test suite excludes its unscriptable models
    with (``EXCLUDE_JIT_FILTERS``)."""
    out = {}
    for name in model_names() if names is None else names:
        with torch.device("meta"):
            reason = torchscript_unsupported(timm.create_model(name))
        if reason:
            out[name] = reason
    return out


def paper_numbers() -> dict[str, dict[str, Any]]:
    """Each registered model's published numbers (params M, gflops, activations M, source, tolerances)."""
    out: dict[str, dict[str, Any]] = {}
    for family in _FAMILIES:
        out.update(getattr(family, "PAPER_NUMBERS", {}))
    return out


def resolve_model_name(name: str) -> str:
    """Return ``name`` if ctxagg or timm registers it, else raise a ConfigError naming the nearest names."""
    if name in timm.list_models():
        return name
    close = difflib.get_close_matches(name, model_names(), n=5, cutoff=0.5) or difflib.get_close_matches(
        name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ConfigError(f"unknown model {name!r}.{hint} (`ctxagg models --no-flops` lists ctxagg's models)")
