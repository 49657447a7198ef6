"""How A is made, part 2 (issue 18): global vectors (Fastformer, MobileViTv2), outlook attention (VOLO), DNL, ConViT's
positional attention and GPSA, the pre-softmax relative bias (CoAtNet, LeViT), head mixing (DeepViT, CaiT) and CvT's
convolutional projection.

Every operator is checked against its independent float64 reference (tests/references.py) on grids of any size,
with known answers whose numbers are worked out by hand in the comments, and with the identities that place it in
the design space (diagonal / rank-one families, DNL vs non-local vs LESA, pre- vs post-softmax positional terms)."""
import math

import pytest
import torch

import references as ref
from test_references import TIGHT, _call, _check, _one_thread, _randn, _randomised  # noqa: F401 (fixture)
from ctxagg.affinity import (AffinityMixture, DisentangledNonLocal, HeadMixing, KeyOnlyAttention, LogitMixedAttention,
                             OutlookAttention, PositionalAttention, QuadraticEncodingAttention, RelativeBiasAttention,
                             RelativeSelfAttention2d, SelfAttentionAffinity, build_affinity)
from ctxagg.affinity.additive import AdditiveAttention, SeparableSelfAttention
from ctxagg.bench import largest_intermediate
from ctxagg.blocks import AggregationBlock
from ctxagg.layers.conv_proj import ConvProjection

DIM, HEADS, GRID = 8, 2, (5, 7)
F64 = torch.float64


def _build(spec, grid=GRID, **ctx):
    torch.manual_seed(0)
    return _randomised(build_affinity(spec, dim=DIM, heads=HEADS, grid=grid, **ctx))


def _qkv(shape, seed=1):
    return [_randn(*shape, seed=seed + i) for i in range(3)]


# ---------------------------------------------------------------- every operator, any size, against its reference

SPECS = ["additive", "separable", "outlook", "outlook5", "dnl", "pos_attn", "gpsa", "rel_sa", "sym_rel_sa",
         "mix(sa,pos_attn)", "heads_mixed(sa)", "heads_mixed(window3)", "heads_mixed(mix(sa,dw3))",
         "heads_mixed(outlook)", "heads_mixed(pos_attn)", "heads_mixed(dnl)", "talking_heads(sa)",
         "heads_mixed(rel_sa)"]
GRIDS = [(5, 7), (1, 1), (2, 9), (6, 3)]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("grid", GRIDS)
def test_operator_matches_its_reference_at_any_size(spec, grid):
    """Any H×W, including 1×1 and sizes other than the built grid (rel_sa clips offsets to its 5×7 table)."""
    op = _build(spec, gate="per_head")
    _check(op, *_qkv((2, DIM, *grid)))


@pytest.mark.parametrize("spec", ["additive", "separable", "dnl", "heads_mixed(sa)", "talking_heads(sa)",
                                  "heads_mixed(mix(additive,mlp))"])
@pytest.mark.parametrize("n", [1, 12])
def test_token_layout_operators_take_any_token_count(spec, n):
    if "mlp" in spec:  # a fixed-N part: build it for this N
        op = _randomised(build_affinity(spec, dim=DIM, heads=HEADS, grid=(1, n)))
    else:
        op = _build(spec)
    _check(op, *_qkv((2, n, DIM)))


@pytest.mark.parametrize("spec", ["heads_mixed(sa)", "heads_mixed(window3)", "heads_mixed(mix(sa,dw3))",
                                  "heads_mixed(outlook)", "talking_heads(sa)", "mix(sa,pos_attn)"])
def test_combinators_have_the_reference_gradients(spec):
    op = _build(spec, gate="per_head")
    v, q, k = (t.requires_grad_() for t in _qkv((2, DIM, 4, 5)))
    inputs = [v, q] if getattr(op, "uses_value", True) is False else [v, q, k]
    params = list(op.parameters())
    weights = _randn(2, DIM, 4, 5, seed=9)
    got = torch.autograd.grad((_call(op, v, q, k) * weights).sum(), inputs + params)
    want = torch.autograd.grad((ref.reference_for(op).forward(op, v, q, k) * weights).sum(), inputs + params)
    for (name, _), g in zip(op.named_parameters(), got[len(inputs):]):
        assert g.abs().sum() > 0, f"no gradient reaches {name}"
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TIGHT)


@pytest.mark.parametrize("spec", ["additive", "separable", "outlook", "pos_attn", "heads_mixed(window7)"])
def test_linear_and_local_operators_never_materialise_n_by_n(spec):
    grid, dim = (64, 64), 16  # N = 4096, N² = 16.8M elements
    torch.manual_seed(0)
    op = build_affinity(spec, dim=dim, heads=2, grid=grid)
    v, q, k = (torch.randn(1, dim, *grid) for _ in range(3))
    n = grid[0] * grid[1]
    with torch.no_grad():
        assert largest_intermediate(lambda: _call(op, v, q, k)) < n * n / 8


# ---------------------------------------------------------------- Fastformer and MobileViTv2: diagonal and rank one

def test_additive_attention_known_answer():
    """One head, d = 2, N = 3. w_q = (√2·ln 2, 0): α ∝ 2^{q_i[0]} = [1, 2, 4]/7 for q[:, 0] = [0, 1, 2], so
    Q = ([0, 1] + 2·[1, 0] + 4·[2, 1])/7 = [10/7, 5/7]; p_i = Q ⊙ k_i = [[10, 0], [0, 5], [10, 10]];
    w_k = (0, √2·ln 2): β ∝ 2^{p_i[1]} = [1, 32, 1024]/1057, g = [10250, 10400]/1057; u_i = g ⊙ v_i."""
    op = AdditiveAttention(2, 1).double()
    with torch.no_grad():
        op.query_vector.copy_(torch.tensor([[math.sqrt(2) * math.log(2), 0.0]], dtype=F64))
        op.key_vector.copy_(torch.tensor([[0.0, math.sqrt(2) * math.log(2)]], dtype=F64))
    q = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [2.0, 1.0]]], dtype=F64)
    k = torch.tensor([[[7.0, 0.0], [0.0, 7.0], [7.0, 14.0]]], dtype=F64)
    v = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [0.0, 3.0]]], dtype=F64)
    g = torch.tensor([10250 / 1057, 10400 / 1057], dtype=F64)
    torch.testing.assert_close(op(v, q, k)[0], v[0] * g, **TIGHT)
    torch.testing.assert_close(op.matrix(v.shape, q, k)[0], torch.diag_embed(g[:, None].expand(2, 3)), **TIGHT)


def test_separable_attention_known_answer():
    """One head: w_I = (ln 2, 0) on s[:, 0] = [0, 1, 2] gives cs = [1, 2, 4]/7 (no scale); the keys
    [[7, 0], [0, 7], [7, 14]] pool to c_v = [35, 70]/7 = [5, 10]; y_i = ReLU(v_i) ⊙ c_v."""
    op = SeparableSelfAttention(2, 1).double()
    with torch.no_grad():
        op.saliency.copy_(torch.tensor([[math.log(2), 0.0]], dtype=F64))
    keys = torch.tensor([[[7.0, 0.0], [0.0, 7.0], [7.0, 14.0]]], dtype=F64)
    values = torch.tensor([[[1.0, -1.0], [2.0, 0.5], [-3.0, 3.0]]], dtype=F64)
    saliency = torch.tensor([[[0.0, 5.0], [1.0, 5.0], [2.0, 5.0]]], dtype=F64)
    expected = torch.tensor([[5.0, 0.0], [10.0, 5.0], [0.0, 30.0]], dtype=F64)
    torch.testing.assert_close(op(keys, values, saliency)[0], expected, **TIGHT)


def test_additive_is_diagonal_and_separable_is_rank_one_per_channel():
    v, q, k = _qkv((2, DIM, 4, 5))
    a = _build("additive").matrix(v.shape, q, k)  # (B, C, N, N)
    off_diagonal = ~torch.eye(20, dtype=torch.bool)
    assert (a[..., off_diagonal] == 0).all()
    diagonal = a.diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(diagonal, diagonal[..., :1].expand_as(diagonal))  # one gain per channel
    s = _build("separable").matrix(v.shape, q, k)
    ranks = torch.linalg.matrix_rank(s)
    assert (ranks == 1).all(), ranks  # every row the same context scores, scaled by ReLU(gate) at that position


def _key_only_like(heads, saliency):
    """LinGlos key-only attention with U1 = I and no bias, so key_only(K, V, K) − K = G ⊙ V."""
    op = KeyOnlyAttention(DIM, heads).double()
    with torch.no_grad():
        op.saliency.copy_(saliency)
        op.u1.weight.copy_(torch.eye(DIM, dtype=F64))
        op.u1.bias.zero_()
    return op


def test_fastformer_with_a_flat_query_is_key_only_attention():
    """Q = Σ α_i q_i = 1 when every q_i = 1, so g = Σ_j softmax(w_k·k_j/√d) k_j: LinGlos's G, u = G ⊙ v."""
    additive = _build("additive")
    v, _, k = _qkv((2, DIM, 4, 5))
    key_only = _key_only_like(HEADS, additive.key_vector.detach())
    torch.testing.assert_close(additive(v, torch.ones_like(v), k), key_only(k, v, k) - k, **TIGHT)


def test_separable_attention_is_key_only_attention_with_a_relu_gate():
    """cs = softmax(s·w_I) with s = K and w_I = W_saliency/√d is LinGlos's A; y = ReLU(V) ⊙ G."""
    separable = _build("separable")
    v, _, k = _qkv((2, DIM, 4, 5))
    gate = v.abs()  # ReLU is the identity here
    key_only = _key_only_like(HEADS, separable.saliency.detach() * math.sqrt(DIM // HEADS))
    torch.testing.assert_close(separable(k, gate, k), key_only(k, gate, k) - k, **TIGHT)


# ---------------------------------------------------------------- VOLO's outlook attention

def test_outlook_known_answers_fold_sums_overlapping_windows():
    """1×3 grid, K = 3, one head of one channel (scale 1), v = [1, 2, 4]; windows centred at x = 0, 1, 2 hold the
    in-image values {v0, v1}, {v0, v1, v2}, {v1, v2} (the rows above and below are padding).
    - A generated as all zeros: every weight 1/9, window sums S = [3, 7, 6]; position p sums S_c/9 over the
      windows holding it: [(3 + 7)/9, (3 + 7 + 6)/9, (7 + 6)/9].
    - A one-hot on the centre slot: every slot of window c outputs v_c; p sums v_c over its windows:
      [1 + 2, 1 + 2 + 4, 2 + 4]."""
    op = OutlookAttention(1, 1, kernel_size=3).double()
    v = torch.tensor([[[[1.0, 2.0, 4.0]]]], dtype=F64)
    with torch.no_grad():
        op.generator.weight.zero_()
        op.generator.bias.zero_()
    torch.testing.assert_close(op(v, v).flatten(), torch.tensor([10 / 9, 16 / 9, 13 / 9], dtype=F64), **TIGHT)
    with torch.no_grad():
        op.generator.bias.view(9, 9)[:, 4] = 100.0  # every output slot reads the centre slot
    torch.testing.assert_close(op(v, v).flatten(), torch.tensor([3.0, 7.0, 6.0], dtype=F64), **TIGHT)
    torch.testing.assert_close(ref.through_matrix(op.matrix(v.shape, v), v, None).flatten(),
                               torch.tensor([3.0, 7.0, 6.0], dtype=F64), **TIGHT)


def test_outlook_matrix_is_a_band_of_2k_minus_1():
    op = _build("outlook")
    v, q, _ = _qkv((1, DIM, 6, 7))
    a = op.matrix(v.shape, q)
    ys, xs = torch.arange(42) // 7, torch.arange(42) % 7
    band = ((ys[:, None] - ys[None]).abs() <= 2) & ((xs[:, None] - xs[None]).abs() <= 2)
    assert (a[..., ~band] == 0).all() and (a[..., band] > 0).all()
    assert op.uses_value is False and AggregationBlock(DIM, op).proj_in.out_channels == 2 * DIM  # v and q only


def test_outlook_refuses_even_kernels_and_token_layouts():
    with pytest.raises(ValueError, match="must be odd"):
        build_affinity("outlook4", dim=DIM, heads=HEADS)
    with pytest.raises(ValueError, match="needs a \\(B, C, H, W\\)"):
        _build("outlook")(torch.randn(1, 12, DIM), torch.randn(1, 12, DIM))


# ---------------------------------------------------------------- DNL vs non-local attention vs LESA

def test_dnl_known_answer():
    """One head, d = 2, N = 3. q[:, 0] = [1, 2, 3] whitens to [−1, 0, 1]; k[:, 0] = √2·ln 2·[0, 1, 2] whitens to
    √2·ln 2·[−1, 0, 1], so the pairwise logits (÷√2) are ln 2·q̃_i·[−1, 0, 1]: rows [4, 2, 1]/7, [1, 1, 1]/3,
    [1, 2, 4]/7. Unary: w_m = (0, 1) on k[:, 1] = [0, ln 2, 0] gives [1, 2, 1]/4 in every row."""
    op = DisentangledNonLocal(2, 1).double()
    with torch.no_grad():
        op.unary.copy_(torch.tensor([[0.0, 1.0]]))
    r = math.sqrt(2) * math.log(2)
    q = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]], dtype=F64)
    k = torch.tensor([[[0.0, 0.0], [r, math.log(2)], [2 * r, 0.0]]], dtype=F64)
    v = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [7.0, 7.0]]], dtype=F64)
    pairwise = [[4 / 7, 2 / 7, 1 / 7], [1 / 3, 1 / 3, 1 / 3], [1 / 7, 2 / 7, 4 / 7]]
    unary = [1 / 4, 1 / 2, 1 / 4]
    expected_a = torch.tensor([[p + u for p, u in zip(row, unary)] for row in pairwise], dtype=F64)
    torch.testing.assert_close(op.matrix(v.shape, q, k)[0, 0], expected_a, **TIGHT)
    torch.testing.assert_close(op(v, q, k)[0], expected_a @ v[0], **TIGHT)


def test_dnl_terms_coupled_in_one_softmax_are_non_local_attention():
    """q_i·k_j = (q_i − μ_q)·(k_j − μ_k) + μ_q·k_j + (constant in j): putting the unary logit μ_q·k_j back inside
    the pairwise softmax gives softmax(QKᵀ/√d), i.e. ``sa``, exactly (DNL §3's decomposition)."""
    dnl, sa = _build("dnl"), SelfAttentionAffinity(DIM, HEADS).double()
    v, q, k = _qkv((2, DIM, 4, 5))
    qh, kh = (t.flatten(2).transpose(1, 2).reshape(2, 20, HEADS, DIM // HEADS).transpose(1, 2) for t in (q, k))
    whitened = dnl.whiten(qh) @ dnl.whiten(kh).transpose(-2, -1)
    unary_logit = qh.mean(-2, keepdim=True) @ kh.transpose(-2, -1)  # μ_q·k_j, the same for every query
    coupled = ((whitened + unary_logit) * dnl.scale).softmax(-1)
    torch.testing.assert_close(coupled, sa.matrix(v.shape, q, k), **TIGHT)
    # whitening: DNL ignores a shift shared by all queries (or keys); non-local attention does not
    shift = _randn(1, DIM, 1, 1, seed=7)
    torch.testing.assert_close(dnl.matrix(v.shape, q + shift, k + shift), dnl.matrix(v.shape, q, k), **TIGHT)
    assert (sa.matrix(v.shape, q + shift, k) - sa.matrix(v.shape, q, k)).abs().max() > 1e-3


def test_dnl_unary_is_a_column_pattern_and_lesa_unary_is_the_diagonal():
    """Two "unary" terms that are different affinities: DNL's (softmax of key saliency) gives every query the same
    row, rank one; LESA's (lesa.txt Eq. 2: the query's weight on itself, S_ii v_i) is the diagonal of S."""
    v, q, k = _qkv((1, DIM, 4, 4))
    dnl = _build("dnl")
    kh = k.flatten(2).transpose(1, 2).reshape(1, 16, HEADS, DIM // HEADS).transpose(1, 2)
    dnl_unary = dnl.unary_weights(kh).unsqueeze(-2).expand(-1, -1, 16, -1)
    pairwise = dnl.matrix(v.shape, q, k) - dnl_unary
    torch.testing.assert_close(pairwise.sum(-1), torch.ones(1, HEADS, 16, dtype=F64), **TIGHT)
    assert (torch.linalg.matrix_rank(dnl_unary) == 1).all() and (torch.linalg.matrix_rank(pairwise) > 1).all()
    lesa = _randomised(RelativeSelfAttention2d(DIM, HEADS, DIM, (4, 4), logit_norm=False))
    full = lesa.matrix(v.shape, q, k)
    lesa.drop_diagonal = True
    lesa_unary = full - lesa.matrix(v.shape, q, k)
    assert (lesa_unary[..., ~torch.eye(16, dtype=torch.bool)] == 0).all()
    assert (torch.linalg.matrix_rank(lesa_unary) == 16).all()  # full rank: a different family


# ---------------------------------------------------------------- ConViT: positional attention and GPSA

def test_positional_attention_known_answer():
    """1×3 grid, one head, v_h = (0, 0, −ln 2): weights 2^{−δx²} over the image's keys. Query 0: δx = 0, 1, 2 →
    [1, 1/2, 1/16] → [16, 8, 1]/25; query 1: [1, 2, 1]/4; query 2: [1, 8, 16]/25. v = [1, 2, 4]."""
    op = PositionalAttention(1, 1).double()
    with torch.no_grad():
        op.weight.copy_(torch.tensor([[0.0, 0.0, -math.log(2)]], dtype=F64))
    v = torch.tensor([[[[1.0, 2.0, 4.0]]]], dtype=F64)
    expected = torch.tensor([(16 + 16 + 4) / 25, (1 + 4 + 4) / 4, (1 + 16 + 64) / 25], dtype=F64)
    torch.testing.assert_close(op(v).flatten(), expected, **TIGHT)


def test_positional_attention_is_conv_attn_renormalised_over_the_image():
    """Same quadratic logits as Cordonnier's conv_attn (v_h = α(2Δx, 2Δy, −1)); conv_attn normalises over the
    zero-padded plane of offsets, ConViT over the image's keys: each row is conv_attn's row divided by its sum."""
    conv = QuadraticEncodingAttention(9, kernel_size=3, alpha=0.8).double()
    with torch.no_grad():
        conv.centres.add_(torch.linspace(-0.4, 0.4, 18, dtype=F64).view(9, 2))
        conv.log_alpha.add_(torch.linspace(-0.3, 0.3, 9, dtype=F64))
    pos = PositionalAttention(9, 9).double()
    alpha, (cy, cx) = conv.log_alpha.detach().exp(), conv.centres.detach().T
    with torch.no_grad():
        pos.weight.copy_(torch.stack([2 * alpha * cx, 2 * alpha * cy, -alpha], 1))
    shape = (1, 9, 4, 6)
    a_conv = conv.matrix(shape)
    torch.testing.assert_close(pos.matrix(shape), a_conv / a_conv.sum(-1, keepdim=True), **TIGHT)
    assert (a_conv.sum(-1) < 1 - 1e-3).any()  # border rows of conv_attn lose mass; ConViT's do not


def test_convit_locality_init_looks_at_the_head_offsets():
    """9 heads on a 3×3 grid of offsets (ConViT: head h = h1 + 3·h2 looks at (Δy, Δx) = (h1 − 1, h2 − 1))."""
    op = PositionalAttention(9, 9, locality_strength=5.0)
    a = op.matrix((1, 9, 5, 5))[0]
    query = 2 * 5 + 2  # the centre pixel
    for h in range(9):
        dy, dx = h % 3 - 1, h // 3 - 1
        assert int(a[h, query].argmax()) == (2 + dy) * 5 + 2 + dx, h
    assert op.matrix((1, 9, 5, 5)).shape == (1, 9, 25, 25)


def test_gpsa_is_the_mixture_with_a_per_head_gate():
    """ConViT: A_h = (1 − σ(λ_h))·softmax(QKᵀ/√d) + σ(λ_h)·A_pos,h with λ = 1 at init (73% positional)."""
    op = build_affinity("gpsa", dim=DIM, heads=4, grid=GRID).double()
    assert isinstance(op, AffinityMixture) and op.gate == "per_head" and op.gate_logit.shape == (4,)
    torch.testing.assert_close(op.weights()[1], torch.full((4,), 1 / (1 + math.exp(-1)), dtype=F64))
    with torch.no_grad():
        op.gate_logit.copy_(torch.tensor([-1.0, 0.0, 2.0, -3.0]))
    v, q, k = _qkv((2, DIM, *GRID))
    lam = -op.gate_logit.detach()
    content, position = op.dynamic_affinity.matrix(v.shape, q, k), op.static_affinity.matrix(v.shape)
    gate = torch.sigmoid(lam).view(1, 4, 1, 1)
    torch.testing.assert_close(op.matrix(v.shape, q, k), (1 - gate) * content + gate * position, **TIGHT)
    torch.testing.assert_close(op(v, q, k), op.reference(v, q, k), **TIGHT)


def test_per_head_gate_on_a_finer_head_grouping_and_unchanged_scalar_gates():
    """mix(sa, dw3) meets 2 attention heads and 8 depthwise channels at 8 heads: one gate per channel."""
    op = _build("mix(sa,dw3)", gate="per_head")
    assert op.gate_logit.shape == (DIM,)
    _check(op, *_qkv((2, DIM, *GRID)))
    assert _build("mix(sa,dw3)").gate_logit.shape == (1,)


# ---------------------------------------------------------------- pre-softmax bias (CoAtNet, LeViT) vs Container's mix

def test_relative_bias_known_answers():
    """q = k = 0, so A = softmax(B). CoAtNet table w[Δx] for Δx = x_q − x_k ∈ {−1, 0, 1} = [ln 3, 0, ln 2]:
    row 0 ∝ [w0, w−1] = [1, 3], row 1 ∝ [w1, w0] = [2, 1]; v = [4, 8] → [7, 16/3]. On a 1×3 grid the offsets ±2
    clip to ±1: row 0 ∝ [1, 3, 3], v = [4, 8, 1] → 31/7. LeViT table on |Δx| = [0, ln 5]: rows [1, 5]/6, [5, 1]/6."""
    rel = RelativeBiasAttention(1, 1, (1, 2)).double()
    sym = RelativeBiasAttention(1, 1, (1, 2), symmetric=True).double()
    with torch.no_grad():
        rel.table.copy_(torch.tensor([[[math.log(3), 0.0, math.log(2)]]], dtype=F64))
        sym.table.copy_(torch.tensor([[[0.0, math.log(5)]]], dtype=F64))
    v = torch.tensor([[[[4.0, 8.0]]]], dtype=F64)
    zeros = torch.zeros_like(v)
    torch.testing.assert_close(rel(v, zeros, zeros).flatten(), torch.tensor([7.0, 16 / 3], dtype=F64), **TIGHT)
    torch.testing.assert_close(sym(v, zeros, zeros).flatten(), torch.tensor([44 / 6, 28 / 6], dtype=F64), **TIGHT)
    wide = torch.tensor([[[[4.0, 8.0, 1.0]]]], dtype=F64)
    assert rel(wide, torch.zeros_like(wide), torch.zeros_like(wide))[0, 0, 0, 0].item() == pytest.approx(31 / 7)


def _convit_logits_as_coatnet_table(rel: RelativeBiasAttention, pos: PositionalAttention) -> None:
    """Fill rel's table so B_h[i, j] = v_h·r_ij, ConViT's positional logits (table offset = query − key = −δ)."""
    gh, gw = rel.grid
    dy = -torch.arange(1 - gh, gh, dtype=F64)[:, None]
    dx = -torch.arange(1 - gw, gw, dtype=F64)[None, :]
    w = pos.weight.detach().double()
    with torch.no_grad():
        rel.table.copy_(w[:, 0, None, None] * dx + w[:, 1, None, None] * dy + w[:, 2, None, None] * (dx ** 2 + dy ** 2))


def test_pre_softmax_bias_is_a_product_and_the_mixture_a_sum():
    """softmax(S + B) = normalise(softmax(S) ⊙ softmax(B)): the bias multiplies the content affinity, where
    Container's mix and ConViT's GPSA add (1 − σ)·softmax(S) + σ·softmax(B). With B = ConViT's positional logits they
    differ; they coincide when one factor is flat along each row and the gate sits at the matching end:
    q = 0 (content flat) vs the fully positional gate, B = 0 (position flat) vs the fully content gate."""
    grid = (4, 5)
    rel = RelativeBiasAttention(DIM, HEADS, grid).double()
    gpsa = _randomised(build_affinity("gpsa", dim=DIM, heads=HEADS, grid=grid))
    _convit_logits_as_coatnet_table(rel, gpsa.static_affinity)
    v, q, k = _qkv((2, DIM, *grid))
    content, position = gpsa.dynamic_affinity.matrix(v.shape, q, k), gpsa.static_affinity.matrix(v.shape)
    product = content * position
    torch.testing.assert_close(rel.matrix(v.shape, q, k), product / product.sum(-1, keepdim=True), **TIGHT)
    assert (rel.matrix(v.shape, q, k) - gpsa.matrix(v.shape, q, k)).abs().max() > 0.05
    with torch.no_grad():
        gpsa.gate_logit.fill_(-60.0)  # σ(λ) = 1: fully positional
    zeros = torch.zeros_like(q)
    torch.testing.assert_close(rel(v, zeros, k), gpsa(v, zeros, k), **TIGHT)
    with torch.no_grad():
        gpsa.gate_logit.fill_(60.0)  # fully content
        rel.table.zero_()
    torch.testing.assert_close(rel(v, q, k), gpsa(v, q, k), **TIGHT)


def test_relative_bias_needs_its_grid():
    with pytest.raises(ValueError, match="pass grid=\\(H, W\\)"):
        build_affinity("rel_sa", dim=DIM, heads=HEADS)


# ---------------------------------------------------------------- head mixing (DeepViT, CaiT)

@pytest.mark.parametrize("inner", ["sa", "window3", "pos_attn"])
def test_head_mixing_known_answer(inner):
    """Two heads of one channel, 1×3 grid, uniform maps (q = k = 0; window3 covers the grid; pos_attn with zero
    logits): A'_h = Σ_g Θ_hg·(1/3) so out_h = rowsum(Θ_h)·mean(v_h). Θ = [[1, 2], [0.5, −1]], means [3, 2]:
    every position gets [3·3, −0.5·2] — through the dense path (sa) and the per-head path (window3, pos_attn)."""
    op = build_affinity(f"heads_mixed({inner})", dim=2, heads=2, grid=(1, 3)).double()
    with torch.no_grad():
        for p in op.inner.parameters():
            p.zero_()
        op.mixing.copy_(torch.tensor([[1.0, 2.0], [0.5, -1.0]]))
    v = torch.tensor([[[[1.0, 2.0, 6.0]], [[3.0, 0.0, 3.0]]]], dtype=F64)
    zeros = torch.zeros_like(v)
    out = op(v, zeros, zeros) if op.dynamic else op(v)
    torch.testing.assert_close(out[0, :, 0], torch.tensor([[9.0] * 3, [-1.0] * 3], dtype=F64), **TIGHT)


def test_head_mixing_starts_as_its_part_and_keeps_its_contract():
    v, q, k = _qkv((2, DIM, *GRID))
    inner = build_affinity("window3", dim=DIM, heads=HEADS).double()
    mixed = HeadMixing(inner)
    torch.testing.assert_close(mixed(v, q, k), inner(v, q, k), **TIGHT)  # Θ = I
    outlook = build_affinity("heads_mixed(outlook)", dim=DIM, heads=HEADS)
    assert outlook.uses_value is False and AggregationBlock(DIM, outlook).proj_in.out_channels == 2 * DIM


def test_talking_heads_known_answer_logits_mixed_before_the_softmax():
    """Two heads of d = 1, N = 2: S_0 = q[:, 0]k[:, 0]ᵀ = [[0, ln 3]] per row, S_1 = [[ln 2, 0]] per row.
    Θ^l = I: head 0 weights [1, 3]/4, head 1 [2, 1]/3; v = [[3, 4], [6, 8]] → [21/4, 16/3] at both tokens.
    Θ^l = swap: head 0 reads S_1 → [2, 1]/3 → 4; head 1 reads S_0 → [1, 3]/4 → 7."""
    op = LogitMixedAttention(2, 2).double()
    q = torch.ones(1, 2, 2, dtype=F64)
    k = torch.tensor([[[0.0, math.log(2)], [math.log(3), 0.0]]], dtype=F64)
    v = torch.tensor([[[3.0, 4.0], [6.0, 8.0]]], dtype=F64)
    torch.testing.assert_close(op(v, q, k)[0], torch.tensor([[21 / 4, 16 / 3]] * 2, dtype=F64), **TIGHT)
    with torch.no_grad():
        op.logit_mixing.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    torch.testing.assert_close(op(v, q, k)[0], torch.tensor([[4.0, 7.0]] * 2, dtype=F64), **TIGHT)


@pytest.mark.parametrize("norm", ["softmax", "scale", "ln_relu"])
def test_logit_mixed_attention_fast_path_matches_the_reference(norm):
    op = _randomised(LogitMixedAttention(DIM, HEADS, norm))
    _check(op, *_qkv((2, DIM, *GRID)))
    _check(op, *_qkv((2, 9, DIM)))


def test_head_mixing_refusals():
    with pytest.raises(ValueError, match="key_only's U1 mixes all channels"):
        build_affinity("heads_mixed(key_only)", dim=DIM, heads=HEADS)
    with pytest.raises(ValueError, match="its argument must be 'sa'"):
        build_affinity("talking_heads(window7)", dim=DIM, heads=HEADS)
    with pytest.raises(ValueError, match="takes one affinity"):
        build_affinity("heads_mixed(sa,dw3)", dim=DIM, heads=HEADS)


# ---------------------------------------------------------------- CvT's convolutional projection

@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("kernel,outputs", [(3, 3), (5, 2), (3, 1)])
def test_conv_projection_is_depthwise_conv_batchnorm_pointwise(kernel, outputs, train):
    proj = _randomised(ConvProjection(DIM, outputs, kernel)).train(train)
    x = _randn(2, DIM, 5, 7, seed=4)
    want = ref.conv_projection_forward(proj, x)  # before forward: training BN updates its running statistics
    torch.testing.assert_close(proj(x), want, **TIGHT)


def test_conv_projection_known_answer():
    """One channel, 1×3 map [1, 2, 4], kernel [[0, 0, 0], [1, 10, 100], [0, 0, 0]] (zero padding): dw = [210, 421, 42];
    BN in eval with mean 1, var 4 − eps, weight 2, bias 3: 2·(dw − 1)/2 + 3 = dw + 2; point-wise 0.5, bias −1."""
    proj = ConvProjection(1, 1, 3).double().eval()
    dw, bn, pw = proj.branches[0]
    with torch.no_grad():
        dw.weight.zero_()
        dw.weight[0, 0, 1] = torch.tensor([1.0, 10.0, 100.0])
        bn.running_mean.fill_(1.0)
        bn.running_var.fill_(4.0 - bn.eps)
        bn.weight.fill_(2.0)
        bn.bias.fill_(3.0)
        pw.weight.fill_(0.5)
        pw.bias.fill_(-1.0)
    x = torch.tensor([[[[1.0, 2.0, 4.0]]]], dtype=F64)
    expected = 0.5 * (torch.tensor([210.0, 421.0, 42.0], dtype=F64) + 2) - 1
    torch.testing.assert_close(proj(x).flatten(), expected, **TIGHT)


@pytest.mark.parametrize("spec", ["sa", "outlook", "gpsa", "dw5", "additive"])
def test_block_with_convolutional_projections(spec):
    """AggregationBlock(proj='conv3'): the affinity's inputs are the conv projection of norm1(x), chunked in the
    block's order; the deployment fold stays exact (norm1 kept: it cannot fold through a padded k×k conv)."""
    torch.manual_seed(0)
    block = _randomised(AggregationBlock(DIM, build_affinity(spec, dim=DIM, heads=HEADS, grid=GRID),
                                         proj="conv3")).eval()
    assert isinstance(block.proj_in, ConvProjection)
    x = _randn(2, DIM, *GRID, seed=5)
    projected = ref.conv_projection_forward(block.proj_in, ref._batch_norm(x, block.norm1))
    v, q, k = block.affinity_inputs(x)
    parts = projected.chunk(len(block.proj_in.branches), 1)
    order = {1: (0, None, None), 2: (1, 0, None), 3: (2, 0, 1)}[len(parts)]  # (v, q, k) from (q, k, v) chunks
    for got, index in zip((v, q, k), order):
        want = None if index is None else parts[index]
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want, **TIGHT)
    before = block(x)
    block.reparameterize()
    torch.testing.assert_close(block(x), before, rtol=1e-9, atol=1e-9)


def test_container_takes_the_projection_by_name_and_refuses_unknown_ones():
    from ctxagg.models.container import ContainerNet
    model = ContainerNet(mixers=("dw3", "outlook", "gpsa", "rel_sa"), dims=(8, 16, 16, 16), depths=(1, 1, 1, 1),
                         img_size=32, head_dim=8, num_classes=3, proj="conv3").eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    assert all(isinstance(b.proj_in, ConvProjection) for s in model.stages for b in s.blocks)
    for bad in ("conv4", "dwconv3", "Linear"):
        with pytest.raises(ValueError, match="proj must be 'linear' or 'conv<k>'"):
            AggregationBlock(DIM, build_affinity("sa", dim=DIM, heads=HEADS), proj=bad)


def test_macs_state_the_cost_classes():
    """macs(N) as documented: linear in N for the global-vector and local operators, N·(H+W) for the separable
    positional attention, N² for DNL; head mixing M times its part plus the mix."""
    n = 16  # a 4×4 grid
    assert _build("additive").macs(n) == 6 * n * DIM
    assert _build("separable").macs(n) == 3 * n * DIM
    assert _build("outlook").macs(n) == n * 81 * (DIM * HEADS + DIM)
    assert _build("dnl").macs(n) == 2 * n * n * DIM + 2 * n * DIM
    assert _build("pos_attn").macs(n) == 2 * n * 4 * DIM
    window = build_affinity("window3", dim=DIM, heads=HEADS)
    assert _build("heads_mixed(window3)").macs(n) == HEADS * window.macs(n) + n * DIM * HEADS
    assert _build("heads_mixed(sa)").macs(n) == 2 * n * n * DIM + n * n * HEADS ** 2
