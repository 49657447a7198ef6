"""Window and shifted-window self-attention (Swin, Liu et al. 2021, §3.2 Eq. 4; Image Transformer's local
2-D blocks; Twins' LSA): attention restricted to non-overlapping w×w windows, a block-diagonal affinity."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tracing import fx_leaf
from .base import Affinity, split_heads
from .registry import AffinityContext, register_affinity

__all__ = ["WindowAttention", "window_groups"]


def window_groups(size: int, window: int, shift: int) -> Tensor:
    """Window id of each of ``size`` positions along one axis, in the original (unrolled) token order.

    Swin rolls the padded axis by ``-shift`` and masks pairs that came from different regions; in the
    original order that is a partition into [0, shift), [shift, shift + w), ... — a window grid offset by
    ``shift`` whose wrapped-around first piece is its own group (id −1)."""
    return torch.div(torch.arange(size) - shift, window, rounding_mode="floor")


@fx_leaf  # shape arithmetic with branches (torch.fx: one graph node)
def window_geometry(height: int, width: int, window: int, shift: int) -> tuple[int, int, int, int]:
    """Padded size (hp, wp) of an H×W grid cut into ``window``-sized windows, and the per-axis shifts applied
    (none along an axis that is a single window)."""
    hp, wp = (math.ceil(s / window) * window for s in (height, width))
    return hp, wp, shift if hp > window else 0, shift if wp > window else 0


class WindowAttention(Affinity):
    """Multi-head softmax attention inside w×w windows (Swin §3.2, Eq. 4 with relative position bias B):
    ``A_m = softmax(Q_m K_mᵀ/√d + B_m + mask)`` with ``mask = −∞`` between tokens of different windows.

    ``shift > 0`` is Swin's shifted window (§3.2 "Shifted window partitioning", cyclic shift + mask).
    Any H×W works: the grid is zero-padded at the bottom/right to a multiple of w, as Swin does; padded
    keys are masked out (paper-silent: Swin lets zero-padded keys take softmax weight; here they take
    none, so the affinity over real tokens is exact and row-stochastic). Along an axis whose padded
    length is a single window the shift is skipped (as Swin sets shift 0 when the input fits one window).
    ``forward`` works window by window (B·N·w² scores, never N×N); ``matrix`` is the dense N×N affinity
    in the original token order (zeros off the windows).
    """

    dynamic = True
    needs_grid = True

    def __init__(self, dim: int, heads: int, window: int = 7, shift: int = 0, rel_pos: bool = True):
        super().__init__(dim, heads)
        if window < 1 or not 0 <= shift < window:
            raise ValueError(f"need window >= 1 and 0 <= shift < window, got window={window}, shift={shift}")
        self.window, self.shift, self.scale = window, shift, self.head_dim ** -0.5
        self.rel_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads)) if rel_pos else None
        if self.rel_table is not None:
            nn.init.trunc_normal_(self.rel_table, std=0.02)  # as Swin

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, window={self.window}, shift={self.shift}"

    def _geometry(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Padded size (hp, wp) and the per-axis shifts actually applied."""
        return window_geometry(height, width, self.window, self.shift)

    def _rel_bias(self, dy: Tensor, dx: Tensor) -> Tensor:
        """Bias B[h] for query-minus-key offsets (dy, dx) (any shape) -> (heads, *shape)."""
        index = (dy + self.window - 1) * (2 * self.window - 1) + dx + self.window - 1
        return self.rel_table[index.clamp(0, self.rel_table.shape[0] - 1)].movedim(-1, 0)

    def _partition(self, x: Tensor, hp: int, wp: int, sy: int, sx: int) -> Tensor:
        """(B, C, H, W) -> (B, windows, M, w², d): pad bottom/right, roll by (−sy, −sx), cut windows."""
        b, _, h, w = x.shape
        x = torch.roll(F.pad(x, (0, wp - w, 0, hp - h)), (-sy, -sx), (2, 3))
        win, d = self.window, self.head_dim
        x = x.reshape(b, self.heads, d, hp // win, win, wp // win, win).permute(0, 3, 5, 1, 4, 6, 2)
        return x.reshape(b, (hp // win) * (wp // win), self.heads, win * win, d)

    def _merge(self, out: Tensor, shape: Sequence[int], hp: int, wp: int, sy: int, sx: int) -> Tensor:
        b, c, h, w = shape
        win = self.window
        out = out.reshape(b, hp // win, wp // win, self.heads, win, win, self.head_dim)
        out = out.permute(0, 3, 6, 1, 4, 2, 5).reshape(b, c, hp, wp)
        return torch.roll(out, (sy, sx), (2, 3))[:, :, :h, :w]

    def _window_mask(self, h: int, w: int, hp: int, wp: int, sy: int, sx: int, device) -> Tensor:
        """(windows, heads or 1, w², w²) additive mask: relative bias where a pair may attend, −∞ elsewhere."""
        win = self.window
        rows, cols = (torch.arange(n) for n in (hp, wp))  # rolled positions -> original positions
        orig_y, orig_x = (rows + sy) % hp, (cols + sx) % wp
        gy, gx = window_groups(hp, win, sy)[orig_y], window_groups(wp, win, sx)[orig_x]
        group = (gy[:, None] * (wp + 2) + gx[None, :]).reshape(hp // win, win, wp // win, win)
        valid = ((orig_y < h)[:, None] & (orig_x < w)[None, :]).reshape(hp // win, win, wp // win, win)
        group, valid = (t.permute(0, 2, 1, 3).reshape(-1, win * win) for t in (group, valid))
        keep = (group[:, :, None] == group[:, None, :]) & valid[:, None, :]
        keep |= torch.eye(win * win, dtype=torch.bool) & ~valid[:, :, None]  # padded queries see themselves
        mask = torch.zeros(keep.shape, device=device).masked_fill(~keep.to(device), float("-inf")).unsqueeze(1)
        if self.rel_table is None:
            return mask
        ly, lx = torch.div(torch.arange(win * win), win, rounding_mode="floor"), torch.arange(win * win) % win
        bias = self._rel_bias((ly[:, None] - ly[None, :]).to(device), (lx[:, None] - lx[None, :]).to(device))
        return mask + bias.unsqueeze(0)

    def forward(self, v: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        if q is None or k is None:
            raise ValueError(f"{type(self).__name__} is dynamic: pass q and k shaped like v")
        self.check_input(v)
        h, w = v.shape[2:]
        hp, wp, sy, sx = self._geometry(h, w)
        qw, kw, vw = (self._partition(t, hp, wp, sy, sx) for t in (q, k, v))
        mask = self._window_mask(h, w, hp, wp, sy, sx, v.device).to(v.dtype)
        out = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=mask, scale=self.scale)
        return self._merge(out, v.shape, hp, wp, sy, sx)

    def matrix(self, v_shape: Sequence[int], q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        if q is None or k is None or len(v_shape) != 4:
            raise ValueError(f"{type(self).__name__}.matrix() needs a (B, C, H, W) shape, q and k")
        h, w = v_shape[2:]
        _, _, sy, sx = self._geometry(h, w)
        ys, xs = (t.flatten() for t in torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"))
        gy, gx = window_groups(h, self.window, sy)[ys], window_groups(w, self.window, sx)[xs]
        ys, xs, gy, gx = (t.to(q.device) for t in (ys, xs, gy, gx))
        same = (gy[:, None] == gy[None, :]) & (gx[:, None] == gx[None, :])
        scores = (split_heads(q, self.heads) * self.scale) @ split_heads(k, self.heads).transpose(-2, -1)
        if self.rel_table is not None:
            scores = scores + self._rel_bias(ys[:, None] - ys[None, :], xs[:, None] - xs[None, :]).to(scores.dtype)
        return scores.masked_fill(~same, float("-inf")).softmax(-1)

    def macs(self, tokens: int) -> int:
        return 2 * tokens * self.window ** 2 * self.dim  # QKᵀ and A·V inside windows (padding not counted)


@register_affinity("window")
def _build_window(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    return WindowAttention(ctx["dim"], ctx["heads"], window=k or 7)


@register_affinity("shifted_window")
def _build_shifted_window(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    window = k or 7
    return WindowAttention(ctx["dim"], ctx["heads"], window=window, shift=window // 2)  # Swin: shift ⌊w/2⌋
