"""Count tensor elements an operator materialises: a timing-free, deterministic memory measure."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["IntermediateRecorder", "largest_intermediate"]


class IntermediateRecorder(TorchDispatchMode):
    """Records the element count of every tensor produced by an ATen op while active."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.sizes.append((str(func), leaf.numel()))
        return out

    @property
    def largest(self) -> int:
        return max((n for _, n in self.sizes), default=0)


def largest_intermediate(fn: Callable[[], Any]) -> int:
    """Largest number of elements of any tensor an ATen op produced while running ``fn()``."""
    with IntermediateRecorder() as recorder:
        fn()
    return recorder.largest
