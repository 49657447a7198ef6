"""Where attention looks (issue 17): window, shifted window, neighbourhood, axial, chain, conv-as-attention.

Every reference below is written from the paper's equation with explicit Python loops over windows and
neighbourhoods in float64; none calls the operator's own code path."""
import math

import pytest
import torch
import torch.nn.functional as F

import references as ref

from ctxagg.affinity import build_affinity, conv_toeplitz
from ctxagg.affinity.axial import AxialAttention
from ctxagg.affinity.chain import AffinityChain
from ctxagg.affinity.conv_attention import QuadraticEncodingAttention
from ctxagg.affinity.masked import MaskedAttention, SparsePattern
from ctxagg.affinity.neighbourhood import NeighbourhoodAttention
from ctxagg.affinity.window import WindowAttention
from ctxagg.bench import largest_intermediate

DIM, HEADS = 8, 2


def _qkv(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(3)]


def _randomise(module, seed=1):
    """Give every parameter random values (relative tables start near zero, which hides index bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _softmax_row(logits):
    top = max(logits)
    e = [math.exp(x - top) for x in logits]
    return [x / sum(e) for x in e]


# ---------------------------------------------------------------- window / shifted window (Swin §3.2)

def swin_reference(v, q, k, window, shift, heads, table=None):
    """Swin §3.2 literally: zero-pad bottom/right to a multiple of the window, cyclically shift by −shift,
    label the 3×3 regions with Swin's slices, attend inside each window among same-region real tokens
    (padded keys excluded) with bias table[(Δy+w−1)(2w−1) + Δx+w−1], shift back, crop."""
    b, c, h, w = v.shape
    d = c // heads
    hp, wp = -(-h // window) * window, -(-w // window) * window
    sy, sx = (shift if hp > window else 0), (shift if wp > window else 0)

    def region_labels(n, s):
        if s == 0:
            return [0] * n
        labels = [0] * n
        for i in range(n - window, n - s):
            labels[i] = 1
        for i in range(n - s, n):
            labels[i] = 2
        return labels

    ry, rx = region_labels(hp, sy), region_labels(wp, sx)
    orig = lambda p, s, n: (p + s) % n  # rolled position -> original position
    out = torch.zeros_like(v)
    for bi in range(b):
        for m in range(heads):
            ch = slice(m * d, (m + 1) * d)
            for y0 in range(0, hp, window):
                for x0 in range(0, wp, window):
                    cells = [(y, x) for y in range(y0, y0 + window) for x in range(x0, x0 + window)]
                    for qy, qx in cells:
                        oy, ox = orig(qy, sy, hp), orig(qx, sx, wp)
                        if oy >= h or ox >= w:
                            continue
                        keys, logits = [], []
                        for ky, kx in cells:
                            iy, ix = orig(ky, sy, hp), orig(kx, sx, wp)
                            if iy >= h or ix >= w or ry[ky] != ry[qy] or rx[kx] != rx[qx]:
                                continue
                            logit = float(q[bi, ch, oy, ox] @ k[bi, ch, iy, ix]) / math.sqrt(d)
                            if table is not None:
                                dy, dx = (qy - y0) - (ky - y0), (qx - x0) - (kx - x0)
                                logit += float(table[(dy + window - 1) * (2 * window - 1) + dx + window - 1, m])
                            keys.append((iy, ix))
                            logits.append(logit)
                        for a, (iy, ix) in zip(_softmax_row(logits), keys):
                            out[bi, ch, oy, ox] += a * v[bi, ch, iy, ix]
    return out


@pytest.mark.parametrize("grid", [(5, 7), (6, 6), (4, 7), (1, 3)])
@pytest.mark.parametrize("spec,shift", [("window3", 0), ("shifted_window3", 1)])
def test_window_attention_matches_swin_loops_and_matrix(grid, spec, shift):
    aff = _randomise(build_affinity(spec, dim=DIM, heads=HEADS).double())
    assert isinstance(aff, WindowAttention) and aff.shift == shift
    v, q, k = _qkv((2, DIM, *grid))
    out = aff(v, q, k)
    assert out.shape == v.shape
    ref = swin_reference(v, q, k, 3, shift, HEADS, table=aff.rel_table.detach())
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(aff.reference(v, q, k), ref, rtol=1e-10, atol=1e-10)


def test_window_matrix_is_block_diagonal_and_shift_window_is_not():
    v, q, k = _qkv((1, DIM, 6, 6))
    plain = build_affinity("window3", dim=DIM, heads=HEADS).double().matrix(v.shape, q, k)
    ys = torch.arange(36) // 6
    xs = torch.arange(36) % 6
    same = ((ys[:, None] // 3) == (ys[None] // 3)) & ((xs[:, None] // 3) == (xs[None] // 3))
    assert (plain[..., ~same] == 0).all() and (plain[..., same] > 0).all()
    torch.testing.assert_close(plain.sum(-1), torch.ones(1, HEADS, 36, dtype=torch.float64))
    shifted = build_affinity("shifted_window3", dim=DIM, heads=HEADS).double().matrix(v.shape, q, k)
    # token (0,0) is alone in its wrapped region after a shift of 1 along both axes; (1,1)..(3,3) share a window
    assert shifted[0, 0, 0, 0] == 1.0
    assert (shifted[0, :, 7, [7, 8, 9, 13, 14, 15, 19, 20, 21]] > 0).all() and shifted[0, 0, 7, 6] == 0


def test_window_known_answer_padding_does_not_leak():
    aff = WindowAttention(1, 1, window=2, rel_pos=False).double()
    v = torch.tensor([[[[1.0, 2.0, 3.0]]]], dtype=torch.float64)
    zeros = torch.zeros_like(v)  # q = k = 0: uniform weights over each window's real tokens
    assert aff(v, zeros, zeros).flatten().tolist() == [1.5, 1.5, 3.0]  # 1.0 at x=2 if the pad leaked
    shifted = WindowAttention(1, 1, window=2, shift=1, rel_pos=False).double()
    assert shifted(v, zeros, zeros).flatten().tolist() == [1.0, 2.5, 2.5]  # groups {0} {1,2} (pad)


def test_window_gradients_flow_to_inputs_and_bias():
    aff = _randomise(WindowAttention(4, 2, window=2, shift=1).double())
    v, q, k = (t.requires_grad_() for t in _qkv((1, 4, 3, 5)))
    assert torch.autograd.gradcheck(lambda a, b, c: aff(a, b, c), (v, q, k), fast_mode=True)
    aff(v, q, k).square().sum().backward()
    assert aff.rel_table.grad.abs().sum() > 0


def test_window_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="0 <= shift < window"):
        WindowAttention(8, 2, window=3, shift=3)
    with pytest.raises(ValueError, match="pass q and k"):
        WindowAttention(8, 2)(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="needs a \\(B, C, H, W\\)"):
        WindowAttention(8, 2)(torch.randn(1, 16, 8), torch.randn(1, 16, 8), torch.randn(1, 16, 8))


# ---------------------------------------------------------------- neighbourhood attention (SASA Eq. 3)

def sasa_reference(v, q, k, kernel, heads, rel_rows=None, rel_cols=None):
    """SASA Eq. 3 with loops: for pixel (i, j), softmax over in-image (a, b) with |a−i|, |b−j| <= k//2 of
    q_ijᵀk_ab + q_ij[:d/2]ᵀ r_row[a−i] + q_ij[d/2:]ᵀ r_col[b−j], then the weighted sum of v_ab."""
    b, c, h, w = v.shape
    d, r = c // heads, kernel // 2
    out = torch.zeros_like(v)
    for bi in range(b):
        for m in range(heads):
            ch = slice(m * d, (m + 1) * d)
            for i in range(h):
                for j in range(w):
                    qv = q[bi, ch, i, j]
                    cells = [(a, bb) for a in range(i - r, i + r + 1) for bb in range(j - r, j + r + 1)
                             if 0 <= a < h and 0 <= bb < w]
                    logits = []
                    for a, bb in cells:
                        logit = float(qv @ k[bi, ch, a, bb])
                        if rel_rows is not None:
                            logit += float(qv[: d // 2] @ rel_rows[m, a - i + r])
                            logit += float(qv[d // 2:] @ rel_cols[m, bb - j + r])
                        logits.append(logit)
                    for wgt, (a, bb) in zip(_softmax_row(logits), cells):
                        out[bi, ch, i, j] += wgt * v[bi, ch, a, bb]
    return out


@pytest.mark.parametrize("grid", [(5, 7), (2, 6), (4, 4)])
@pytest.mark.parametrize("kernel", [3, 5])
def test_neighbourhood_attention_matches_sasa_loops_and_matrix(grid, kernel):
    aff = _randomise(build_affinity(f"neighbourhood{kernel}", dim=DIM, heads=HEADS).double())
    assert isinstance(aff, NeighbourhoodAttention) and aff.kernel_size == kernel
    v, q, k = _qkv((2, DIM, *grid))
    out = aff(v, q, k)
    assert out.shape == v.shape
    ref = sasa_reference(v, q, k, kernel, HEADS, aff.rel_rows.detach(), aff.rel_cols.detach())
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(aff.reference(v, q, k), ref, rtol=1e-10, atol=1e-10)


def test_neighbourhood_matrix_is_banded():
    aff = NeighbourhoodAttention(DIM, HEADS, kernel_size=3).double()
    v, q, k = _qkv((1, DIM, 5, 7))
    a = aff.matrix(v.shape, q, k)
    ys, xs = torch.arange(35) // 7, torch.arange(35) % 7
    band = ((ys[:, None] - ys[None]).abs() <= 1) & ((xs[:, None] - xs[None]).abs() <= 1)
    assert (a[..., ~band] == 0).all() and (a[..., band] > 0).all()
    assert int(band[0].sum()) == 4 and int(band[8].sum()) == 9  # corner sees 2×2, interior 3×3


def test_neighbourhood_known_answer_border_is_cut_not_zero_padded():
    aff = NeighbourhoodAttention(2, 1, kernel_size=3, rel_pos=False).double()
    v = torch.tensor([[[[1.0, 2.0, 3.0]], [[0.0, 6.0, 0.0]]]], dtype=torch.float64)
    zeros = torch.zeros_like(v)
    torch.testing.assert_close(aff(v, zeros, zeros)[0, :, 0],
                               torch.tensor([[1.5, 2.0, 2.5], [3.0, 2.0, 3.0]], dtype=torch.float64))
    with_rel = NeighbourhoodAttention(2, 1, kernel_size=3).double()
    with torch.no_grad():
        with_rel.rel_rows.zero_()
        with_rel.rel_cols.copy_(torch.tensor([[[0.0], [0.0], [math.log(3.0)]]]))  # column offset +1 gets e^{q·r}
    q = torch.tensor([[[[0.0, 0.0, 0.0]], [[1.0, 1.0, 1.0]]]], dtype=torch.float64)  # q's column half = 1
    # x=0: keys x=0,1 weights 1:3 -> (1 + 3·2)/4 = 1.75; x=1: 1:1:3 -> (1+2+9)/5 = 2.4; x=2: 1:1 -> 2.5
    torch.testing.assert_close(with_rel(v, q, torch.zeros_like(v))[0, 0, 0],
                               torch.tensor([1.75, 2.4, 2.5], dtype=torch.float64))


def test_neighbourhood_gradients_and_bad_arguments():
    aff = _randomise(NeighbourhoodAttention(4, 2, kernel_size=3).double())
    v, q, k = (t.requires_grad_() for t in _qkv((1, 4, 3, 4)))
    assert torch.autograd.gradcheck(lambda a, b, c: aff(a, b, c), (v, q, k), fast_mode=True)
    aff(v, q, k).square().sum().backward()
    assert aff.rel_rows.grad.abs().sum() > 0 and aff.rel_cols.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="odd"):
        NeighbourhoodAttention(8, 2, kernel_size=4)
    with pytest.raises(ValueError, match="must be even"):
        NeighbourhoodAttention(6, 2, kernel_size=3)


# ---------------------------------------------------------------- axial attention and chain(a, b)

def axial_matrices(q, k, heads):
    """Ho et al. §3 with loops: row attention R[i, j] = softmax over j in i's row of q_iᵀk_j/√d (0 elsewhere),
    column attention C likewise over i's column; returns (R, C), each (B, M, N, N)."""
    b, c, h, w = q.shape
    d, n = c // heads, h * w
    rows = torch.zeros(b, heads, n, n, dtype=torch.float64)
    cols = torch.zeros(b, heads, n, n, dtype=torch.float64)
    for bi in range(b):
        for m in range(heads):
            ch = slice(m * d, (m + 1) * d)
            for y in range(h):
                for x in range(w):
                    for target, line in ((rows, [(y, xx) for xx in range(w)]), (cols, [(yy, x) for yy in range(h)])):
                        logits = [float(q[bi, ch, y, x] @ k[bi, ch, a, bb]) / math.sqrt(d) for a, bb in line]
                        for wgt, (a, bb) in zip(_softmax_row(logits), line):
                            target[bi, m, y * w + x, a * w + bb] = wgt
    return rows, cols


def _apply_loops(a, v, heads):
    """out[b, c, i] = Σ_j A[b, head(c), i, j] v[b, c, j] with explicit index arithmetic (einsum)."""
    b, c, h, w = v.shape
    per_channel = a.repeat_interleave(c // heads, dim=1)
    return torch.einsum("bcij,bcj->bci", per_channel, v.reshape(b, c, h * w)).reshape(v.shape)


@pytest.mark.parametrize("grid", [(5, 7), (3, 2)])
def test_axial_attention_is_column_times_row(grid):
    aff = build_affinity("axial", dim=DIM, heads=HEADS).double()
    assert isinstance(aff, AffinityChain) and isinstance(aff.first, AxialAttention)
    assert (aff.first.axis, aff.second.axis) == ("row", "column")
    v, q, k = _qkv((2, DIM, *grid))
    rows, cols = axial_matrices(q, k, HEADS)
    ref = _apply_loops(cols, _apply_loops(rows, v, HEADS), HEADS)
    out = aff(v, q, k)
    assert out.shape == v.shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(aff.matrix(v.shape, q, k), cols @ rows, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(aff.first.matrix(v.shape, q, k), rows, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(build_affinity("axial_column", dim=DIM, heads=HEADS).double()(v, q, k),
                               _apply_loops(cols, v, HEADS), rtol=1e-10, atol=1e-10)


def test_chain_of_window_then_neighbourhood_matches_composed_loops():
    aff = _randomise(build_affinity("chain(shifted_window3, neighbourhood3)", dim=DIM, heads=HEADS).double())
    v, q, k = _qkv((2, DIM, 5, 7))
    first, second = aff.first, aff.second
    ref = sasa_reference(swin_reference(v, q, k, 3, 1, HEADS, first.rel_table.detach()), q, k, 3, HEADS,
                         second.rel_rows.detach(), second.rel_cols.detach())
    torch.testing.assert_close(aff(v, q, k), ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(aff.reference(v, q, k), ref, rtol=1e-10, atol=1e-10)


def test_chain_of_three_and_nested_mix_parse_and_agree():
    aff = _randomise(build_affinity("chain(window2, shifted_window2, mix(sa,dw3))", dim=DIM, heads=HEADS).double())
    assert isinstance(aff.first, AffinityChain) and aff.heads == DIM  # lcm(2 heads, 8 depthwise channels)
    v, q, k = _qkv((2, DIM, 4, 5))
    torch.testing.assert_close(aff(v, q, k), aff.reference(v, q, k), rtol=1e-10, atol=1e-10)
    assert aff.bias_term() is not None  # the mixture's β·bias, added after the product


def test_axial_and_chain_known_answers():
    zeros = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    v = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64)
    assert build_affinity("axial", dim=1, heads=1)(v, zeros, zeros).flatten().tolist() == [2.5] * 4
    v = torch.tensor([[[[4.0, 8.0]]]], dtype=torch.float64)
    q = torch.tensor([[[[0.0, math.log(3.0)]]]], dtype=torch.float64)
    k = torch.tensor([[[[0.0, 1.0]]]], dtype=torch.float64)
    # query 0: weights 1:1 -> 6; query 1: logits (0, ln 3) -> weights 1/4, 3/4 -> 7; a column of one token is itself
    out = build_affinity("chain(axial_column,axial_row)", dim=1, heads=1)(v, q, k)
    torch.testing.assert_close(out.flatten(), torch.tensor([6.0, 7.0], dtype=torch.float64))


def test_axial_gradients_and_chain_refusals():
    aff = build_affinity("axial", dim=4, heads=2).double()
    v, q, k = (t.requires_grad_() for t in _qkv((1, 4, 3, 4)))
    assert torch.autograd.gradcheck(lambda a, b, c: aff(a, b, c), (v, q, k), fast_mode=True)
    with pytest.raises(ValueError, match="adds a bias"):
        build_affinity("chain(dw3,sa)", dim=8, heads=2)
    with pytest.raises(ValueError, match="at least two"):
        build_affinity("chain(sa)", dim=8, heads=2)
    with pytest.raises(ValueError, match="unknown axis"):
        AxialAttention(8, 2, axis="diagonal")


# ---------------------------------------------------------------- self-attention that is a convolution (Cordonnier)

def quadratic_reference(v, centres, alphas, support=None):
    """Cordonnier Lemma 1 with loops: head h weights key pixel k of query q by
    exp(−α_h(‖δ − Δ_h‖² − ‖Δ_h‖²)), δ = k − q, normalised over every offset of the zero-padded plane
    (|δy| < H, |δx| < W, or |δ| <= support//2), and sums the in-image values."""
    b, c, h, w = v.shape
    heads = len(alphas)
    d = c // heads
    ry, rx = (h - 1, w - 1) if support is None else (support // 2, support // 2)
    out = torch.zeros_like(v)
    for m in range(heads):
        cy, cx, alpha = float(centres[m, 0]), float(centres[m, 1]), float(alphas[m])
        weight = lambda dy, dx: math.exp(-alpha * ((dy - cy) ** 2 + (dx - cx) ** 2 - cy ** 2 - cx ** 2))
        norm = sum(weight(dy, dx) for dy in range(-ry, ry + 1) for dx in range(-rx, rx + 1))
        for y in range(h):
            for x in range(w):
                for a in range(h):
                    for bb in range(w):
                        if abs(a - y) <= ry and abs(bb - x) <= rx:
                            share = weight(a - y, bb - x) / norm
                            out[:, m * d:(m + 1) * d, y, x] += share * v[:, m * d:(m + 1) * d, a, bb]
    return out


@pytest.mark.parametrize("kernel,support,grid", [(3, None, (4, 5)), (2, None, (3, 2)), (3, 5, (5, 7))])
def test_quadratic_encoding_attention_matches_lemma_1_loops(kernel, support, grid):
    aff = QuadraticEncodingAttention(2 * kernel ** 2, kernel_size=kernel, alpha=0.7, support=support).double()
    with torch.no_grad():  # learned centres and sharpness away from their initial grid
        aff.centres.add_(torch.linspace(-0.4, 0.4, aff.centres.numel()).view_as(aff.centres).double())
        aff.log_alpha.add_(torch.linspace(-0.5, 0.5, aff.heads).double())
    v = _qkv((2, aff.dim, *grid))[0]
    ref = quadratic_reference(v, aff.centres.detach(), aff.log_alpha.detach().exp(), support)
    torch.testing.assert_close(aff(v), ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(aff.reference(v), ref, rtol=1e-10, atol=1e-10)
    assert aff.matrix(v.shape).shape == (1, kernel ** 2, grid[0] * grid[1], grid[0] * grid[1])


@pytest.mark.parametrize("kernel,grid", [(3, (4, 5)), (5, (6, 6)), (2, (3, 4))])
def test_k2_quadratic_heads_weighted_by_a_kernel_are_its_conv_toeplitz(kernel, grid):
    """Cordonnier Lemma 1 / Theorem 1 executable: as α grows, Σ_h κ[Δ_h]·A_h is the zero-padded K×K conv."""
    aff = QuadraticEncodingAttention(kernel ** 2, kernel_size=kernel, alpha=40.0).double()
    kappa = torch.randn(kernel, kernel, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a = aff.matrix((1, aff.dim, *grid))[0]
    combined = torch.einsum("h,hij->ij", kappa.flatten(), a)
    torch.testing.assert_close(combined, conv_toeplitz(kappa[None], *grid)[0], rtol=0, atol=1e-12)
    soft = QuadraticEncodingAttention(kernel ** 2, kernel_size=kernel, alpha=1.0).double().matrix((1, 1, *grid))[0]
    assert (torch.einsum("h,hij->ij", kappa.flatten(), soft) - combined).abs().max() > 0.1  # α matters


def test_multi_head_attention_reproduces_a_multi_channel_convolution():
    """Theorem 1: K² heads each reading all C_in channels (W_val = I), output projection W_out[h] = W[:, :, Δ_h]."""
    c_in, c_out, kernel = 2, 3, 3
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, c_in, 5, 4, generator=g, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, kernel, kernel, generator=g, dtype=torch.float64)
    aff = QuadraticEncodingAttention(kernel ** 2 * c_in, kernel_size=kernel, alpha=40.0).double()
    values = x.repeat(1, kernel ** 2, 1, 1)  # head h gets its own copy of X
    heads_out = aff(values).view(2, kernel ** 2, c_in, 5, 4)
    y = sum(torch.einsum("oc,bcyx->boyx", weight[:, :, h // kernel, h % kernel], heads_out[:, h])
            for h in range(kernel ** 2))
    torch.testing.assert_close(y, F.conv2d(x, weight, padding=1), rtol=0, atol=1e-12)


def test_quadratic_encoding_known_answer_and_gradients():
    aff = QuadraticEncodingAttention(1, kernel_size=1, alpha=math.log(2.0)).double()
    v = torch.tensor([[[[4.0, 8.0]]]], dtype=torch.float64)
    # offsets −1, 0, +1 weigh 1/4, 1/2, 1/4 (the padded key at −1 or +1 keeps its share): 4/2 + 8/4, 4/4 + 8/2
    torch.testing.assert_close(aff(v).flatten(), torch.tensor([4.0, 5.0], dtype=torch.float64))
    aff = QuadraticEncodingAttention(8, kernel_size=2, alpha=0.5).double()
    v = _qkv((1, 8, 3, 4))[0].requires_grad_()
    assert torch.autograd.gradcheck(aff, (v,), fast_mode=True)
    aff(v).square().sum().backward()
    assert aff.centres.grad.abs().sum() > 0 and aff.log_alpha.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs 9 heads"):
        build_affinity("conv_attn3", dim=16, heads=4)
    with pytest.raises(ValueError, match="support must be odd"):
        QuadraticEncodingAttention(9, kernel_size=3, support=4)


# ---------------------------------------------------------------- masked(sa, pattern): sparse patterns

def masked_reference(v, q, k, pattern, heads):
    b, c, h, w = v.shape
    d = c // heads
    out = torch.zeros_like(v)
    for bi in range(b):
        for m in range(heads):
            ch = slice(m * d, (m + 1) * d)
            for y in range(h):
                for x in range(w):
                    keys = ref.pattern_keys(pattern, y, x, h, w)
                    logits = [float(q[bi, ch, y, x] @ k[bi, ch, a, bb]) / math.sqrt(d) for a, bb in keys]
                    for wgt, (a, bb) in zip(_softmax_row(logits), keys):
                        out[bi, ch, y, x] += wgt * v[bi, ch, a, bb]
    return out


@pytest.mark.parametrize("pattern", ["band3", "dilated3_2", "row+column", "global3", "band3+global2",
                                     "dilated3_2+row+global4"])
@pytest.mark.parametrize("grid", [(5, 7), (4, 4)])
def test_masked_attention_matches_pattern_loops_and_matrix(pattern, grid):
    aff = build_affinity(f"masked(sa, {pattern})", dim=DIM, heads=HEADS).double()
    assert isinstance(aff, MaskedAttention) and str(aff.pattern) == pattern
    v, q, k = _qkv((2, DIM, *grid))
    want = masked_reference(v, q, k, pattern, HEADS)
    torch.testing.assert_close(aff(v, q, k), want, rtol=1e-10, atol=1e-10)
    a = aff.matrix(v.shape, q, k)
    torch.testing.assert_close(aff.reference(v, q, k), want, rtol=1e-10, atol=1e-10)
    h, w = grid
    counts = torch.tensor([len(ref.pattern_keys(pattern, i // w, i % w, h, w)) for i in range(h * w)])
    assert ((a > 0).sum(-1) == counts).all()  # matrix() shows the pattern's zeros


def test_masked_known_answer_global_tokens_count_once():
    v = torch.tensor([[[[1.0, 2.0, 3.0, 10.0]]]], dtype=torch.float64)
    zeros = torch.zeros_like(v)  # uniform weights over each query's allowed keys
    out = build_affinity("masked(sa,global2)", dim=1, heads=1)(v, zeros, zeros)
    torch.testing.assert_close(out.flatten(), torch.tensor([4.0, 2.0, 4.0, 2.0], dtype=torch.float64))
    out = build_affinity("masked(sa,band3+global2)", dim=1, heads=1)(v, zeros, zeros)
    # x=3 sees band {2, 3} and global {0, 2}: {0, 2, 3} once each -> 14/3 (4.25 if key 2 counted twice)
    torch.testing.assert_close(out.flatten(), torch.tensor([4.0, 2.0, 4.0, 14 / 3], dtype=torch.float64))


def test_masked_gradients_and_refusals():
    aff = MaskedAttention(4, 2, "band3+global2").double()
    v, q, k = (t.requires_grad_() for t in _qkv((1, 4, 3, 4)))
    assert torch.autograd.gradcheck(lambda a, b, c: aff(a, b, c), (v, q, k), fast_mode=True)
    with pytest.raises(ValueError, match="unknown pattern term 'stripes'"):
        SparsePattern.parse("band3+stripes")
    with pytest.raises(ValueError, match="must be odd"):
        SparsePattern.parse("band4")
    with pytest.raises(ValueError, match="masks softmax dot-product attention"):
        build_affinity("masked(dw3,band3)", dim=8, heads=2)
    with pytest.raises(ValueError, match="an attention and a pattern"):
        build_affinity("masked(sa)", dim=8, heads=2)


# ---------------------------------------------------------------- cross-shaped and shuffled windows

def test_cswin_known_answer_stripes_and_padding():
    # q = k = 0: uniform weights over each query's stripe. Channel 0 (head 0) sees horizontal stripes of 2 rows
    # (rows {0, 1} and the padded {2}); channel 1 (head 1) vertical stripes of 2 columns (the whole 3×2 grid)
    v = torch.tensor([[[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], [[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]]]],
                     dtype=torch.float64)
    zeros = torch.zeros_like(v)
    out = build_affinity("cswin2", dim=2, heads=2)(v, zeros, zeros)
    want = torch.tensor([[[[2.5, 2.5], [2.5, 2.5], [5.5, 5.5]], [[35.0] * 2] * 3]], dtype=torch.float64)
    torch.testing.assert_close(out, want)  # padded keys would give row 2 (5 + 6 + 0 + 0) / 4 = 2.75


def test_shuffled_window_known_answer_and_size_rule():
    # 4×4 grid, window 2: the shuffle groups tokens with equal (y mod 2, x mod 2); q = k = 0 averages each group:
    # the values 4y + x at (a + 2i, b + 2j) average to 4a + b + 5
    v = torch.arange(16, dtype=torch.float64).reshape(1, 1, 4, 4)
    zeros = torch.zeros_like(v)
    out = build_affinity("shuffle_window2", dim=1, heads=1)(v, zeros, zeros)
    ys, xs = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    torch.testing.assert_close(out[0, 0], (4 * (ys % 2) + xs % 2 + 5).double())
    with pytest.raises(ValueError, match="multiples of window=3; got 4×4"):
        build_affinity("shuffle_window3", dim=1, heads=1)(v, zeros, zeros)
    with pytest.raises(ValueError, match="heads must be even"):
        build_affinity("cswin7", dim=6, heads=3)


# ---------------------------------------------------------------- never N×N in forward

@pytest.mark.parametrize("spec", ["window7", "shifted_window7", "neighbourhood5", "axial",
                                  "chain(window7,neighbourhood3)", "masked(sa,band5+global16)",
                                  "masked(sa,dilated3_2)", "cswin7", "shuffle_window8"])
def test_sparse_patterns_never_materialise_n_by_n(spec):
    grid, dim = (64, 64), 16  # N = 4096, N² = 16.8M elements
    torch.manual_seed(0)
    aff = build_affinity(spec, dim=dim, heads=2)
    v, q, k = (torch.randn(1, dim, *grid) for _ in range(3))
    n = grid[0] * grid[1]
    with torch.no_grad():
        assert largest_intermediate(lambda: aff(v, q, k)) < n * n / 8


# ---------------------------------------------------------------- the design-space table (`ctxagg space`)

def test_ctxagg_space_lists_every_registered_affinity_and_the_reading_list(tmp_path, capsys):
    from ctxagg.affinity import affinity_names
    from ctxagg.affinity.space import READING_LIST
    from ctxagg.bench.space import block_cost
    from ctxagg.cli import main

    out = tmp_path / "space.json"
    assert main(["space", "--no-measure", "--reading-list", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in affinity_names():
        assert f"`{name}`" in printed, name
    assert len(READING_LIST) == 73 and "| 73 | Aggregated Pyramid Vision Transformer |" in printed
    assert main(["space", "--no-measure", "--json", str(out)]) == 2  # an earlier table is kept
    assert "already exists" in capsys.readouterr().err
    # the measured columns: a dense attention block costs N²-ish, a 7×7 window block N·49-ish
    params_sa, macs_sa = block_cost("sa", 56)
    params_win, macs_win = block_cost("window7", 56)
    assert params_win - params_sa == 13 ** 2 * 4  # the window's relative-position table, per head
    assert macs_sa > 4 * macs_win


# ViT-as-DynConv Table 1 (kernel bank, kernel selection, kernel type, kernel size), as the paper prints it
DYNCONV_TABLE_1 = {
    "sa": ("dynamic", "hard (all)", "C→1→C", "1×1"),  # ViT
    "window": ("dynamic", "hard (local", "C→1→C", "1×1"),  # Swin Transformer
    "linformer": ("dynamic", "soft", "C→1→C", "1×1"),  # Linformer
    "dynamic_conv": ("static", "soft", "C→C", "3×3"),  # Dynamic Conv. [4]
    "dynamic_dw": ("none", "none", "depth-wise", "7×7"),  # Dynamic DW-Conv. [11]: N/A, N/A (kernels made per image)
}


def test_every_affinity_states_its_place_in_the_kernel_bank_frame():
    from ctxagg.affinity.space import DESIGN_SPACE
    from ctxagg.bench.space import format_space_table, space_rows
    for name, entry in DESIGN_SPACE.items():
        for value in (entry.bank, entry.selection, entry.kernel_type, entry.kernel_size):
            assert value.strip(), f"{name} leaves a kernel-bank column empty"
    for name, (bank, selection, kernel_type, size) in DYNCONV_TABLE_1.items():
        entry = DESIGN_SPACE[name]
        assert entry.bank.startswith(bank) and entry.selection.startswith(selection)
        assert entry.kernel_type == kernel_type and entry.kernel_size == size
    table = format_space_table(space_rows(measure=False))
    header = table.splitlines()[0]
    for column in ("kernel bank", "kernel selection", "kernel type", "kernel size"):
        assert f"| {column} |" in header
    sa_row = next(line for line in table.splitlines() if "| `sa` |" in line)
    assert "| dynamic | hard (all) | C→1→C | 1×1 |" in sa_row
