"""Model families, registered in timm's registry on import."""
from __future__ import annotations

from typing import Any

from timm.models._registry import _model_entrypoints

from . import container, lesa, linglos, vit
from .container import ContainerNet

__all__ = ["ContainerNet", "container", "lesa", "linglos", "vit", "model_names", "paper_numbers"]

_FAMILIES = [container, lesa, linglos, vit]  # vit.PAPER_NUMBERS also holds the Swin rows


def model_names() -> list[str]:
    """Every model this package registers in timm, in registration order."""
    return [name for name, fn in _model_entrypoints.items() if fn.__module__.startswith("ctxagg.")]


def paper_numbers() -> dict[str, dict[str, Any]]:
    """Each registered model's published numbers (params M, gflops, activations M, source, tolerances)."""
    out: dict[str, dict[str, Any]] = {}
    for family in _FAMILIES:
        out.update(getattr(family, "PAPER_NUMBERS", {}))
    return out
