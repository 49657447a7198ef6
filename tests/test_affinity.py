"""The affinity contract: matrix() @ V + bias == forward(), for every operator (DESIGN.md).

Both sides are also compared with an independent reference written from the paper's equation
(tests/references.py), so the check cannot pass by comparing one code path with itself. The operator
list is the registry (every registered name, plus kernel-size and mixture variants), not a hand-kept list.
"""
import pytest
import torch

import references as ref
from ctxagg.affinity import (ATTENTION_NORMS, DepthwiseConvAffinity, SelfAttentionAffinity,
                             TokenMlpAffinity, affinity_names, apply_matrix, build_affinity, conv_toeplitz)
from ctxagg.bench import largest_intermediate

SPECS = [name for name in affinity_names() if "(" not in name] + [
    "dw5", "mhdw3", "conv3", "gconv3", "mix(sa,dw5)", "mix(sa,mhdw3)", "mix(sa,mlp)"]
DIM, HEADS, GRID = 16, 4, (5, 7)  # non-square grid on purpose


def _inputs(shape=(2, DIM, *GRID), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(3)]


def _build(spec, **kw):
    torch.manual_seed(0)
    return build_affinity(spec, dim=DIM, heads=HEADS, grid=GRID, **kw).double()


def _call(aff, v, q, k):
    """forward(v, q, k); an operator that aggregates the keys itself (``uses_value = False``) takes them as v."""
    return aff(v, q) if getattr(aff, "uses_value", True) is False else aff(v, q, k)


@pytest.mark.parametrize("spec", SPECS)
def test_matrix_times_values_equals_forward(spec):
    spec, grid = ref.registry_case(spec, GRID)
    aff = _build(spec)
    v, q, k = _inputs((2, DIM, *grid))
    out = _call(aff, v, q, k)
    assert out.shape == v.shape
    torch.testing.assert_close(out, aff.reference(v, q, k), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, ref.reference_for(aff).forward(aff, v, q, k), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("norm", ATTENTION_NORMS)
def test_attention_normalisers_match_their_matrix(norm):
    aff = SelfAttentionAffinity(DIM, HEADS, normaliser=norm).double()
    v, q, k = _inputs()
    torch.testing.assert_close(aff(v, q, k), aff.reference(v, q, k), rtol=1e-10, atol=1e-10)
    # the paper's normaliser written out independently (matrix() and forward share a path for some of them)
    torch.testing.assert_close(aff.matrix(v.shape, q, k), ref.sa_matrix(aff, v.shape, q, k), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(aff(v, q, k), ref.sa_forward(aff, v, q, k), rtol=1e-10, atol=1e-10)


def test_softmax_rows_sum_to_one_and_scale_divides_by_tokens():
    v, q, k = _inputs()
    a = SelfAttentionAffinity(DIM, HEADS).double().matrix(v.shape, q, k)
    torch.testing.assert_close(a.sum(-1), torch.ones_like(a[..., 0]))
    raw = SelfAttentionAffinity(DIM, HEADS, normaliser="none").double().matrix(v.shape, q, k)
    scaled = SelfAttentionAffinity(DIM, HEADS, normaliser="scale").double().matrix(v.shape, q, k)
    torch.testing.assert_close(scaled * v.shape[2] * v.shape[3], raw)


def test_attention_bias_enters_the_scores():
    aff = SelfAttentionAffinity(DIM, HEADS).double()
    v, q, k = _inputs()
    n = GRID[0] * GRID[1]
    bias = torch.randn(HEADS, n, n, dtype=torch.float64)
    out = aff(v, q, k, attn_bias=bias)
    torch.testing.assert_close(out, apply_matrix(aff.matrix(v.shape, q, k, attn_bias=bias), v))
    assert not torch.allclose(out, aff(v, q, k))


@pytest.mark.parametrize("spec", ["sa", "mlp", "mlp_lr", "mh_mlp_lr", "mix(sa,mlp)"])
def test_token_layout_matches_grid_layout(spec):
    aff = _build(spec)
    v, q, k = _inputs()
    as_tokens = [t.flatten(2).transpose(1, 2) for t in (v, q, k)]
    out_tokens = aff(*as_tokens)
    torch.testing.assert_close(out_tokens, aff(v, q, k).flatten(2).transpose(1, 2))
    torch.testing.assert_close(out_tokens, aff.reference(*as_tokens))


@pytest.mark.parametrize("spec", SPECS)
def test_gradients_reach_every_parameter_and_input(spec):
    spec, grid = ref.registry_case(spec, GRID)
    aff = _build(spec)
    v, q, k = (t.requires_grad_() for t in _inputs((2, DIM, *grid)))
    _call(aff, v, q, k).square().sum().backward()
    for name, p in aff.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert v.grad.abs().sum() > 0
    if aff.dynamic:
        assert q.grad.abs().sum() > 0
        assert getattr(aff, "uses_value", True) is False or k.grad.abs().sum() > 0


def test_toeplitz_known_answers():
    identity = torch.zeros(1, 3, 3)
    identity[0, 1, 1] = 1
    torch.testing.assert_close(conv_toeplitz(identity, 4, 5)[0], torch.eye(20))
    right = torch.zeros(1, 3, 3)
    right[0, 1, 2] = 1  # output (y, x) reads input (y, x + 1): zero in the last column
    a = conv_toeplitz(right, 2, 3)[0]
    expected = torch.zeros(6, 6)
    for y in range(2):
        for x in range(2):
            expected[y * 3 + x, y * 3 + x + 1] = 1
    torch.testing.assert_close(a, expected)


@pytest.mark.parametrize("grid", [(1, 1), (1, 3), (2, 2)])
def test_depthwise_matrix_on_grids_smaller_than_the_kernel(grid):
    aff = DepthwiseConvAffinity(DIM, 5).double()
    v = torch.randn(1, DIM, *grid, dtype=torch.float64)
    torch.testing.assert_close(aff(v), aff.reference(v))


def test_multi_head_depthwise_shares_kernels_inside_a_head():
    aff = DepthwiseConvAffinity(DIM, 3, heads=HEADS)
    assert aff.weight.shape == (HEADS, 1, 3, 3)
    kernels = aff.channel_kernels()
    assert torch.equal(kernels[0], kernels[DIM // HEADS - 1]) and not torch.equal(kernels[0], kernels[DIM // HEADS])


def test_mixture_gates():
    convex = _build("mix(sa,dw5)")
    alpha, beta = convex.weights()
    assert alpha.item() == pytest.approx(0.5) and (alpha + beta).item() == pytest.approx(1.0)
    assert convex.heads == DIM  # 4 attention heads meet 16 depthwise channels at 16
    free = _build("mix(sa,dw5)", gate="free")
    with torch.no_grad():
        free.alpha.fill_(2.0)
        free.beta.fill_(-0.5)
    v, q, k = _inputs()
    expected = 2.0 * free.dynamic_affinity(v, q, k) - 0.5 * free.static_affinity(v)
    torch.testing.assert_close(free(v, q, k), expected)
    torch.testing.assert_close(free(v, q, k), free.reference(v, q, k))
    with pytest.raises(ValueError, match="unknown gate"):
        _build("mix(sa,dw5)", gate="softmax")


def test_fixed_token_operators_name_the_size_they_were_built_for():
    aff = TokenMlpAffinity(DIM, 35, grid=GRID)
    with pytest.raises(ValueError, match=r"built for 5×7 tokens \(35\) and got 4×4 \(16\)"):
        aff(torch.randn(1, DIM, 4, 4))


def test_bad_specs_and_layouts_are_refused_clearly():
    with pytest.raises(ValueError, match="unknown affinity 'dw_conv'"):
        build_affinity("dw_conv", dim=8, heads=2)
    with pytest.raises(ValueError, match="need a fixed grid"):
        build_affinity("mlp", dim=8, heads=2)
    with pytest.raises(ValueError, match="not divisible"):
        SelfAttentionAffinity(10, 4)
    with pytest.raises(ValueError, match="needs a \\(B, C, H, W\\) feature map"):
        DepthwiseConvAffinity(8, 3)(torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="built for 8 channels, got 6"):
        DepthwiseConvAffinity(8, 3)(torch.randn(1, 6, 4, 4))
    with pytest.raises(ValueError, match="pass q and k"):
        SelfAttentionAffinity(8, 2)(torch.randn(1, 8, 4, 4))


@pytest.mark.parametrize("spec,norm", [("sa", "softmax"), ("sa", "scale"), ("sa", "none"), ("dw5", None),
                                       ("mlp_lr", None)])
def test_forward_never_materialises_an_n_by_n_matrix(spec, norm):
    grid, dim = (32, 32), 32  # N = 1024, N² = 1M elements; every tensor in forward is far smaller
    torch.manual_seed(0)
    aff = build_affinity(spec, dim=dim, heads=4, grid=grid, attn_norm=norm or "softmax", mlp_rank=16)
    v, q, k = (torch.randn(1, dim, *grid) for _ in range(3))
    n = grid[0] * grid[1]
    with torch.no_grad():
        assert largest_intermediate(lambda: aff(v, q, k)) < n * n / 8
        assert largest_intermediate(lambda: aff.matrix(v.shape, q, k)) >= n * n
