"""LinGlos (linglos.txt): key-only attention, RP-CPE, the LinGlo backbones and their ablations."""
import pytest
import timm
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import ctxagg.models.linglos as linglos
from ctxagg.affinity.attention import SelfAttentionAffinity
from ctxagg.affinity.key_only import KeyOnlyAttention
from ctxagg.affinity.registry import build_affinity
from ctxagg.bench import count_params
from ctxagg.bench.linglos_fig4 import PeakTensorBytes
from ctxagg.layers.rep_cpe import CPE_MODES, RepConditionalPosEnc

MODELS = timm.list_models(module="linglos")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is as fast, and immune to OpenMP spin-waiting on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
COUNTED = [n for n in MODELS if "params" in linglos.PAPER_NUMBERS[n]]


def _randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _key_only(dim=16, heads=4, seed=0) -> KeyOnlyAttention:
    torch.manual_seed(seed)
    aff = KeyOnlyAttention(dim, heads).double()
    with torch.no_grad():  # leave the near-uniform init: make the saliency softmax and U1's bias non-trivial
        aff.saliency.normal_()
        aff.u1.bias.normal_()
    return aff


# ---------------------------------------------------------------- parameter counts (Tables 2 and 5)

@pytest.mark.parametrize("name", COUNTED)
def test_parameter_count_matches_paper(name):
    paper = linglos.PAPER_NUMBERS[name]
    model = timm.create_model(name)
    training = count_params(model)
    deployed = count_params(timm.models.reparameterize_model(model, inplace=True))
    assert paper["params_deployed"]
    assert abs(deployed / 1e6 / paper["params"] - 1) <= paper["params_tol"], (name, deployed, paper)
    assert training > deployed  # the RP-CPE branches existed before re-parameterisation


def test_variants_follow_section_3_4():
    b0, b2 = timm.create_model("linglo_b0"), timm.create_model("linglo_b2")
    assert [s.blocks[0].attn.affinity.heads for s in b0.stages] == [1, 2, 5, 8]
    assert [len(s.blocks) for s in b2.stages] == [3, 5, 9, 3]
    assert [s.blocks[0].mlp.fc1.out_features // d for s, d in zip(b2.stages, (64, 128, 320, 512))] == [8, 8, 4, 4]
    assert (b0.stem.proj.kernel_size, b0.stem.proj.stride, b0.stem.proj.padding) == ((7, 7), (4, 4), (3, 3))
    down = b0.stages[1].downsample.proj
    assert (down.kernel_size, down.stride, down.padding) == ((3, 3), (2, 2), (1, 1))
    assert len(b0.stages[0].blocks[0].mlp.cpe.branches) == 4


# ---------------------------------------------------------------- key-only attention (§3.1)

@pytest.mark.parametrize("shape", [(2, 16, 5, 7), (2, 35, 16)])
def test_key_only_matrix_reproduces_forward(shape):
    aff = _key_only()
    keys, gate, saliency_input = (_randn(*shape, seed=s) for s in range(3))
    out = aff(keys, gate=gate, saliency_input=saliency_input)
    assert out.shape == keys.shape
    torch.testing.assert_close(out, aff.reference(keys, gate, saliency_input), rtol=1e-10, atol=1e-10)
    # the saliency input defaults to the aggregated keys (the LinGlo block's K, V, K)
    torch.testing.assert_close(aff(keys, gate=gate), aff(keys, gate=gate, saliency_input=keys))


def test_key_only_matrix_is_rank_one_affinity_plus_identity():
    aff = _key_only()
    keys, gate_map, saliency_input = (_randn(1, 16, 3, 4, seed=s) for s in range(3))
    n, c = 12, 16
    m = aff.matrix(keys.shape, gate=gate_map, saliency_input=saliency_input)[0, 0].view(n, c, n, c)  # [n, c', i, c]
    dyn = m - torch.eye(n * c, dtype=m.dtype).view(n, c, n, c)
    a = aff.attention_weights(saliency_input)[0]  # (heads, N), Eq. 2
    torch.testing.assert_close(a.sum(-1), torch.ones(4, dtype=a.dtype))
    # with the gate and U1 removed, every query position sees the same saliency weights: 1·aᵀ
    gate = gate_map[0].flatten(1).T  # (N, C)
    w = aff.u1.weight  # (C', C)
    expected = torch.einsum("ci,nc,dc->ndic", a.repeat_interleave(4, 0), gate, w)
    torch.testing.assert_close(dyn, expected)


def test_key_only_block_computes_equations_2_to_4():
    """The LinGlo token mixer equals Eq. 2-4 written out with explicit W_K, W_V, W_sal, U1, U2."""
    torch.manual_seed(0)
    mixer = linglos.TokenMixer(12, heads=3).double()
    with torch.no_grad():
        mixer.affinity.saliency.normal_()
    x = _randn(2, 10, 12)
    w_k, w_v = mixer.proj_in.weight.chunk(2, 0)
    b_k, b_v = mixer.proj_in.bias.chunk(2, 0)
    key, value = x @ w_k.T + b_k, x @ w_v.T + b_v
    ys = []
    for h in range(3):
        kh, vh = key[..., 4 * h:4 * h + 4], value[..., 4 * h:4 * h + 4]
        a = torch.softmax(kh @ mixer.affinity.saliency[h] / 4 ** 0.5, dim=1)  # Eq. 2, over positions
        g = (a.unsqueeze(-1) * kh).sum(1, keepdim=True)  # Eq. 3
        ys.append(g * vh)
    inner = torch.cat(ys, -1) @ mixer.affinity.u1.weight.T + mixer.affinity.u1.bias + key
    y = inner @ mixer.proj_out.weight.T + mixer.proj_out.bias  # Eq. 4
    torch.testing.assert_close(mixer(x), y, rtol=1e-10, atol=1e-10)


def test_key_only_gradients_reach_every_parameter():
    torch.manual_seed(0)
    mixer = linglos.TokenMixer(16, heads=2)
    x = torch.randn(2, 20, 16, requires_grad=True)
    (mixer(x) ** 2).sum().backward()
    for name, p in [("input", x), *mixer.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert torch.isfinite(p.grad).all(), name


def test_key_only_registered_and_checks_inputs():
    aff = build_affinity("key_only", dim=16, heads=4)
    assert isinstance(aff, KeyOnlyAttention) and aff.dynamic
    assert aff.macs(100) == 100 * 16 * 18
    with pytest.raises(ValueError, match="needs the gate"):
        aff(torch.randn(1, 16, 4, 4))
    with pytest.raises(ValueError, match="shaped like the aggregated keys"):
        aff(torch.randn(1, 16, 4, 4), gate=torch.randn(1, 16, 4, 5))


# ---------------------------------------------------------------- memory: linear vs quadratic (§3.1, §5.2)

def _peak_and_largest(fn):
    with torch.no_grad(), PeakTensorBytes() as counter:
        fn()
    return counter.peak, counter.largest


def test_key_only_memory_grows_linearly_dot_product_quadratically():
    dim, heads = 32, 2
    torch.manual_seed(0)
    key_only, dot = KeyOnlyAttention(dim, heads), SelfAttentionAffinity(dim, heads)
    stats = {}
    for side in (16, 32):  # N = 256 and 4N = 1024 tokens
        v, q, k = (torch.randn(1, dim, side, side) for _ in range(3))
        stats["key_only", side] = _peak_and_largest(lambda: key_only(k, gate=v, saliency_input=k))
        with sdpa_kernel([SDPBackend.MATH]):  # stored N×N scores: the dot-product attention the paper measured
            stats["dot", side] = _peak_and_largest(lambda: dot(v, q, k))
    for i in range(2):  # peak bytes, then largest tensor
        ratio_key = stats["key_only", 32][i] / stats["key_only", 16][i]
        ratio_dot = stats["dot", 32][i] / stats["dot", 16][i]
        assert 3.5 <= ratio_key <= 4.5, ratio_key
        assert 14 <= ratio_dot <= 16.5, ratio_dot
    assert stats["key_only", 32][1] < 1024 * 1024 * 4 / 16  # never an N×N float tensor, not even 1/16 of one


def test_model_memory_linear_for_key_only_superlinear_for_dot_product():
    ratios = {}
    for name in ("linglo_b0", "linglo_b0_dotprod"):
        model = timm.models.reparameterize_model(timm.create_model(name, num_classes=0).eval()).to("meta")
        peaks = []
        for size in (64, 128):
            x = torch.empty(1, 3, size, size, device="meta")
            with sdpa_kernel([SDPBackend.MATH]):
                peaks.append(_peak_and_largest(lambda: model(x))[0])
        ratios[name] = peaks[1] / peaks[0]
    assert 3.5 <= ratios["linglo_b0"] <= 4.5, ratios
    assert ratios["linglo_b0_dotprod"] > 10, ratios


# ---------------------------------------------------------------- RP-CPE (§3.2, Table 6)

def _bn_shaken(model, batches=2, size=32, channels=3):
    """Random BN affine parameters and running statistics updated by a few training batches."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    model.train()
    with torch.no_grad():
        for s in range(batches):
            model(_randn(4, channels, size, size, seed=10 + s))
    return model.eval()


@pytest.mark.parametrize("mode", CPE_MODES)
def test_rep_cpe_layer_folds_into_one_conv(mode):
    torch.manual_seed(0)
    cpe = _bn_shaken(RepConditionalPosEnc(8, mode).double(), channels=8, size=9)
    x = _randn(2, 8, 6, 7)
    before = cpe(x)
    cpe.reparameterize()
    assert len(cpe.branches) == 0 and cpe.reparam_conv is not None
    torch.testing.assert_close(cpe(x), before, rtol=1e-10, atol=1e-10)
    assert count_params(cpe) == 8 * 9 + 8


def test_parallel_branches_do_not_collapse_in_training():
    torch.manual_seed(0)
    cpe = RepConditionalPosEnc(8, "p_cpe").double().train()
    x = _randn(4, 8, 6, 6)
    summed_kernel = torch.stack([b.conv.weight for b in cpe.branches]).sum(0)
    one_conv = F.batch_norm(F.conv2d(x, summed_kernel, padding=1, groups=8), None, None, training=True)
    assert not torch.allclose(cpe(x), one_conv, atol=1e-3)  # per-branch batch statistics differ


@pytest.mark.parametrize("mode", CPE_MODES)
def test_reparameterized_model_matches_original(mode):
    torch.manual_seed(0)
    model = _bn_shaken(timm.create_model("linglo_b0", cpe=mode, num_classes=10).double())
    x = _randn(2, 3, 32, 48)
    with torch.no_grad():
        before = model(x)
        deployed = timm.models.reparameterize_model(model)  # timm's walker finds RepConditionalPosEnc
        after = deployed(x)
    cpes = [m for m in deployed.modules() if isinstance(m, RepConditionalPosEnc)]
    assert len(cpes) == 10 and all(m.reparam_conv is not None and len(m.branches) == 0 for m in cpes)
    assert count_params(deployed) < count_params(model)
    torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-9)


def test_timm_utils_reparameterize_finds_modules():
    from timm.utils.model import reparameterize_model
    model = timm.create_model("linglo_b0_chhh")
    deployed = reparameterize_model(model)
    cpes = [m for m in deployed.modules() if isinstance(m, RepConditionalPosEnc)]
    assert len(cpes) == 8 and all(m.reparam_conv is not None for m in cpes)
    assert all(len(m.branches) == 4 for m in model.modules() if isinstance(m, RepConditionalPosEnc))


# ---------------------------------------------------------------- timm citizenship

def test_features_only_four_levels_at_strides_4_to_32_non_square():
    model = timm.create_model("linglo_b0", features_only=True)
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [32, 64, 160, 256]
    feats = model(torch.randn(1, 3, 160, 192))
    assert [tuple(f.shape[-2:]) for f in feats] == [(40, 48), (20, 24), (10, 12), (5, 6)]


def test_forward_intermediates_head_and_classifier():
    torch.manual_seed(0)
    model = timm.create_model("linglo_b0", num_classes=7, drop_path_rate=0.1).eval()
    x = torch.randn(2, 3, 160, 192)
    final, inter = model.forward_intermediates(x)
    assert [t.shape[1] for t in inter] == [32, 64, 160, 256]
    torch.testing.assert_close(final, model.forward_features(x))
    assert model.forward_head(final, pre_logits=True).shape == (2, 256)
    assert model(x).shape == (2, 7)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    cfg = model.pretrained_cfg
    assert cfg["first_conv"] == "stem.proj" and cfg["classifier"] == "head" and cfg["pool_size"] == (7, 7)
    assert "stem" in model.group_matcher() and model.no_weight_decay() == set()
    logits = model(x)
    model.set_grad_checkpointing(True)
    assert all(s.grad_checkpointing for s in model.stages)
    torch.testing.assert_close(model(x), logits)


def test_in_chans_and_grad_checkpointing_backward():
    torch.manual_seed(0)
    model = timm.create_model("linglo_b0", in_chans=1, num_classes=4)
    model.set_grad_checkpointing(True)
    model(torch.randn(2, 1, 64, 64)).sum().backward()
    assert model.stem.proj.weight.grad is not None


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_every_model(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 5)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing[:5]


def test_ablation_structure():
    cchh, chhh = timm.create_model("linglo_b0_cchh"), timm.create_model("linglo_b0_chhh")
    kinds = lambda m: "".join("C" if isinstance(s.blocks[0], linglos.ConvSEBlock) else "H" for s in m.stages)
    assert kinds(cchh) == "CCHH" and kinds(chhh) == "CHHH"
    wo_c = timm.create_model("linglo_b0_wo_c")
    assert not any(isinstance(m, RepConditionalPosEnc) for m in wo_c.modules())
    assert wo_c.stem.proj.kernel_size == (4, 4) and wo_c.stages[1].downsample[0].proj.stride == (2, 2)
    assert len(wo_c.no_weight_decay()) == 4  # one absolute position embedding a stage
    wo_ch = timm.create_model("linglo_wo_ch", features_only=True)
    assert wo_ch.feature_info.reduction() == [16] * 4 and wo_ch.feature_info.channels() == [150] * 4
    dot = timm.create_model("linglo_b0_dotprod")
    assert all(isinstance(b.attn.affinity, SelfAttentionAffinity) for s in dot.stages for b in s.blocks)
    # wo-C at another input size resizes its absolute position embeddings
    assert timm.create_model("linglo_b0_wo_c")(torch.randn(1, 3, 96, 128)).shape == (1, 1000)
