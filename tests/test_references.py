"""Every affinity operator against an independent float64 reference (tests/references.py), written from
the papers' equations: forward() == reference, matrix() == reference matrix, on a non-square grid with
batch 2 and several heads; known-answer cases with the numbers written here; gradients through both.

The registry test builds every registered name from one standard context, so an operator registered
later is checked too (and fails clearly if it cannot be built or has no reference)."""
import math

import pytest
import torch
from torch import nn

import references as ref
from ctxagg.affinity import (ATTENTION_NORMS, AttentionAugmentedConv, DepthwiseConvAffinity, DepthwiseSelfAttention,
                             GroupConvAffinity, KeyOnlyAttention, LocallyEnhancedSelfAttention,
                             RelativeSelfAttention2d, SelfAttentionAffinity, TokenMlpAffinity, affinity_names,
                             build_affinity)

DIM, HEADS, GRID, BATCH = 16, 4, (5, 7), 2  # non-square grid, batch ≥ 2, heads ≥ 2
STANDARD_CONTEXT = dict(dim=DIM, heads=HEADS, grid=GRID)
TIGHT = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _inputs(shape=(BATCH, DIM, *GRID)):
    return [_randn(*shape, seed=s) for s in (1, 2, 3)]


def _randomised(op: nn.Module, seed: int = 0) -> nn.Module:
    """float64, every parameter and BN statistic non-trivial (gates away from 0.5, saliency away from uniform)."""
    op = op.double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in op.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
        for bn in [m for m in op.modules() if isinstance(m, nn.BatchNorm2d)]:
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g, dtype=torch.float64))
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g, dtype=torch.float64) + 0.5)
    return op


def _call(op, v, q, k):
    """The affinity contract forward(v, q, k); operators that aggregate the keys themselves take them as v."""
    return op(v, q) if getattr(op, "uses_value", True) is False else op(v, q, k)


def _check(op, v, q, k):
    """forward == reference forward, matrix == reference matrix, forward == reference through the matrix."""
    reference = ref.reference_for(op)
    out = _call(op, v, q, k)
    assert out.shape == v.shape
    torch.testing.assert_close(out, reference.forward(op, v, q, k), **TIGHT)
    a = op.matrix(v.shape, q, k)
    torch.testing.assert_close(a, reference.matrix(op, v.shape, q, k).expand_as(a), **TIGHT)
    torch.testing.assert_close(out, ref.through_matrix(a, v, op.bias_term()), **TIGHT)


# ------------------------------------------------------------------ the registry: every name, present and future

def _registered_names() -> list[str]:
    return [name for name in affinity_names() if "(" not in name]  # mix(<dynamic>,<static>) is a combinator


def _build_standard(spec: str, **options):
    torch.manual_seed(0)
    try:
        op = build_affinity(spec, **STANDARD_CONTEXT, **options)
    except Exception as err:  # noqa: BLE001 - turned into a clear failure, never a skip
        pytest.fail(f"registered affinity {spec!r} cannot be built from the standard context {STANDARD_CONTEXT}: "
                    f"{type(err).__name__}: {err}. Every registered operator must build from dim/heads/grid.")
    return _randomised(op)


def test_registry_holds_every_operator_of_the_papers():
    assert {"sa", "dw", "mhdw", "conv", "gconv", "mlp", "mlp_lr", "mh_mlp_lr", "key_only", "dw_sa"} <= set(
        _registered_names())


@pytest.mark.parametrize("name", _registered_names())
@pytest.mark.parametrize("layout", ["grid", "tokens"])
def test_every_registered_affinity_matches_its_independent_reference(name, layout):
    spec, grid = ref.registry_case(name, GRID)
    op = _build_standard(spec)
    v, q, k = _inputs((BATCH, DIM, *grid))
    if layout == "tokens":
        if op.needs_grid:
            pytest.skip(f"{name} needs a (B, C, H, W) grid: (B, N, C) tokens are refused by design")
        v, q, k = (ref.tokens(t) for t in (v, q, k))
    _check(op, v, q, k)


@pytest.mark.parametrize("name", _registered_names())
def test_every_registered_affinity_has_the_reference_gradients(name):
    spec, grid = ref.registry_case(name, GRID)
    op = _build_standard(spec)
    v, q, k = (t.requires_grad_() for t in _inputs((BATCH, DIM, *grid)))
    weights = _randn(BATCH, DIM, *grid, seed=9)
    inputs = [v] + ([q, k] if op.dynamic else [])
    if getattr(op, "uses_value", True) is False:
        inputs = [v, q]
    params = [p for p in op.parameters()]
    got = torch.autograd.grad((_call(op, v, q, k) * weights).sum(), inputs + params)
    want = torch.autograd.grad((ref.reference_for(op).forward(op, v, q, k) * weights).sum(), inputs + params)
    for (name_, p), g in zip(op.named_parameters(), got[len(inputs):]):
        assert g.abs().sum() > 0, f"{name}: no gradient reaches {name_}"
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TIGHT)


MIXES = ["mix(sa,dw)", "mix(sa,dw5)", "mix(sa,mhdw)", "mix(sa,mlp)", "mix(sa,mh_mlp_lr)"]


@pytest.mark.parametrize("spec", MIXES)
@pytest.mark.parametrize("gate", ["convex", "free"])
def test_mixture_matches_alpha_dynamic_plus_beta_static(spec, gate):
    op = _build_standard(spec, gate=gate)
    alpha, beta = ref.mixture_gates(op)
    assert abs(alpha.item() - beta.item()) > 0.05  # randomised away from α = β, so a swap shows
    _check(op, *_inputs())


# ------------------------------------------------------------------ self-attention, every normaliser

@pytest.mark.parametrize("norm", ATTENTION_NORMS)
@pytest.mark.parametrize("layout", ["grid", "tokens"])
def test_attention_normaliser_matches_the_reference(norm, layout):
    op = SelfAttentionAffinity(DIM, HEADS, norm).double()
    v, q, k = _inputs()
    if layout == "tokens":
        v, q, k = (ref.tokens(t) for t in (v, q, k))
    _check(op, v, q, k)


@pytest.mark.parametrize("norm", ATTENTION_NORMS)
def test_attention_bias_enters_the_scores_before_the_normaliser(norm):
    op = SelfAttentionAffinity(DIM, HEADS, norm).double()
    v, q, k = _inputs()
    n = GRID[0] * GRID[1]
    bias = _randn(HEADS, n, n, seed=7)
    torch.testing.assert_close(op(v, q, k, attn_bias=bias), ref.sa_forward(op, v, q, k, bias), **TIGHT)
    torch.testing.assert_close(op.matrix(v.shape, q, k, attn_bias=bias), ref.sa_matrix(op, v.shape, q, k, bias), **TIGHT)


# Known answers. One head, d = 2, N = 3 tokens: q = √2·[[1, 0], [0, 2], [1, −1]], k = [[1, 0], [0, 1], [1, 1]],
# so the scaled scores QKᵀ/√2 are S = [[1, 0, 1], [0, 2, 2], [1, −1, 0]] exactly.
_KQ = [[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]]
_KK = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
_KV = [[1.0, 2.0], [0.0, 1.0], [3.0, 0.0]]
_E = math.e
# LayerNorm over each row of S by hand: deviations from the row mean and the (biased) row variance
_LN_ROWS = [([1 / 3, -2 / 3, 1 / 3], 2 / 9), ([-4 / 3, 2 / 3, 2 / 3], 8 / 9), ([1.0, -1.0, 0.0], 2 / 3)]
_LN = [[dev / math.sqrt(var + 1e-5) for dev in devs] for devs, var in _LN_ROWS]
KNOWN_ANSWERS = {
    "none": [[1, 0, 1], [0, 2, 2], [1, -1, 0]],
    "scale": [[1 / 3, 0, 1 / 3], [0, 2 / 3, 2 / 3], [1 / 3, -1 / 3, 0]],
    "scale_relu": [[1 / 3, 0, 1 / 3], [0, 2 / 3, 2 / 3], [1 / 3, 0, 0]],
    "softmax": [[_E / (2 * _E + 1), 1 / (2 * _E + 1), _E / (2 * _E + 1)],
                [1 / (1 + 2 * _E ** 2), _E ** 2 / (1 + 2 * _E ** 2), _E ** 2 / (1 + 2 * _E ** 2)],
                [_E / (_E + 1 / _E + 1), (1 / _E) / (_E + 1 / _E + 1), 1 / (_E + 1 / _E + 1)]],
    "layernorm": [[x / 3 for x in row] for row in _LN],
    "ln_relu": [[max(x, 0.0) / 3 for x in row] for row in _LN],
}


def test_known_answers_cover_every_normaliser():
    assert set(KNOWN_ANSWERS) == set(ATTENTION_NORMS)


@pytest.mark.parametrize("norm", ATTENTION_NORMS)
def test_attention_normaliser_known_answer(norm):
    op = SelfAttentionAffinity(2, 1, norm).double()
    q = torch.tensor([_KQ], dtype=torch.float64) * math.sqrt(2)
    k, v = torch.tensor([_KK], dtype=torch.float64), torch.tensor([_KV], dtype=torch.float64)
    expected = KNOWN_ANSWERS[norm]
    out = [[sum(expected[i][j] * _KV[j][c] for j in range(3)) for c in range(2)] for i in range(3)]
    torch.testing.assert_close(op.matrix(v.shape, q, k)[0, 0], torch.tensor(expected, dtype=torch.float64), **TIGHT)
    torch.testing.assert_close(op(v, q, k)[0], torch.tensor(out, dtype=torch.float64), **TIGHT)
    if norm == "scale":  # the output written out: row 0 = (v0 + v2)/3, row 1 = 2(v1 + v2)/3, row 2 = (v0 − v1)/3
        torch.testing.assert_close(op(v, q, k)[0], torch.tensor([[4 / 3, 2 / 3], [2, 2 / 3], [1 / 3, 1 / 3]],
                                                                dtype=torch.float64), **TIGHT)


# ------------------------------------------------------------------ convolutions

@pytest.mark.parametrize("kernel,heads,grid", [(3, None, GRID), (5, None, GRID), (3, HEADS, GRID), (5, HEADS, (2, 3)),
                                               (7, 2, (4, 3))])
def test_depthwise_and_multi_head_depthwise_match_the_reference(kernel, heads, grid):
    op = _randomised(DepthwiseConvAffinity(DIM, kernel, heads=heads))
    _check(op, *_inputs((BATCH, DIM, *grid)))


def test_depthwise_known_answer():
    """3×3 kernel [[1, 2, 3], [4, 5, 6], [7, 8, 9]] on a 3×3 grid, impulses 1 at (0, 0) and 2 at (2, 2), bias 0.5:
    cross-correlation, out[y, x] = Σ w[ky, kx] in[y + ky − 1, x + kx − 1]."""
    op = DepthwiseConvAffinity(1, 3).double()
    with torch.no_grad():
        op.weight.copy_(torch.arange(1.0, 10.0, dtype=torch.float64).view(1, 1, 3, 3))
        op.bias.fill_(0.5)
    x = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    x[0, 0, 0, 0], x[0, 0, 2, 2] = 1, 2
    expected = torch.tensor([[5, 4, 0], [2, 1 + 18, 16], [0, 12, 10]], dtype=torch.float64) + 0.5
    torch.testing.assert_close(op(x)[0, 0], expected, **TIGHT)
    a = op.matrix(x.shape)[0, 0]
    torch.testing.assert_close(a[4], torch.arange(1.0, 10.0, dtype=torch.float64), **TIGHT)  # centre sees the kernel
    torch.testing.assert_close(a[0], torch.tensor([5, 6, 0, 8, 9, 0, 0, 0, 0], dtype=torch.float64), **TIGHT)
    torch.testing.assert_close(a[8], torch.tensor([0, 0, 0, 0, 1, 2, 0, 4, 5], dtype=torch.float64), **TIGHT)


@pytest.mark.parametrize("groups", [1, 2, HEADS, DIM])
def test_full_and_grouped_convolution_match_the_reference(groups):
    op = _randomised(GroupConvAffinity(DIM, 3, groups=groups))
    _check(op, *_inputs())


# ------------------------------------------------------------------ token MLPs (Container Eq. 8)

@pytest.mark.parametrize("heads,rank", [(1, None), (HEADS, None), (1, 8), (HEADS, 8), (HEADS, 35)])
@pytest.mark.parametrize("layout", ["grid", "tokens"])
def test_token_mlp_matches_the_reference(heads, rank, layout):
    op = _randomised(TokenMlpAffinity(DIM, GRID[0] * GRID[1], heads=heads, rank=rank, grid=GRID))
    v, q, k = _inputs()
    if layout == "tokens":
        v, q, k = (ref.tokens(t) for t in (v, q, k))
    _check(op, v, q, k)


def test_token_mlp_known_answer():
    """A = W (Eq. 8, W_MLPᵀ stored directly): N = 3, one channel; out_i = Σ_j W[i, j] v_j."""
    op = TokenMlpAffinity(1, 3, heads=1).double()
    with torch.no_grad():
        op.weight.copy_(torch.tensor([[[1.0, 2.0, 0.0], [0.0, -1.0, 3.0], [0.5, 0.0, 0.0]]]))
    v = torch.tensor([[[1.0], [10.0], [100.0]]], dtype=torch.float64)
    torch.testing.assert_close(op(v)[0, :, 0], torch.tensor([21.0, 290.0, 0.5], dtype=torch.float64), **TIGHT)


# ------------------------------------------------------------------ key-only attention (LinGlos Eq. 2-4)

@pytest.mark.parametrize("heads", [1, 2, HEADS])
@pytest.mark.parametrize("layout", ["grid", "tokens"])
def test_key_only_matches_equations_2_to_4(heads, layout):
    op = _randomised(KeyOnlyAttention(DIM, heads))
    v, q, k = _inputs()
    if layout == "tokens":
        v, q, k = (ref.tokens(t) for t in (v, q, k))
    _check(op, v, q, k)  # aggregated, gate, saliency_input all different, so a swap of roles shows


def test_key_only_known_answer():
    """d = 2, one head, N = 3, the block's roles (aggregated = saliency_input = K, gate = the paper's V). W_sal = [√2·ln 2, 0] gives logits
    K[i, 0]·ln 2, so A = [1, 2, 4]/7 for K[:, 0] = [0, 1, 2]; G = ΣA_i K_i = [10/7, 1];
    G ⊙ Q = [[10, 1], [0, 2], [10, −1]]; U1 = [[1, 0], [0.5, 1]], b1 = [0.25, −1]; Z = (G ⊙ Q) U1ᵀ + b1 + K."""
    op = KeyOnlyAttention(2, 1).double()
    with torch.no_grad():
        op.saliency.copy_(torch.tensor([[math.sqrt(2) * math.log(2), 0.0]], dtype=torch.float64))
        op.u1.weight.copy_(torch.tensor([[1.0, 0.0], [0.5, 1.0]], dtype=torch.float64))
        op.u1.bias.copy_(torch.tensor([0.25, -1.0], dtype=torch.float64))
    keys = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [2.0, 1.75]]], dtype=torch.float64)
    gate = torch.tensor([[[7.0, 1.0], [0.0, 2.0], [7.0, -1.0]]], dtype=torch.float64)
    expected = torch.tensor([[10.25, 5.0], [1.25, 1.0], [12.25, 4.75]], dtype=torch.float64)
    torch.testing.assert_close(op(keys, gate, keys)[0], expected, **TIGHT)
    torch.testing.assert_close(ref.through_matrix(op.matrix(keys.shape, gate, keys), keys, op.bias_term())[0],
                               expected, **TIGHT)


# ------------------------------------------------------------------ depth-wise self-attention (Eq. 5)

def _dw_sa_cases():
    n = GRID[0] * GRID[1]
    select = (_randn(1, 1, n, n, seed=5) > 0).double()
    select[0, 0, torch.arange(n), torch.arange(n)] = 1
    return {"all_keys": {}, "select": dict(select=select),
            "rel_bias": dict(attn_bias=_randn(1, 2, n, n, seed=6)),
            "class_tokens": dict(attn_bias=_randn(1, 4, n - 3, n - 3, seed=6)),
            "select_and_bias": dict(select=select, attn_bias=_randn(1, 4, n, n, seed=6))}


@pytest.mark.parametrize("case", list(_dw_sa_cases()))
def test_depthwise_self_attention_matches_equation_5(case):
    options = _dw_sa_cases()[case]
    op = DepthwiseSelfAttention(DIM, options["attn_bias"].shape[1] if "attn_bias" in options else 1).double()
    keys, q, _ = _inputs()
    if "class_tokens" == case:  # 3 leading tokens, (B, N, C) layout
        keys, q = ref.tokens(keys), ref.tokens(q)
    out = op(keys, q, **options)
    assert out.shape == keys.shape
    torch.testing.assert_close(out, ref.dw_sa_forward(op, keys, q, **options), **TIGHT)
    torch.testing.assert_close(op.matrix(keys.shape, q, **options), ref.dw_sa_matrix(op, keys.shape, q, **options),
                               **TIGHT)


def test_depthwise_self_attention_known_answer():
    """o_i = q_i ⊙ k̄_i + Σ_j p_ij k_j, N = 3, C = 2: k = [[1, 2], [3, 4], [5, 0]], q = [[1, 0], [2, −1], [0.5, 3]]."""
    op = DepthwiseSelfAttention(2, 1).double()
    k = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]]], dtype=torch.float64)
    q = torch.tensor([[[1.0, 0.0], [2.0, -1.0], [0.5, 3.0]]], dtype=torch.float64)
    p = torch.tensor([[[[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [1.0, 0.0, -1.0]]]], dtype=torch.float64)
    select = torch.tensor([[[[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]]], dtype=torch.float64)
    # all keys: k̄ = [3, 2] → q ⊙ k̄ = [[3, 0], [6, −2], [1.5, 6]]; p·k = [k1, 2·k0, k0 − k2] = [[3, 4], [2, 4], [−4, 2]]
    expected = torch.tensor([[6.0, 4.0], [8.0, 2.0], [-2.5, 8.0]], dtype=torch.float64)
    torch.testing.assert_close(op(k, q, attn_bias=p)[0], expected, **TIGHT)
    # selection: k̄ = [[2, 3], [4, 2], [3, 1]]; p masked by it drops p[1, 0] = 2 (key 0 not selected by query 1)
    expected = torch.tensor([[2 + 3.0, 0 + 4.0], [8.0, -2.0], [1.5 - 4, 3.0 + 2]], dtype=torch.float64)
    torch.testing.assert_close(op(k, q, attn_bias=p, select=select)[0], expected, **TIGHT)
    a = op.matrix(k.shape, q, attn_bias=p, select=select)
    torch.testing.assert_close(ref.through_matrix(a, k, None)[0], expected, **TIGHT)


# ------------------------------------------------------------------ LESA's binary term and the LESA / AA layers

def _relative_attention(rel_pos="full", key_rel=True, logit_norm=True, train=False, drop_diagonal=False, seed=0):
    torch.manual_seed(seed)
    op = _randomised(RelativeSelfAttention2d(DIM, HEADS, 8, (4, 4), rel_pos, key_rel=key_rel, logit_norm=logit_norm),
                     seed)
    op.drop_diagonal = drop_diagonal
    return op.train(train)


RELATIVE_CASES = {
    "lesa_eval": {}, "lesa_train": dict(train=True), "factorized": dict(rel_pos="factorized"),
    "drop_diagonal_eval": dict(drop_diagonal=True), "drop_diagonal_train": dict(drop_diagonal=True, train=True),
    "no_key_term": dict(key_rel=False), "bello": dict(rel_pos="factorized", key_rel=False, logit_norm=False),
}


@pytest.mark.parametrize("case", list(RELATIVE_CASES))
@pytest.mark.parametrize("grid", [GRID, (3, 2)])  # 5×7 clips the 4×4 table's offsets; 3×2 reads inside it
def test_relative_self_attention_matches_lesa_equations_1_to_3(case, grid):
    op = _relative_attention(**RELATIVE_CASES[case])
    v = _randn(BATCH, DIM, *grid, seed=1)
    q, k = _randn(BATCH, 8, *grid, seed=2), _randn(BATCH, 8, *grid, seed=3)
    want = ref.relative_attention_forward(op, v, q, k)  # before forward: training BN updates running stats
    want_matrix = ref.relative_attention_matrix(op, v.shape, q, k)
    torch.testing.assert_close(op(v, q, k), want, **TIGHT)
    torch.testing.assert_close(op.matrix(v.shape, q, k), want_matrix, **TIGHT)


@pytest.mark.parametrize("mode", ["lesa", "static", "sa"])
@pytest.mark.parametrize("rel_pos", ["full", "factorized"])
def test_lesa_layer_matches_equations_5_to_7(mode, rel_pos):
    torch.manual_seed(0)
    layer = _randomised(LocallyEnhancedSelfAttention(DIM, HEADS, (4, 4), mode=mode, rel_pos=rel_pos)).eval()
    x = _randn(BATCH, DIM, *GRID, seed=4)
    torch.testing.assert_close(layer(x), ref.lesa_forward(layer, x), **TIGHT)


def test_attention_augmented_conv_matches_bello():
    torch.manual_seed(0)
    aa = _randomised(AttentionAugmentedConv(32, HEADS, (4, 4), key_ratio=0.25, value_ratio=0.25))
    x = _randn(BATCH, 32, *GRID, seed=4)
    torch.testing.assert_close(aa(x), ref.attention_augmented_forward(aa, x), **TIGHT)


# ------------------------------------------------------------------ the design-space table's "tested" column

def test_every_design_space_row_is_checked_against_its_reference():
    """`ctxagg space` says every row is tested: each registered name (and each combinator's example instance)
    builds, has an independent reference, and matches it here."""
    from ctxagg.affinity.space import COMBINATOR_EXAMPLES, DESIGN_SPACE

    assert set(DESIGN_SPACE) == set(affinity_names())  # a registered operator must say what it is
    for name in DESIGN_SPACE:
        spec, grid = ref.registry_case(COMBINATOR_EXAMPLES.get(name, name), GRID)
        op = _build_standard(spec)
        _check(op, *_inputs((BATCH, DIM, *grid)))
