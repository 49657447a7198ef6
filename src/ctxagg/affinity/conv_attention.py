"""Self-attention that is a convolution (Cordonnier, Loukas & Jaggi 2020, "On the Relationship between
Self-Attention and Convolutional Layers", §3, Lemma 1 and Theorem 1): the quadratic relative encoding."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Affinity
from .registry import AffinityContext, register_affinity

__all__ = ["QuadraticEncodingAttention"]


class QuadraticEncodingAttention(Affinity):
    """K² attention heads whose logits are Lemma 1's quadratic relative encoding, with W_qry = W_key = 0:

        A_h[q, k] = softmax_k( −α_h (‖δ − Δ_h‖² − ‖Δ_h‖²) ),   δ = k − q  (key minus query pixel)

    i.e. ``v_hᵀ r_δ`` with ``v_h = −α_h(1, −2Δ_h)`` and ``r_δ = (‖δ‖², δ)``. Head h looks around the shift Δ_h
    (initialised to the K×K offsets, head h = (Δy + ⌊K/2⌋)·K + Δx + ⌊K/2⌋); as α → ∞ each A_h becomes the
    shift by Δ_h and Σ_h W_h·A_h·X is a K×K convolution (Theorem 1). Δ_h and α_h are learned, as in the
    paper's "learned quadratic embedding" experiments. ``heads`` is K²; channel c belongs to head c // (C/K²).

    Paper-silent: the border. Keys range over the zero-padded plane (every offset δ with |δy| < H, |δx| < W,
    or within ``support``×``support`` when given), padded keys carrying zero values, so a head whose shift
    leaves the image loses that mass exactly as a zero-padded convolution does. A is then translation
    invariant, so ``forward`` is one depthwise convolution with the softmax kernel (exact, any α); with the
    default global support its cost is that of dense attention, O(N²·C). α starts at ``alpha`` (paper-silent).
    """

    needs_grid = True

    def __init__(self, dim: int, kernel_size: int = 4, alpha: float = 1.0, support: Optional[int] = None):
        if kernel_size < 1 or dim % (kernel_size ** 2):
            raise ValueError(f"a {kernel_size}×{kernel_size} convolution needs {kernel_size ** 2} heads: "
                             f"dim={dim} must be a positive multiple of kernel_size²")
        if support is not None and (support % 2 == 0 or support < kernel_size):
            raise ValueError(f"support must be odd and at least kernel_size={kernel_size}, got {support}")
        if alpha <= 0:
            raise ValueError(f"alpha must be positive (a sharpness), got {alpha}")
        super().__init__(dim, kernel_size ** 2)
        self.kernel_size, self.support = kernel_size, support
        offsets = torch.arange(kernel_size) - kernel_size // 2
        grid = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), -1).reshape(-1, 2)
        self.centres = nn.Parameter(grid.float())  # Δ_h = (Δy, Δx)
        self.log_alpha = nn.Parameter(torch.full((self.heads,), math.log(alpha)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernel_size={self.kernel_size}, support={self.support}"

    def _reach(self, height: int, width: int) -> tuple[int, int]:
        """Largest |δy|, |δx| a key may have."""
        if self.support is not None:
            return self.support // 2, self.support // 2
        return height - 1, width - 1

    def _logits(self, dy: Tensor, dx: Tensor) -> Tensor:
        """−α_h(‖δ − Δ_h‖² − ‖Δ_h‖²) for offsets (dy, dx) of any shape -> (heads, *shape)."""
        alpha, centres = self.log_alpha.exp(), self.centres.to(dy.dtype)
        shape = (-1,) + (1,) * dy.ndim
        cy, cx, alpha = centres[:, 0].view(shape), centres[:, 1].view(shape), alpha.to(dy.dtype).view(shape)
        return -alpha * ((dy - cy) ** 2 + (dx - cx) ** 2 - cy ** 2 - cx ** 2)

    def kernels(self, height: int, width: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """The per-head softmax kernels (heads, 2·ry+1, 2·rx+1) over all key offsets: A_h is their Toeplitz."""
        ry, rx = self._reach(height, width)
        dy = torch.arange(-ry, ry + 1, dtype=dtype, device=self.centres.device)
        dx = torch.arange(-rx, rx + 1, dtype=dtype, device=self.centres.device)
        logits = self._logits(dy[:, None].expand(-1, dx.numel()), dx[None, :].expand(dy.numel(), -1))
        return logits.flatten(1).softmax(-1).view_as(logits)

    def forward(self, v: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        self.check_input(v)
        h, w = v.shape[2:]
        ry, rx = self._reach(h, w)
        kernel = self.kernels(h, w, v.dtype).repeat_interleave(self.head_dim, 0).unsqueeze(1)
        return F.conv2d(v, kernel, padding=(ry, rx), groups=self.dim)

    def matrix(self, v_shape: Sequence[int], q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        if len(v_shape) != 4:
            raise ValueError(f"{type(self).__name__}.matrix() needs a (B, C, H, W) shape")
        h, w = v_shape[2:]
        ry, rx = self._reach(h, w)
        dtype, device = self.centres.dtype, self.centres.device
        ys, xs = (t.flatten().to(device, dtype) for t in torch.meshgrid(torch.arange(h), torch.arange(w),
                                                                         indexing="ij"))
        dy, dx = ys[None, :] - ys[:, None], xs[None, :] - xs[:, None]  # key minus query
        plane_y, plane_x = torch.meshgrid(torch.arange(-ry, ry + 1, dtype=dtype, device=device),
                                          torch.arange(-rx, rx + 1, dtype=dtype, device=device), indexing="ij")
        log_norm = self._logits(plane_y, plane_x).flatten(1).logsumexp(-1)  # softmax over the padded plane
        inside = (dy.abs() <= ry) & (dx.abs() <= rx)
        a = (self._logits(dy, dx) - log_norm.view(-1, 1, 1)).exp()
        return a.masked_fill(~inside, 0).unsqueeze(0)

    def macs(self, tokens: int) -> int:
        taps = tokens if self.support is None else self.support ** 2  # global: every key offset ≈ N
        return tokens * taps * self.dim


@register_affinity("conv_attn")
def _build_conv_attn(ctx: AffinityContext, k: Optional[int]) -> Affinity:
    # paper-silent default K = 4: 16 heads divide every Container width (64/128/320/512); conv_attn3 needs C % 9 == 0
    return QuadraticEncodingAttention(ctx["dim"], kernel_size=k or 4)
