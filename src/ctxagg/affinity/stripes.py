"""Cross-shaped window attention (CSWin, Dong et al. 2022, §3.2 Eq. 1-3) and shuffled window attention (Shuffle
Transformer, Huang et al. 2021, §3.2): two more ways of choosing *which* keys a query sees, each a
block-diagonal affinity after a permutation of the tokens."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..tracing import fx_leaf, is_symbolic
from .base import Affinity, split_heads
from .registry import AffinityContext, register_affinity

__all__ = ["CrossShapedWindowAttention", "ShuffledWindowAttention"]


@fx_leaf  # branches on the grid size (torch.fx: one graph node)
def stripe_padding_mask(rows: int, length: int, stripe: int, like: Tensor) -> Optional[Tensor]:
    """Additive (stripes, 1, stripe·L) mask, −∞ on the keys that pad ``rows`` up to a multiple of ``stripe``
    (dtype and device of ``like``), or None when nothing is padded."""
    padded = -(-rows // stripe) * stripe
    if padded == rows:
        return None
    row = torch.arange(padded, device=like.device).reshape(-1, stripe).repeat_interleave(length, 1)
    key_ok = (row < rows)[:, None, :]  # every stripe keeps at least one real row: no all-masked query row
    return torch.zeros(key_ok.shape, dtype=like.dtype, device=like.device).masked_fill(~key_ok, float("-inf"))


class CrossShapedWindowAttention(Affinity):
    """CSWin's cross-shaped window self-attention (Dong et al., §3.2): the heads are split in two halves; the
    first half attends inside horizontal stripes of ``stripe`` rows × the full width, the second inside vertical
    stripes of the full height × ``stripe`` columns, so together a query sees a cross. Per head,
    ``A_m = softmax(Q_m K_mᵀ/√d + mask)`` with −∞ between tokens of different stripes — block-diagonal.

    The locally-enhanced positional encoding (LePE, a depth-wise conv on V) is a static affinity of its own:
    ``mix(cswin7, dw3)`` composes it. Paper-silent: a height (width) that is not a multiple of ``stripe`` is
    zero-padded at the bottom (right), and padded keys take no weight (as :class:`WindowAttention`).
    ``forward`` works stripe by stripe: B·N·(stripe·W + stripe·H)/2 scores, never N×N."""

    dynamic = True
    needs_grid = True

    def __init__(self, dim: int, heads: int, stripe: int = 7):
        super().__init__(dim, heads)
        if heads < 2 or heads % 2:
            raise ValueError(f"cross-shaped windows split the heads in two halves: heads must be even, got {heads}")
        if stripe < 1:
            raise ValueError(f"stripe width must be at least 1, got {stripe}")
        self.stripe, self.scale = stripe, self.head_dim ** -0.5

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, stripe={self.stripe}"

    def _half(self, x: Tensor, vertical: bool) -> Tensor:
        """Half the heads of (B, C, H, W) as (B, M/2, stripes, stripe·L, d) (vertical: the grid transposed)."""
        b, c, h, w = x.shape
        half = x[:, c // 2:] if vertical else x[:, :c // 2]
        if vertical:
            half = half.transpose(2, 3)
        rows, length = half.shape[2], half.shape[3]
        padded = -(-rows // self.stripe) * self.stripe  # ceil, as integer ops (torch.fx traces them)
        half = F.pad(half, (0, 0, 0, padded - rows)).reshape(b, self.heads // 2, self.head_dim, padded, length)
        half = half.reshape(b, self.heads // 2, self.head_dim, padded // self.stripe, self.stripe * length)
        return half.permute(0, 1, 3, 4, 2)

    def _unhalf(self, out: Tensor, h: int, w: int, vertical: bool) -> Tensor:
        b, m, stripes, _, d = out.shape
        rows, length = (w, h) if vertical else (h, w)
        out = out.permute(0, 1, 4, 2, 3).reshape(b, m * d, stripes * self.stripe, length)[:, :, :rows]
        return out.transpose(2, 3) if vertical else out

    def forward(self, v: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        if q is None or k is None:
            raise ValueError(f"{type(self).__name__} is dynamic: pass q and k shaped like v")
        self.check_input(v)
        h, w = v.shape[2:]
        outs = []
        for vertical in (False, True):
            rows, length = (w, h) if vertical else (h, w)
            mask = stripe_padding_mask(rows, length, self.stripe, v)
            out = F.scaled_dot_product_attention(*(self._half(t, vertical) for t in (q, k, v)), attn_mask=mask,
                                                 scale=self.scale)
            outs.append(self._unhalf(out, h, w, vertical))
        return torch.cat(outs, 1)

    def matrix(self, v_shape: Sequence[int], q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        if q is None or k is None or len(v_shape) != 4:
            raise ValueError(f"{type(self).__name__}.matrix() needs a (B, C, H, W) shape, q and k")
        h, w = v_shape[2:]
        index = torch.arange(h * w, device=q.device)
        row_stripe, col_stripe = (index // w) // self.stripe, (index % w) // self.stripe
        same_row = row_stripe[:, None] == row_stripe[None, :]
        same_col = col_stripe[:, None] == col_stripe[None, :]
        half = self.heads // 2
        allowed = torch.stack([same_row] * half + [same_col] * half)  # (M, N, N)
        scores = (split_heads(q, self.heads) * self.scale) @ split_heads(k, self.heads).transpose(-2, -1)
        return scores.masked_fill(~allowed, float("-inf")).softmax(-1)

    def macs(self, tokens: int) -> int:
        side = math.isqrt(tokens)  # a square grid: each query sees stripe·side keys
        return 2 * tokens * self.stripe * side * self.dim


class ShuffledWindowAttention(Affinity):
    """Shuffle Transformer's spatial-shuffle window attention (Huang et al. 2021, §3.2): window attention over
    the grid after a spatial shuffle, so window (a, b) holds the tokens (y, x) with y mod (H/w) = a and
    x mod (W/w) = b — ``window²`` tokens spaced H/w apart, covering the whole image. With P the shuffle
    permutation, A = Pᵀ·blockdiag(softmax(Q_g K_gᵀ/√d))·P: a dilated, image-wide window.

    H and W must be multiples of ``window`` (the paper's setting; a shuffle of a padded grid would mix padding
    into every window). ``forward`` is windowed SDPA on the shuffled tokens: B·N·w² scores, never N×N."""

    dynamic = True
    needs_grid = True

    def __init__(self, dim: int, heads: int, window: int = 7):
        super().__init__(dim, heads)
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.window, self.scale = window, self.head_dim ** -0.5

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, window={self.window}"

    def _check_size(self, h: int, w: int) -> None:
        if is_symbolic(h):  # torch.fx: no size to check
            return
        if h % self.window or w % self.window:
            raise ValueError(f"{type(self).__name__} shuffles a grid whose sides are multiples of window="
                             f"{self.window}; got {h}×{w} (use an input size whose feature maps divide by it)")

    def _windows(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, M, (H/w)·(W/w) groups, w², d): token (y, x) = (i·H/w + a, j·W/w + b) joins group
        (a, b) at place (i, j)."""
        b, _, h, w = x.shape
        win, d = self.window, self.head_dim
        x = x.reshape(b, self.heads, d, win, h // win, win, w // win)  # (…, i, a, j, b)
        return x.permute(0, 1, 4, 6, 3, 5, 2).reshape(b, self.heads, (h // win) * (w // win), win * win, d)

    def forward(self, v: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        if q is None or k is None:
            raise ValueError(f"{type(self).__name__} is dynamic: pass q and k shaped like v")
        self.check_input(v)
        b, c, h, w = v.shape
        self._check_size(h, w)
        out = F.scaled_dot_product_attention(*(self._windows(t) for t in (q, k, v)), scale=self.scale)
        win = self.window
        out = out.reshape(b, self.heads, h // win, w // win, win, win, self.head_dim)  # (a, b, i, j)
        return out.permute(0, 1, 6, 4, 2, 5, 3).reshape(b, c, h, w)

    def matrix(self, v_shape: Sequence[int], q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        if q is None or k is None or len(v_shape) != 4:
            raise ValueError(f"{type(self).__name__}.matrix() needs a (B, C, H, W) shape, q and k")
        h, w = v_shape[2:]
        self._check_size(h, w)
        index = torch.arange(h * w, device=q.device)
        group = ((index // w) % (h // self.window)) * w + (index % w) % (w // self.window)
        scores = (split_heads(q, self.heads) * self.scale) @ split_heads(k, self.heads).transpose(-2, -1)
        return scores.masked_fill(group[:, None] != group[None, :], float("-inf")).softmax(-1)

    def macs(self, tokens: int) -> int:
        return 2 * tokens * self.window ** 2 * self.dim


@register_affinity("cswin")
def _build_cswin(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    return CrossShapedWindowAttention(ctx["dim"], ctx["heads"], stripe=k or 7)  # CSWin-T stage widths 1, 2, 7, 7


@register_affinity("shuffle_window")
def _build_shuffle_window(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    return ShuffledWindowAttention(ctx["dim"], ctx["heads"], window=k or 7)
