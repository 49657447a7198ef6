"""How A is made, part 2 (issue 18): Linformer, Performer (FAVOR+), spatial-reduction attention (PVT, Twins GSA,
PVTv2), MViT pooling attention and the lambda layer.

Each operator is checked against its independent float64 reference (tests/references.py, written from the paper's
equation) on several grids, with a known answer computed by hand, gradients, its any-size behaviour and, for the
sub-quadratic ones, an element count showing that forward never forms an N×N tensor."""
import math

import pytest
import torch

import references as ref
from ctxagg.affinity import (LambdaLayer, LinformerAttention, PerformerAttention, PoolingAttention,
                             SelfAttentionAffinity, SpatialReductionAttention, apply_matrix, build_affinity)
from ctxagg.bench import largest_intermediate
from test_references import _one_thread  # noqa: F401 - the suite's autouse one-thread fixture

DIM, HEADS = 8, 2
TIGHT = dict(rtol=1e-10, atol=1e-10)
F64 = dict(dtype=torch.float64)


def _qkv(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, **F64) for _ in range(3)]


def _randomised(op, seed=1):
    op = op.double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in op.parameters():
            p.copy_(torch.randn(p.shape, generator=g, **F64) * 0.5)
    return op


def _agrees(op, v, q, k):
    """forward == reference forward == apply_matrix(matrix) + bias; matrix == reference matrix."""
    reference = ref.reference_for(op)
    out = op(v, q, k)
    assert out.shape == op.output_shape(v.shape)
    torch.testing.assert_close(out, reference.forward(op, v, q, k), **TIGHT)
    a = op.matrix(v.shape, q, k)
    torch.testing.assert_close(a, reference.matrix(op, v.shape, q, k).expand_as(a), **TIGHT)
    torch.testing.assert_close(out, op.reference(v, q, k), **TIGHT)
    return out, a


def _tensor(rows):
    return torch.tensor(rows, **F64)


# ---------------------------------------------------------------- Linformer (Eq. 7)

@pytest.mark.parametrize("sharing", ["none", "headwise", "kv"])
@pytest.mark.parametrize("layout", ["grid", "tokens"])
def test_linformer_matches_equation_7_and_has_rank_at_most_k(sharing, layout):
    grid, projected = (4, 5), 3
    op = _randomised(LinformerAttention(DIM, HEADS, 20, projected=projected, sharing=sharing, grid=grid))
    assert (op.f is None) == (sharing == "kv") and op.e.shape[0] == (HEADS if sharing == "none" else 1)
    v, q, k = _qkv((2, DIM, *grid))
    if layout == "tokens":
        v, q, k = (ref.tokens(t) for t in (v, q, k))
    _, a = _agrees(op, v, q, k)
    assert a.shape == (2, HEADS, 20, 20)
    assert int(torch.linalg.matrix_rank(a[0, 0])) == projected  # N×N, rank k


def test_linformer_known_answer():
    """N = 3, k = 2, d = 1: E = [[1, 0, 0], [0, 1, 1]], F = [[1, 0, 0], [0, ½, ½]], keys (0, ln 3, 0), queries
    (1, 0, 2): E K = (0, ln 3), so P rows are (1, 3)/4, (1, 1)/2, (1, 9)/10; F V = (4, 6) for V = (4, 2, 10)."""
    op = LinformerAttention(1, 1, 3, projected=2, sharing="none").double()
    with torch.no_grad():
        op.e.copy_(_tensor([[[1, 0, 0], [0, 1, 1]]]))
        op.f.copy_(_tensor([[[1, 0, 0], [0, 0.5, 0.5]]]))
    q, k, v = (_tensor(x).view(1, 3, 1) for x in ([1, 0, 2], [0, math.log(3), 0], [4, 2, 10]))
    torch.testing.assert_close(op(v, q, k).flatten(), _tensor([5.5, 5.0, 5.8]), **TIGHT)
    expected = _tensor([[1 / 4, 3 / 8, 3 / 8], [1 / 2, 1 / 4, 1 / 4], [1 / 10, 9 / 20, 9 / 20]])
    torch.testing.assert_close(op.matrix(v.shape, q, k)[0, 0], expected, **TIGHT)


def test_linformer_has_a_fixed_size_and_says_which():
    op = build_affinity("linformer8", dim=DIM, heads=HEADS, grid=(5, 7))
    assert op.fixed_tokens == 35 and op.projected == 8 and op.e.shape == (1, 8, 35)
    assert build_affinity("linformer", dim=DIM, heads=HEADS, grid=(5, 7)).projected == 35  # min(N, 256)
    assert build_affinity("linformer", dim=DIM, heads=HEADS, grid=(20, 20)).projected == 256
    x = torch.randn(1, DIM, 4, 4)
    with pytest.raises(ValueError, match=r"built for 5×7 tokens \(35\) and got 4×4 \(16\); Linformer projects"):
        op(x, x, x)
    with pytest.raises(ValueError, match="needs a fixed grid"):
        build_affinity("linformer", dim=DIM, heads=HEADS)
    with pytest.raises(ValueError, match="unknown Linformer sharing"):
        LinformerAttention(DIM, HEADS, 35, sharing="layerwise")


# ---------------------------------------------------------------- Performer (FAVOR+, Lemma 1, Eq. 4-5)

@pytest.mark.parametrize("layout", ["grid", "tokens"])
@pytest.mark.parametrize("features", [1, 5, 64])
def test_performer_matches_favor_plus(layout, features):
    op = PerformerAttention(DIM, HEADS, features=features, seed=3).double()
    v, q, k = _qkv((2, DIM, 3, 5))
    if layout == "tokens":
        v, q, k = (ref.tokens(t) for t in (v, q, k))
    _, a = _agrees(op, v, q, k)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, HEADS, 15, **F64), **TIGHT)
    assert (a > 0).all()  # positive features: no negative weights (FAVOR+'s point)


def test_performer_known_answers():
    """d = 1 (so x' = x). One feature ω = 2: φ(k) = exp(2k − k²/2) = (1, e^1.5, e²) for k = (0, 1, 2), whatever
    the query. Two features ω = ±1: φ(q)·φ(k) = 2 e^{−(q² + k²)/2} cosh(q + k), so row i ∝ e^{−k_j²/2} cosh(q_i + k_j)."""
    op = PerformerAttention(1, 1, features=1, seed=0).double()
    with torch.no_grad():
        op.omega.copy_(_tensor([[2.0]]))
    q, k, v = (_tensor(x).view(1, 3, 1) for x in ([5.0, -1.0, 0.0], [0.0, 1.0, 2.0], [1.0, 0.0, 0.0]))
    row = _tensor([1, math.exp(1.5), math.exp(2)]) / (1 + math.exp(1.5) + math.exp(2))
    torch.testing.assert_close(op.matrix(v.shape, q, k)[0, 0], row.expand(3, 3), **TIGHT)
    torch.testing.assert_close(op(v, q, k).flatten(), row[0].expand(3), **TIGHT)
    op = PerformerAttention(1, 1, features=2, seed=0).double()
    with torch.no_grad():
        op.omega.copy_(_tensor([[1.0], [-1.0]]))
    q, k, v = (_tensor(x).view(1, 2, 1) for x in ([0.0, 1.0], [0.0, 1.0], [1.0, 3.0]))
    rows = _tensor([[1, math.exp(-0.5) * math.cosh(1)], [math.cosh(1), math.exp(-0.5) * math.cosh(2)]])
    rows = rows / rows.sum(-1, keepdim=True)
    torch.testing.assert_close(op.matrix(v.shape, q, k)[0, 0], rows, **TIGHT)
    torch.testing.assert_close(op(v, q, k).flatten(), rows @ _tensor([1.0, 3.0]), **TIGHT)


def test_performer_error_to_softmax_shrinks_as_features_grow():
    """Mean over query rows of Σ_j |A_favor − A_softmax| (total variation ×2), d = 16, N = 64, q and k entries
    N(0, ¼), averaged over feature seeds 0..7. Measured here (float64): m = 4: 0.510, 16: 0.288, 64: 0.177,
    256: 0.103, 1024: 0.062 — about halving for every 4× features (the 1/√m of a Monte-Carlo estimate)."""
    g = torch.Generator().manual_seed(0)
    q, k = (0.5 * torch.randn(1, 64, 16, generator=g, **F64) for _ in range(2))
    exact = SelfAttentionAffinity(16, 1).double().matrix(q.shape, q, k)
    errors = []
    for features in (4, 16, 64, 256, 1024):
        per_seed = [(PerformerAttention(16, 1, features=features, seed=s).double().matrix(q.shape, q, k) - exact)
                    .abs().sum(-1).mean().item() for s in range(8)]
        errors.append(sum(per_seed) / len(per_seed))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.4 and errors[-1] < 0.08 and errors[-1] < errors[1] / 3, errors


def test_performer_features_are_orthogonal_blocks_with_gaussian_norms():
    op = PerformerAttention(8, 1, features=20, seed=4).double()  # d = 8: blocks of 8, 8, 4 rows
    omega = op.omega
    for block in (omega[:8], omega[8:16], omega[16:]):
        gram = block @ block.T
        torch.testing.assert_close(gram - torch.diag(torch.diagonal(gram)), torch.zeros_like(gram), atol=1e-5, rtol=0)
    assert not torch.allclose(omega[:8] @ omega[8:16].T, torch.zeros(8, 8, **F64), atol=1e-3)  # blocks independent
    norms = omega.norm(dim=1)  # rescaled to Gaussian-vector norms (χ_8), not unit rows
    assert norms.std() > 0.1 and 0.6 < norms.mean() / math.sqrt(8) < 1.4


def test_performer_redraw_policy_is_deterministic_under_a_seed():
    x = torch.randn(1, 8, 2, 3)
    a, b = PerformerAttention(8, 2, features=4, redraw_interval=3, seed=5), \
        PerformerAttention(8, 2, features=4, redraw_interval=3, seed=5)
    assert torch.equal(a.omega, b.omega) and not torch.equal(a.omega, PerformerAttention(8, 2, 4, seed=6).omega)
    first = a.omega.clone()
    for _ in range(7):  # calls 0..6: redraws before calls 3 and 6
        a(x, x, x)
    assert int(a.draws) == 2 and int(a.calls) == 7
    torch.testing.assert_close(a.omega, a.draw(5, 2).float())
    assert not torch.equal(a.omega, first)
    resumed = PerformerAttention(8, 2, features=4, redraw_interval=3, seed=99)
    resumed.load_state_dict(a.state_dict())  # seed, draw index, call count and features travel
    for _ in range(3):
        a(x, x, x)
        resumed(x, x, x)
    assert int(resumed.draws) == 3 and torch.equal(resumed.omega, a.omega)
    frozen = a.omega.clone()
    a.eval()
    for _ in range(4):
        a(x, x, x)
    assert torch.equal(a.omega, frozen) and int(a.calls) == 10  # eval never redraws
    never = PerformerAttention(8, 2, features=4, redraw_interval=0, seed=5)
    for _ in range(5):
        never(x, x, x)
    assert int(never.draws) == 0
    torch.manual_seed(11)
    s1 = int(PerformerAttention(8, 2, 4).seed)
    torch.manual_seed(11)
    assert int(PerformerAttention(8, 2, 4).seed) == s1  # seed=None: fixed by torch.manual_seed
    with pytest.raises(ValueError, match="features >= 1"):
        PerformerAttention(8, 2, features=0)


# ---------------------------------------------------------------- spatial-reduction attention (PVT Eq. 2-4; PVTv2)

@pytest.mark.parametrize("spec,grid", [("sra2", (5, 7)), ("sra3", (5, 7)), ("sra4", (1, 1)), ("sra2", (2, 9)),
                                       ("sra1", (3, 2)), ("sra_pool2", (5, 7)), ("sra_pool4", (3, 2)),
                                       ("sra_pool7", (1, 1))])
def test_spatial_reduction_matches_pvt_on_any_grid(spec, grid):
    op = _randomised(build_affinity(spec, dim=DIM, heads=HEADS))
    _, a = _agrees(op, *_qkv((2, DIM, *grid)))
    n = grid[0] * grid[1]
    assert a.shape == ((2, 1, n * DIM, n * DIM) if op.reduction == "conv" else (2, HEADS, n, n))
    assert (op.bias_term() is not None) == (op.reduction == "conv")


def test_spatial_reduction_known_answers():
    """Conv: C = 2, R = 2 summing each channel over its 2×2 window, bias (½, −1), on a 1×3 grid zero-padded to 2×4:
    reduced values (v0 + v1, v2) + bias; with q = 0 every query averages them: ch0 ((1 + 2) + 5)/2 + ½ = 4.5, ch1
    (4 + 0)/2 − 1 = 1. Pool: P = 2 on a 1×4 grid: both row bins are row 0 (overlapping), column bins {0, 1}, {2, 3};
    keys (2, 0) on bin A, (0, 0) on bin B normalise to (t, −t) and 0 (t = 1/√(1 + 1e-5)); query 0 = (√2 ln 2/t, 0)
    scores A at ln 2: weights 2:1 → ch0 ⅔·2 + ⅓·6 = 10/3; zero queries average: 4."""
    op = SpatialReductionAttention(2, 1, "conv", ratio=2).double()
    with torch.no_grad():
        op.reduce.weight.copy_(torch.eye(2, **F64)[:, :, None, None].expand(2, 2, 2, 2))
        op.reduce.bias.copy_(_tensor([0.5, -1.0]))
    v = _tensor([[[[1, 2, 5]], [[4, 0, 0]]]])
    zeros = torch.zeros_like(v)
    torch.testing.assert_close(op(v, zeros, v), _tensor([[[[4.5] * 3], [[1.0] * 3]]]), **TIGHT)
    torch.testing.assert_close(op.matrix(v.shape, zeros, v)[0, 0], 0.5 * torch.kron(torch.ones(3, 3, **F64),
                                                                                      torch.eye(2, **F64)), **TIGHT)
    op = SpatialReductionAttention(2, 1, "pool", pooled=2).double()
    t = 1 / math.sqrt(1 + 1e-5)
    q = _tensor([[[[math.sqrt(2) * math.log(2) / t, 0, 0, 0]], [[0, 0, 0, 0]]]])
    k = _tensor([[[[2, 2, 0, 0]], [[0, 0, 0, 0]]]])
    v = _tensor([[[[1, 3, 5, 7]], [[0, 0, 10, 10]]]])
    torch.testing.assert_close(op(v, q, k), _tensor([[[[10 / 3, 4, 4, 4]], [[10 / 3, 5, 5, 5]]]]), **TIGHT)
    torch.testing.assert_close(op.matrix(v.shape, q, k)[0, 0, 0], _tensor([1 / 3, 1 / 3, 1 / 6, 1 / 6]), **TIGHT)


# ---------------------------------------------------------------- MViT pooling attention (§3.1)

@pytest.mark.parametrize("kv_stride,q_stride,grid", [(2, 1, (5, 7)), (1, 1, (3, 2)), (4, 1, (6, 5)), (2, 2, (5, 7)),
                                                     (3, 2, (4, 9)), (1, 3, (1, 1)), (2, 4, (7, 3))])
def test_pooling_attention_matches_mvit_square_and_not(kv_stride, q_stride, grid):
    op = _randomised(PoolingAttention(DIM, HEADS, kv_stride=kv_stride, q_stride=q_stride))
    v, q, k = _qkv((2, DIM, *grid))
    out, a = _agrees(op, v, q, k)
    h_out, w_out = ((s - 1) // q_stride + 1 for s in grid)
    assert out.shape == (2, DIM, h_out, w_out) and a.shape == (2, DIM, h_out * w_out, grid[0] * grid[1])
    # matrix()·V == forward for the non-square affinity, through the contract's apply_matrix
    torch.testing.assert_close(apply_matrix(a, v, op.output_shape(v.shape)), out, **TIGHT)


def test_pooling_attention_known_answers():
    """C = d = 2, one head, kernel 1 (pooling is a strided pick), kv stride 2 on a 1×4 grid: keys and values at
    x = 0, 2 only (the 9s and 100s at x = 1, 3 are skipped). k̂ = LN(2, 0) = (t, −t), LN(0, 0) = 0; the query
    norm's weight c = ln 2 / (√2 t²) gives query 0 the score ln 2 on key 0: weights ⅔, ⅓ → (2, 2); queries with
    equal channels normalise to 0 and average: (2.5, 3). Query stride 2 keeps queries 0 and 2."""
    t = 1 / math.sqrt(1 + 1e-5)
    q = _tensor([[[[2, 0, 0, 5]], [[0, 0, 0, 5]]]])
    k = _tensor([[[[2, 9, 0, 9]], [[0, 9, 0, 9]]]])
    v = _tensor([[[[1, 100, 4, 100]], [[0, 100, 6, 100]]]])
    for q_stride, expected in ((1, [[[[2, 2.5, 2.5, 2.5]], [[2, 3, 3, 3]]]]), (2, [[[[2, 2.5]], [[2, 3]]]])):
        op = PoolingAttention(2, 1, kv_stride=2, q_stride=q_stride, kernel_size=1).double()
        with torch.no_grad():
            for kernel in (op.pool_q, op.pool_k, op.pool_v):
                kernel.fill_(1.0)
            op.norm_q.weight.fill_(math.log(2) / (math.sqrt(2) * t * t))
        torch.testing.assert_close(op(v, q, k), _tensor(expected), **TIGHT)
        a = op.matrix(v.shape, q, k)[0, 0]
        torch.testing.assert_close(a[0], _tensor([2 / 3, 0, 1 / 3, 0]), **TIGHT)
        torch.testing.assert_close(a[1], _tensor([0.5, 0, 0.5, 0]), **TIGHT)


def test_pooling_attention_gradients_and_refusals():
    op = _randomised(PoolingAttention(4, 2, kv_stride=2, q_stride=2))
    v, q, k = (t.requires_grad_() for t in _qkv((1, 4, 3, 4)))
    assert torch.autograd.gradcheck(lambda a, b, c: op(a, b, c), (v, q, k), fast_mode=True)
    with pytest.raises(ValueError, match="odd kernel"):
        PoolingAttention(4, 2, kernel_size=2)
    with pytest.raises(ValueError, match="needs a \\(B, C, H, W\\) feature map"):
        op(*(torch.randn(1, 12, 4, dtype=torch.float64) for _ in range(3)))
    assert build_affinity("pool_attn4", dim=4, heads=2).kv_stride == 4  # the registry: query stride 1 (square)


# ---------------------------------------------------------------- lambda layer (Eq. 1-2, lambda convolution)

@pytest.mark.parametrize("context,grid", [(3, (5, 7)), (5, (2, 3)), (23, (6, 5)), (1, (3, 3)), (5, (1, 1))])
def test_lambda_layer_matches_the_lambda_form_on_any_grid(context, grid):
    op = _randomised(LambdaLayer(DIM, HEADS, context=context))
    _agrees(op, *_qkv((2, DIM, *grid)))


def test_lambda_layer_known_answer():
    """C = d = 1, context 3 on a 1×3 grid: only the embeddings' middle row (dy = 0) is read, e_{−1}, e_0, e_{+1} =
    1, 2, 3 (offset n − m); keys 0 → k̄ = ⅓. q = (1, 2, ½), v = (3, 6, 9): y_0 = 1·(7/3·3 + 4/3·6 + ⅓·9) = 18,
    y_1 = 2·(10/3·3 + 7/3·6 + 4/3·9) = 72, y_2 = ½·(⅓·3 + 10/3·6 + 7/3·9) = 21 (a swapped offset sign gives 26, 60, 27)."""
    op = LambdaLayer(1, 1, context=3).double()
    with torch.no_grad():
        op.embedding.fill_(100.0)  # rows dy = ±1 are outside a one-row image: never read
        op.embedding[1, :, 0] = _tensor([1, 2, 3])
    q, k, v = (_tensor(x).view(1, 1, 1, 3) for x in ([1, 2, 0.5], [0, 0, 0], [3, 6, 9]))
    torch.testing.assert_close(op(v, q, k).flatten(), _tensor([18, 72, 21]), **TIGHT)
    torch.testing.assert_close(ref.through_matrix(op.matrix(v.shape, q, k), v, None).flatten(), _tensor([18, 72, 21]),
                               **TIGHT)


def test_lambda_layer_refusals():
    with pytest.raises(ValueError, match="must be odd"):
        LambdaLayer(8, 2, context=4)
    with pytest.raises(ValueError, match="needs a \\(B, C, H, W\\) feature map"):
        LambdaLayer(8, 2)(*(torch.randn(1, 6, 8) for _ in range(3)))


# ---------------------------------------------------------------- never N×N; plugged into the Container base; cost

@pytest.mark.parametrize("spec", ["linformer64", "performer64", "sra8", "sra_pool", "lambda"])
def test_sub_quadratic_generators_never_materialise_n_by_n(spec):
    grid, dim = (64, 64), 16  # N = 4096, N² = 16.8M elements
    torch.manual_seed(0)
    aff = build_affinity(spec, dim=dim, heads=2, grid=grid)
    v, q, k = (torch.randn(1, dim, *grid) for _ in range(3))
    n = grid[0] * grid[1]
    with torch.no_grad():
        assert largest_intermediate(lambda: aff(v, q, k)) < n * n / 8
    small = build_affinity(spec, dim=dim, heads=2, grid=(12, 12))
    v, q, k = (torch.randn(1, dim, 12, 12) for _ in range(3))
    with torch.no_grad():
        assert largest_intermediate(lambda: small.matrix(v.shape, q, k)) >= 144 * 144  # matrix() is explicit


def test_usable_by_string_in_the_container_base():
    from ctxagg.models.container import ContainerNet
    torch.manual_seed(0)
    model = ContainerNet(mixers=("sra2", ("mix(performer16,dw3)", "pool_attn"), "lambda5", ("linformer2", "sra_pool")),
                         dims=(8, 16, 16, 32), depths=(1, 2, 1, 2), mlp_ratios=(2, 2, 2, 2), head_dim=8,
                         num_classes=3, img_size=64)
    out = model(torch.randn(2, 3, 64, 64))
    out.logsumexp(-1).sum().backward()
    assert out.shape == (2, 3)
    assert not [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert model.fixed_img_size == (64, 64)  # Linformer fixes the size


def test_space_table_measures_every_generator():
    """`ctxagg space` measures one block per operator; the extra parameters are the operators' own."""
    from ctxagg.bench.space import block_cost
    params = {spec: block_cost(spec, 14)[0] for spec in ("sa", "linformer", "performer", "sra", "sra_pool",
                                                         "pool_attn", "lambda")}
    assert params["linformer"] - params["sa"] == 2 * 196 * 196  # E, F ∈ R^{k×N}, k = min(N, 256) = 196
    assert params["performer"] == params["sa"]  # random features are a buffer, not parameters
    assert params["sra"] - params["sa"] == 128 * 128 * 16 + 128 + 128  # 4×4 stride-4 conv + bias + key-norm weight
    assert params["sra_pool"] - params["sa"] == 128
    assert params["pool_attn"] - params["sa"] == 3 * 32 * 9 + 32 + 32 + 32  # three 3×3 channel-wise kernels + norms
    assert params["lambda"] - params["sa"] == 23 * 23 * 32
    assert block_cost("sra", 56)[1] < block_cost("sa", 56)[1] / 3  # N·N/16 scores instead of N²
