"""The ConvNet rows of ViT-as-DynConv Table 1 as affinities (issue 21): dynamic convolution (Chen et al. 2020,
[4]) and dynamic depth-wise convolution (Han et al. 2022, [11]). The registry-wide tests (test_references.py,
test_affinity.py) hold both against tests/references.py; here: known answers worked out by hand, per-image
kernels, the values as the kernels' source in a block and a mixture, any size, clear errors, no N×N."""
import math

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck

import references as ref
from ctxagg.affinity import DynamicConvAffinity, DynamicDepthwiseConv, build_affinity
from ctxagg.bench import largest_intermediate
from ctxagg.blocks import AggregationBlock
from ctxagg.models import ContainerNet

TIGHT = dict(rtol=1e-10, atol=1e-10)
F64 = dict(dtype=torch.float64)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # every random input below is the same whatever ran before


def _impulses(*values_at):
    """(B, 1, 3, 3) maps, image b holding one impulse: values_at[b] = (value, y, x)."""
    x = torch.zeros(len(values_at), 1, 3, 3, **F64)
    for b, (value, y, xx) in enumerate(values_at):
        x[b, 0, y, xx] = value
    return x


def _randomised(op, seed=0):
    g = torch.Generator().manual_seed(seed)
    op = op.double()
    with torch.no_grad():
        for p in op.parameters():
            p.copy_(torch.randn(p.shape, generator=g, **F64) * 0.5)
    return op


# ------------------------------------------------------------------ known answers

def test_dynamic_conv_known_answer():
    """Chen et al. Eq. 1-3 by hand. C = 1, K = 2 kernels W1 = [[1, 2, 3], [4, 5, 6], [7, 8, 9]], W2 = all 4, bias 0.5;
    attention: fc1 = 1 (bias 0), fc2 = [ln 3, 0] (bias 0) and τ = 2, so π = softmax([m·ln 3 / 2, 0]) for the
    pooled mean m. Image 0: 18 at the centre, m = 2 → π = (3/4, 1/4), W̃ = ¾W1 + 1; image 1: 36 at (0, 0), m = 4 →
    π = (9/10, 1/10), W̃ = 0.9·W1 + 0.4. Cross-correlation: out[y, x] = Σ W̃[ky, kx] in[y + ky − 1, x + kx − 1]."""
    op = DynamicConvAffinity(1, 3, kernels=2, temperature=2.0).double()
    with torch.no_grad():
        op.bank[0, 0, 0].copy_(torch.arange(1.0, 10.0, **F64).view(3, 3))
        op.bank[1].fill_(4.0)
        op.bias.fill_(0.5)
        op.attention.fc1.weight.fill_(1.0)
        op.attention.fc1.bias.zero_()
        op.attention.fc2.weight.copy_(torch.tensor([[math.log(3.0)], [0.0]], **F64))
        op.attention.fc2.bias.zero_()
    x = _impulses((18.0, 1, 1), (36.0, 0, 0))
    torch.testing.assert_close(op.coefficients(x), torch.tensor([[0.75, 0.25], [0.9, 0.1]], **F64), **TIGHT)
    expected = torch.tensor([[[139.5, 126, 112.5], [99, 85.5, 72], [58.5, 45, 31.5]],  # 18·W̃ flipped
                             [[176.4, 144, 0], [79.2, 46.8, 0], [0, 0, 0]]], **F64) + 0.5  # 36·(4.9, 4.0; 2.2, 1.3)
    torch.testing.assert_close(op(x)[:, 0], expected, **TIGHT)
    torch.testing.assert_close(ref.through_matrix(op.matrix(x.shape, x), x, op.bias_term())[:, 0], expected, **TIGHT)


def test_dynamic_depthwise_known_answer():
    """Han et al.'s generator by hand, eval mode. C = 1, k = 3, hidden 1: fc1 = 1, BN the identity (mean 0,
    var 1 − eps, γ 1, β 0), fc2 = [1, ..., 9]/2 with bias 1 on the centre tap, bias 0.25. Image 0: 18 at the
    centre, m = 2 → Ker = [[1, 2, 3], [4, 6, 6], [7, 8, 9]]; image 1: 36 at (0, 0), m = 4 →
    Ker = [[2, 4, 6], [8, 11, 12], [14, 16, 18]]."""
    op = DynamicDepthwiseConv(1, 3).double().eval()
    gen = op.generator
    with torch.no_grad():
        gen.fc1.weight.fill_(1.0)
        gen.norm.running_var.fill_(1 - gen.norm.eps)
        gen.fc2.weight.copy_(torch.arange(1.0, 10.0, **F64).view(9, 1) / 2)
        gen.fc2.bias.copy_(torch.tensor([0, 0, 0, 0, 1.0, 0, 0, 0, 0], **F64))
        op.bias.fill_(0.25)
    x = _impulses((18.0, 1, 1), (36.0, 0, 0))
    torch.testing.assert_close(op.kernels(x)[:, 0, 0], torch.tensor(
        [[[1, 2, 3], [4, 6, 6], [7, 8, 9]], [[2, 4, 6], [8, 11, 12], [14, 16, 18]]], **F64), **TIGHT)
    expected = torch.tensor([[[162, 144, 126], [108, 108, 72], [54, 36, 18]],  # 18·Ker flipped
                             [[396, 288, 0], [144, 72, 0], [0, 0, 0]]], **F64) + 0.25  # 36·(11, 8; 4, 2)
    torch.testing.assert_close(op(x)[:, 0], expected, **TIGHT)
    a = op.matrix(x.shape, x)
    assert a.shape == (2, 1, 9, 9)
    torch.testing.assert_close(a[0, 0, 4], torch.tensor([1, 2, 3, 4, 6, 6, 7, 8, 9], **F64), **TIGHT)  # the centre row
    torch.testing.assert_close(ref.through_matrix(a, x, op.bias_term())[:, 0], expected, **TIGHT)


# ------------------------------------------------------------------ per-image kernels, kernels from the values

@pytest.mark.parametrize("spec", ["dynamic_conv", "dynamic_dw3"])
def test_each_image_gets_its_own_kernels(spec):
    op = _randomised(build_affinity(spec, dim=8, heads=2)).eval()
    g = torch.Generator().manual_seed(3)
    v = torch.randn(3, 8, 4, 5, generator=g, **F64) + 2 * torch.randn(3, 8, 1, 1, generator=g, **F64)
    alone = torch.cat([op(v[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(op(v), alone, **TIGHT)  # a batch is its images, each with kernels of its own
    kernels = op.kernels(v)
    assert not torch.allclose(kernels[0], kernels[1])


@pytest.mark.parametrize("spec", ["dynamic_conv", "dynamic_dw3"])
def test_kernels_come_from_the_values_unless_q_is_given(spec):
    op = _randomised(build_affinity(spec, dim=8, heads=2))
    v, q = torch.randn(2, 8, 4, 5, **F64), torch.randn(2, 8, 4, 5, **F64)
    torch.testing.assert_close(op(v), op(v, v), **TIGHT)
    torch.testing.assert_close(op(v), ref.reference_for(op).forward(op, v, v), **TIGHT)
    torch.testing.assert_close(op(v, q), ref.reference_for(op).forward(op, v, q), **TIGHT)
    assert not torch.allclose(op(v), op(v, q))
    torch.testing.assert_close(op(v), op.reference(v, v), **TIGHT)  # matrix(v.shape, v) is the block's affinity


def test_temperature_flattens_the_attention_over_the_bank():
    op = _randomised(DynamicConvAffinity(8, 3, kernels=4))
    v = torch.randn(2, 8, 4, 4, **F64)
    sharp = op.coefficients(v)
    torch.testing.assert_close(sharp.sum(-1), torch.ones(2, **F64), **TIGHT)
    op.temperature = 1e9
    torch.testing.assert_close(op.coefficients(v), torch.full((2, 4), 0.25, **F64), rtol=0, atol=1e-8)
    assert (sharp - 0.25).abs().max() > 0.05


@pytest.mark.parametrize("spec", ["dynamic_conv", "dynamic_dw7", "mix(dynamic_dw3,dw3)"])
def test_a_block_projects_only_the_values_and_passes_them_as_the_kernel_source(spec):
    """ViT-as-DynConv's frame: the kernels come from the block's input (the papers' form), so the block's 1×1
    projection makes V alone and the affinity gets (v, v); a mixture passes that on to its dynamic part."""
    torch.manual_seed(0)
    block = _randomised(AggregationBlock(8, build_affinity(spec, dim=8, heads=2))).eval()
    assert block.proj_in.out_channels == 8  # no q/k rows
    x = torch.randn(2, 8, 5, 6, **F64)
    x0 = block.pos_embed(x)
    v, q, k = block.affinity_inputs(x0)
    assert q is v and k is None
    torch.testing.assert_close(v, block.proj_in(block.norm1(x0)), **TIGHT)
    x1 = x0 + block.proj_out(ref.reference_for(block.affinity).forward(block.affinity, v, v))
    torch.testing.assert_close(block(x), x1 + block.mlp(block.norm2(x1)), **TIGHT)


def test_usable_by_string_in_the_container_base():
    torch.manual_seed(0)
    model = ContainerNet(mixers=("dw3", "dynamic_conv", "mix(dynamic_dw5,dw5)", "dynamic_dw7"), dims=(8, 16, 16, 32),
                         depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2), head_dim=8, num_classes=3, img_size=64)
    out = model(torch.randn(2, 3, 64, 64))
    out.logsumexp(-1).sum().backward()
    assert out.shape == (2, 3)
    assert not [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert model.eval()(torch.randn(1, 3, 48, 80)).shape == (1, 3)  # any size (no fixed-size operator)


# ------------------------------------------------------------------ any size, gradients, errors, cost

@pytest.mark.parametrize("spec", ["dynamic_conv5", "dynamic_dw7"])
@pytest.mark.parametrize("grid", [(1, 1), (2, 3), (9, 4)])
def test_any_size_including_grids_smaller_than_the_kernel(spec, grid):
    op = _randomised(build_affinity(spec, dim=4, heads=2))
    v, q = torch.randn(2, 4, *grid, **F64), torch.randn(2, 4, *grid, **F64)
    reference = ref.reference_for(op)
    torch.testing.assert_close(op(v, q), reference.forward(op, v, q), **TIGHT)
    torch.testing.assert_close(op.matrix(v.shape, q), reference.matrix(op, v.shape, q), **TIGHT)
    torch.testing.assert_close(op.eval()(v[:1]), reference.forward(op, v[:1]), **TIGHT)  # eval: a batch of 1


@pytest.mark.parametrize("spec", ["dynamic_conv", "dynamic_dw3"])
def test_gradcheck(spec):
    op = _randomised(build_affinity(spec, dim=2, heads=1))
    v, q = (torch.randn(2, 2, 3, 4, **F64, requires_grad=True) for _ in range(2))
    assert gradcheck(lambda v, q: op(v, q), (v, q))
    assert gradcheck(lambda v: op(v), (v,))  # kernels from the values: the second path into v


def test_bad_inputs_are_refused_clearly():
    op = DynamicDepthwiseConv(4, 3)
    v = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        DynamicConvAffinity(4, 4)
    with pytest.raises(ValueError, match="at least one kernel"):
        DynamicConvAffinity(4, 3, kernels=0)
    with pytest.raises(ValueError, match="needs a \\(B, C, H, W\\) feature map"):
        op(torch.randn(2, 25, 4))
    with pytest.raises(ValueError, match="must be shaped like the values"):
        op(v, torch.randn(2, 4, 5, 6))
    with pytest.raises(ValueError, match="no separate key tensor"):
        op(v, v, torch.randn_like(v))
    with pytest.raises(ValueError, match="matrix\\(\\) needs q"):
        op.matrix(v.shape)
    with pytest.raises(ValueError, match="batch of at least 2 images"):
        op.train()(v[:1])


@pytest.mark.parametrize("spec", ["dynamic_conv", "dynamic_dw7"])
def test_forward_never_materialises_an_n_by_n_matrix(spec):
    op = build_affinity(spec, dim=4, heads=2)
    v = torch.randn(2, 4, 32, 32)
    n = 32 * 32
    with torch.no_grad():
        assert largest_intermediate(lambda: op(v)) < n * n / 8
        assert largest_intermediate(lambda: op.matrix(v.shape, v)) >= n * n


def test_macs_count_the_convolution_and_the_kernel_generation():
    # dynamic dw, C = 8, k = 3, hidden 2, N = 10: conv 10·8·9 + pooling 10·8 + fc1 8·2 + fc2 2·72
    assert DynamicDepthwiseConv(8, 3).macs(10) == 720 + 80 + 16 + 144
    # dynamic conv, C = 8, k = 3, K = 4, hidden 2, N = 10: conv 10·64·9 + mixing 4·64·9 + pooling 80 + 8·2 + 2·4
    assert DynamicConvAffinity(8, 3, kernels=4).macs(10) == 5760 + 2304 + 80 + 16 + 8


@pytest.mark.parametrize("spec", ["dynamic_conv", "dynamic_dw3"])
def test_pop_bias_removes_exactly_the_static_offset(spec):
    op = _randomised(build_affinity(spec, dim=8, heads=2)).eval()
    v = torch.randn(2, 8, 4, 5, **F64)
    before = op(v)
    bias = op.pop_bias()
    torch.testing.assert_close(op(v) + bias.view(1, -1, 1, 1), before, **TIGHT)
    assert op.bias_term() is None and op.pop_bias() is None
