"""Independent float64 references of every affinity operator, written from the papers' equations.

Rules: a reference reads only an operator's *parameters* (and its constructor configuration: heads,
kernel size, grid, normaliser name) and never calls the operator's own code path (no ``forward``,
``matrix``, ``apply_matrix``, ``split_heads``, ``conv_toeplitz``, ``F.conv2d``, ``F.layer_norm``,
``softmax``, SDPA ...). Sums are explicit loops or ``einsum`` over the indices of the equation.

Layout conventions (the affinity contract, not the operators' code): a (B, C, H, W) map is read as
tokens n = y·W + x; channel c belongs to head c // (C / M).

``reference_for(op)`` returns the reference of an operator instance, or raises a clear error naming
the class that has none; the registry test uses it so that a newly registered operator cannot pass
without an independent reference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ctxagg.affinity import (AffinityChain, AffinityMixture, AxialAttention, CrossShapedWindowAttention,
                             DepthwiseConvAffinity, MaskedAttention, ShuffledWindowAttention,
                             DepthwiseSelfAttention, GroupConvAffinity, KeyOnlyAttention, NeighbourhoodAttention,
                             QuadraticEncodingAttention, RelativeSelfAttention2d, SelfAttentionAffinity,
                             TokenMlpAffinity, WindowAttention)
from ctxagg.affinity.dynamic_conv import DynamicConvAffinity, DynamicDepthwiseConv
from ctxagg.affinity import (AdditiveAttention, DisentangledNonLocal, HeadMixing, LogitMixedAttention,
                             OutlookAttention, PositionalAttention, RelativeBiasAttention, SeparableSelfAttention,
                             token_count)

from ctxagg.affinity import (LambdaLayer, LinformerAttention, PerformerAttention, PoolingAttention,
                             SpatialReductionAttention)

LAYER_NORM_EPS = 1e-5  # documented choice in affinity/attention.py: LayerNorm over keys, no affine, eps 1e-5


# ------------------------------------------------------------------ layout and accessors (not operator code)

def tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, N, C) with n = y·W + x, float64; (B, N, C) is returned as float64."""
    if x.ndim == 4:
        b, c, h, w = x.shape
        return torch.einsum("bchw->bhwc", x).reshape(b, h * w, c).double()
    return x.double()


def like(t: Tensor, shape: Sequence[int]) -> Tensor:
    """(B, N, C) back to the layout of ``shape``."""
    if len(shape) == 4:
        b, c, h, w = shape
        return torch.einsum("bhwc->bchw", t.reshape(b, h, w, c))
    return t


def head_of_channel(dim: int, heads: int) -> Tensor:
    """h(c) = c // (C / M) for every channel c."""
    return torch.arange(dim) // (dim // heads)


def per_channel(a: Tensor, dim: int) -> Tensor:
    """(B, M, N, N) per-head matrices -> (B, C, N, N) per-channel matrices (head h(c) for channel c)."""
    return a[:, head_of_channel(dim, a.shape[1])]


def aggregate(a_channels: Tensor, v_tokens: Tensor) -> Tensor:
    """o[b, i, c] = Σ_j A_c[i, j] v[b, j, c] (Container Eq. 3 with one matrix per channel)."""
    b = v_tokens.shape[0]
    return torch.einsum("bcij,bjc->bic", a_channels.expand(b, -1, -1, -1), v_tokens)


def aggregate_pairs(a: Tensor, v_tokens: Tensor) -> Tensor:
    """Affinity over (position, channel) pairs of G groups, index n·d + c (the contract of
    ``GroupConvAffinity``/``KeyOnlyAttention``): o[b, n, g·d + c'] = Σ_{i, c} A[g, (n, c'), (i, c)] v[b, i, g·d + c]."""
    b, n, c = v_tokens.shape
    g = a.shape[1]
    d = c // g
    blocks = a.expand(b, -1, -1, -1).reshape(b, g, n, d, n, d)
    return torch.einsum("bgxeif,bigf->bxge", blocks, v_tokens.reshape(b, n, g, d)).reshape(b, n, c)


def through_matrix(a: Tensor, v: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``A·V + bias`` from an explicit matrix in either contract form, written here (not ``apply_matrix``)."""
    vt = tokens(v)
    n, c = vt.shape[1], vt.shape[2]
    if a.shape[-1] == n:
        out = aggregate(per_channel(a.double(), c), vt)
    elif a.shape[-1] == n * c // a.shape[1]:
        out = aggregate_pairs(a.double(), vt)
    else:
        raise AssertionError(f"matrix of shape {tuple(a.shape)} fits neither N={n} nor (N·C/M) of values {tuple(v.shape)}")
    if bias is not None:
        out = out + bias.double()
    return like(out, v.shape)


def first(module: nn.Module, *names: str):
    """The first attribute of ``module`` among ``names`` (tolerates a rename in progress)."""
    for name in names:
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"{type(module).__name__} has none of {names}")


def normaliser_name(op: nn.Module) -> str:
    return first(op, "normaliser", "norm")


# ------------------------------------------------------------------ self-attention and its normalisers

def attention_scores(q: Tensor, k: Tensor, heads: int) -> Tensor:
    """s[b, m, i, j] = Σ_{e<d} q[b, i, m·d+e] k[b, j, m·d+e] / √d, d = C/M (Container Eq. 4)."""
    qt, kt = tokens(q), tokens(k)
    b, n, c = qt.shape
    d = c // heads
    s = torch.einsum("bime,bjme->bmij", qt.reshape(b, n, heads, d), kt.reshape(b, kt.shape[1], heads, d))
    return s / math.sqrt(d)


def layer_norm_keys(s: Tensor) -> Tensor:
    """(s − mean_j) / √(var_j + eps) over the key axis j, biased variance, no affine."""
    mean = s.sum(-1, keepdim=True) / s.shape[-1]
    var = ((s - mean) ** 2).sum(-1, keepdim=True) / s.shape[-1]
    return (s - mean) / torch.sqrt(var + LAYER_NORM_EPS)


def normalise(s: Tensor, name: str) -> Tensor:
    """The §4.2 normalisers of "ViT are Dynamic Convolutions" (Table 2) on scaled scores over the key axis.

    Documented choices (affinity/attention.py): ``scale`` divides by N_k; the ReLU and LayerNorm variants
    use the same constant 1/N_k; LayerNorm is over keys without affine parameters."""
    n_keys = s.shape[-1]
    if name == "softmax":  # exp(x_j) / Σ_j' exp(x_j'), temperature folded into the 1/√d of the scores
        e = torch.exp(s - s.max(-1, keepdim=True).values)
        return e / e.sum(-1, keepdim=True)
    if name == "none":
        return s
    if name == "scale":
        return s / n_keys
    if name == "scale_relu":
        return torch.clamp(s, min=0) / n_keys
    if name == "layernorm":
        return layer_norm_keys(s) / n_keys
    if name == "ln_relu":
        return torch.clamp(layer_norm_keys(s), min=0) / n_keys
    raise AssertionError(f"no reference for normaliser {name!r}")


def sa_matrix(op: SelfAttentionAffinity, v_shape, q: Tensor, k: Tensor, attn_bias: Optional[Tensor] = None) -> Tensor:
    """A_m = norm(Q_m K_mᵀ / √(C/M) [+ bias_m]) (Container Eq. 4; ViT-as-DynConv §4.2), (B, M, N, N)."""
    s = attention_scores(q, k, op.heads)
    if attn_bias is not None:
        s = s + attn_bias.double()
    return normalise(s, normaliser_name(op))


def sa_forward(op: SelfAttentionAffinity, v: Tensor, q: Tensor, k: Tensor, attn_bias: Optional[Tensor] = None) -> Tensor:
    """Concat_m(A_m V_m) (Container Eq. 3)."""
    a = sa_matrix(op, v.shape, q, k, attn_bias)
    return like(aggregate(per_channel(a, op.dim), tokens(v)), v.shape)


# ------------------------------------------------------------------ convolutions (Container Eq. 7, Table 2)

def _padded(v: Tensor, pad: int) -> Tensor:
    b, c, h, w = v.shape
    out = v.new_zeros(b, c, h + 2 * pad, w + 2 * pad, dtype=torch.float64)
    out[:, :, pad:pad + h, pad:pad + w] = v
    return out


def depthwise_kernels(op: DepthwiseConvAffinity) -> Tensor:
    """(C, k, k): channel c uses head h(c)'s kernel (MH-DW shares kernels inside a head, Container §3.3)."""
    weight = op.weight.double()
    return weight.reshape(op.heads, weight.shape[-2], weight.shape[-1])[head_of_channel(op.dim, op.heads)]


def depthwise_matrix(op: DepthwiseConvAffinity, v_shape) -> Tensor:
    """2-D Eq. 7: A_c[(y, x), (y', x')] = Ker_c[y' − y + k//2, x' − x + k//2] inside the kernel, else 0.

    Orientation: cross-correlation (nn.Conv2d's convention, documented in affinity/depthwise.py); zero
    padding. Returns (1, M, N, N), one matrix per head (the channels of a head share it)."""
    h, w = v_shape[2], v_shape[3]
    weight = op.weight.double().reshape(op.heads, op.weight.shape[-2], op.weight.shape[-1])
    size = weight.shape[-1]
    a = weight.new_zeros(op.heads, h * w, h * w)
    for y in range(h):
        for x in range(w):
            for ky in range(size):
                for kx in range(size):
                    y2, x2 = y + ky - size // 2, x + kx - size // 2
                    if 0 <= y2 < h and 0 <= x2 < w:
                        a[:, y * w + x, y2 * w + x2] = weight[:, ky, kx]
    return a.unsqueeze(0)


def depthwise_forward(op: DepthwiseConvAffinity, v: Tensor) -> Tensor:
    """o[b, c, y, x] = Σ_{ky, kx} Ker_c[ky, kx] v[b, c, y + ky − k//2, x + kx − k//2] + bias_c."""
    kernels = depthwise_kernels(op)
    size = kernels.shape[-1]
    vp = _padded(v, size // 2)
    h, w = v.shape[2], v.shape[3]
    out = torch.zeros(v.shape, dtype=torch.float64)
    for ky in range(size):
        for kx in range(size):
            out = out + kernels[None, :, ky, kx, None, None] * vp[:, :, ky:ky + h, kx:kx + w]
    return out + (0 if op.bias is None else op.bias.double().view(1, -1, 1, 1))


def group_conv_forward(weight: Tensor, bias: Optional[Tensor], groups: int, v: Tensor) -> Tensor:
    """o[b, o, y, x] = Σ_{e<d} Σ_{ky, kx} W[o, e, ky, kx] v[b, g(o)·d + e, y + ky − k//2, x + kx − k//2] + b_o."""
    weight = weight.double()
    size = weight.shape[-1]
    c_out, d = weight.shape[0], weight.shape[1]
    out_per = c_out // groups
    vp = _padded(v, size // 2)
    b, _, h, w = v.shape
    out = torch.zeros(b, c_out, h, w, dtype=torch.float64)
    for g in range(groups):
        rows, cols = slice(g * out_per, (g + 1) * out_per), slice(g * d, (g + 1) * d)
        for ky in range(size):
            for kx in range(size):
                out[:, rows] += torch.einsum("oe,behw->bohw", weight[rows, :, ky, kx], vp[:, cols, ky:ky + h, kx:kx + w])
    return out + (0 if bias is None else bias.double().view(1, -1, 1, 1))


def group_conv_matrix(op: GroupConvAffinity, v_shape) -> Tensor:
    """(1, G, N·d, N·d), index n·d + c: M[g, (n, o), (n', e)] = W[g·d + o, e, ky, kx] where n' = n + (ky, kx) − k//2."""
    weight = op.conv.weight.double()
    size, groups = weight.shape[-1], op.heads
    d = weight.shape[1]
    h, w = v_shape[2], v_shape[3]
    n = h * w
    m = weight.new_zeros(groups, n, d, n, d)
    for y in range(h):
        for x in range(w):
            for ky in range(size):
                for kx in range(size):
                    y2, x2 = y + ky - size // 2, x + kx - size // 2
                    if 0 <= y2 < h and 0 <= x2 < w:
                        m[:, y * w + x, :, y2 * w + x2, :] = weight[:, :, ky, kx].reshape(groups, d, d)
    return m.reshape(1, groups, n * d, n * d)


# ------------------------------------------------------------------ token MLP (Container Eq. 8)

def token_mlp_matrix(op: TokenMlpAffinity, v_shape=None) -> Tensor:
    """A_m = W_m (dense, Eq. 8 with A = W_MLPᵀ stored directly) or A_m[i, j] = Σ_r U_m[i, r] V_m[r, j] (low rank)."""
    if op.rank is None:
        return op.weight.double().unsqueeze(0)
    u, vt = op.u.double(), op.vt.double()
    return torch.einsum("mir,mrj->mij", u, vt).unsqueeze(0)


def token_mlp_forward(op: TokenMlpAffinity, v: Tensor) -> Tensor:
    """o[b, i, c] = Σ_j A_{h(c)}[i, j] v[b, j, c] (Container Eq. 3 with the Eq. 8 matrices; no bias)."""
    vt = tokens(v)
    out = torch.zeros_like(vt)
    a = token_mlp_matrix(op)[0]
    heads_of = head_of_channel(op.dim, op.heads)
    for c in range(op.dim):
        out[:, :, c] = torch.einsum("ij,bj->bi", a[heads_of[c]], vt[:, :, c])
    return like(out, v.shape)


# ------------------------------------------------------------------ key-only attention (LinGlos Eq. 2-4)

def key_only_saliency(op: KeyOnlyAttention, k: Tensor) -> Tensor:
    """A_h[i] = exp(z_i) / Σ_i' exp(z_i'), z_i = Σ_{e<d} K[i, h·d+e] W_sal[h, e] / √d (Eq. 2), (B, M, N).

    Documented choice (affinity/key_only.py): √d uses the head dimension d = C/M."""
    kt = tokens(k)
    b, n, c = kt.shape
    d = c // op.heads
    z = torch.einsum("bihe,he->bhi", kt.reshape(b, n, op.heads, d), op.saliency.double()) / math.sqrt(d)
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def key_only_forward(op: KeyOnlyAttention, v: Tensor, q: Tensor, k: Optional[Tensor] = None) -> Tensor:
    """Z[n, c'] = Σ_c (G[c] · q[n, c]) U1[c', c] + b1[c'] + v[n, c'], G[c] = Σ_i A_h(c)[i] v[i, c] (Eq. 3-4).

    Roles (documented in KeyOnlyAttention), positional in the (v, q, k) slots: v = ``aggregated`` (the paper's K),
    q = ``gate`` (the paper's V), k = ``saliency_input`` (the paper's K in Eq. 2, defaults to v)."""
    k = v if k is None else k
    a = key_only_saliency(op, k)[:, head_of_channel(op.dim, op.heads)]  # (B, C, N)
    vt, qt = tokens(v), tokens(q)
    g = torch.einsum("bci,bic->bc", a, vt)
    z = torch.einsum("bc,bnc,dc->bnd", g, qt, op.u1.weight.double()) + op.u1.bias.double() + vt
    return like(z, v.shape)


def key_only_matrix(op: KeyOnlyAttention, v_shape, q: Tensor, k: Tensor) -> Tensor:
    """M[(n, c'), (i, c)] = A_h(c)[i] · q[n, c] · U1[c', c] + δ_ni δ_cc' (the decomposition in the docstring)."""
    a = key_only_saliency(op, k)[:, head_of_channel(op.dim, op.heads)]
    qt = tokens(q)
    b, n, c = qt.shape
    m = torch.einsum("bci,bnc,dc->bndic", a, qt, op.u1.weight.double()).reshape(b, n * c, n * c)
    return (m + torch.eye(n * c, dtype=torch.float64)).unsqueeze(1)


# ------------------------------------------------------------------ depth-wise self-attention (ViT-as-DynConv Eq. 5)

def dw_sa_matrix(op: DepthwiseSelfAttention, v_shape, q: Tensor, k=None, attn_bias: Optional[Tensor] = None,
                 select: Optional[Tensor] = None) -> Tensor:
    """A_c[i, j] = q_i[c] · s_ij / Σ_j' s_ij' + p_{h(c)}[i, j] · s_ij (Eq. 5, o_i = q_i ⊙ k̄_i + p_i k), (B, C, N, N).

    Documented choices (affinity/dw_attention.py): p covers the last N_b tokens (class tokens get none);
    with a selection, p is zeroed outside it; an empty selection row divides by 1."""
    qt = tokens(q)
    b, n, c = qt.shape
    s = torch.ones(1, n, n, dtype=torch.float64) if select is None else select[:, 0].double()
    weights = s / torch.clamp(s.sum(-1, keepdim=True), min=1)
    a = torch.einsum("bic,bij->bcij", qt, weights.expand(b, -1, -1))
    if attn_bias is not None:
        nb, off = attn_bias.shape[-1], n - attn_bias.shape[-1]
        p = attn_bias.double()[:, head_of_channel(c, attn_bias.shape[1])]  # (B or 1, C, Nb, Nb)
        p = p * s[:, None, off:, off:]
        a = a.clone()
        a[:, :, off:, off:] = a[:, :, off:, off:] + p
    return a


def dw_sa_forward(op: DepthwiseSelfAttention, v: Tensor, q: Tensor, k=None, attn_bias=None, select=None) -> Tensor:
    """o_i[c] = q_i[c] · k̄_i[c] + Σ_j p̃_{h(c)}[i, j] k_j[c], k̄_i = mean of the keys selected by i (Eq. 5);
    ``v`` holds the keys (the value bank is discarded, §4.3)."""
    kt, qt = tokens(v), tokens(q)
    b, n, c = kt.shape
    if select is not None and select.shape[:2] != (1, 1):
        raise AssertionError("the dw_sa reference takes one (1, 1, N, N) selection shared by the batch")
    out = torch.zeros_like(kt)
    for i in range(n):
        chosen = [j for j in range(n) if select is None or select[0, 0, i, j]]
        k_bar = kt[:, chosen].sum(1) / max(1, len(chosen))
        out[:, i] = qt[:, i] * k_bar
    if attn_bias is not None:
        nb, off = attn_bias.shape[-1], n - attn_bias.shape[-1]
        heads_of = head_of_channel(c, attn_bias.shape[1])
        for i in range(nb):
            for j in range(nb):
                if select is not None and not select[0, 0, off + i, off + j]:
                    continue
                out[:, off + i] += attn_bias.double()[:, heads_of, i, j].expand(b, c) * kt[:, off + j]
    return like(out, v.shape)


# ------------------------------------------------------------------ LESA binary term (lesa.txt Eq. 1-3, 5)

def _relative_vectors(table: nn.Module, grid: Sequence[int], height: int, width: int, sign: int) -> Tensor:
    """R[:, i, j] = r_{sign·(p_j − p_i)}, offsets clipped to the table's grid (Shaw et al.), (c, N, N).

    ``full``: one vector per 2-D offset, column (dy + H−1)·(2W−1) + (dx + W−1); ``factorized``: r_dy + r_dx."""
    max_dy, max_dx = grid[0] - 1, grid[1] - 1
    n = height * width
    channels = (table.table if table.kind == "full" else table.height).shape[0]
    out = torch.zeros(channels, n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            dy = max(-max_dy, min(max_dy, sign * (j // width - i // width)))
            dx = max(-max_dx, min(max_dx, sign * (j % width - i % width)))
            if table.kind == "full":
                out[:, i, j] = table.table[:, (dy + max_dy) * (2 * max_dx + 1) + dx + max_dx].double()
            else:
                out[:, i, j] = table.height[:, dy + max_dy].double() + table.width[:, dx + max_dx].double()
    return out


def _batch_norm(x: Tensor, bn: nn.BatchNorm2d) -> Tensor:
    """BN over dim 1 of (B, K, ...): batch statistics (biased) in training, running ones in eval."""
    dims = [0] + list(range(2, x.ndim))
    shape = [1, -1] + [1] * (x.ndim - 2)
    if bn.training or bn.running_var is None:
        mean = x.mean(dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dims, keepdim=True)
    else:
        mean, var = bn.running_mean.double().view(shape), bn.running_var.double().view(shape)
    out = (x - mean) / torch.sqrt(var + bn.eps)
    return out * bn.weight.double().view(shape) + bn.bias.double().view(shape) if bn.affine else out


def relative_attention_matrix(op: RelativeSelfAttention2d, v_shape, q: Tensor, k: Tensor) -> Tensor:
    """S(z)_ij = exp(z_ij) / Σ_j exp(z_ij) (Eq. 3) with z_ij = q_i·k_j + q_i·r^q_{p_j−p_i} + k_j·r^k_{p_i−p_j}
    (Eq. 1, plus the key term of [51]); with the logit BN each term is batch-normalised per head (Axial-DeepLab
    [51]) and unscaled, else the sum is scaled by 1/√d (Bello). ``drop_diagonal``: S_ii set to 0 (Eq. 2)."""
    height, width = q.shape[-2], q.shape[-1]
    qt, kt = tokens(q), tokens(k)
    b, n, c = qt.shape
    m = op.heads
    d = c // m
    qh, kh = qt.reshape(b, n, m, d), kt.reshape(b, n, m, d)
    terms = [torch.einsum("bime,bjme->bmij", qh, kh),
             torch.einsum("bime,eij->bmij", qh, _relative_vectors(op.rel_q, op.grid, height, width, +1))]
    if op.rel_k is not None:
        terms.append(torch.einsum("bjme,eij->bmij", kh, _relative_vectors(op.rel_k, op.grid, height, width, -1)))
    if op.logit_norm is None:
        z = sum(terms) / math.sqrt(d)
    else:
        z = _batch_norm(torch.cat(terms, 1), op.logit_norm).reshape(b, len(terms), m, n, n).sum(1)
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    a = e / e.sum(-1, keepdim=True)
    if op.drop_diagonal:
        a = a * (1 - torch.eye(n, dtype=torch.float64))
    return a


def relative_attention_forward(op: RelativeSelfAttention2d, v: Tensor, q: Tensor, k: Tensor) -> Tensor:
    """x_i = Σ_j S_ij v_j per head (lesa.txt Eq. 1)."""
    a = relative_attention_matrix(op, v.shape, q, k)
    return like(aggregate(per_channel(a, op.dim), tokens(v)), v.shape)


def _conv1x1(x: Tensor, conv: nn.Conv2d) -> Tensor:
    out = torch.einsum("oc,bchw->bohw", conv.weight.double()[:, :, 0, 0], x.double())
    return out if conv.bias is None else out + conv.bias.double().view(1, -1, 1, 1)


def lesa_forward(layer: nn.Module, x: Tensor) -> Tensor:
    """LESA (lesa.txt Eq. 5-7): x⁺ = m + ω ⊙ BN(Σ_j S_ij v_j), m = BN(x W_g^k W_1^1) (Eq. 6),
    ω = sigmoid(F(m ‖ binary)) (Eq. 7), F = ReLU→fc1→BN→ReLU→fc2→BN on the BN'd terms (§3.3, as documented)."""
    qkv = _batch_norm(_conv1x1(x, layer.qkv), layer.qkv_norm)
    att = layer.attention
    q, k, v = qkv[:, :att.qk_dim], qkv[:, att.qk_dim:2 * att.qk_dim], qkv[:, 2 * att.qk_dim:]
    binary = _batch_norm(relative_attention_forward(att, v, q, k), layer.binary_norm)
    if layer.unary is None:
        return binary
    grouped, point, unary_bn = layer.unary
    unary = _batch_norm(_conv1x1(group_conv_forward(grouped.weight, grouped.bias, grouped.groups, x), point), unary_bn)
    if layer.fusion is None:
        return unary + binary
    _, fc1, bn1, _, fc2, bn2 = layer.fusion
    hidden = torch.clamp(_batch_norm(_conv1x1(torch.clamp(torch.cat([unary, binary], 1), min=0), fc1), bn1), min=0)
    omega = torch.sigmoid(_batch_norm(_conv1x1(hidden, fc2), bn2))
    return unary + omega * binary


def attention_augmented_forward(aa: nn.Module, x: Tensor) -> Tensor:
    """Bello et al. 2019 (lesa.txt Table 6 "AA"): concat(conv3×3(x), W_o · MHA(q, k, v)) with 1×1 q, k, v."""
    qkv = _conv1x1(x, aa.qkv)
    q, k, v = qkv[:, :aa.key_dim], qkv[:, aa.key_dim:2 * aa.key_dim], qkv[:, 2 * aa.key_dim:]
    attended = relative_attention_forward(aa.attention, v, q, k)
    return torch.cat([group_conv_forward(aa.conv.weight, aa.conv.bias, 1, x), _conv1x1(attended, aa.proj)], 1)


# ------------------------------------------------------------------ local attention (Swin §3.2; SASA Eq. 3)

def _softmax_where(logits: Tensor, allowed: Tensor) -> Tensor:
    """exp(z_ij) / Σ_{j allowed} exp(z_ij) over allowed j, 0 elsewhere."""
    z = logits.masked_fill(~allowed, -math.inf)
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def window_attention_matrix(op: nn.Module, v_shape, q: Tensor, k: Tensor) -> Tensor:
    """Swin Eq. 4: A_m = softmax(Q_m K_mᵀ/√d + B_m) inside each w×w window, 0 across windows, (B, M, N, N).

    Documented choices (affinity/window.py): along an axis, position p is in window ⌊(p − s)/w⌋ (the cyclic
    shift s and its mask, in the original order); s = 0 on an axis that fits one padded window; padded keys
    take no weight; B_m[i, j] = table[(y_i − y_j + w − 1)(2w − 1) + x_i − x_j + w − 1, m]."""
    h, w = v_shape[2], v_shape[3]
    win = op.window
    shift_y = op.shift if math.ceil(h / win) * win > win else 0
    shift_x = op.shift if math.ceil(w / win) * win > win else 0
    s = attention_scores(q, k, op.heads)
    n = h * w
    allowed = torch.zeros(n, n, dtype=torch.bool)
    bias = torch.zeros(op.heads, n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            yi, xi, yj, xj = i // w, i % w, j // w, j % w
            allowed[i, j] = ((yi - shift_y) // win == (yj - shift_y) // win) and ((xi - shift_x) // win == (xj - shift_x) // win)
            if allowed[i, j] and op.rel_table is not None:
                bias[:, i, j] = op.rel_table[(yi - yj + win - 1) * (2 * win - 1) + xi - xj + win - 1].double()
    return _softmax_where(s + bias, allowed)


def neighbourhood_attention_matrix(op: nn.Module, v_shape, q: Tensor, k: Tensor) -> Tensor:
    """SASA Eq. 3: y_ij = Σ_{(a,b) ∈ N_k(i,j)} softmax_ab(q_ijᵀ k_ab + q_ijᵀ r_{a−i, b−j}) v_ab, (B, M, N, N).

    Documented choices (affinity/neighbourhood.py): r = (row embedding of a − i ‖ column embedding of b − j),
    d/2 channels each, per head; the neighbourhood is cut at the border; logits times ``scale`` (1: none)."""
    h, w = v_shape[2], v_shape[3]
    r = op.kernel_size // 2
    qt, kt = tokens(q), tokens(k)
    b, n, c = qt.shape
    m = op.heads
    d = c // m
    qh, kh = qt.reshape(b, n, m, d), kt.reshape(b, n, m, d)
    logits = torch.einsum("bime,bjme->bmij", qh, kh)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            dy, dx = j // w - i // w, j % w - i % w
            if abs(dy) <= r and abs(dx) <= r:
                allowed[i, j] = True
                if op.rel_rows is not None:
                    logits[:, :, i, j] += torch.einsum("bme,me->bm", qh[:, i, :, :d // 2], op.rel_rows[:, dy + r].double())
                    logits[:, :, i, j] += torch.einsum("bme,me->bm", qh[:, i, :, d // 2:], op.rel_cols[:, dx + r].double())
    return _softmax_where(logits * op.scale, allowed)


def axial_attention_matrix(op: nn.Module, v_shape, q: Tensor, k: Tensor) -> Tensor:
    """Ho et al. 2019 §3: A_m[i, j] = softmax_j(q_iᵀk_j/√d) over the j in i's row (``axis="row"``) or column."""
    w = v_shape[3]
    n = v_shape[2] * w
    line = [(i // w) if op.axis == "row" else (i % w) for i in range(n)]
    allowed = torch.tensor([[line[i] == line[j] for j in range(n)] for i in range(n)])
    return _softmax_where(attention_scores(q, k, op.heads), allowed)


def quadratic_encoding_matrix(op: nn.Module, v_shape, q=None, k=None) -> Tensor:
    """Cordonnier et al. 2020, Lemma 1: A_h[i, j] = exp(−α_h(‖δ − Δ_h‖² − ‖Δ_h‖²)) / Σ_δ' exp(...), δ = key − query,
    normalised over the zero-padded plane of offsets |δy| ≤ ry, |δx| ≤ rx (ry = H − 1 or support // 2, documented
    in affinity/conv_attention.py), then zero where the key is outside that reach; (1, M, N, N)."""
    h, w = v_shape[2], v_shape[3]
    ry, rx = (op.support // 2, op.support // 2) if op.support is not None else (h - 1, w - 1)
    alpha, centres = op.log_alpha.double().exp(), op.centres.double()

    def logit(m: int, dy: int, dx: int) -> Tensor:
        cy, cx = centres[m]
        return -alpha[m] * ((dy - cy) ** 2 + (dx - cx) ** 2 - cy ** 2 - cx ** 2)

    n = h * w
    a = torch.zeros(1, op.heads, n, n, dtype=torch.float64)
    for m in range(op.heads):
        norm = sum(torch.exp(logit(m, dy, dx)) for dy in range(-ry, ry + 1) for dx in range(-rx, rx + 1))
        for i in range(n):
            for j in range(n):
                dy, dx = j // w - i // w, j % w - i % w
                if abs(dy) <= ry and abs(dx) <= rx:
                    a[0, m, i, j] = torch.exp(logit(m, dy, dx)) / norm
    return a


def cross_shaped_window_matrix(op: nn.Module, v_shape, q: Tensor, k: Tensor) -> Tensor:
    """CSWin §3.2: heads 0..M/2−1 attend within horizontal stripes (⌊y/s⌋ equal), heads M/2..M−1 within vertical
    stripes (⌊x/s⌋ equal); softmax(q·k/√d) over the allowed keys, (B, M, N, N)."""
    w = v_shape[3]
    n = v_shape[2] * w
    allowed = torch.zeros(op.heads, n, n, dtype=torch.bool)
    for m in range(op.heads):
        for i in range(n):
            for j in range(n):
                if m < op.heads // 2:
                    allowed[m, i, j] = (i // w) // op.stripe == (j // w) // op.stripe
                else:
                    allowed[m, i, j] = (i % w) // op.stripe == (j % w) // op.stripe
    return _softmax_where(attention_scores(q, k, op.heads), allowed)


def shuffled_window_matrix(op: nn.Module, v_shape, q: Tensor, k: Tensor) -> Tensor:
    """Shuffle Transformer §3.2: query (y, x) attends to the keys (y', x') with y' ≡ y (mod H/w) and
    x' ≡ x (mod W/w) — its window after the spatial shuffle, (B, M, N, N)."""
    h, w = v_shape[2], v_shape[3]
    n = h * w
    ph, pw = h // op.window, w // op.window
    allowed = torch.tensor([[(i // w) % ph == (j // w) % ph and (i % w) % pw == (j % w) % pw for j in range(n)]
                            for i in range(n)])
    return _softmax_where(attention_scores(q, k, op.heads), allowed)


def pattern_keys(pattern: str, y: int, x: int, h: int, w: int) -> list[tuple[int, int]]:
    """The keys (a, b) query (y, x) may see under a sparse pattern ``term+term``, from the papers' definitions
    (Longformer §3.1: sliding window of k, dilated window, global tokens both ways; Sparse Transformers §4.2
    strided = row / column here; global<s>: tokens with y and x multiples of s, documented in affinity/masked.py)."""
    terms = [t.strip() for t in pattern.split("+")]

    def local(a: int, b: int) -> bool:
        for term in terms:
            if term == "row" and a == y or term == "column" and b == x:
                return True
            if term.startswith(("band", "dilated")):
                size, dil = (int(term[4:]), 1) if term.startswith("band") else map(int, term[7:].split("_"))
                r = size // 2
                if any((y + dil * i, x + dil * j) == (a, b) for i in range(-r, r + 1) for j in range(-r, r + 1)):
                    return True
        return False

    strides = [int(t[6:]) for t in terms if t.startswith("global")]

    def is_global(a: int, b: int) -> bool:
        return bool(strides) and a % strides[0] == 0 and b % strides[0] == 0

    return [(a, b) for a in range(h) for b in range(w) if is_global(y, x) or is_global(a, b) or local(a, b)]


def masked_attention_matrix(op: nn.Module, v_shape, q: Tensor, k: Tensor) -> Tensor:
    """softmax(q·k/√d) over the keys :func:`pattern_keys` allows, 0 elsewhere, (B, M, N, N)."""
    h, w = v_shape[2], v_shape[3]
    n = h * w
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for a, b in pattern_keys(str(op.pattern), i // w, i % w, h, w):
            allowed[i, a * w + b] = True
    return _softmax_where(attention_scores(q, k, op.heads), allowed)


def _chain_channels(op: nn.Module, v_shape, q=None, k=None) -> Tensor:
    """chain(a, b): apply a then b, A_c = A_b,c · A_a,c per channel (matrix product over tokens)."""
    parts = []
    for part in (op.first, op.second):
        ref = reference_for(part)
        if ref.channel_matrix is None:
            raise AssertionError(f"the chain reference needs spatial (N×N) parts, got {type(part).__name__}")
        parts.append(ref.channel_matrix(part, v_shape, q, k) if part.dynamic else ref.channel_matrix(part, v_shape))
    return torch.einsum("bcij,bcjl->bcil", *torch.broadcast_tensors(parts[1], parts[0]))


def _chain_forward(op: nn.Module, v, q=None, k=None) -> Tensor:
    out = like(aggregate(_chain_channels(op, v.shape, q, k), tokens(v)), v.shape)
    bias = reference_for(op.second).bias(op.second)
    return out if bias is None else out + (bias.double().view(1, -1, 1, 1) if v.ndim == 4 else bias.double())


def _attention_forward(matrix_fn):
    def forward(op, v, q=None, k=None):
        return like(aggregate(per_channel(matrix_fn(op, v.shape, q, k), op.dim), tokens(v)), v.shape)
    return forward


# ------------------------------------------------------------------ dynamic convolutions (ViT-as-DynConv Table 1: [4], [11])

def pooled_mlp(gen: nn.Module, q: Tensor) -> Tensor:
    """fc2(ReLU(BN(fc1(m)))), m[b, c] = Σ_{y, x} q[b, c, y, x] / (H·W): global average pooling then two layers
    (Chen et al. Fig. 3; Han et al.'s generator adds the BatchNorm, by hand here: batch statistics in training)."""
    m = q.double().sum((2, 3)) / (q.shape[2] * q.shape[3])
    hidden = torch.einsum("jc,bc->bj", gen.fc1.weight.double(), m)
    if gen.fc1.bias is not None:
        hidden = hidden + gen.fc1.bias.double()
    if isinstance(gen.norm, nn.BatchNorm1d):
        hidden = _batch_norm(hidden, gen.norm)
    return torch.einsum("oj,bj->bo", gen.fc2.weight.double(), torch.clamp(hidden, min=0)) + gen.fc2.bias.double()


def dynamic_conv_kernels(op: DynamicConvAffinity, q: Tensor) -> Tensor:
    """W̃_b = Σ_k π_bk W_k, π_b = exp(z_b / τ) / Σ_k exp(z_bk / τ), z = the attention branch (Chen et al. Eq. 1-3):
    (B, C_out, C_in, k, k), one kernel per image."""
    z = pooled_mlp(op.attention, q) / op.temperature
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    return torch.einsum("bk,koihw->boihw", e / e.sum(-1, keepdim=True), op.bank.double())


def dynamic_conv_forward(op: DynamicConvAffinity, v: Tensor, q: Optional[Tensor] = None, k=None) -> Tensor:
    """o[b] = W̃_b ⋆ v[b] + bias: every image through the (loop) convolution reference with its own kernels."""
    kernels = dynamic_conv_kernels(op, v if q is None else q)
    return torch.cat([group_conv_forward(kernels[i], op.bias, 1, v[i:i + 1]) for i in range(v.shape[0])])


def dynamic_conv_matrix(op: DynamicConvAffinity, v_shape, q: Tensor, k=None) -> Tensor:
    """(B, 1, N·C, N·C), index n·C + c: column (n', i) of image b is the response of W̃_b ⋆ to a unit impulse at
    position n', channel i (A is linear in V, so its columns are impulse responses; no Toeplitz indexing here)."""
    kernels = dynamic_conv_kernels(op, q)
    b, c, h, w = v_shape
    size = h * w * c
    impulses = torch.einsum("jhwc->jchw", torch.eye(size, dtype=torch.float64).reshape(size, h, w, c))
    cols = [group_conv_forward(kernels[i], None, 1, impulses) for i in range(b)]  # (N·C_in, C_out, H, W)
    return torch.stack([torch.einsum("jchw->hwcj", col).reshape(size, size) for col in cols]).unsqueeze(1)


def dynamic_dw_kernels(op: DynamicDepthwiseConv, q: Tensor) -> Tensor:
    """Ker_b[c, ky, kx] = generator output c·k² + ky·k + kx (the layout documented by the operator): (B, C, k, k)."""
    size = op.kernel_size
    return pooled_mlp(op.generator, q).reshape(q.shape[0], op.dim, size, size)


def _depthwise_with(kernels: Tensor, v: Tensor) -> Tensor:
    """o[b, c, y, x] = Σ_{ky, kx} kernels[c, ky, kx] v[b, c, y + ky − k//2, x + kx − k//2], zero padding."""
    size = kernels.shape[-1]
    vp = _padded(v, size // 2)
    out = torch.zeros(v.shape, dtype=torch.float64)
    for ky in range(size):
        for kx in range(size):
            out = out + kernels[None, :, ky, kx, None, None] * vp[:, :, ky:ky + v.shape[2], kx:kx + v.shape[3]]
    return out


def dynamic_dw_forward(op: DynamicDepthwiseConv, v: Tensor, q: Optional[Tensor] = None, k=None) -> Tensor:
    """o[b] = Ker_b ⋆ v[b] (depth-wise) + bias (Han et al.'s dynamic depth-wise convolution)."""
    kernels = dynamic_dw_kernels(op, v if q is None else q)
    out = torch.cat([_depthwise_with(kernels[i], v[i:i + 1]) for i in range(v.shape[0])])
    return out + (0 if op.bias is None else op.bias.double().view(1, -1, 1, 1))


def dynamic_dw_matrix(op: DynamicDepthwiseConv, v_shape, q: Tensor, k=None) -> Tensor:
    """(B, C, N, N): column n' of channel c is the response of Ker_b ⋆ to a unit impulse at position n'."""
    kernels = dynamic_dw_kernels(op, q)
    b, c, h, w = v_shape
    n = h * w
    impulses = torch.eye(n, dtype=torch.float64).reshape(n, 1, h, w).expand(n, c, h, w)
    return torch.stack([_depthwise_with(kernels[i], impulses).reshape(n, c, n).permute(1, 2, 0) for i in range(b)])


# ------------------------------------------------------------------ the mixture (Container Eq. 9)

def mixture_gates(op: AffinityMixture) -> tuple[Tensor, Tensor]:
    """convex: α = 1 / (1 + exp(−w)), β = 1 − α (official release); per_head: the same with one w per head of the
    mixture (ConViT's GPSA, λ_h = −w_h); free: α, β as learned (Eq. 9)."""
    if op.gate in ("convex", "per_head"):
        alpha = 1 / (1 + torch.exp(-op.gate_logit.double()))
        return alpha, 1 - alpha
    return op.alpha.double(), op.beta.double()


@dataclass(frozen=True)
class Reference:
    """An operator's independent reference: forward(op, v, q, k) and matrix(op, v_shape, q, k) in the
    operator's contract shape, plus channel_matrix(op, v_shape, q, k) (B or 1, C, N, N) for spatial ones."""
    forward: Callable
    matrix: Callable
    bias: Callable = lambda op: None
    channel_matrix: Optional[Callable] = None


def _channels_of(matrix_fn):
    return lambda op, v_shape, q=None, k=None: per_channel(matrix_fn(op, v_shape, q, k), op.dim)


def _mixture_channels(op: AffinityMixture, v_shape, q=None, k=None) -> Tensor:
    alpha, beta = mixture_gates(op)
    parts = []
    for part, inputs in ((op.dynamic_affinity, (q, k)), (op.static_affinity, (None, None))):
        ref = reference_for(part)
        if ref.channel_matrix is None:
            raise AssertionError(f"the mixture reference needs a spatial (N×N) part, got {type(part).__name__}")
        parts.append(ref.channel_matrix(part, v_shape, *inputs))
    alpha, beta = (_gate_channels(w, op.dim).view(-1, 1, 1) for w in (alpha, beta))
    return alpha * parts[0] + beta * parts[1]


def _mixture_bias(op: AffinityMixture) -> Optional[Tensor]:
    alpha, beta = mixture_gates(op)
    biases = [(w, reference_for(p).bias(p)) for w, p in ((alpha, op.dynamic_affinity), (beta, op.static_affinity))]
    terms = [_gate_channels(w, op.dim) * b.double() for w, b in biases if b is not None]
    return sum(terms) if terms else None


def _mixture_forward(op: AffinityMixture, v, q=None, k=None) -> Tensor:
    out = like(aggregate(_mixture_channels(op, v.shape, q, k), tokens(v)), v.shape)
    bias = _mixture_bias(op)
    return out if bias is None else out + (bias.view(1, -1, 1, 1) if v.ndim == 4 else bias)


def _mixture_matrix(op: AffinityMixture, v_shape, q=None, k=None) -> Tensor:
    """α·A_dyn + β·A_static at the operator's head grouping: the first channel of each of its heads."""
    return _mixture_channels(op, v_shape, q, k)[:, ::op.dim // op.heads]


_SA = Reference(lambda op, v, q=None, k=None: sa_forward(op, v, q, k),
                lambda op, v_shape, q=None, k=None: sa_matrix(op, v_shape, q, k))
_DW = Reference(lambda op, v, q=None, k=None: depthwise_forward(op, v),
                lambda op, v_shape, q=None, k=None: depthwise_matrix(op, v_shape), bias=lambda op: op.bias)
_MLP = Reference(lambda op, v, q=None, k=None: token_mlp_forward(op, v),
                 lambda op, v_shape, q=None, k=None: token_mlp_matrix(op, v_shape))
REFERENCES: dict[type, Reference] = {
    SelfAttentionAffinity: Reference(_SA.forward, _SA.matrix, channel_matrix=_channels_of(_SA.matrix)),
    DepthwiseConvAffinity: Reference(_DW.forward, _DW.matrix, _DW.bias, _channels_of(_DW.matrix)),
    TokenMlpAffinity: Reference(_MLP.forward, _MLP.matrix, channel_matrix=_channels_of(_MLP.matrix)),
    GroupConvAffinity: Reference(
        lambda op, v, q=None, k=None: group_conv_forward(op.conv.weight, op.conv.bias, op.heads, v),
        lambda op, v_shape, q=None, k=None: group_conv_matrix(op, v_shape), bias=lambda op: op.conv.bias),
    KeyOnlyAttention: Reference(key_only_forward, key_only_matrix, bias=lambda op: op.u1.bias),
    DepthwiseSelfAttention: Reference(lambda op, v, q=None, k=None: dw_sa_forward(op, v, q),
                                      lambda op, v_shape, q=None, k=None: dw_sa_matrix(op, v_shape, q),
                                      channel_matrix=lambda op, v_shape, q=None, k=None: dw_sa_matrix(op, v_shape, q)),
    AffinityMixture: Reference(_mixture_forward, _mixture_matrix, _mixture_bias, _mixture_channels),
    RelativeSelfAttention2d: Reference(relative_attention_forward, relative_attention_matrix,
                                       channel_matrix=_channels_of(relative_attention_matrix)),
}
for _cls, _matrix in ((WindowAttention, window_attention_matrix),
                      (NeighbourhoodAttention, neighbourhood_attention_matrix),
                      (AxialAttention, axial_attention_matrix),
                      (QuadraticEncodingAttention, quadratic_encoding_matrix),
                      (CrossShapedWindowAttention, cross_shaped_window_matrix),
                      (ShuffledWindowAttention, shuffled_window_matrix),
                      (MaskedAttention, masked_attention_matrix)):
    REFERENCES[_cls] = Reference(_attention_forward(_matrix), _matrix, channel_matrix=_channels_of(_matrix))
REFERENCES[AffinityChain] = Reference(
    _chain_forward, lambda op, v_shape, q=None, k=None: _chain_channels(op, v_shape, q, k)[:, ::op.dim // op.heads],
    bias=lambda op: reference_for(op.second).bias(op.second), channel_matrix=_chain_channels)
REFERENCES[DynamicConvAffinity] = Reference(dynamic_conv_forward, dynamic_conv_matrix, bias=lambda op: op.bias)
REFERENCES[DynamicDepthwiseConv] = Reference(dynamic_dw_forward, dynamic_dw_matrix, bias=lambda op: op.bias,
                                             channel_matrix=dynamic_dw_matrix)


# ------------------------------------------------------------------ how A is generated, part 2 (issue 18): Linformer,
# Performer, spatial reduction (PVT, Twins GSA, PVTv2), pooling attention (MViT), the lambda layer

def _per_head(x: Tensor, heads: int) -> Tensor:
    """(B, C, H, W) or (B, N, C) -> (B, N, M, d) float64, channel m·d + e."""
    t = tokens(x)
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads)


def _linformer_projections(op: nn.Module) -> tuple[Tensor, Tensor]:
    """(E_m, F_m) for every head, (M, k, N): stored (heads or 1, k, N); sharing "kv" stores E only (F = E)."""
    e = op.e.double()
    f = e if op.f is None else op.f.double()
    return e.expand(op.heads, -1, -1), f.expand(op.heads, -1, -1)


def _linformer_weights(op: nn.Module, q: Tensor, k: Tensor) -> Tensor:
    """P_m[i, r] = softmax_r(Σ_e q[i, m·d+e] (Σ_n E_m[r, n] k[n, m·d+e]) / √d), (B, M, N, k) (Linformer Eq. 7)."""
    qh, kh = _per_head(q, op.heads), _per_head(k, op.heads)
    e, _ = _linformer_projections(op)
    projected_keys = torch.einsum("mrn,bnme->bmre", e, kh)
    return normalise(torch.einsum("bime,bmre->bmir", qh, projected_keys) / math.sqrt(qh.shape[-1]), "softmax")


def linformer_matrix(op: nn.Module, v_shape, q: Tensor, k: Tensor) -> Tensor:
    """A_m[i, j] = Σ_r P_m[i, r] F_m[r, j], (B, M, N, N) of rank ≤ k."""
    _, f = _linformer_projections(op)
    return torch.einsum("bmir,mrj->bmij", _linformer_weights(op, q, k), f)


def linformer_forward(op: nn.Module, v: Tensor, q: Tensor, k: Tensor) -> Tensor:
    """head_m = P_m · (F_m V_m): the values projected to k rows first (Eq. 7), not through the N×N matrix."""
    _, f = _linformer_projections(op)
    projected_values = torch.einsum("mrn,bnme->bmre", f, _per_head(v, op.heads))
    out = torch.einsum("bmir,bmre->bime", _linformer_weights(op, q, k), projected_values)
    return like(out.reshape(out.shape[0], out.shape[1], -1), v.shape)


def performer_features(op: nn.Module, x: Tensor) -> Tensor:
    """Lemma 1's positive random features φ(x)_f = exp(ω_f·x' − ‖x'‖²/2) / √m, x' = x / d^{1/4}, with the
    operator's features ω (its buffer, m×d), per head: (B, M, N, m)."""
    xh = _per_head(x, op.heads)
    xh = xh / xh.shape[-1] ** 0.25
    omega = op.omega.double()
    logits = torch.einsum("bnme,fe->bmnf", xh, omega) - torch.einsum("bnme,bnme->bmn", xh, xh)[..., None] / 2
    return torch.exp(logits) / math.sqrt(omega.shape[0])


def performer_matrix(op: nn.Module, v_shape, q: Tensor, k: Tensor) -> Tensor:
    """FAVOR+ (Eq. 4-5): A = D⁻¹ φ(Q')φ(K')ᵀ, D = diag(φ(Q')φ(K')ᵀ 1), (B, M, N, N)."""
    kernel = torch.einsum("bmif,bmjf->bmij", performer_features(op, q), performer_features(op, k))
    return kernel / kernel.sum(-1, keepdim=True)


def _taps(in_hw: tuple[int, int], out_hw: tuple[int, int], size: int, stride: int, pad: int) -> list:
    """(output index, input index, ky, kx) of every tap of a strided cross-correlation that lands in the input:
    output (Y, X) reads input (Y·s − p + ky, X·s − p + kx)."""
    (h, w), (ho, wo) = in_hw, out_hw
    found = []
    for oy in range(ho):
        for ox in range(wo):
            for ky in range(size):
                for kx in range(size):
                    y, x = oy * stride - pad + ky, ox * stride - pad + kx
                    if 0 <= y < h and 0 <= x < w:
                        found.append((oy * wo + ox, y * w + x, ky, kx))
    return found


def _pool_bins(length: int, size: int) -> list[tuple[int, int]]:
    """Adaptive average pooling's bins: [⌊i·L/size⌋, ⌈(i+1)·L/size⌉) for i < size."""
    return [((i * length) // size, -(-((i + 1) * length) // size)) for i in range(size)]


def _layer_norm_last(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """(x − mean) / √(var + eps) · g (+ β) over the last axis, biased variance."""
    mean = x.sum(-1, keepdim=True) / x.shape[-1]
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / x.shape[-1]
    out = (x - mean) / torch.sqrt(var + LAYER_NORM_EPS) * weight.double()
    return out if bias is None else out + bias.double()


def _sra_grid(op: nn.Module, h: int, w: int) -> tuple[int, int]:
    """The reduced grid: ⌈H/R⌉ × ⌈W/R⌉ (zero-padded bottom/right, documented) or P × P (pooled)."""
    return (-(-h // op.ratio), -(-w // op.ratio)) if op.reduction == "conv" else (op.pooled, op.pooled)


def _sra_reduction_weights(op: nn.Module, h: int, w: int) -> list:
    """R as (reduced index, input index, weight): weight a (C, C) block W[:, :, ky, kx] (conv) or a scalar
    1/|bin| (pooled)."""
    reduced = _sra_grid(op, h, w)
    if op.reduction == "conv":
        weight = op.reduce.weight.double()
        return [(r, i, weight[:, :, ky, kx]) for r, i, ky, kx in _taps((h, w), reduced, op.ratio, op.ratio, 0)]
    found = []
    for a, (y0, y1) in enumerate(_pool_bins(h, op.pooled)):
        for b, (x0, x1) in enumerate(_pool_bins(w, op.pooled)):
            share = 1.0 / ((y1 - y0) * (x1 - x0))
            found += [(a * op.pooled + b, y * w + x, share) for y in range(y0, y1) for x in range(x0, x1)]
    return found


def _sra_reduce(op: nn.Module, x: Tensor) -> Tensor:
    """PVT's SR(x) (Eq. 4) as documented: (B, N_r, C) = Σ_taps x_i W[:, :, ky, kx]ᵀ + b, or bin averages."""
    h, w = x.shape[2], x.shape[3]
    xt = tokens(x)
    reduced = _sra_grid(op, h, w)
    out = torch.zeros(xt.shape[0], reduced[0] * reduced[1], xt.shape[2], dtype=torch.float64)
    for r, i, weight in _sra_reduction_weights(op, h, w):
        out[:, r] += xt[:, i] @ weight.T if op.reduction == "conv" else weight * xt[:, i]
    return out + op.reduce.bias.double() if op.reduction == "conv" else out


def _sra_scores(op: nn.Module, q: Tensor, k: Tensor) -> Tensor:
    """softmax_r(q_n · LN(SR(K))_r / √d) per head, (B, M, N, N_r); the key LayerNorm has a weight only."""
    keys = _layer_norm_last(_sra_reduce(op, k), op.key_norm.weight, None)
    qh = _per_head(q, op.heads)
    kh = keys.reshape(keys.shape[0], keys.shape[1], op.heads, -1)
    return normalise(torch.einsum("bnme,brme->bmnr", qh, kh) / math.sqrt(qh.shape[-1]), "softmax")


def sra_forward(op: nn.Module, v: Tensor, q: Tensor, k: Tensor) -> Tensor:
    """PVT Eq. 3: head_m = softmax(Q_m SR(K)_mᵀ/√d) SR(V)_m, with the reduced values (and the conv bias) formed first."""
    s = _sra_scores(op, q, k)
    values = _sra_reduce(op, v)
    vh = values.reshape(values.shape[0], values.shape[1], op.heads, -1)
    out = torch.einsum("bmnr,brme->bnme", s, vh)
    return like(out.reshape(out.shape[0], out.shape[1], -1), v.shape)


def sra_matrix(op: nn.Module, v_shape, q: Tensor, k: Tensor) -> Tensor:
    """A = softmax(Q K_rᵀ/√d) · R: (B, M, N, N) for pooling; for the conv over (position, channel) pairs,
    (B, 1, N·C, N·C) with A[(n, o), (i, c)] = Σ_{taps r ← i} S_{h(o)}[n, r] W[o, c, ky, kx]."""
    h, w = v_shape[2], v_shape[3]
    s = _sra_scores(op, q, k)
    b, n = s.shape[0], h * w
    if op.reduction == "pool":
        a = torch.zeros(b, op.heads, n, n, dtype=torch.float64)
        for r, i, share in _sra_reduction_weights(op, h, w):
            a[..., i] += share * s[..., r]
        return a
    c = op.dim
    s_channels = per_channel(s, c)  # (B, C, N, N_r)
    a = torch.zeros(b, n, c, n, c, dtype=torch.float64)
    for r, i, weight in _sra_reduction_weights(op, h, w):
        a[:, :, :, i, :] += torch.einsum("bon,oc->bnoc", s_channels[..., r], weight)
    return a.reshape(b, 1, n * c, n * c)


def _mvit_grid(op: nn.Module, h: int, w: int, stride: int) -> tuple[int, int]:
    p = op.kernel_size // 2
    return (h + 2 * p - op.kernel_size) // stride + 1, (w + 2 * p - op.kernel_size) // stride + 1


def _mvit_pool(op: nn.Module, x: Tensor, kernel: Tensor, stride: int, norm: Optional[nn.Module]) -> Tensor:
    """MViT §3.1 P(x; Θ) then LayerNorm: channel-wise k×k pooling, stride s, padding ⌊k/2⌋, head channel e
    using kernel[e] in every head; (B, M, N_out, d)."""
    h, w = x.shape[2], x.shape[3]
    xh = _per_head(x, op.heads)
    grid = _mvit_grid(op, h, w, stride)
    out = torch.zeros(xh.shape[0], op.heads, grid[0] * grid[1], xh.shape[-1], dtype=torch.float64)
    weights = kernel.double()[:, 0]
    for o, i, ky, kx in _taps((h, w), grid, op.kernel_size, stride, op.kernel_size // 2):
        out[:, :, o] += xh[:, i] * weights[:, ky, kx]
    return out if norm is None else _layer_norm_last(out, norm.weight, norm.bias)


def _mvit_scores(op: nn.Module, q: Tensor, k: Tensor) -> Tensor:
    qp = _mvit_pool(op, q, op.pool_q, op.q_stride, op.norm_q)
    kp = _mvit_pool(op, k, op.pool_k, op.kv_stride, op.norm_k)
    return normalise(torch.einsum("bmoe,bmre->bmor", qp, kp) / math.sqrt(qp.shape[-1]), "softmax")


def pool_attention_forward(op: nn.Module, v: Tensor, q: Tensor, k: Tensor) -> Tensor:
    """softmax(Q̂ K̂ᵀ/√d) V̂ with V̂ = P(V; Θ_V) pooled first; (B, C, H_out, W_out) on the query's pooled grid."""
    out = torch.einsum("bmor,bmre->bome", _mvit_scores(op, q, k), _mvit_pool(op, v, op.pool_v, op.kv_stride, None))
    b, c = v.shape[0], v.shape[1]
    return like(out.reshape(b, out.shape[1], c), (b, c, *_mvit_grid(op, v.shape[2], v.shape[3], op.q_stride)))


def pool_attention_matrix(op: nn.Module, v_shape, q: Tensor, k: Tensor) -> Tensor:
    """A_c[o, i] = Σ_{taps r ← i} S_{h(c)}[o, r] K_V[e(c), ky, kx], per channel c = h·d + e: (B, C, N_out, N_in)."""
    h, w = v_shape[2], v_shape[3]
    s = _mvit_scores(op, q, k)
    kernel = op.pool_v.double()[:, 0]
    d = kernel.shape[0]
    a = torch.zeros(s.shape[0], op.heads, d, s.shape[2], h * w, dtype=torch.float64)
    for r, i, ky, kx in _taps((h, w), _mvit_grid(op, h, w, op.kv_stride), op.kernel_size, op.kv_stride,
                              op.kernel_size // 2):
        a[..., i] += s[:, :, None, :, r] * kernel[None, None, :, ky, kx, None]
    return a.reshape(s.shape[0], op.heads * d, s.shape[2], h * w)


def _lambda_terms(op: nn.Module, v_shape, k: Tensor) -> tuple[Tensor, Tensor]:
    """k̄ (B, N, M, d): keys softmax-normalised over positions per channel; e (N, N, d): e_{p_n − p_m} inside the
    r×r context, 0 outside (LambdaNetworks Eq. 1-2, §4.2)."""
    h, w = v_shape[2], v_shape[3]
    kt = tokens(k)
    ex = torch.exp(kt - kt.max(1, keepdim=True).values)
    k_bar = (ex / ex.sum(1, keepdim=True)).reshape(kt.shape[0], kt.shape[1], op.heads, -1)
    radius = op.context // 2
    table = op.embedding.double()
    rel = torch.zeros(h * w, h * w, table.shape[-1], dtype=torch.float64)
    for n in range(h * w):
        for m in range(h * w):
            dy, dx = n // w - m // w, n % w - m % w
            if abs(dy) <= radius and abs(dx) <= radius:
                rel[n, m] = table[dy + radius, dx + radius]
    return k_bar, rel


def lambda_matrix(op: nn.Module, v_shape, q: Tensor, k: Tensor) -> Tensor:
    """A_h[n, m] = q_n^h · (k̄_m^h + e_{n−m}), (B, M, N, N)."""
    k_bar, rel = _lambda_terms(op, v_shape, k)
    qh = _per_head(q, op.heads)
    return torch.einsum("bnme,bjme->bmnj", qh, k_bar) + torch.einsum("bnme,nje->bmnj", qh, rel)


def lambda_forward(op: nn.Module, v: Tensor, q: Tensor, k: Tensor) -> Tensor:
    """The lambda form: λ^c = K̄ᵀV and λ^p_n = Σ_m e_{n−m} v_mᵀ (d×d per head), then y_n = (λ^c + λ^p_n)ᵀ q_n."""
    k_bar, rel = _lambda_terms(op, v.shape, k)
    qh, vh = _per_head(q, op.heads), _per_head(v, op.heads)
    content = torch.einsum("bjmk,bjme->bmke", k_bar, vh)  # λ^c: (B, M, d_k, d_v)
    out = torch.zeros_like(qh)
    for n in range(qh.shape[1]):
        position = torch.einsum("jk,bjme->bmke", rel[n], vh)  # λ^p_n
        out[:, n] = torch.einsum("bmk,bmke->bme", qh[:, n], content + position)
    return like(out.reshape(out.shape[0], out.shape[1], -1), v.shape)


def _sra_channels(op: nn.Module, v_shape, q=None, k=None) -> Tensor:
    if op.reduction == "conv":
        raise AssertionError("spatial reduction by a conv mixes channels: it has no per-channel N×N matrix")
    return per_channel(sra_matrix(op, v_shape, q, k), op.dim)


REFERENCES.update({
    LinformerAttention: Reference(linformer_forward, linformer_matrix, channel_matrix=_channels_of(linformer_matrix)),
    PerformerAttention: Reference(_attention_forward(performer_matrix), performer_matrix,
                                  channel_matrix=_channels_of(performer_matrix)),
    SpatialReductionAttention: Reference(sra_forward, sra_matrix, channel_matrix=_sra_channels,
                                         bias=lambda op: op.reduce.bias if op.reduction == "conv" else None),
    PoolingAttention: Reference(pool_attention_forward, pool_attention_matrix, channel_matrix=pool_attention_matrix),
    LambdaLayer: Reference(lambda_forward, lambda_matrix, channel_matrix=_channels_of(lambda_matrix)),
})


# ------------------------------------------------------------------ how A is generated, part 2 (issue 18), second half:
# global vectors (Fastformer, MobileViTv2), outlook (VOLO), DNL, ConViT's positional attention, pre-softmax bias
# (CoAtNet, LeViT), head mixing (DeepViT, CaiT), CvT's convolutional projection

def _token_heads(x: Tensor, heads: int) -> Tensor:
    """(B, C, H, W) or (B, N, C) as (B, N, M, d) float64 tokens, channel m·d + e."""
    t = tokens(x)
    return t.reshape(t.shape[0], t.shape[1], heads, t.shape[2] // heads)


def _pooled(weights: Tensor, x: Tensor) -> Tensor:
    """Σ_n weights[b, m, n] x[b, n, m, e] -> (B, M, d)."""
    return torch.einsum("bmn,bnme->bme", weights, x)


def additive_gains(op: AdditiveAttention, q: Tensor, k: Tensor) -> Tensor:
    """Fastformer §3.2 per head (d = C/M): α_i = softmax_i(w_q·q_i/√d), Q = Σ_i α_i q_i; p_i = Q ⊙ k_i,
    β_i = softmax_i(w_k·p_i/√d), g = Σ_i β_i p_i. Returns g per channel, (B, C)."""
    qh, kh = _token_heads(q, op.attn_heads), _token_heads(k, op.attn_heads)
    d = qh.shape[-1]
    alpha = normalise(torch.einsum("bnme,me->bmn", qh, op.query_vector.double()) / math.sqrt(d), "softmax")
    p = kh * _pooled(alpha, qh)[:, None]
    beta = normalise(torch.einsum("bnme,me->bmn", p, op.key_vector.double()) / math.sqrt(d), "softmax")
    return _pooled(beta, p).reshape(qh.shape[0], -1)


def additive_matrix(op: AdditiveAttention, v_shape, q: Tensor, k: Tensor) -> Tensor:
    """u_i = g ⊙ v_i: A_c[i, j] = g_c if i == j else 0, (B, C, N, N)."""
    n = token_count(v_shape)
    return torch.einsum("bc,ij->bcij", additive_gains(op, q, k), torch.eye(n, dtype=torch.float64))


def additive_forward(op: AdditiveAttention, v: Tensor, q: Tensor, k: Tensor) -> Tensor:
    return like(tokens(v) * additive_gains(op, q, k)[:, None, :], v.shape)


def separable_scores(op: SeparableSelfAttention, s: Tensor) -> Tensor:
    """MobileViTv2 §3.2: cs_j = softmax_j(w_I·s_j) per head (no scale), per channel h(c): (B, C, N)."""
    sh = _token_heads(s, op.attn_heads)
    scores = normalise(torch.einsum("bnme,me->bmn", sh, op.saliency.double()), "softmax")
    return scores[:, head_of_channel(op.dim, op.attn_heads)]


def separable_matrix(op: SeparableSelfAttention, v_shape, q: Tensor, k: Tensor) -> Tensor:
    """A_c[i, j] = max(q_i[c], 0) · cs_j (slots: v = the paper's K, q = the paper's V, k = the saliency input)."""
    return torch.einsum("bic,bcj->bcij", torch.clamp(tokens(q), min=0), separable_scores(op, k))


def separable_forward(op: SeparableSelfAttention, v: Tensor, q: Tensor, k: Tensor) -> Tensor:
    """y_i = ReLU(q_i) ⊙ c_v, c_v[c] = Σ_j cs_j v_j[c] (the context vector of the keys in v)."""
    context = torch.einsum("bcj,bjc->bc", separable_scores(op, k), tokens(v))
    return like(torch.clamp(tokens(q), min=0) * context[:, None, :], v.shape)


def outlook_matrix(op: OutlookAttention, v_shape, q: Tensor, k=None) -> Tensor:
    """VOLO §3.1, stride 1: window centre c gets weights softmax_{a'}((W_A q_c + b_A)[m, a, a'] / √d) over its K×K
    slots (slot a = (ay, ax) at c + (ay − K//2, ax − K//2)); slot a's output Σ_{a'} w[a, a'] v[slot a'] is folded back
    to slot a's position and the windows' outputs summed. Padded slots hold zeros. Loops over centres and slot pairs."""
    h, w = v_shape[2], v_shape[3]
    size, r, n = op.kernel_size, op.kernel_size // 2, h * w
    qt = tokens(q)
    logits = torch.einsum("oc,bnc->bno", op.generator.weight.double(), qt) + op.generator.bias.double()
    logits = logits.reshape(qt.shape[0], n, op.heads, size * size, size * size) / math.sqrt(op.dim // op.heads)
    weights = normalise(logits, "softmax")
    a = torch.zeros(qt.shape[0], op.heads, n, n, dtype=torch.float64)
    for cy in range(h):
        for cx in range(w):
            slots = [(cy + ay - r, cx + ax - r) for ay in range(size) for ax in range(size)]
            for s1, (y1, x1) in enumerate(slots):
                for s2, (y2, x2) in enumerate(slots):
                    if 0 <= y1 < h and 0 <= x1 < w and 0 <= y2 < h and 0 <= x2 < w:
                        a[:, :, y1 * w + x1, y2 * w + x2] += weights[:, cy * w + cx, :, s1, s2]
    return a


def dnl_matrix(op: DisentangledNonLocal, v_shape, q: Tensor, k: Tensor) -> Tensor:
    """DNL §3: softmax_j((q_i − μ_q)·(k_j − μ_k)/√d) + softmax_j(w_m·k_j), μ the means over positions, per head."""
    qh, kh = _token_heads(q, op.heads), _token_heads(k, op.heads)
    n, d = qh.shape[1], qh.shape[-1]
    qw, kw = qh - qh.sum(1, keepdim=True) / n, kh - kh.sum(1, keepdim=True) / n
    pairwise = normalise(torch.einsum("bime,bjme->bmij", qw, kw) / math.sqrt(d), "softmax")
    unary = normalise(torch.einsum("bjme,me->bmj", kh, op.unary.double()), "softmax")
    return pairwise + unary[:, :, None, :]


def positional_matrix(op: PositionalAttention, v_shape, q=None, k=None) -> Tensor:
    """ConViT: A_h[i, j] = exp(v_h·r_ij) / Σ_j' exp(v_h·r_ij'), r_ij = (δx, δy, δx² + δy²), δ = key − query, over the
    image's keys; the 2-D softmax over all N keys written out (no factorisation), (1, M, N, N)."""
    h, w = v_shape[2], v_shape[3]
    n = h * w
    r = torch.tensor([[[j % w - i % w, j // w - i // w, (j % w - i % w) ** 2 + (j // w - i // w) ** 2]
                       for j in range(n)] for i in range(n)], dtype=torch.float64)
    return normalise(torch.einsum("ijt,mt->mij", r, op.weight.double()), "softmax").unsqueeze(0)


def relative_bias_matrix(op: RelativeBiasAttention, v_shape, q: Tensor, k: Tensor) -> Tensor:
    """CoAtNet Eq. 3 / LeViT: norm(QKᵀ/√d + B), B_h[i, j] = w_h[y_i − y_j, x_i − x_j] of a (2H−1)×(2W−1) table, offsets
    clipped to it (Shaw et al.), or w_h[|y_i − y_j|, |x_i − x_j|] of an H×W table (``symmetric``, LeViT)."""
    h, w = v_shape[2], v_shape[3]
    gh, gw = op.grid
    n = h * w
    bias = torch.zeros(op.heads, n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            dy, dx = i // w - j // w, i % w - j % w
            if op.symmetric:
                iy, ix = min(abs(dy), gh - 1), min(abs(dx), gw - 1)
            else:
                iy, ix = max(1 - gh, min(gh - 1, dy)) + gh - 1, max(1 - gw, min(gw - 1, dx)) + gw - 1
            bias[:, i, j] = op.table[:, iy, ix].double()
    return normalise(attention_scores(q, k, op.heads) + bias, normaliser_name(op))


def logit_mixed_matrix(op: LogitMixedAttention, v_shape, q: Tensor, k: Tensor) -> Tensor:
    """Talking heads before the normaliser (Shazeer et al. 2020): norm(Σ_g Θ^l_hg Q_g K_gᵀ/√d)."""
    s = attention_scores(q, k, op.heads)
    return normalise(torch.einsum("hg,bgij->bhij", op.logit_mixing.double(), s), normaliser_name(op))


def head_mixing_matrix(op: HeadMixing, v_shape, q=None, k=None) -> Tensor:
    """DeepViT re-attention / CaiT's post-softmax talking heads: A'_h = Σ_g Θ_hg A_g over the inner affinity's
    reference maps (B or 1, M, N, N)."""
    inner = op.inner
    a = reference_for(inner).matrix(inner, v_shape, q, k)
    if a.shape[-1] != token_count(v_shape):
        raise AssertionError(f"the head-mixing reference needs spatial (N×N) maps, got {type(inner).__name__}")
    return torch.einsum("hg,bgij->bhij", op.mixing.double(), a.double())


def head_mixing_bias(op: HeadMixing) -> Optional[Tensor]:
    """out_h = Σ_g Θ_hg (A_g V_h + b_g): the bias of head h's channel e is Σ_g Θ_hg b[g·d + e]."""
    b = reference_for(op.inner).bias(op.inner)
    if b is None:
        return None
    return torch.einsum("hg,ge->he", op.mixing.double(), b.double().reshape(op.heads, -1)).reshape(-1)


def head_mixing_forward(op: HeadMixing, v: Tensor, q=None, k=None) -> Tensor:
    out = aggregate(per_channel(head_mixing_matrix(op, v.shape, q, k), op.dim), tokens(v))
    bias = head_mixing_bias(op)
    return like(out if bias is None else out + bias, v.shape)


def conv_projection_forward(proj: nn.Module, x: Tensor) -> Tensor:
    """CvT §3.2: per output (q, k, v in that order) W_r · BN_r(DW_r ⋆ x): a k×k depth-wise conv (zero padding, no
    bias), BatchNorm (batch statistics in training, running ones in eval), a point-wise 1×1 conv; concatenated."""
    outs = []
    for dw, bn, pw in proj.branches:
        y = group_conv_forward(dw.weight, dw.bias, dw.weight.shape[0], x)
        outs.append(_conv1x1(_batch_norm(y, bn), pw))
    return torch.cat(outs, 1)


def _gate_channels(w: Tensor, dim: int) -> Tensor:
    """A mixture gate of one entry (as is) or one per head h, read per channel c as entry h(c)."""
    return w if w.numel() == 1 else w[head_of_channel(dim, w.numel())]


REFERENCES.update({
    AdditiveAttention: Reference(additive_forward, additive_matrix, channel_matrix=additive_matrix),
    SeparableSelfAttention: Reference(separable_forward, separable_matrix, channel_matrix=separable_matrix),
    OutlookAttention: Reference(_attention_forward(outlook_matrix), outlook_matrix,
                                channel_matrix=_channels_of(outlook_matrix)),
    DisentangledNonLocal: Reference(_attention_forward(dnl_matrix), dnl_matrix, channel_matrix=_channels_of(dnl_matrix)),
    PositionalAttention: Reference(_attention_forward(positional_matrix), positional_matrix,
                                   channel_matrix=_channels_of(positional_matrix)),
    RelativeBiasAttention: Reference(_attention_forward(relative_bias_matrix), relative_bias_matrix,
                                     channel_matrix=_channels_of(relative_bias_matrix)),
    LogitMixedAttention: Reference(_attention_forward(logit_mixed_matrix), logit_mixed_matrix,
                                   channel_matrix=_channels_of(logit_mixed_matrix)),
    HeadMixing: Reference(head_mixing_forward, head_mixing_matrix, head_mixing_bias, _channels_of(head_mixing_matrix)),
})


def reference_for(op: nn.Module) -> Reference:
    """The independent reference of ``op``'s class; a clear failure for a class that has none."""
    ref = REFERENCES.get(type(op))
    if ref is None:
        raise AssertionError(
            f"no independent reference for {type(op).__module__}.{type(op).__name__}: write one from the paper's "
            "equation in tests/references.py (explicit loops/einsum, float64, parameters only) and add it to REFERENCES")
    return ref


# operators whose registry default cannot take the tests' standard (5, 7) grid: the spec and the (still
# non-square) grid their registry test uses instead
SIZED_CASES = {"shuffle_window": ("shuffle_window2", (4, 6))}


def registry_case(name: str, grid: tuple[int, int]) -> tuple[str, tuple[int, int]]:
    """(spec, grid) the registry tests build and run ``name`` at."""
    return SIZED_CASES.get(name, (name, grid))
