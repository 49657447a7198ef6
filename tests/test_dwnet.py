"""Swin-T with dynamic depth-wise convolution in place of window attention (Han et al. 2022, ViT-as-DynConv [11]):
the published size, the exact parameter arithmetic against Swin-T, the block written out, timm citizenship."""
import pytest
import timm
import torch
from torch import nn

import references as ref
from ctxagg.affinity import DynamicDepthwiseConv
from ctxagg.bench import count_gmacs, count_params
from ctxagg.models import dwnet, model_names, paper_numbers
from ctxagg.models.dwnet import DWNetBlock
from ctxagg.train.config import input_size_overrides

NAME = "swin_t_dynamic_dw"
SMALL = dict(img_size=64, window_size=4, depths=(2, 2), num_heads=(3, 6), drop_path_rate=0.0)
DIMS, DEPTHS, HEADS = (96, 192, 384, 768), (2, 2, 6, 2), (3, 6, 12, 24)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _meta(**kwargs):
    with torch.device("meta"):
        return timm.create_model(NAME, **kwargs)


def test_registered_with_its_published_size():
    assert NAME in model_names() and paper_numbers()[NAME] is dwnet.PAPER_NUMBERS[NAME]
    paper = dwnet.PAPER_NUMBERS[NAME]
    params, gmacs = count_params(_meta()) / 1e6, count_gmacs(_meta())
    assert abs(params / paper["params"] - 1) <= paper["params_tol"] and round(params) == 51
    assert round(gmacs, 1) == paper["gflops"]  # 3.754 GMACs; their table's 3.8G to its printed digit
    assert round(count_params(_meta(dynamic=False)) / 1e6) == 24  # their static DWNet-T: 24M


def test_exact_parameter_arithmetic_against_swin_t():
    """Per block of width C, Swin's LN, qkv, proj, relative table (13²·heads) and LN give way to two bias-free 1×1
    convs, three BNs, the generator (C·C/4, its BN, C/4·49C + 49C) with the conv's bias C, and the BN before the MLP."""
    swin_t = 28_288_354  # timm swin_tiny_patch4_window7_224
    removed = sum(d * (2 * c + 3 * c * c + 3 * c + c * c + c + 169 * h + 2 * c) for c, d, h in zip(DIMS, DEPTHS, HEADS))
    added = sum(d * (2 * c * c + 6 * c + c * c // 4 + c // 2 + c // 4 * 49 * c + 49 * c + c + 2 * c)
                for c, d in zip(DIMS, DEPTHS))
    assert count_params(_meta()) == swin_t - removed + added == 51_131_752


def test_every_attention_is_replaced_by_the_dynamic_depthwise_branch():
    model = _meta()
    blocks = [b for stage in model.layers for b in stage.blocks]
    assert len(blocks) == 12 and all(isinstance(b, DWNetBlock) for b in blocks)
    assert all(isinstance(b.mixer.conv, DynamicDepthwiseConv) and b.mixer.conv.kernel_size == 7 for b in blocks)
    assert all(isinstance(b.norm2, nn.BatchNorm2d) for b in blocks)
    assert not [n for n, _ in model.named_modules() if n.endswith(("attn", "norm1"))]


def test_block_is_han_et_al_written_out():
    """x + BN(W₂·ReLU(BN(DynDW(ReLU(BN(W₁·x)))))), then x + MLP(BN(x)), in float64 with random BN statistics."""
    torch.manual_seed(0)
    block = DWNetBlock(8, timm.layers.Mlp(8, 16), nn.Identity(), nn.Identity(), kernel_size=3).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]:
            bn.weight.normal_(generator=g), bn.bias.normal_(generator=g), bn.running_mean.normal_(generator=g)
            bn.running_var.uniform_(0.5, 1.5, generator=g)
    block.eval()
    x = torch.randn(2, 5, 6, 8, dtype=torch.float64)  # NHWC, as Swin's stages
    mixer = block.mixer

    def conv1x1(t, conv):
        return torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], t)

    t = torch.clamp(ref._batch_norm(conv1x1(x.permute(0, 3, 1, 2), mixer.proj_in), mixer.norm_in), min=0)
    t = torch.clamp(ref._batch_norm(ref.dynamic_dw_forward(mixer.conv, t), mixer.norm), min=0)
    y = x + ref._batch_norm(conv1x1(t, mixer.proj_out), mixer.norm_out).permute(0, 2, 3, 1)
    expected = y + block.mlp(ref._batch_norm(y.permute(0, 3, 1, 2), block.norm2).permute(0, 2, 3, 1))
    torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)


def test_trains_a_step():
    torch.manual_seed(0)
    model = timm.create_model(NAME, num_classes=5, **SMALL).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([1, 3]))
    loss.backward()
    assert torch.isfinite(loss) and not [n for n, p in model.named_parameters() if p.grad is None]
    opt.step()
    assert not [n for n, p in model.named_parameters() if torch.equal(p, before[n])]


def test_timm_citizenship():
    model = timm.create_model(NAME, features_only=True, img_size=64, window_size=4, depths=(2, 2, 2, 2)).eval()
    with torch.no_grad():
        assert [f.shape[-1] for f in model(torch.randn(1, 3, 64, 64))] == list(DIMS)  # NHWC, as Swin
    model = timm.create_model(NAME, num_classes=3, **SMALL).eval()
    assert model.pretrained_cfg["classifier"] == "head.fc"
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 80)).shape == (1, 3)  # any size: no windows, padded patch merging
    model.reset_classifier(0, "")
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 8, 8, 192)  # unpooled NHWC features, as swin_t
    resized = timm.create_model(NAME, num_classes=3, **SMALL)
    resized.set_input_size(img_size=(96, 96), window_size=6)
    with torch.no_grad():
        assert resized.eval()(torch.randn(1, 3, 96, 96)).shape == (1, 3)
    assert input_size_overrides(NAME, 32) == dict(img_size=32, patch_size=2, window_size=4)
