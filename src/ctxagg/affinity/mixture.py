"""The Container mixture ``α·A_dynamic + β·A_static`` (Container Eq. 9, Eq. 12)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .base import Affinity

__all__ = ["AffinityMixture", "expand_heads", "GATES"]

GATES = ("convex", "free", "per_head")


def expand_heads(a: Tensor, heads: int) -> Tensor:
    """Repeat each head's matrix over the finer head grouping ``heads`` (a multiple of a.shape[1])."""
    if heads % a.shape[1]:
        raise ValueError(f"cannot expand {a.shape[1]} heads to {heads}")
    return a.repeat_interleave(heads // a.shape[1], dim=1)


class AffinityMixture(Affinity):
    """Learnable mixture of a dynamic and a static affinity sharing V and the output projection.

    ``gate="convex"`` (default) follows the official Container release: α = sigmoid(w), β = 1 − α,
    w initialised to 0. ``gate="free"`` follows the paper's Eq. 9 literally: α and β are independent
    learnable scalars (initialised to 0.5 each so both gates start as the same function).
    :meth:`matrix` is α·A_dyn + β·A_static at the finest common head grouping (e.g. 16 attention
    heads and 512 depthwise channels meet at 512 heads, Container §3.3).
    ``gate="per_head"`` is the convex gate with one logit per head of that grouping, α_h = sigmoid(w_h),
    β_h = 1 − α_h (ConViT's gated positional self-attention, with λ_h = −w_h; the registry's ``gpsa``).
    """

    def __init__(self, dynamic_affinity: Affinity, static_affinity: Affinity, gate: str = "convex"):
        if dynamic_affinity.dim != static_affinity.dim:
            raise ValueError(f"mixture parts disagree on dim: {dynamic_affinity.dim} vs {static_affinity.dim}")
        if static_affinity.dynamic:
            raise ValueError(f"the static part of a mixture must not depend on the input, got "
                             f"{type(static_affinity).__name__}")
        if gate not in GATES:
            raise ValueError(f"unknown gate {gate!r}; choose one of {GATES}")
        super().__init__(dynamic_affinity.dim, math.lcm(dynamic_affinity.heads, static_affinity.heads))
        self.dynamic_affinity = dynamic_affinity
        self.static_affinity = static_affinity
        self.gate = gate
        self.dynamic = dynamic_affinity.dynamic  # the Affinity flag: whether forward needs q and k
        # what a block feeds the dynamic part (AggregationBlock): (k, q) to a value-free one, (v, v) to one whose
        # kernels come from the values (dynamic convolutions); the static part gets that first tensor
        self.uses_value = getattr(dynamic_affinity, "uses_value", True)
        self.kernels_from_values = getattr(dynamic_affinity, "kernels_from_values", False)
        self.needs_grid = dynamic_affinity.needs_grid or static_affinity.needs_grid
        self.fixed_tokens = static_affinity.fixed_tokens or dynamic_affinity.fixed_tokens
        if gate in ("convex", "per_head"):
            self.gate_logit = nn.Parameter(torch.zeros(1 if gate == "convex" else self.heads))
        else:
            self.alpha = nn.Parameter(torch.full((1,), 0.5))
            self.beta = nn.Parameter(torch.full((1,), 0.5))

    def extra_repr(self) -> str:
        return f"gate={self.gate}"

    def weights(self) -> tuple[Tensor, Tensor]:
        """(α, β) as 1-element tensors, or one entry per head under ``per_head``."""
        if self.gate != "free":
            alpha = torch.sigmoid(self.gate_logit)
            return alpha, 1 - alpha
        return self.alpha, self.beta

    def forward(self, v: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        alpha, beta = (self._per_channel(w, v.ndim) for w in self.weights())
        return alpha * self.dynamic_affinity(v, q, k) + beta * self.static_affinity(v)

    def _per_channel(self, w: Tensor, ndim: int) -> Tensor:
        """A gate of one entry (as is) or one per head (repeated over each head's channels), shaped to scale a
        (B, C, H, W) result (``ndim`` 4) or a (B, N, C) one / a (C,) bias."""
        if self.gate != "per_head":
            return w
        w = w.repeat_interleave(self.dim // w.numel())
        return w.view(-1, 1, 1) if ndim == 4 else w

    def matrix(self, v_shape: Sequence[int], q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        alpha, beta = self.weights()
        a_dyn = expand_heads(self.dynamic_affinity.matrix(v_shape, q, k), self.heads)
        a_static = expand_heads(self.static_affinity.matrix(v_shape), self.heads)
        return alpha.view(-1, 1, 1) * a_dyn + beta.view(-1, 1, 1) * a_static

    def bias_term(self) -> Optional[Tensor]:
        alpha, beta = self.weights()
        parts = ((alpha, self.dynamic_affinity.bias_term()), (beta, self.static_affinity.bias_term()))
        terms = [self._per_channel(w, 1) * b for w, b in parts if b is not None]
        return sum(terms) if terms else None

    @torch.no_grad()
    def pop_bias(self) -> Optional[Tensor]:
        """Remove the parts' constant offsets, each weighted by its gate at the current (frozen) α, β."""
        alpha, beta = self.weights()
        parts = ((alpha, self.dynamic_affinity.pop_bias()), (beta, self.static_affinity.pop_bias()))
        terms = [self._per_channel(w, 1) * b for w, b in parts if b is not None]
        return sum(terms) if terms else None

    def macs(self, tokens: int) -> int:
        return self.dynamic_affinity.macs(tokens) + self.static_affinity.macs(tokens) + tokens * self.dim
