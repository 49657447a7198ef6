"""Transposed-MLP (MLP-Mixer token mixing) as a static affinity (Container Eq. 8, Table 2)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .base import Affinity, check_fixed_tokens, merge_heads, split_heads
from .registry import AffinityContext, register_affinity

__all__ = ["TokenMlpAffinity"]


class TokenMlpAffinity(Affinity):
    """A learned dense N×N affinity ``A = W_MLPᵀ`` per head (Container Eq. 8).

    - ``heads=1, rank=None``: the MLP variant of Container Table 2 (one dense matrix, M=1);
    - ``rank=r``: MLP-LR, ``A = U Vᵀ`` with U, V of shape (N, r), applied as ``U (Vᵀ V_vals)``;
    - ``heads>1``: MH-MLP(-LR), an independent matrix per group of C/M channels (Container §3.3).

    Paper-silent choices: no bias and no non-linearity (Container §4.1: "we do not add any
    non-linearity ... as is specified in the contextual aggregation equation"); weights are drawn so
    that every entry of ``A`` has standard deviation about 1/√N, as a ``nn.Linear(N, N)`` would.
    The token count is fixed: an input of another size is refused with the size it was built for.
    """

    def __init__(self, dim: int, tokens: int, heads: int = 1, rank: Optional[int] = None,
                 grid: Optional[tuple[int, int]] = None):
        super().__init__(dim, heads)
        if tokens <= 0:
            raise ValueError(f"a token-MLP affinity needs a positive token count, got {tokens}")
        self.fixed_tokens = tokens
        self.grid = grid
        self.rank = rank
        if rank is None:
            self.weight = nn.Parameter(torch.randn(heads, tokens, tokens) * tokens ** -0.5)
        else:
            if not 0 < rank <= tokens:
                raise ValueError(f"rank must be in [1, {tokens}], got {rank}")
            self.u = nn.Parameter(torch.randn(heads, tokens, rank) * rank ** -0.5)
            self.vt = nn.Parameter(torch.randn(heads, rank, tokens) * tokens ** -0.5)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, tokens={self.fixed_tokens}, rank={self.rank}"

    def check_input(self, v: Tensor) -> None:
        super().check_input(v)
        check_fixed_tokens(self, v, self.grid,
                           "token-MLP affinities have a fixed size: build the model with the img_size you feed it")

    def forward(self, v: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        self.check_input(v)
        vh = split_heads(v, self.heads)
        out = self.weight @ vh if self.rank is None else self.u @ (self.vt @ vh)
        return merge_heads(out, v.shape)

    def matrix(self, v_shape: Sequence[int], q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        a = self.weight if self.rank is None else self.u @ self.vt
        return a.unsqueeze(0)

    def macs(self, tokens: int) -> int:
        if self.rank is None:
            return tokens * tokens * self.dim
        return 2 * tokens * self.rank * self.dim


def _fixed_grid(ctx: AffinityContext) -> tuple[int, tuple[int, int]]:
    """(N, (H, W)) of the stage a token-MLP is built for; it has a fixed size, so the grid is required."""
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


@register_affinity("mlp")
def _build_mlp(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    n, grid = _fixed_grid(ctx)
    return TokenMlpAffinity(ctx["dim"], n, heads=1, grid=grid)


@register_affinity("mlp_lr")
def _build_mlp_lr(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    n, grid = _fixed_grid(ctx)
    return TokenMlpAffinity(ctx["dim"], n, heads=1, rank=_mlp_rank(ctx, n), grid=grid)


@register_affinity("mh_mlp_lr")
def _build_mh_mlp_lr(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    n, grid = _fixed_grid(ctx)
    return TokenMlpAffinity(ctx["dim"], n, heads=ctx["heads"], rank=_mlp_rank(ctx, n), grid=grid)
