"""Outlook attention (VOLO, Yuan et al. 2021, §3.1): a local affinity *generated* from the centre token
by a linear map — a dynamic convolution with no query-key product at all."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Affinity, to_tokens
from .registry import AffinityContext, register_affinity

__all__ = ["OutlookAttention"]


class OutlookAttention(Affinity):
    """VOLO's outlook attention with stride 1, per head (d = C/M channels):

        Â_c = reshape(W_A x_c + b_A) · scale      (K⁴ logits per head from the token at c)
        Y_{Δc} = Σ_{a'} softmax_{a'}(Â_c[a, a']) · V_{Δc}[a']   (the K×K window around c)
        y_p = Σ_{windows c ∋ p} Y_{Δc}[p − c]                   (fold: overlapping windows are summed)

    As ``A·V``: ``A[p, p'] = Σ_c softmax(Â_c)[p − c, p' − c]`` over every window centre c that holds both p and
    p', a band of (2K−1)×(2K−1) offsets (``matrix()``). ``forward`` unfolds V into K×K windows and folds back:
    B·N·K⁴·M weights and B·C·K²·N values, never N×N.

    Choices: stride 1 (VOLO uses stride 2, windows centred every other token with Â from 2×2-pooled tokens; with
    stride 1 every token is a window centre, so A is translation-equivariant away from the border and the map
    keeps its size for any H×W). Windows are zero-padded at the border and the softmax runs over all K² window
    slots, padded ones included (VOLO's unfold/fold): a border window loses the padded slots' weight. K is odd.
    The generator reads the block's second projection: ``uses_value = False`` makes the block project two maps
    and call ``affinity(first, second)``; the first is aggregated (VOLO's V), the second generates A (VOLO's x).
    """

    dynamic = True
    needs_grid = True
    uses_value = False  # two inputs: values and the generator's input (no keys)

    def __init__(self, dim: int, heads: int, kernel_size: int = 3):
        super().__init__(dim, heads)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive (a window centred on its token), got {kernel_size}")
        self.kernel_size = kernel_size
        self.generator = nn.Linear(dim, heads * kernel_size ** 4)  # W_A, b_A
        self.scale = self.head_dim ** -0.5

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, kernel_size={self.kernel_size}"

    def weights(self, x: Tensor) -> Tensor:
        """softmax over a' of Â_c[a, a'], (B, M, N, K², K²) for the generator input x (B, C, H, W)."""
        b, n, t = x.shape[0], x.shape[2] * x.shape[3], self.kernel_size ** 2
        logits = self.generator(to_tokens(x)).view(b, n, self.heads, t, t).transpose(1, 2)
        return (logits * self.scale).softmax(-1)

    def forward(self, v: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        if q is None:
            raise ValueError("OutlookAttention is dynamic: pass the generator input q (the values as v)")
        self.check_input(v)
        b, c, h, w = v.shape
        size, n = self.kernel_size, h * w
        windows = F.unfold(v, size, padding=size // 2).view(b, self.heads, self.head_dim, size * size, n)
        out = torch.einsum("bmnaz,bmdzn->bmdan", self.weights(q), windows)
        return F.fold(out.reshape(b, c * size * size, n), (h, w), size, padding=size // 2)

    def matrix(self, v_shape: Sequence[int], q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        """(B, M, N, N): each window's K²×K² block scattered to its positions and summed over windows."""
        if q is None or len(v_shape) != 4:
            raise ValueError("OutlookAttention.matrix() needs a (B, C, H, W) shape and the generator input q")
        h, w = v_shape[2:]
        n, r, device = h * w, self.kernel_size // 2, q.device
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        offsets = torch.arange(-r, r + 1, device=device)
        dy, dx = offsets.repeat_interleave(2 * r + 1), offsets.repeat(2 * r + 1)  # slot a = (dy + r)·K + dx + r
        py, px = ys.reshape(-1, 1) + dy, xs.reshape(-1, 1) + dx  # (N centres, K² slots)
        inside = (py >= 0) & (py < h) & (px >= 0) & (px < w)
        pos = py * w + px
        pairs = inside[:, :, None] & inside[:, None, :]  # (N, K², K²): both slots in the image
        flat = (pos[:, :, None] * n + pos[:, None, :])[pairs]
        attn = self.weights(q)
        b = attn.shape[0]
        a = attn.new_zeros(b * self.heads, n * n)
        a.index_add_(1, flat, attn.reshape(b * self.heads, n, *pairs.shape[1:])[:, pairs])
        return a.view(b, self.heads, n, n)

    def macs(self, tokens: int) -> int:
        # generator N·C·M·K⁴, window aggregation N·C·K⁴ (K² outputs of K² taps per channel)
        return tokens * self.kernel_size ** 4 * (self.dim * self.heads + self.dim)


@register_affinity("outlook")
def _build_outlook(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    return OutlookAttention(ctx["dim"], ctx["heads"], kernel_size=k or 3)  # VOLO's K = 3
