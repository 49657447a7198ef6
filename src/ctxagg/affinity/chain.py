"""The product combinator ``chain(a, b)``: apply ``a`` then ``b``, so ``A = A_b · A_a`` (DESIGN.md, "Affinities
compose"; axial attention, Ho et al. 2019, is ``chain(axial_row, axial_column)``)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

from torch import Tensor

from .base import Affinity, token_count
from .mixture import expand_heads
from .registry import AffinityContext, build_affinity, register_combinator

__all__ = ["AffinityChain"]


class AffinityChain(Affinity):
    """Composition of two affinities sharing the block's q and k: ``forward(v) = b(a(v))``, so the explicit
    affinity is the matrix product ``A = A_b · A_a`` at the finest common head grouping (lcm of the parts'
    heads, as :class:`AffinityMixture`).

    Paper-silent: the Axial Transformer (Ho et al. §3) and Axial-DeepLab project q, k, v again between
    the two passes; here both parts read the same q and k (one projection per block), which keeps A a
    product of two affinities of the same input. The first part must have no bias: its image through
    ``A_b`` is not a per-channel offset (for a zero-padded conv ``A_b·1 ≠ 1``), so the contract's
    ``A·V + bias`` could not express it. Channel-mixing parts ((position, channel) matrices) are refused.
    """

    def __init__(self, first: Affinity, second: Affinity):
        if first.dim != second.dim:
            raise ValueError(f"chain parts disagree on dim: {first.dim} vs {second.dim}")
        if first.bias_term() is not None:
            raise ValueError(f"chain(a, b): the first part ({type(first).__name__}) adds a bias, whose image "
                             "through b is not a per-channel offset; put a bias-free operator first")
        super().__init__(first.dim, math.lcm(first.heads, second.heads))
        self.first, self.second = first, second
        self.dynamic = first.dynamic or second.dynamic
        self.needs_grid = first.needs_grid or second.needs_grid
        self.fixed_tokens = first.fixed_tokens or second.fixed_tokens

    @staticmethod
    def _run(part: Affinity, v: Tensor, q: Optional[Tensor], k: Optional[Tensor]) -> Tensor:
        return part(v, q, k) if part.dynamic else part(v)

    def forward(self, v: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        return self._run(self.second, self._run(self.first, v, q, k), q, k)

    def matrix(self, v_shape: Sequence[int], q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        parts = [p.matrix(v_shape, q, k) if p.dynamic else p.matrix(v_shape) for p in (self.first, self.second)]
        if any(a.shape[-1] != token_count(v_shape) for a in parts):
            raise ValueError("chain needs spatial (N×N) affinities, not (position, channel) matrices")
        a_first, a_second = (expand_heads(a, self.heads) for a in parts)
        return a_second @ a_first

    def bias_term(self) -> Optional[Tensor]:
        return self.second.bias_term()

    def macs(self, tokens: int) -> int:
        return self.first.macs(tokens) + self.second.macs(tokens)


@register_combinator("chain")
def _build_chain(ctx: AffinityContext, args: list[str]) -> Affinity:
    """``chain(a, b, c, ...)`` = apply a, then b, then c: ``A = A_c · A_b · A_a``."""
    if len(args) < 2:
        raise ValueError(f"chain needs at least two affinities, e.g. chain(axial_row,axial_column); got {args}")
    chained = build_affinity(args[0], **ctx)
    for spec in args[1:]:
        chained = AffinityChain(chained, build_affinity(spec, **ctx))
    return chained
