"""Performer / FAVOR+ (Choromanski et al. 2021, "Rethinking Attention with Performers", §3, Lemma 1, Eq. 4-5):
softmax attention approximated through positive orthogonal random features, computed in O(N·m·C)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .base import Affinity, merge_heads, split_heads
from .registry import AffinityContext, register_affinity

__all__ = ["PerformerAttention", "orthogonal_gaussian"]

DEFAULT_FEATURES = 256  # paper-silent for images; the paper's experiments use m = 256 features


def orthogonal_gaussian(features: int, dim: int, generator: torch.Generator) -> Tensor:
    """(features, dim) orthogonal random features (§3.2 "Orthogonal random features"): blocks of d orthogonal rows
    (QR of a Gaussian matrix) stacked to ``features`` rows, each row rescaled to the norm of an independent
    Gaussian d-vector so that every row is marginally N(0, I_d). float64, on the CPU."""
    blocks = []
    for _ in range(math.ceil(features / dim)):
        gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64, device="cpu")
        blocks.append(torch.linalg.qr(gaussian)[0].T)
    rows = torch.cat(blocks)[:features]
    norms = torch.randn(features, dim, generator=generator, dtype=torch.float64, device="cpu").norm(dim=1, keepdim=True)
    return rows * norms


class PerformerAttention(Affinity):
    """FAVOR+ attention: ``A_m = D⁻¹ φ(Q_m) φ(K_m)ᵀ``, ``D = diag(φ(Q_m) φ(K_m)ᵀ 1)`` (Eq. 4-5), with the positive
    random features of Lemma 1, ``φ(x) = exp(ω_i·x − ‖x‖²/2) / √m`` for i = 1..m, applied to x = q / d^{1/4} and
    k / d^{1/4}, so that E[φ(q')·φ(k')] = exp(q·k/√d), softmax attention's kernel.

    :meth:`forward` computes ``D⁻¹ φ(Q) (φ(K)ᵀ V)`` right to left, O(N·m·d) per head, never N×N;
    :meth:`matrix` forms A explicitly. The features ω (m×d, :func:`orthogonal_gaussian`) are shared by all heads
    and stored as a buffer (a checkpoint reproduces the same A).

    Redraw policy (the paper redraws features during training; its schedule is not fixed): draw t of the
    features is a function of (``seed``, t) alone, so a seed fixes the whole sequence. In training mode every
    ``redraw_interval``-th call of :meth:`forward` (calls interval, 2·interval, …) first draws the next set; eval
    mode never redraws; ``redraw_interval=0`` never redraws. ``seed=None`` takes one from torch's global
    generator, so ``torch.manual_seed`` fixes it too. The counters are buffers: a resumed run continues the
    same sequence.

    Paper-silent choices: stabilising shifts (the row maximum of ω·q' for each query, the maximum over all keys and
    features for the keys) cancel exactly in D⁻¹ and are applied; no ε is added, so matrix() and forward agree
    to rounding.
    """

    dynamic = True

    def __init__(self, dim: int, heads: int, features: int = DEFAULT_FEATURES, redraw_interval: int = 1000,
                 seed: Optional[int] = None):
        super().__init__(dim, heads)
        if features < 1 or redraw_interval < 0:
            raise ValueError(f"need features >= 1 and redraw_interval >= 0, got {features}, {redraw_interval}")
        self.features, self.redraw_interval = features, redraw_interval
        if seed is None:
            seed = int(torch.randint(2 ** 31 - 1, (1,), device="cpu"))
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.long))
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))  # index t of the current draw
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))  # training forward calls so far
        self.register_buffer("omega", torch.empty(features, self.head_dim))
        self.omega.copy_(self.draw(seed, 0))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, features={self.features}, redraw_interval={self.redraw_interval}"

    def draw(self, seed: int, index: int) -> Tensor:
        """Draw ``index`` of the sequence fixed by ``seed``: the same (seed, index) always gives the same features."""
        state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        return orthogonal_gaussian(self.features, self.head_dim, generator)

    @torch.no_grad()
    def redraw(self) -> None:
        """Replace the features by the next draw of the sequence."""
        self.draws += 1
        self.omega.copy_(self.draw(int(self.seed), int(self.draws)))

    def _step(self) -> None:
        if not self.training:
            return
        if self.redraw_interval and int(self.calls) > 0 and int(self.calls) % self.redraw_interval == 0:
            self.redraw()
        self.calls += 1

    def feature_maps(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """φ(Q'), φ(K'), each (B, M, N, m), up to the per-query and per-(batch, head) constants that D⁻¹ cancels."""
        qh, kh = (split_heads(t, self.heads) * self.head_dim ** -0.25 for t in (q, k))
        omega = self.omega.to(qh.dtype)
        q_proj, k_proj = qh @ omega.T, kh @ omega.T
        q_shift = q_proj.amax(-1, keepdim=True).detach()
        k_shift = k_proj.amax((-2, -1), keepdim=True).detach()
        phi_q = torch.exp(q_proj - qh.square().sum(-1, keepdim=True) / 2 - q_shift)
        phi_k = torch.exp(k_proj - kh.square().sum(-1, keepdim=True) / 2 - k_shift)
        return phi_q, phi_k  # the common 1/√m cancels in D⁻¹ too

    def forward(self, v: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        if q is None or k is None:
            raise ValueError("PerformerAttention is dynamic: pass q and k shaped like v")
        self.check_input(v)
        self._step()
        phi_q, phi_k = self.feature_maps(q, k)
        context = phi_k.transpose(-2, -1) @ split_heads(v, self.heads)  # φ(K)ᵀ V: (B, M, m, d)
        normaliser = phi_q @ phi_k.sum(-2).unsqueeze(-1)  # D = φ(Q) (φ(K)ᵀ 1): (B, M, N, 1)
        return merge_heads((phi_q @ context) / normaliser, v.shape)

    def matrix(self, v_shape: Sequence[int], q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        """A_m = D⁻¹ φ(Q'_m) φ(K'_m)ᵀ with the current features, (B, M, N, N)."""
        if q is None or k is None:
            raise ValueError("PerformerAttention is dynamic: matrix() needs q and k")
        phi_q, phi_k = self.feature_maps(q, k)
        kernel = phi_q @ phi_k.transpose(-2, -1)
        return kernel / kernel.sum(-1, keepdim=True)

    def macs(self, tokens: int) -> int:
        # ω·q and ω·k (N·m·d each per head), φ(K)ᵀV and φ(Q)·context (N·m·d each), the normaliser (N·m)
        return 4 * tokens * self.features * self.dim + tokens * self.features * self.heads


@register_affinity("performer")
def _build_performer(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    """``performer<m>``: m random features (default 256)."""
    return PerformerAttention(ctx["dim"], ctx["heads"], features=k or DEFAULT_FEATURES,
                              redraw_interval=ctx.get("redraw_interval", 1000))
