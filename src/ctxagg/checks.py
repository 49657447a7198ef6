"""Input checks any model can get: layout, dtype, channel count, empty batch, fixed size, and (opt-in) NaN/Inf.

Every family gets them the same way, from one forward-pre-hook (the stable API)::

    ctxagg.checks.add_input_checks(model)               # default checks; a family's constructor (or entry
                                                        # point) installs them, `ctxagg train/eval` too
    ctxagg.checks.add_input_checks(model, finite=True)  # ... and refuse NaN/Inf pixels
    with ctxagg.checks.enable_input_checks():           # NaN/Inf checks for every checked model in the block
        model(x)

What a model accepts is read from the model (:func:`input_spec`): ``model_name`` (or the timm
``pretrained_cfg`` architecture), the first conv's ``in_channels``, ``fixed_img_size`` (or a strict timm
``patch_embed.img_size``). The hook checks calls of ``model(x)``; methods called directly
(``forward_features``) are not hooked. The finite check reads the whole batch (a device sync on GPU), so it
is off by default. While torch.fx traces a model the input is a ``Proxy`` (no values, no shape): the checks
skip it (:func:`ctxagg.tracing.is_symbolic`), and the traced graph runs without them, as timm's traced models do.

Layer: this module imports only torch (and :mod:`ctxagg.tracing`), so every layer (affinity/ ... cli.py) may use
it and it never imports the package (no cycle through models/).
"""
from __future__ import annotations

import copy
import functools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from .tracing import is_symbolic

__all__ = ["InputError", "InputTypeError", "NonFiniteInputError", "InputSpec", "check_images", "input_spec",
           "add_input_checks", "enable_input_checks", "finite_checks_enabled", "fixed_input_size",
           "state_fixed_input_size"]


class InputError(ValueError):
    """An input tensor a model cannot use."""


class InputTypeError(InputError, TypeError):
    """An input tensor of the wrong dtype (a ``TypeError`` and an :class:`InputError`)."""


class NonFiniteInputError(InputError):
    """An input holding NaN or Inf values (raised only when finite checks are on)."""


_finite_depth = 0  # > 0 inside enable_input_checks()


def finite_checks_enabled() -> bool:
    """True inside :func:`enable_input_checks`."""
    return _finite_depth > 0


@contextmanager
def enable_input_checks(finite: bool = True) -> Iterator[None]:
    """Within the block, every model given :func:`add_input_checks` also refuses NaN/Inf inputs."""
    global _finite_depth
    _finite_depth += int(finite)
    try:
        yield
    finally:
        _finite_depth -= int(finite)


def check_images(x: Tensor, name: str = "model", in_chans: Optional[int] = None,
                 fixed_size: Optional[Sequence[int]] = None, finite: bool = False) -> None:
    """Raise an :class:`InputError` naming what was expected if ``x`` is not a usable image batch."""
    if not isinstance(x, Tensor):
        raise InputTypeError(f"{name} expects an image tensor shaped (B, C, H, W), got {type(x).__name__}")
    if x.ndim != 4:
        raise InputError(f"{name} expects images shaped (B, C, H, W), got {tuple(x.shape)}"
                         + (" (add a batch dimension: x.unsqueeze(0))" if x.ndim == 3 else ""))
    if not x.is_floating_point():
        raise InputTypeError(f"{name} expects a floating-point image tensor, got {x.dtype}"
                             + (" (convert and normalise: x.float() / 255, then mean/std)" if x.dtype == torch.uint8
                                else ""))
    if x.shape[0] == 0:
        raise InputError(f"{name} got an empty batch {tuple(x.shape)}; expected at least one image "
                         f"({in_chans if in_chans is not None else 'C'}, H, W)")
    if in_chans is not None and x.shape[1] != in_chans:
        raise InputError(f"{name} was built for {in_chans} input channels, got {x.shape[1]} "
                         f"(pass in_chans={x.shape[1]} to create_model)")
    if fixed_size is not None and tuple(x.shape[-2:]) != tuple(fixed_size):
        h, w = fixed_size
        raise InputError(f"{name} has fixed-size layers (token-MLP affinities, position tables) built for "
                         f"{h}×{w} input, got {x.shape[-2]}×{x.shape[-1]}; "
                         f"build it with img_size={x.shape[-2]} instead")
    if finite or finite_checks_enabled():
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            per_image = bad.flatten(1).any(1).nonzero().flatten().tolist()
            nan, inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
            shown = ", ".join(map(str, per_image[:8])) + (", ..." if len(per_image) > 8 else "")
            raise NonFiniteInputError(f"{name} input has {nan} NaN and {inf} Inf values (of {x.numel()}) in "
                                      f"{len(per_image)} of {x.shape[0]} images (batch indices {shown}); "
                                      "expected finite pixels")


@dataclass
class InputSpec:
    """What a model accepts, as far as it can be read from the model."""

    name: str
    in_chans: Optional[int] = None
    fixed_size: Optional[tuple[int, int]] = None


def _first_conv(model: nn.Module) -> Optional[nn.Module]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    first = cfg.get("first_conv")
    for name in ([first] if isinstance(first, str) else list(first or [])):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(module, nn.Conv2d):
            return module
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def input_spec(model: nn.Module) -> InputSpec:
    """Model name, input channels and fixed input size (if any) of ``model``: its ``model_name`` and
    ``fixed_img_size`` attributes, timm's ``pretrained_cfg``/``patch_embed``, or the first Conv2d."""
    own_name = getattr(model, "model_name", None)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = own_name if isinstance(own_name, str) and own_name != "model" else cfg.get("architecture") \
        or type(model).__name__
    conv = _first_conv(model)
    return InputSpec(name, conv.in_channels if conv is not None else None, fixed_input_size(model))


def fixed_input_size(model: nn.Module) -> Optional[tuple[int, int]]:
    """The one input size ``model`` accepts now, or None: its ``fixed_img_size``, or a strict timm ``patch_embed``
    size (read at every call: ``set_input_size`` changes it)."""
    fixed = getattr(model, "fixed_img_size", None)
    patch_embed = getattr(model, "patch_embed", None)
    if fixed is None and patch_embed is not None and getattr(patch_embed, "strict_img_size", False) \
            and not getattr(model, "dynamic_img_size", False) and getattr(patch_embed, "img_size", None) is not None:
        fixed = patch_embed.img_size
    return tuple(fixed) if fixed is not None else None


def state_fixed_input_size(model: nn.Module) -> nn.Module:
    """Set ``model.pretrained_cfg["fixed_input_size"]`` when the built model takes one size only
    (:func:`fixed_input_size`), so a model built with other arguments than its registered default (a strict ViT,
    a token-MLP mixer) says so where timm's tools and test suite read it. Returns ``model``."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and fixed_input_size(model) is not None:
        cfg["fixed_input_size"] = True
    return model


class _InputCheckHook:
    """A forward-pre-hook running :func:`check_images` on the first tensor argument."""

    def __init__(self, spec: InputSpec, finite: bool):
        self.spec, self.finite = spec, finite

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        x = args[0] if args else kwargs.get("x", next(iter(kwargs.values()), None))
        if is_symbolic(x):
            return None
        check_images(x, self.spec.name, self.spec.in_chans, fixed_input_size(module), self.finite)
        return None


class InputChecks:
    """What :func:`add_input_checks` changed; ``remove()`` undoes exactly that (a hook it installed is taken off,
    a finite setting it changed is restored)."""

    def __init__(self, model: nn.Module, finite: bool, hook: _InputCheckHook, previous_finite: bool,
                 installed: bool):
        self.model, self.finite, self._hook = model, finite, hook
        self._previous, self._installed = previous_finite, installed

    def remove(self) -> None:
        if not self._installed:
            self._hook.finite = self._previous
            return
        hooks = self.model._forward_pre_hooks
        for key in [k for k, h in hooks.items() if h is self._hook]:
            del hooks[key]
            self.model._forward_pre_hooks_with_kwargs.pop(key, None)
        self.model.__dict__.pop("__prepare_scriptable__", None)


def _without_input_checks(model: nn.Module) -> nn.Module:
    """What ``torch.jit.script`` compiles of a checked model (its ``__prepare_scriptable__``): a shallow copy (same
    parameters and submodules) without the check hook, which is Python TorchScript cannot compile. The scripted
    model runs unchecked; ``model`` keeps its checks."""
    clone = copy.copy(model)
    clone.__dict__.pop("__prepare_scriptable__", None)
    clone._forward_pre_hooks = type(model._forward_pre_hooks)(
        (k, h) for k, h in model._forward_pre_hooks.items() if not isinstance(h, _InputCheckHook))
    clone._forward_pre_hooks_with_kwargs = {k: v for k, v in model._forward_pre_hooks_with_kwargs.items()
                                            if k in clone._forward_pre_hooks}
    return clone


def add_input_checks(model: nn.Module, finite: bool = False) -> InputChecks:
    """Make ``model`` refuse bad inputs with a clear :class:`InputError` (wrong layout, dtype, channel count,
    empty batch, wrong size for a fixed-size model; with ``finite`` also NaN/Inf), through one
    forward-pre-hook. Calling it again updates the settings instead of stacking hooks."""
    hook = next((h for h in model._forward_pre_hooks.values() if isinstance(h, _InputCheckHook)), None)
    if hook is not None:
        previous, hook.finite = hook.finite, finite
        return InputChecks(model, finite, hook, previous, installed=False)
    hook = _InputCheckHook(input_spec(model), finite)
    model.register_forward_pre_hook(hook, with_kwargs=True)
    model.__prepare_scriptable__ = functools.partial(_without_input_checks, model)  # torch.jit.script: no hook
    return InputChecks(model, finite, hook, False, installed=True)
