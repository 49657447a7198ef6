"""torch.fx support shared by every layer: what a symbolically traced value is, and leaf functions.

torch.fx traces a model with ``Proxy`` values that have no data and no static shape, so Python code that
branches on a shape (``if x.ndim == 4``) cannot be traced. ctxagg's operators are layout-polymorphic, so their
small shape-dependent helpers are *leaf functions* (:func:`fx_leaf`): a call with a Proxy argument is recorded
as one graph node and runs on real tensors when the traced graph runs. Unlike ``torch.fx.wrap`` (which patches
the defining module only) or timm's ``register_notrace_function`` (which needs timm's tracer settings), the
decorated function records itself wherever it is imported and with any tracer: ``torch.fx.symbolic_trace``,
torchvision's ``create_feature_extractor`` and timm's FX feature extraction alike. It is registered with timm's
``register_notrace_function`` too, so ``timm.layers.get_notrace_functions()`` lists it.

Layer: imports only torch and timm (layer 0).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, TypeVar

import torch
from timm.layers import register_notrace_function

__all__ = ["is_symbolic", "fx_leaf"]

F = TypeVar("F", bound=Callable[..., Any])


def is_symbolic(x: object) -> bool:
    """True for a torch.fx ``Proxy``: a symbolically traced value, which has no data or shape to check."""
    return isinstance(x, torch.fx.Proxy)


def _first_proxy(args: tuple, kwargs: dict) -> Optional[torch.fx.Proxy]:
    found: list[torch.fx.Proxy] = []
    torch.fx.node.map_aggregate((args, kwargs), lambda a: found.append(a) if is_symbolic(a) else None)
    return found[0] if found else None


def fx_leaf(fn: F) -> F:
    """Make ``fn`` a torch.fx leaf: called with a Proxy anywhere in its arguments (nested tuples too), it adds
    one ``call_function`` node of ``fn`` to the graph being traced instead of running; otherwise it runs."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        proxy = _first_proxy(args, kwargs)
        if proxy is None:
            return fn(*args, **kwargs)
        return proxy.tracer.create_proxy("call_function", fn, args, kwargs)

    return register_notrace_function(wrapper)  # type: ignore[return-value]
