"""Sparse attention patterns as a mask combinator ``masked(sa, pattern)`` (Longformer §3.1; Sparse Transformers
§4.2; Vision Longformer): softmax attention over the keys a pattern allows, the others computed not at all."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import SelfAttentionAffinity
from .base import Affinity, merge_heads, split_heads
from .registry import AffinityContext, build_affinity, register_combinator

__all__ = ["SparsePattern", "MaskedAttention"]

_TERM = re.compile(r"^(?:band(?P<band>\d+)|dilated(?P<dk>\d+)_(?P<dd>\d+)|global(?P<stride>\d+)|(?P<line>row|column))$")


@dataclass(frozen=True)
class SparsePattern:
    """A union of 2-D attention patterns, written ``term+term+...``:

    - ``band<k>``: the k×k sliding window around the query (Longformer's sliding window; Vision Longformer);
    - ``dilated<k>_<d>``: a k×k window with dilation d (Longformer's dilated sliding window);
    - ``row`` / ``column``: the query's row / column — Sparse Transformers' strided factorisation on a
      raster-ordered image with stride W (the "local" head sees the row, the "strided" head the column),
      here non-causal and in one head;
    - ``global<s>``: tokens on an s-stride grid (y % s == 0 and x % s == 0) attend to all and are attended
      by all (Longformer global attention; paper-silent: Vision Longformer adds extra global tokens, a
      fixed-N affinity designates existing ones instead).
    """

    local: tuple[tuple[str, int, int], ...]
    global_stride: Optional[int] = None

    @classmethod
    def parse(cls, text: str) -> "SparsePattern":
        local, stride = [], None
        for term in text.split("+"):
            match = _TERM.match(term)
            if not match:
                raise ValueError(f"unknown pattern term {term!r} in {text!r}; use band<k>, dilated<k>_<d>, row, "
                                 "column, global<s>, joined by '+' (e.g. band7+global4)")
            if match["band"] or match["dk"]:
                size, dilation = int(match["band"] or match["dk"]), int(match["dd"] or 1)
                if size % 2 == 0 or dilation < 1:
                    raise ValueError(f"{term!r}: the window must be odd and the dilation at least 1")
                local.append(("band", size, dilation))
            elif match["line"]:
                local.append((match["line"], 0, 0))
            else:
                stride = int(match["stride"])
                if stride < 1:
                    raise ValueError(f"{term!r}: the global stride must be at least 1")
        return cls(tuple(local), stride)

    def __str__(self) -> str:
        names = [kind if kind in ("row", "column") else (f"band{k}" if d == 1 else f"dilated{k}_{d}")
                 for kind, k, d in self.local]
        return "+".join(names + ([f"global{self.global_stride}"] if self.global_stride else []))

    def allows_offset(self, dy: Tensor, dx: Tensor) -> Tensor:
        """Whether a local term lets a query see the key at offset (dy, dx) (key minus query)."""
        allowed = torch.zeros(dy.shape, dtype=torch.bool, device=dy.device)
        for kind, size, dilation in self.local:
            if kind == "row":
                allowed |= dy == 0
            elif kind == "column":
                allowed |= dx == 0
            else:
                reach = (size // 2) * dilation
                allowed |= (dy.abs() <= reach) & (dx.abs() <= reach) & (dy % dilation == 0) & (dx % dilation == 0)
        return allowed

    def offsets(self, height: int, width: int) -> Tensor:
        """(L, 2) key offsets the local terms allow on a height×width grid."""
        dy, dx = torch.meshgrid(torch.arange(1 - height, height), torch.arange(1 - width, width), indexing="ij")
        keep = self.allows_offset(dy, dx)
        return torch.stack([dy[keep], dx[keep]], -1)

    def global_tokens(self, height: int, width: int) -> Tensor:
        """Token indices (y·W + x) of the global tokens."""
        if not self.global_stride:
            return torch.zeros(0, dtype=torch.long)
        ys, xs = torch.arange(0, height, self.global_stride), torch.arange(0, width, self.global_stride)
        return (ys[:, None] * width + xs[None, :]).flatten()

    def allowed(self, height: int, width: int) -> Tensor:
        """The explicit (N, N) pattern: True where query i may attend to key j."""
        ys, xs = (t.flatten() for t in torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij"))
        allowed = self.allows_offset(ys[None, :] - ys[:, None], xs[None, :] - xs[:, None])
        glob = self.global_tokens(height, width)
        allowed[:, glob] = True
        allowed[glob, :] = True
        return allowed


class MaskedAttention(Affinity):
    """Softmax attention restricted to a :class:`SparsePattern`: ``A_m = softmax(Q_m K_mᵀ/√d + log S)`` with
    S the 0/1 pattern (Longformer §3.1, Sparse Transformers §4.2). ``matrix`` shows the zeros.

    ``forward`` never forms QKᵀ: it gathers the L keys at the pattern's local offsets (B·N·L·C elements;
    a band costs N·k², a row/column N·√N), adds the G global keys for every query (N·G), and recomputes the
    G global queries' rows against all N keys (G·N). A global key that is also a local one counts once.
    """

    dynamic = True
    needs_grid = True

    def __init__(self, dim: int, heads: int, pattern: SparsePattern | str):
        super().__init__(dim, heads)
        self.pattern = SparsePattern.parse(pattern) if isinstance(pattern, str) else pattern
        if not self.pattern.local and not self.pattern.global_stride:
            raise ValueError("an empty pattern leaves queries with no keys")
        self.scale = self.head_dim ** -0.5

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, pattern={self.pattern}"

    def _local_index(self, h: int, w: int, device) -> tuple[Tensor, Tensor]:
        """(N, L) key index of each query's local offsets and whether it lies inside the image."""
        offsets = self.pattern.offsets(h, w).to(device)
        ys, xs = torch.arange(h * w, device=device) // w, torch.arange(h * w, device=device) % w
        ky, kx = ys[:, None] + offsets[:, 0], xs[:, None] + offsets[:, 1]
        inside = (ky >= 0) & (ky < h) & (kx >= 0) & (kx < w)
        return (ky * w + kx).where(inside, torch.zeros_like(ky)), inside

    def _global_logits(self, qh: Tensor, kh: Tensor, glob: Tensor, w: int) -> Tensor:
        """(B, M, N, G) logits of every query against the global keys, −∞ where a local term already has it."""
        n = qh.shape[2]
        ys, xs = torch.arange(n, device=qh.device) // w, torch.arange(n, device=qh.device) % w
        local = self.pattern.allows_offset((glob // w)[None, :] - ys[:, None], (glob % w)[None, :] - xs[:, None])
        logits = (qh * self.scale) @ kh[:, :, glob].transpose(-2, -1)
        return logits.masked_fill(local, float("-inf"))

    def forward(self, v: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        if q is None or k is None:
            raise ValueError(f"{type(self).__name__} is dynamic: pass q and k shaped like v")
        self.check_input(v)
        h, w = v.shape[2:]
        qh, kh, vh = (split_heads(t, self.heads) for t in (q, k, v))
        index, inside = self._local_index(h, w, v.device)
        logits = torch.einsum("bmnd,bmnld->bmnl", qh * self.scale, kh[:, :, index]).masked_fill(~inside, float("-inf"))
        glob = self.pattern.global_tokens(h, w).to(v.device)
        if glob.numel():
            logits = torch.cat([logits, self._global_logits(qh, kh, glob, w)], -1)
        attn = logits.softmax(-1)
        out = torch.einsum("bmnl,bmnld->bmnd", attn[..., :index.shape[1]], vh[:, :, index])
        if glob.numel():
            out = out + attn[..., index.shape[1]:] @ vh[:, :, glob]
            # a global query sees every key: its row is plain attention over all N, replacing the local one
            rows = F.scaled_dot_product_attention(qh[:, :, glob], kh, vh, scale=self.scale)
            out = out.index_copy(2, glob, rows)
        return merge_heads(out, v.shape)

    def matrix(self, v_shape: Sequence[int], q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        if q is None or k is None or len(v_shape) != 4:
            raise ValueError(f"{type(self).__name__}.matrix() needs a (B, C, H, W) shape, q and k")
        allowed = self.pattern.allowed(v_shape[2], v_shape[3]).to(q.device)
        scores = (split_heads(q, self.heads) * self.scale) @ split_heads(k, self.heads).transpose(-2, -1)
        return scores.masked_fill(~allowed, float("-inf")).softmax(-1)

    def macs(self, tokens: int) -> int:
        side = math.isqrt(tokens)  # a square grid
        local = self.pattern.offsets(side, side).shape[0]
        glob = self.pattern.global_tokens(side, side).numel()
        return 2 * tokens * (local + 2 * glob) * self.dim


@register_combinator("masked")
def _build_masked(ctx: AffinityContext, args: list[str]) -> Affinity:
    """``masked(sa, pattern)``: the pattern masks softmax dot-product attention (the only operator it applies to)."""
    if len(args) != 2:
        raise ValueError(f"masked takes an attention and a pattern, e.g. masked(sa,band7+global4); got {args}")
    inner = build_affinity(args[0], **ctx)
    if not isinstance(inner, SelfAttentionAffinity) or inner.normaliser != "softmax":
        raise ValueError(f"masked(a, pattern) masks softmax dot-product attention: a must be 'sa' with the softmax "
                         f"normaliser, got {args[0]!r}")
    return MaskedAttention(inner.dim, inner.heads, args[1])
