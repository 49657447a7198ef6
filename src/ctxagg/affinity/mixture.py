"""The Container mixture ``α·A_dynamic + β·A_static`` (Container Eq. 9, Eq. 12), optionally with a learned
on/off switch of its dynamic path (:class:`HardConcreteSwitch`)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..tracing import fx_leaf
from .base import Affinity

__all__ = ["AffinityMixture", "HardConcreteSwitch", "expand_heads", "GATES"]

GATES = ("convex", "free", "per_head")


def expand_heads(a: Tensor, heads: int) -> Tensor:
    """Repeat each head's matrix over the finer head grouping ``heads`` (a multiple of a.shape[1])."""
    if heads % a.shape[1]:
        raise ValueError(f"cannot expand {a.shape[1]} heads to {heads}")
    return a.repeat_interleave(heads // a.shape[1], dim=1)


class HardConcreteSwitch(nn.Module):
    """A learned on/off switch ``z ∈ [0, 1]`` that is exactly 0 or 1 with positive probability: the hard concrete
    gate of Louizos, Welling & Kingma 2018 ("Learning Sparse Neural Networks through L0 Regularization", §4.2,
    Eq. 10-12), the relaxation Voita et al. 2019 use to switch attention heads off.

    Training draws ``s = sigmoid((log u − log(1−u) + log_alpha)/τ)``, ``u ~ U(0, 1)``; evaluation uses
    ``s = sigmoid(log_alpha)`` (the paper's test-time estimator); either way ``z = clamp(s(ζ − γ) + γ, 0, 1)`` with
    τ = 2/3, γ = −0.1, ζ = 1.1 (the paper's values). :meth:`prob_on` is P(z ≠ 0) (Eq. 12), differentiable in
    ``log_alpha``: the expected cost of what the switch gates. ``state`` (int8, copied exactly by EMA) fixes the
    switch: −1 learned, 0 off, 1 on. The default ``log_alpha`` = 2.5 gives z = 1 in evaluation (starts on).
    """

    def __init__(self, init_log_alpha: float = 2.5, temperature: float = 2 / 3, limits: tuple = (-0.1, 1.1)):
        super().__init__()
        self.temperature, (self.low, self.high) = temperature, limits
        self.log_alpha = nn.Parameter(torch.full((1,), float(init_log_alpha)))
        self.register_buffer("state", torch.full((1,), -1, dtype=torch.int8))

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:.3g}, limits=({self.low}, {self.high})"

    def forward(self) -> Tensor:
        """z: a fresh draw in training mode, the deterministic value in eval mode; the fixed value if ``state``."""
        if self.training:
            u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.temperature)
        else:
            s = torch.sigmoid(self.log_alpha)
        return self._fixed_or((s * (self.high - self.low) + self.low).clamp(0.0, 1.0))

    def deterministic(self) -> Tensor:
        """The evaluation value of z (whatever the module's mode)."""
        z = (torch.sigmoid(self.log_alpha) * (self.high - self.low) + self.low).clamp(0.0, 1.0)
        return self._fixed_or(z)

    def prob_on(self) -> Tensor:
        """P(z ≠ 0) = sigmoid(log_alpha − τ·log(−γ/ζ)) (Louizos et al. Eq. 12); 0 or 1 once fixed."""
        return self._fixed_or(torch.sigmoid(self.log_alpha - self.temperature * math.log(-self.low / self.high)))

    def _fixed_or(self, value: Tensor) -> Tensor:
        return torch.where(self.state < 0, value, self.state.to(value.dtype))

    @torch.no_grad()
    def fix(self, on: bool) -> None:
        """Fix the switch on or off (training continues with the other weights; the gate gets no more gradient)."""
        self.state.fill_(int(on))

    @property
    def fixed(self) -> bool:
        return bool(self.state.item() >= 0)


@fx_leaf  # ndim is the values' (a Proxy under torch.fx): one graph node
def _per_channel_gate(w: Tensor, dim: int, ndim: int) -> Tensor:
    """One gate per head, repeated over each head's channels and shaped for a (B, C, H, W) result (``ndim`` 4) or a
    (B, N, C) one / a (C,) bias."""
    w = w.repeat_interleave(dim // w.numel())
    return w.view(-1, 1, 1) if ndim == 4 else w


class AffinityMixture(Affinity):
    """Learnable mixture of a dynamic and a static affinity sharing V and the output projection.

    ``gate="convex"`` (default) follows the official Container release: α = sigmoid(w), β = 1 − α,
    w initialised to 0. ``gate="free"`` follows the paper's Eq. 9 literally: α and β are independent
    learnable scalars (initialised to 0.5 each so both gates start as the same function).
    :meth:`matrix` is α·A_dyn + β·A_static at the finest common head grouping (e.g. 16 attention
    heads and 512 depthwise channels meet at 512 heads, Container §3.3).
    ``gate="per_head"`` is the convex gate with one logit per head of that grouping, α_h = sigmoid(w_h),
    β_h = 1 − α_h (ConViT's gated positional self-attention, with λ_h = −w_h; the registry's ``gpsa``).

    ``switch=True`` adds a learned on/off switch z of the dynamic path (:class:`HardConcreteSwitch`; the
    learned Container-Light pattern, Container §5 "Limitations"): α' = z·α, and β' = 1 − z·α under the convex gate
    (it stays convex, so z = 0 leaves exactly A_static·V, Container-Light's static block) or β' = β under the free
    gate. In training mode every call draws a new z.
    """

    def __init__(self, dynamic_affinity: Affinity, static_affinity: Affinity, gate: str = "convex",
                 switch: bool = False):
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
        # relaxation: hard concrete / L0 (Louizos et al. 2018): exact zeros, and a closed-form P(z ≠ 0) to put a price
        # on (straight-through Gumbel has neither; an L1 penalty on α never reaches 0, so a threshold would change
        # the function at deployment)
        self.switch = HardConcreteSwitch() if switch else None

    def extra_repr(self) -> str:
        return f"gate={self.gate}"

    def weights(self) -> tuple[Tensor, Tensor]:
        """(α, β) as 1-element tensors, or one entry per head under ``per_head`` (with the switch: α' = z·α and β'
        as in the class docstring)."""
        if self.gate != "free":
            alpha = torch.sigmoid(self.gate_logit)
            beta = 1 - alpha
        else:
            alpha, beta = self.alpha, self.beta
        if self.switch is None:
            return alpha, beta
        z = self.switch()
        return z * alpha, (1 - z * alpha) if self.gate != "free" else beta

    def dynamic_on(self) -> bool:
        """Whether the dynamic path contributes in evaluation (always, without a switch)."""
        return self.switch is None or bool(self.switch.deterministic().item() > 0)

    @torch.no_grad()
    def fold_switch(self) -> None:
        """Deployment: fold an on switch's evaluation value z into the gate (α ← z·α, exact) and remove it. A
        switched-off path is removed by the block (:meth:`~ctxagg.blocks.AggregationBlock.settle_switch`)."""
        if self.switch is None:
            return
        if not self.dynamic_on():
            raise ValueError("the dynamic path is switched off: the block replaces this mixture by its static part")
        z = self.switch.deterministic()
        if self.gate != "free":
            self.gate_logit.copy_(torch.logit(z * torch.sigmoid(self.gate_logit)))
        else:
            self.alpha.mul_(z)
        self.switch = None

    def forward(self, v: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        alpha, beta = (self._per_channel(w, v.ndim) for w in self.weights())
        return alpha * self.dynamic_affinity(v, q, k) + beta * self.static_affinity(v)

    def _per_channel(self, w: Tensor, ndim: int) -> Tensor:
        """A gate of one entry (as is) or one per head (repeated over each head's channels), shaped to scale a
        (B, C, H, W) result (``ndim`` 4) or a (B, N, C) one / a (C,) bias."""
        if self.gate != "per_head":  # one entry: known from the gate, so torch.fx traces no branch on a tensor
            return w
        return _per_channel_gate(w, self.dim, ndim)

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

    def dynamic_macs(self, tokens: int) -> int:
        """MACs that switching the dynamic path off saves inside the affinity: building and applying A_dyn (the
        element-wise mix is not counted, as MAC counters do not count it)."""
        return self.dynamic_affinity.macs(tokens)
