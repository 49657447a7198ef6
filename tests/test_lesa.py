"""LESA (lesa.txt): the operator, its affinity contract, 2-D relative positions, the ResNet family on
timm, the paper's parameter counts (Tables 2 and 6) and the unary/binary analyses (Tables 1 and 2)."""
import math

import pytest
import timm
import torch
from torch import nn

import ctxagg.models.lesa  # noqa: F401  (registers the models)
import references as ref
from ctxagg.affinity.lesa import (AttentionAugmentedConv, LocallyEnhancedSelfAttention, RelativePositionTable2d,
                                  RelativeSelfAttention2d)
from ctxagg.analysis.lesa import (diagonal_shares, fusion_weight_shares, mean_share, unary_ablation,
                                  unary_removed)
from ctxagg.bench import count_params
from ctxagg.models.lesa import PAPER_NUMBERS, LesaResNet

# zero_init_last=False: with timm's default zero-initialised bn3 every residual branch is silent at init
TINY = dict(layers=(1, 1, 2, 2), channels=(16, 16, 32, 32), heads=4, img_size=64, num_classes=10, zero_init_last=False)


def tiny(mixer: str, **kwargs) -> LesaResNet:
    torch.manual_seed(0)
    return LesaResNet(mixer=mixer, **{**TINY, **kwargs})


def lesa_layers(model):
    return [m for m in model.modules() if isinstance(m, LocallyEnhancedSelfAttention)]


@pytest.mark.parametrize("name", list(PAPER_NUMBERS))
def test_parameter_counts_match_the_paper(name):
    with torch.device("meta"):  # counts only: skip allocation and init
        model = timm.create_model(name)
    target = PAPER_NUMBERS[name]
    measured = count_params(model) / 1e6
    assert abs(measured - target["params"]) / target["params"] <= target["params_tol"], (name, measured)


def test_every_variant_has_paper_numbers():
    assert set(timm.list_models(module="lesa")) == set(PAPER_NUMBERS)


def test_exact_counts_of_the_lesa_pieces():
    # d = 256, 8 heads: unary 3×3 grouped conv + 1×1 + BN; fusion 2d→d, d→d 1×1 convs + 2 BNs (Eq. 6-7)
    d = 256
    sa = LocallyEnhancedSelfAttention(d, 8, mode="sa")
    static = LocallyEnhancedSelfAttention(d, 8, mode="static")
    lesa = LocallyEnhancedSelfAttention(d, 8, mode="lesa")
    assert count_params(static) - count_params(sa) == d * d * 9 // 8 + d * d + 2 * d
    assert count_params(lesa) - count_params(static) == 2 * d * d + d * d + 4 * d
    # binary: qkv (d/2 + d/2 + d) + its BN, 3 logit BNs per head, output BN, two 27×27 tables of d/16 channels
    assert count_params(sa) == 2 * d * d + 4 * d + 2 * 3 * 8 + 2 * d + 2 * (d // 16) * 27 * 27


def test_stride_layout_follows_section_4_1():
    model = timm.create_model("resnet50_lesa", layers=(1, 1, 3, 2), channels=(16, 16, 32, 32))
    first = model.layer3[0].conv2
    assert isinstance(first, nn.Conv2d) and first.stride == (2, 2)  # first block of stage 3 unchanged
    assert all(isinstance(b.conv2, LocallyEnhancedSelfAttention) for b in list(model.layer3[1:]) + list(model.layer4))
    assert isinstance(model.layer4[0].bn2, nn.Identity)
    assert [f["reduction"] for f in model.feature_info] == [2, 4, 8, 16, 16]  # last stage at stride 1
    conv = timm.create_model("resnet50_conv", layers=(1, 1, 1, 1), channels=(16, 16, 32, 32))
    assert conv.layer4[0].conv2.dilation == (1, 1) and conv.layer4[0].conv2.stride == (1, 1)


def _lesa_in_eval(dim=32, heads=4, grid=(4, 4), **kwargs) -> LocallyEnhancedSelfAttention:
    torch.manual_seed(0)
    layer = LocallyEnhancedSelfAttention(dim, heads, grid, **kwargs).double()
    with torch.no_grad():  # non-trivial BN statistics and affine parameters, so the eval fold is exercised
        for bn in [m for m in layer.modules() if isinstance(m, nn.BatchNorm2d)]:
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1, 1)
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2.0)
    return layer.eval()


@pytest.mark.parametrize("rel_pos", ["full", "factorized"])
@pytest.mark.parametrize("size", [(4, 4), (5, 7)])
def test_binary_matrix_times_values_equals_forward(rel_pos, size):
    layer = _lesa_in_eval(rel_pos=rel_pos)
    x = torch.randn(2, 32, *size, dtype=torch.float64)
    q, k, v = layer.qkv_split(x)
    att = layer.attention
    a = att.matrix(v.shape, q, k)
    n = size[0] * size[1]
    assert a.shape == (2, 4, n, n)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 4, n, dtype=torch.float64))
    fused = att(v, q, k)  # eval: fused SDPA with the BN folded into q and the relative mask
    torch.testing.assert_close(att.reference(v, q, k), fused, rtol=1e-10, atol=1e-10)
    # independently of the operator's code (Eq. 1-3 written out in tests/references.py)
    torch.testing.assert_close(a, ref.relative_attention_matrix(att, v.shape, q, k), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fused, ref.relative_attention_forward(att, v, q, k), rtol=1e-10, atol=1e-10)
    att.logit_norm.train()  # training: explicit logits with batch statistics (forward is matrix() @ V here)
    torch.testing.assert_close(att(v, q, k), ref.relative_attention_forward(att, v, q, k), rtol=1e-10, atol=1e-10)
    att.drop_diagonal = True  # Table 1 ablation: S_ii v_i removed, forward is matrix() @ V here too
    torch.testing.assert_close(att(v, q, k), ref.relative_attention_forward(att, v, q, k), rtol=1e-10, atol=1e-10)


def test_attention_augmentation_matrix_times_values_equals_forward():
    torch.manual_seed(0)
    aa = AttentionAugmentedConv(64, 8, (4, 4)).double()
    x = torch.randn(2, 64, 5, 4, dtype=torch.float64)
    q, k, v = aa.qkv(x).split([aa.key_dim, aa.key_dim, aa.value_dim], 1)
    torch.testing.assert_close(aa.attention.reference(v, q, k), aa.attention(v, q, k), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(aa.attention(v, q, k), ref.relative_attention_forward(aa.attention, v, q, k),
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(aa(x), ref.attention_augmented_forward(aa, x), rtol=1e-10, atol=1e-10)
    assert aa(x).shape == x.shape
    big = AttentionAugmentedConv(256, 8)
    assert (big.key_dim, big.value_dim) == (48, 24)  # κ = 0.2, υ = 0.1 of 256, in multiples of 8 heads


def test_lesa_keeps_omega_in_eager_only():
    """ω is stored for analysis by an eager forward; a traced one (torch.export, torch.compile) leaves no state
    behind (export would warn that an attribute was assigned during tracing)."""
    import warnings

    layer = _lesa_in_eval().float()
    x = torch.randn(1, 32, 4, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = torch.export.export(layer, (x,))
    assert layer.last_omega is None
    assert not [w for w in caught if "last_omega" in str(w.message)]
    torch.testing.assert_close(program.module()(x), layer(x))
    assert layer.last_omega is not None and layer.last_omega.shape == x.shape


def test_lesa_output_is_unary_plus_gated_binary():
    layer = _lesa_in_eval()
    x = torch.randn(2, 32, 4, 4, dtype=torch.float64)
    out = layer(x)
    omega = layer.last_omega
    assert omega.shape == x.shape and (omega > 0).all() and (omega < 1).all()
    torch.testing.assert_close(out, layer.unary(x) + omega * layer.binary(x))
    static = _lesa_in_eval(mode="static")
    torch.testing.assert_close(static(x), static.unary(x) + static.binary(x))
    assert static.fusion is None and static.last_omega is None
    sa = _lesa_in_eval(mode="sa")
    assert sa.unary is None and sa.fusion is None


@pytest.mark.parametrize("eval_mode", [False, True])
def test_gradients_reach_every_parameter(eval_mode):
    torch.manual_seed(0)
    layer = LocallyEnhancedSelfAttention(32, 4, (4, 4)).train(not eval_mode)
    x = torch.randn(2, 32, 4, 4, requires_grad=True)
    layer(x).square().mean().backward()
    for name, p in layer.named_parameters():
        if name == "attention.logit_norm.bias":  # a per-head constant on every logit: the softmax ignores it
            assert p.grad is None or p.grad.abs().max() < 1e-6
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_full_relative_table_is_two_dimensional():
    torch.manual_seed(0)
    table = RelativePositionTable2d(3, (4, 4), "full")
    x = torch.randn(3).expand(1, 1, 16, 3)  # the same query vector at every position
    logits = table(x, 4, 4)[0, 0]
    # pairs with the same 2-D offset (+1 row, +1 col) have the same logit, and it is the table entry
    assert logits[0, 5] == logits[6, 11] == logits[10, 15]
    torch.testing.assert_close(logits[0, 5], x[0, 0, 0] @ table.table[:, (1 + 3) * 7 + (1 + 3)])
    # flattened distance 3 in both, but (0,0)->(0,3) is 3 columns and (0,3)->(1,2) is 1 row, −1 column
    assert logits[0, 3] != logits[3, 6]
    torch.testing.assert_close(logits[3, 6], x[0, 0, 0] @ table.table[:, (1 + 3) * 7 + (-1 + 3)])


def test_factorized_relative_table_is_row_plus_column():
    torch.manual_seed(0)
    table = RelativePositionTable2d(3, (4, 4), "factorized")
    x = torch.randn(3).expand(1, 1, 16, 3)
    logits = table(x, 4, 4)[0, 0]
    q = x[0, 0, 0]
    torch.testing.assert_close(logits[3, 6], q @ (table.height[:, 1 + 3] + table.width[:, -1 + 3]))
    assert logits[0, 5] == logits[6, 11] and logits[0, 3] != logits[3, 6]


def test_relative_offsets_beyond_the_table_are_clipped():
    torch.manual_seed(0)
    table = RelativePositionTable2d(3, (4, 4), "full")
    x = torch.randn(3).expand(1, 1, 36, 3)
    logits = table(x, 6, 6)[0, 0]  # a 6×6 grid on a table built for 4×4: offsets ±5 clip to ±3
    assert logits[0, 5 * 6] == logits[0, 3 * 6] != logits[0, 2 * 6]
    small = table(x[:, :, :4], 2, 2)[0, 0]  # a 2×2 grid reads the same entries as the 4×4 one
    torch.testing.assert_close(small[0, 3], table(x[:, :, :16], 4, 4)[0, 0, 0, 5])


def test_diagonal_removal_of_a_uniform_attention():
    layer = _lesa_in_eval(mode="sa")
    att = layer.attention
    with torch.no_grad():
        att.logit_norm.weight.zero_()  # every logit becomes its BN bias: constant per row, so A = 1/N
    x = torch.randn(1, 32, 4, 4, dtype=torch.float64)
    q, k, v = layer.qkv_split(x)
    torch.testing.assert_close(att.matrix(v.shape, q, k), torch.full((1, 4, 16, 16), 1 / 16, dtype=torch.float64))
    att.drop_diagonal = True
    mean_v = v.mean((2, 3), keepdim=True)
    torch.testing.assert_close(att(v, q, k), mean_v - v / 16)  # Σ_{j≠i} v_j / N
    torch.testing.assert_close(att.reference(v, q, k), att(v, q, k))


@pytest.mark.parametrize("mixer", ["lesa", "static_lesa", "sa", "aa", "conv"])
@pytest.mark.parametrize("size", [64, 96, 80])
def test_tiny_models_run_at_any_size(mixer, size):
    model = tiny(mixer).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 10)


def test_tiny_model_trains_end_to_end():
    model = tiny("lesa").train()
    model(torch.randn(2, 3, 64, 64)).logsumexp(-1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


def test_resnet50_lesa_at_224_and_320():
    torch.manual_seed(0)
    model = timm.create_model("resnet50_lesa").eval()
    cfg = model.pretrained_cfg
    assert cfg["first_conv"] == "conv1" and cfg["classifier"] == "fc"
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, 224, 224))
        assert feats.shape[-2:] == cfg["pool_size"] == (14, 14)
        assert model.forward_head(feats).shape == (1, 1000)
        out = model(torch.randn(1, 3, 320, 320))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    assert all(m.last_omega.shape[-2:] == (20, 20) for m in lesa_layers(model))


def test_timm_citizenship():
    model = timm.create_model("resnet50_lesa", layers=(1, 1, 2, 1), channels=(16, 16, 32, 32)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (1, 128)
        final, inter = model.forward_intermediates(x)
        assert [t.shape[-1] for t in inter] == [32, 16, 8, 4, 4] and final.shape == (1, 128, 4, 4)
        model.reset_classifier(5)
        assert model(x).shape == (1, 5)


def test_features_only_strides():
    model = timm.create_model("resnet50_lesa", features_only=True, layers=(1, 1, 2, 1), channels=(16, 16, 32, 32))
    assert model.feature_info.reduction() == [2, 4, 8, 16, 16]
    assert model.feature_info.channels() == [64, 64, 64, 128, 128]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 96, 128))
    assert [tuple(f.shape[-2:]) for f in feats] == [(48, 64), (24, 32), (12, 16), (6, 8), (6, 8)]


def test_fusion_weight_shares_known_answer():
    model = tiny("lesa")
    layers = lesa_layers(model)
    assert len(layers) == 3  # stage 3: 1 of 2 blocks (the first keeps its conv); stage 4: 2 of 2
    with torch.no_grad():
        for i, layer in enumerate(layers):
            last_bn = layer.fusion[-1]
            last_bn.weight.zero_()  # ω = sigmoid(bias) everywhere
            last_bn.bias.fill_(float(i))
    shares = fusion_weight_shares(model.train(), torch.randn(2, 3, 64, 64))
    assert model.training  # mode restored
    for i, (unary, binary) in enumerate(shares.values()):
        omega = 1 / (1 + math.exp(-i))
        assert unary == pytest.approx(1 / (1 + omega)) and binary == pytest.approx(omega / (1 + omega))
    assert mean_share(shares)[0] == pytest.approx(sum(1 / (1 + 1 / (1 + math.exp(-i))) for i in range(3)) / 3)


def test_diagonal_share_known_answer():
    model = tiny("sa").eval()
    with torch.no_grad():
        for att in [m for m in model.modules() if isinstance(m, RelativeSelfAttention2d)]:
            att.logit_norm.weight.zero_()  # uniform attention: S_ii = 1/N
    _, shares = diagonal_shares(model, torch.randn(1, 3, 96, 96))  # stage 3-4 grid 6×6
    assert len(shares) == 3 and all(s == pytest.approx(1 / 36) for s in shares.values())


def test_unary_ablation_of_a_self_attention_model():
    model = tiny("sa")
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        targets = model.eval()(images).argmax(-1)
    result = unary_ablation(model.train(), images, targets)
    assert model.training
    assert result.top1 == 1.0
    assert not torch.allclose(result.logits, result.ablated_logits)
    assert 0 < result.mean_diagonal_share < 1 and len(result.diagonal_share) == 3
    assert not any(m.drop_diagonal for m in model.modules() if isinstance(m, RelativeSelfAttention2d))
    with unary_removed(model.eval()), torch.no_grad():
        torch.testing.assert_close(model(images), result.ablated_logits)
    with pytest.raises(ValueError):
        unary_ablation(tiny("conv"), images)
