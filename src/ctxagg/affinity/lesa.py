"""Locally Enhanced Self-Attention (LESA, lesa.txt §3.2-3.3) and the Attention Augmentation baseline
(Bello et al. 2019, lesa.txt Table 6), built on a 2-D relative-position attention affinity.

Only the binary term is an affinity: ``RelativeSelfAttention2d`` computes ``A·V`` and ``matrix()`` returns
``A`` (B, heads, N, N) with the relative-position logits folded in. LESA's unary term (grouped conv + 1×1
projection), the output BatchNorm of the binary term and the dynamic fusion ω are outside ``A·V``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Affinity, merge_heads, split_heads

__all__ = ["RelativePositionTable2d", "RelativeSelfAttention2d", "LocallyEnhancedSelfAttention",
           "AttentionAugmentedConv", "LESA_MODES", "relative_offset_index"]

LESA_MODES = ("lesa", "static", "sa")
REL_POS_KINDS = ("full", "factorized")


def relative_offset_index(height: int, width: int, max_dy: int, max_dx: int,
                          device: Optional[torch.device] = None) -> tuple[Tensor, Tensor]:
    """Row and column offsets key − query of every (query i, key j) pair of an H×W grid, each (N, N),
    clipped to ±max and shifted to start at 0 so they index a table of 2·max + 1 entries."""
    ys = torch.arange(height, device=device).repeat_interleave(width)
    xs = torch.arange(width, device=device).repeat(height)
    dy = (ys[None, :] - ys[:, None]).clamp(-max_dy, max_dy) + max_dy
    dx = (xs[None, :] - xs[:, None]).clamp(-max_dx, max_dx) + max_dx
    return dy, dx


class RelativePositionTable2d(nn.Module):
    """2-D relative position embeddings ``r_(i,j)→(h,w)`` of lesa.txt Eq. 1, used as logits ``x_i·r_{p_j − p_i}``.

    ``full``: one vector per 2-D offset (dy, dx), a (2H−1)(2W−1) table. ``factorized``: ``r_{dy} + r_{dx}``
    from a height and a width table (the BoTNet/Bello form, the reference's ``detection_qr`` type).
    Unlike the reference classification code, which embeds the offset of the *flattened* index
    (i·W + j), so that a pair one row apart and a pair W−1 columns apart share an embedding (it wraps
    across rows), both kinds here depend on the true 2-D offset.

    The table is sized for a reference grid; other grids index it with offsets clipped to its range
    (Shaw et al. 2018, lesa.txt [41]): smaller grids use the exact entries they would have at the
    reference size, larger grids reuse the outermost entry beyond it. This keeps any input size valid.
    """

    def __init__(self, channels: int, grid: Sequence[int], kind: str = "full"):
        super().__init__()
        if kind not in REL_POS_KINDS:
            raise ValueError(f"unknown relative position kind {kind!r}; choose one of {REL_POS_KINDS}")
        self.kind = kind
        self.max_dy, self.max_dx = grid[0] - 1, grid[1] - 1
        th, tw = 2 * grid[0] - 1, 2 * grid[1] - 1
        std = channels ** -0.5  # paper-silent: N(0, 1/c), as Bello et al. / BoTNet initialise theirs
        if kind == "full":
            self.table = nn.Parameter(torch.randn(channels, th * tw) * std)
        else:
            self.height = nn.Parameter(torch.randn(channels, th) * std)
            self.width = nn.Parameter(torch.randn(channels, tw) * std)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, grid=({self.max_dy + 1}, {self.max_dx + 1})"

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        """Logits ``out[b, m, i, j] = x[b, m, i] · r_{p_j − p_i}`` for x of shape (B, M, N, c) -> (B, M, N, N)."""
        b, m, n, _ = x.shape
        dy, dx = relative_offset_index(height, width, self.max_dy, self.max_dx, x.device)
        if self.kind == "full":  # project onto the whole table once, then pick each pair's entry
            index = dy * (2 * self.max_dx + 1) + dx
            return (x @ self.table).gather(-1, index.expand(b, m, n, n))
        return (x @ self.height).gather(-1, dy.expand(b, m, n, n)) + (x @ self.width).gather(-1, dx.expand(b, m, n, n))


class RelativeSelfAttention2d(Affinity):
    """Global multi-head self-attention with 2-D relative position logits: LESA's binary term
    (lesa.txt Eq. 1, 5; position embedding "used in [51]", Table 2) and Bello et al.'s attention.

    ``logits = qᵢ·kⱼ + qᵢ·r^q_{pⱼ−pᵢ} [+ kⱼ·r^k_{pᵢ−pⱼ}]``; with ``logit_norm`` each of the three terms is
    batch-normalised per head before they are summed (Axial-DeepLab [51], as LESA's reference code), and
    no 1/√d scale is applied (the BN sets the scale); without it all terms are scaled by 1/√d (Bello).
    ``A = softmax_j(logits)`` and ``forward`` returns ``A·V``.

    ``forward`` runs the fused ``scaled_dot_product_attention`` with the relative logits as an additive
    mask whenever the logit BN is in eval mode (its affine map is folded into q and the mask; its offsets
    are constant per row and cancel in the softmax); in training it forms the logits explicitly because
    the BN needs their batch statistics. ``matrix()`` always forms them, so ``matrix() @ V == forward()``
    checks the fold. The relative terms are N×N by nature: this affinity costs O(N²) memory.

    The logit BN's biases add a per-head constant to every logit, which the softmax ignores: they are
    kept for parity with the reference (and its parameter count) but receive no gradient.

    ``drop_diagonal`` removes the unary term ``S(·)ᵢᵢ vᵢ`` of lesa.txt Eq. 2 (no renormalisation, as the
    decomposition implies) for the Table 1 ablation.
    """

    dynamic = True
    needs_grid = True

    def __init__(self, dim: int, heads: int, qk_dim: int, grid: Sequence[int] = (14, 14), rel_pos: str = "full",
                 key_rel: bool = True, logit_norm: bool = True):
        super().__init__(dim, heads)
        if qk_dim % heads:
            raise ValueError(f"qk_dim={qk_dim} is not divisible by heads={heads}")
        self.qk_dim = qk_dim
        self.grid = tuple(grid)
        head_qk = qk_dim // heads
        self.scale = 1.0 if logit_norm else head_qk ** -0.5
        self.rel_q = RelativePositionTable2d(head_qk, grid, rel_pos)  # shared by all heads, as [51] and Bello
        self.rel_k = RelativePositionTable2d(head_qk, grid, rel_pos) if key_rel else None
        self.terms = 3 if key_rel else 2
        self.logit_norm = nn.BatchNorm2d(self.terms * heads) if logit_norm else None
        self.drop_diagonal = False

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, qk_dim={self.qk_dim}, grid={self.grid}"

    def _relative_terms(self, qh: Tensor, kh: Tensor, height: int, width: int) -> list[Tensor]:
        terms = [self.rel_q(qh, height, width)]
        if self.rel_k is not None:  # key term kⱼ·r_{pᵢ−pⱼ}: the query-side table read with roles swapped
            terms.append(self.rel_k(kh, height, width).transpose(-2, -1))
        return terms

    def logits(self, q: Tensor, k: Tensor) -> Tensor:
        """Pre-softmax logits (B, heads, N, N) of (B, qk_dim, H, W) queries and keys."""
        height, width = q.shape[-2:]
        qh, kh = split_heads(q, self.heads), split_heads(k, self.heads)
        terms = [qh @ kh.transpose(-2, -1)] + self._relative_terms(qh, kh, height, width)
        if self.logit_norm is None:
            return sum(terms) * self.scale
        b, m, n, _ = qh.shape
        return self.logit_norm(torch.cat(terms, 1)).view(b, self.terms, m, n, n).sum(1)

    def matrix(self, v_shape: Sequence[int], q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        if q is None or k is None:
            raise ValueError("RelativeSelfAttention2d is dynamic: matrix() needs q and k")
        a = self.logits(q, k).softmax(-1)
        if self.drop_diagonal:
            a = a * (1 - torch.eye(a.shape[-1], dtype=a.dtype, device=a.device))
        return a

    def forward(self, v: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        if q is None or k is None:
            raise ValueError("RelativeSelfAttention2d is dynamic: pass q and k")
        self.check_input(v)
        norm = self.logit_norm
        if self.drop_diagonal or (norm is not None and (norm.training or norm.running_var is None)):
            return merge_heads(self.matrix(v.shape, q, k) @ split_heads(v, self.heads), v.shape)
        height, width = q.shape[-2:]
        qh, kh, vh = (split_heads(t, self.heads) for t in (q, k, v))
        if norm is None:
            gain = qh.new_full((self.terms, self.heads), self.scale)
        else:  # BN in eval is x·g + const per (term, head); the constants cancel in the softmax
            gain = (norm.weight / (norm.running_var + norm.eps).sqrt()).view(self.terms, self.heads)
        gain = gain.view(self.terms, 1, self.heads, 1, 1)
        terms = self._relative_terms(qh, kh, height, width)  # indexed, not zipped: gain may be an fx Proxy
        bias = sum(gain[i + 1] * t for i, t in enumerate(terms))
        out = F.scaled_dot_product_attention(qh * gain[0], kh, vh, attn_mask=bias, scale=1.0)
        return merge_heads(out, v.shape)

    def macs(self, tokens: int) -> int:
        side = round(tokens ** 0.5)  # assumes a square grid
        table = self.rel_q.table.shape[-1] if self.rel_q.kind == "full" else 2 * (2 * side - 1)
        return tokens * tokens * (self.qk_dim + self.dim) + (self.terms - 1) * tokens * table * self.qk_dim


class LocallyEnhancedSelfAttention(nn.Module):
    """LESA (lesa.txt Eq. 5-7): ``x⁺ = m + ω ⊙ binary``, the drop-in replacement of a bottleneck's 3×3 conv.

    - unary ``m = x W_g^k W_1^1`` (Eq. 6): a k×k convolution with ``groups = heads`` then a 1×1 projection;
    - binary: :class:`RelativeSelfAttention2d` on 1×1-conv queries, keys, values (Eq. 1);
    - fusion ``ω = sigmoid(F(m ‖ binary))`` (Eq. 7), F = BN→ReLU→fc1(2d→d)→BN→ReLU→fc2(d→d)→BN (§3.3).
      F's first BN is per channel, so BN(m ‖ binary) = BN(m) ‖ BN(binary): it is realised as the output
      BNs of the two terms, which the output sum then uses too (as the reference code does).

    ``mode``: ``lesa`` (dynamic fusion), ``static`` (m + binary, "Static LESA", Table 6) or ``sa``
    (binary only, the self-attention baseline). The last ω of an eager forward is kept in ``last_omega`` (detached,
    (B, d, H, W)); Table 2's unary/binary weights are the means of 1/(1+ω) and ω/(1+ω).

    Paper-silent choices (following the reference code where it has one):
    - queries and keys have d/2 channels in total, values d (``qk_ratio``);
    - q, k, v come from one 1×1 conv followed by BN;
    - the unary kernel is 3×3 and neither conv has a bias (each is followed by BN);
    - fc1 and fc2 are 1×1 convolutions without bias (followed by BN).
    """

    def __init__(self, dim: int, heads: int = 8, grid: Sequence[int] = (14, 14), kernel_size: int = 3,
                 mode: str = "lesa", rel_pos: str = "full", qk_ratio: float = 0.5):
        super().__init__()
        if mode not in LESA_MODES:
            raise ValueError(f"unknown LESA mode {mode!r}; choose one of {LESA_MODES}")
        self.mode = mode
        self.qk_dim = int(dim * qk_ratio)
        self.qkv = nn.Conv2d(dim, 2 * self.qk_dim + dim, 1, bias=False)
        self.qkv_norm = nn.BatchNorm2d(2 * self.qk_dim + dim)
        self.attention = RelativeSelfAttention2d(dim, heads, self.qk_dim, grid, rel_pos)
        self.binary_norm = nn.BatchNorm2d(dim)
        self.unary = None if mode == "sa" else nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=heads, bias=False),
            nn.Conv2d(dim, dim, 1, bias=False), nn.BatchNorm2d(dim))
        self.fusion = None if mode != "lesa" else nn.Sequential(
            nn.ReLU(), nn.Conv2d(2 * dim, dim, 1, bias=False), nn.BatchNorm2d(dim),
            nn.ReLU(), nn.Conv2d(dim, dim, 1, bias=False), nn.BatchNorm2d(dim))
        self.last_omega: Optional[Tensor] = None

    def extra_repr(self) -> str:
        return f"mode={self.mode}"

    def qkv_split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys (qk_dim channels each) and values (dim channels) of a (B, dim, H, W) map."""
        return self.qkv_norm(self.qkv(x)).split([self.qk_dim, self.qk_dim, self.attention.dim], dim=1)

    def binary(self, x: Tensor) -> Tensor:
        """The context term BN(A·V) of Eq. 5."""
        q, k, v = self.qkv_split(x)
        return self.binary_norm(self.attention(v, q, k))

    def forward(self, x: Tensor) -> Tensor:
        binary = self.binary(x)
        if self.unary is None:
            return binary
        unary = self.unary(x)
        if self.fusion is None:
            return unary + binary
        omega = torch.sigmoid(self.fusion(torch.cat([unary, binary], 1)))
        if not torch.compiler.is_compiling():  # kept for analysis in eager; traced graphs must not store state
            self.last_omega = omega.detach()
        return unary + omega * binary


class AttentionAugmentedConv(nn.Module):
    """Attention Augmentation (Bello et al. 2019; the "AA" parallel baseline of lesa.txt Table 6):
    ``concat(conv3×3(x) → d − d_v channels, W_o · MHA(x) → d_v channels)``.

    Attention is :class:`RelativeSelfAttention2d` with Bello's factorized 2-D relative logits on the
    query side only and 1/√d_k scaling. Bello's ResNet-50 setting κ = d_k/d = 0.2, υ = d_v/d = 0.1 with
    8 heads (d_k, d_v rounded to multiples of the heads). Paper-silent: the 1×1 convs have no bias (the
    block's BN follows the concatenation).
    """

    def __init__(self, dim: int, heads: int = 8, grid: Sequence[int] = (14, 14), key_ratio: float = 0.2,
                 value_ratio: float = 0.1):
        super().__init__()
        self.key_dim = max(1, round(key_ratio * dim / heads)) * heads
        self.value_dim = max(1, round(value_ratio * dim / heads)) * heads
        self.conv = nn.Conv2d(dim, dim - self.value_dim, 3, padding=1, bias=False)
        self.qkv = nn.Conv2d(dim, 2 * self.key_dim + self.value_dim, 1, bias=False)
        self.attention = RelativeSelfAttention2d(self.value_dim, heads, self.key_dim, grid, "factorized",
                                                 key_rel=False, logit_norm=False)
        self.proj = nn.Conv2d(self.value_dim, self.value_dim, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).split([self.key_dim, self.key_dim, self.value_dim], dim=1)
        return torch.cat([self.conv(x), self.proj(self.attention(v, q, k))], 1)
