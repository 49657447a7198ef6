"""Key-only attention (LinGlos §3.1, Eq. 2-4): attention weights from the keys alone, linear in N."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..tracing import is_symbolic
from .base import Affinity, from_tokens, split_heads, to_tokens
from .registry import AffinityContext, register_affinity

__all__ = ["KeyOnlyAttention"]


class KeyOnlyAttention(Affinity):
    """Key-only attention, LinGlos §3.1: ``Z = (G ⊙ V) U1 + K`` with ``G = Σ_i A_i K_i`` (Eq. 3) and
    ``A = softmax(K W_saliency / √d)`` over all N positions (Eq. 2), per head. No N×N tensor is built:
    time and memory are O(N·C).

    Split of Eq. 4 between block and affinity: the block owns W_K, W_V (its ``proj_in``) and U2 (its
    ``proj_out``); this module owns W_saliency and U1 and adds the K skip, i.e. it returns the inner
    bracket of Eq. 4, so ``proj_out(affinity(...))`` is the paper's Y.

    Inputs, named for their role (they fill the (v, q, k) slots of the affinity contract in that order):
      - ``aggregated``: what is summed across positions, the paper's K (G is a weighted sum of keys, Eq. 3);
      - ``gate``: the per-position input that meets the global context, the paper's V (``G ⊙ V``);
      - ``saliency_input``: what the attention weights are computed from, the paper's K again (Eq. 2); defaults to
        ``aggregated``. The LinGlo block calls ``affinity(k, gate=v, saliency_input=k)``.

    ``matrix()`` — the decomposition. Given (gate, saliency_input), the output is linear in ``aggregated``.
    Per head h(c) of channel c and with U1[c, c'] mapping channel c to c', over (position, channel) pairs
    (index n·C + c)::

        Z[n, c'] = Σ_i Σ_c  a_h(c)[i] · gate[n, c] · U1[c, c'] · K[i, c]  +  K[n, c']  +  b1[c']
        M[(n, c'), (i, c)] = a_h(c)[i] · gate[n, c] · U1[c, c']  +  δ_ni δ_cc'

    The first term is the dynamic affinity: the rank-one spatial matrix 1·a_hᵀ (every position uses the
    same saliency weights — attention without a query), gated per position by the gate and mixed by U1; the
    second is the identity (the K skip of Eq. 4); U1's bias is :meth:`bias_term`. U1 mixes heads, so the matrix
    has one head and shape (B, 1, N·C, N·C): for tests and small-N analysis only.
    :meth:`attention_weights` gives the N-vector A of Eq. 2 for inspection.

    Paper-silent choices: the softmax scale uses the head dimension d = C/M (the paper's √D for one head);
    W_saliency has no bias (it would cancel in the softmax over positions); U1 has a bias like the other
    linear layers.
    """

    dynamic = True

    def __init__(self, dim: int, heads: int = 1):
        super().__init__(dim, heads)
        self.saliency = nn.Parameter(torch.empty(heads, self.head_dim))  # W_saliency, D -> 1 per head
        self.u1 = nn.Linear(dim, dim)
        self.scale = self.head_dim ** -0.5
        nn.init.trunc_normal_(self.saliency, std=0.02)  # small: starts near uniform weights (average pooling)
        nn.init.trunc_normal_(self.u1.weight, std=0.02)
        nn.init.zeros_(self.u1.bias)

    def attention_weights(self, saliency_input: Tensor) -> Tensor:
        """A = softmax(K W_saliency / √d) over positions (Eq. 2), shape (B, heads, N)."""
        logits = (split_heads(saliency_input, self.heads) @ self.saliency.unsqueeze(-1)).squeeze(-1)
        return (logits * self.scale).softmax(dim=-1)

    def _check(self, aggregated: Tensor, gate: Optional[Tensor], saliency_input: Optional[Tensor]) -> Tensor:
        if gate is None:
            raise ValueError("KeyOnlyAttention needs the gate (the paper's V); pass gate= shaped like the keys")
        self.check_input(aggregated)
        saliency_input = aggregated if saliency_input is None else saliency_input
        if is_symbolic(aggregated):  # torch.fx: no shapes to compare
            return saliency_input
        if gate.shape != aggregated.shape or saliency_input.shape != aggregated.shape:
            raise ValueError(f"gate and saliency_input must be shaped like the aggregated keys "
                             f"{tuple(aggregated.shape)}, got {tuple(gate.shape)}, {tuple(saliency_input.shape)}")
        return saliency_input

    def forward(self, aggregated: Tensor, gate: Optional[Tensor] = None,
                saliency_input: Optional[Tensor] = None) -> Tensor:
        saliency_input = self._check(aggregated, gate, saliency_input)
        a = self.attention_weights(saliency_input)  # (B, M, N)
        context = a.unsqueeze(-2) @ split_heads(aggregated, self.heads)  # G, Eq. 3: (B, M, 1, d)
        gated = split_heads(gate, self.heads) * context  # G ⊙ V: (B, M, N, d)
        b, m, n, d = gated.shape
        z = self.u1(gated.transpose(1, 2).reshape(b, n, m * d)) + to_tokens(aggregated)
        return from_tokens(z, aggregated.shape)

    def matrix(self, v_shape: Sequence[int], gate: Optional[Tensor] = None,
               saliency_input: Optional[Tensor] = None) -> Tensor:
        """(B, 1, N·C, N·C): the dynamic affinity plus the identity, over (position, channel) pairs; applied to
        the aggregated keys of shape ``v_shape``."""
        if gate is None or saliency_input is None:
            raise ValueError("KeyOnlyAttention is dynamic: matrix() needs the gate (paper's V) and the saliency "
                             "input (paper's K)")
        a = self.attention_weights(saliency_input).repeat_interleave(self.head_dim, dim=1)  # (B, C, N): a_h(c)[i]
        gate_tokens = to_tokens(gate)  # (B, N, C): gate[n, c]
        m = torch.einsum("bci,bnc,dc->bndic", a, gate_tokens, self.u1.weight)  # [b, n, c', i, c]
        b, n, c = gate_tokens.shape
        m = m.reshape(b, n * c, n * c)
        m = m + torch.eye(n * c, dtype=m.dtype, device=m.device)
        return m.unsqueeze(1)

    def bias_term(self) -> Optional[Tensor]:
        return self.u1.bias

    def macs(self, tokens: int) -> int:
        # saliency logits N·C, weighted sum of keys N·C, U1 N·C² (the ⊙ gate is element-wise, not counted)
        return tokens * self.dim * (self.dim + 2)


@register_affinity("key_only")
def _build_key_only(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    return KeyOnlyAttention(ctx["dim"], ctx["heads"])
