"""Every registered model works with timm's tooling as timm's own models do (issue [timm-citizen]).

The properties timm 1.0.31's own model suite (its tests/test_models.py) checks on timm's models, checked here on
every model ``ctxagg models`` lists — including families registered later:

- the input sizes timm's suite derives from the cfg run, and the cfg's ``fixed_input_size`` is the truth: a
  fixed-size model refuses another size with a clear :class:`~ctxagg.checks.InputError`, any other model takes a
  non-square size;
- ``reset_classifier(0, "")`` (and ``num_classes=0, global_pool=""`` at creation) gives the unpooled features
  (``forward_features``' shape: (B, C, H, W) at ``pool_size``, NHWC for Swin and (B, N, C) tokens for ViTs, as timm's
  own), ``reset_classifier(0)`` the pooled ``forward_head(pre_logits=True)``; the cfg names real layers;
- torch.fx traces the model (timm's tracer and plain ``torch.fx``), the traced graph computes exactly the model's
  output, backward runs through it, and FX feature extraction gives the same maps as ``features_only``;
- ``forward_intermediates`` gives ``feature_info``'s maps and ``forward_features``' output;
- ``torch.jit.script`` works and matches eager, or refuses with ``TorchScriptUnsupportedError`` naming the part and
  the reason (:func:`ctxagg.models.unscriptable_models`).

Structural checks run on the meta device (shapes only: no memory, no arithmetic), value checks on tiny builds of
each model (its family's arguments with few, narrow blocks). By default a representative subset runs (one model
per distinct mechanism, and the first model of every family none of them belongs to); ``-m slow`` runs the rest of
the registry.
"""
from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.layers import get_notrace_functions, get_notrace_modules
from torch import nn
from torchvision.models.feature_extraction import NodePathTracer

from ctxagg.checks import InputError, fixed_input_size
from ctxagg.errors import TorchScriptUnsupportedError
from ctxagg.models import model_names, torchscript_unsupported, unscriptable_models

# torchvision notes that train and eval graphs differ (dropout, BatchNorm): expected, each mode is traced on its own
pytestmark = pytest.mark.filterwarnings("ignore:.*nodes obtained by tracing:UserWarning")

# timm's suite picks its input sizes from the cfg for these targets: forward 384, backward / TorchScript / FX 128,
# feature extraction 96 (a fixed-size model is always run at its own size)
TIMM_TARGETS = (384, 128, 96)
OTHER_SIZE = (96, 128)  # non-square, a multiple of every model's total stride

# one model per distinct mechanism (the first model of every other family is added below): mixtures of attention and
# convolution, (shifted) windows, stripes, fixed-size token MLPs, the ViT with a static N×N affinity, key-only
# attention with RP-CPE, absolute position tables, LESA, the scriptable conv baseline, Swin with an absolute
# table and with depth-wise attention, DeiT with a relative bias, depth-wise attention and without a class token
MECHANISMS = ("container_light", "container_swin", "container_cswin", "container_mlp_lr", "container_pam",
              "linglo_b0", "linglo_b0_wo_c", "resnet50_lesa", "resnet50_conv", "swin_t_scale_abs", "swin_t_dw",
              "deit_s_scale_rel", "deit_s_dw_rel", "deit_s_layernorm_rel_gap")


def _family(name: str) -> str:
    return timm.models.model_entrypoint(name).__module__


def _params() -> list:
    names = model_names()
    first, covered = {}, {_family(n) for n in MECHANISMS if n in names}
    for name in names:
        first.setdefault(_family(name), name)
    default = set(MECHANISMS) | {n for family, n in first.items() if family not in covered}
    return [pytest.param(n, marks=() if n in default else pytest.mark.slow) for n in names]


MODELS = _params()


def _meta_model(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, **kwargs).eval()


def _meta_images(size, batch: int = 2) -> torch.Tensor:
    return torch.empty(batch, 3, *size[-2:], device="meta")


def _timm_test_size(cfg: dict, target: int) -> tuple[int, ...]:
    """The input size timm's suite runs a model at for ``target``: its own size if fixed, else the cfg's size capped
    at ``target`` (or the cfg's ``min_input_size`` where the size is above ``target``)."""
    size = tuple(cfg["input_size"])
    if cfg.get("fixed_input_size") or max(size) <= target:
        return size
    return tuple(cfg["min_input_size"]) if cfg.get("min_input_size") else tuple(min(s, target) for s in size)


@pytest.mark.parametrize("name", MODELS)
def test_the_cfg_says_truthfully_which_sizes_the_model_takes(name):
    model = _meta_model(name)
    cfg = model.pretrained_cfg
    assert bool(cfg.get("fixed_input_size")) == bool(timm.get_pretrained_cfg_value(name, "fixed_input_size"))
    for size in {_timm_test_size(cfg, t) for t in TIMM_TARGETS}:
        assert model(_meta_images(size)).shape == (2, cfg["num_classes"]), size
    if cfg.get("fixed_input_size"):
        with pytest.raises(InputError, match=r"built for|224"):
            model(_meta_images(OTHER_SIZE))
    else:
        assert model(_meta_images(OTHER_SIZE)).shape == (2, cfg["num_classes"])


def _spatial(out: torch.Tensor, model: nn.Module) -> tuple[int, int]:
    """(H, W) of an unpooled NCHW (timm's default) or NHWC (``output_fmt``, Swin) feature map."""
    return tuple(out.shape[1:3]) if getattr(model, "output_fmt", "NCHW") == "NHWC" else tuple(out.shape[-2:])


@pytest.mark.parametrize("name", MODELS)
def test_removing_the_head_and_the_pool_gives_the_unpooled_features(name):
    model = _meta_model(name)
    cfg = model.pretrained_cfg
    x = _meta_images(cfg["input_size"])
    features = model.forward_features(x)
    pooled = model.forward_head(features, pre_logits=True)
    assert pooled.shape == (2, model.head_hidden_size) and model.num_features > 0
    if features.ndim == 4:  # a map: at the cfg's pool_size, as timm's suite checks
        assert _spatial(features, model) == tuple(cfg["pool_size"])
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape == pooled.shape
    model.reset_classifier(0, "")
    assert model(x).shape == features.shape  # (B, C, H, W), (B, H, W, C) or (B, N, C): not flattened
    assert _meta_model(name, num_classes=0, global_pool="")(x).shape == features.shape
    state = model.state_dict()
    assert f"{cfg['classifier']}.weight" in _meta_model(name).state_dict()
    assert f"{cfg['first_conv']}.weight" in state


@pytest.mark.parametrize("name", MODELS)
def test_plain_torch_fx_traces_the_model(name):
    graph = torch.fx.symbolic_trace(_meta_model(name)).graph  # ctxagg's leaves need no tracer settings
    assert len([n for n in graph.nodes if n.op == "placeholder"]) == 1  # images only: no mask inputs


@pytest.mark.parametrize("name", MODELS)
def test_torchscript_scripts_the_model_or_says_why_not(name):
    reason = torchscript_unsupported(_meta_model(name))
    model = _tiny_model(name).eval()
    if reason:
        assert unscriptable_models([name]) == {name: reason}
        with pytest.raises(TorchScriptUnsupportedError, match="not TorchScript-compatible.*torch.export"):
            torch.jit.script(model)
        return
    x = torch.randn(1, 3, *_tiny_size(name))
    torch.testing.assert_close(torch.jit.script(model)(x), model(x))
    assert model._forward_pre_hooks, "the eager model keeps its input checks"


# --- value checks on tiny builds ---------------------------------------------------------------------------------

# narrow, shallow arguments per model class (two blocks where a stage alternates plain and shifted windows); a
# class not listed is built with its family's small_input_kwargs only
TINY = {
    "ContainerNet": dict(dims=(16, 16, 32, 32), depths=(1, 2, 1, 1), mlp_ratios=(2, 2, 2, 2), head_dim=8),
    "LinGloNet": dict(dims=(8, 16, 16, 32), depths=(1, 1, 1, 1), heads=(1, 1, 2, 2), mlp_ratios=(2, 2, 2, 2)),
    "LesaResNet": dict(layers=(1, 1, 1, 1)),
    "AffinityViT": dict(embed_dim=32, depth=4, num_heads=2),
    "NoMaskVisionTransformer": dict(embed_dim=32, depth=4, num_heads=2),
    "AffinitySwin": dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2)),
    "DWNetSwin": dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2)),
}
TINY_IMG = 64


def _tiny_kwargs(name: str) -> dict:
    family = __import__(_family(name), fromlist=["small_input_kwargs"])
    kwargs = dict(getattr(family, "small_input_kwargs", lambda n, s: dict(img_size=s))(name, TINY_IMG))
    return dict(kwargs, **TINY.get(type(_meta_model(name)).__name__, {}), num_classes=5)


def _tiny_model(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **_tiny_kwargs(name), **kwargs)


def _tiny_size(name: str) -> tuple[int, int]:
    """The size a tiny build was made for if it takes only that one, else a non-square one."""
    return fixed_input_size(_meta_model(name, **_tiny_kwargs(name))) or (TINY_IMG, TINY_IMG + 32)


def _traced(model: nn.Module, train: bool) -> torch.fx.GraphModule:
    """``model`` traced in train or eval mode with the tracer timm's suite and FX feature extraction use
    (torchvision's, with timm's notrace modules and functions)."""
    tracer = NodePathTracer(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    return torch.fx.GraphModule(model, tracer.trace(model.train(train)))


@torch.no_grad()
def _bn_statistics(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so evaluation-mode graphs are checked on more than the identity."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("name", MODELS)
def test_the_traced_graph_computes_the_model_and_backpropagates(name):
    model = _bn_statistics(_tiny_model(name))
    x = torch.randn(2, 3, *_tiny_size(name))
    graph = _traced(model, train=False)
    with torch.no_grad():
        assert torch.equal(graph(x), model(x))  # the same ops: bit-identical
    _traced(model, train=True)(x).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient through the traced graph for {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _as_nchw(out: torch.Tensor, channels: int, grid: tuple[int, int]) -> torch.Tensor:
    """A feature as an NCHW map of ``channels`` on ``grid``: NHWC maps (Swin) transposed, (B, N, C) tokens (an FX node
    inside a ViT) without their prefix (class) tokens and laid out on the grid."""
    if out.ndim == 3:
        h, w = grid
        return out[:, out.shape[1] - h * w:].transpose(1, 2).reshape(out.shape[0], channels, h, w)
    return out.permute(0, 3, 1, 2) if out.shape[1] != channels and out.shape[-1] == channels else out


@pytest.mark.parametrize("name", MODELS)
def test_fx_feature_extraction_gives_the_features_only_maps(name):
    reference = _tiny_model(name, features_only=True).eval()  # the same seed: the same weights
    traced = _tiny_model(name, features_only=True, feature_cls="fx").eval()
    x = torch.randn(1, 3, *_tiny_size(name))
    with torch.no_grad():
        expected, got = reference(x), traced(x)
    assert len(got) == len(expected) == len(reference.feature_info.channels())
    for want, have, channels in zip(expected, got, reference.feature_info.channels()):
        want = _as_nchw(want, channels, ())
        assert want.shape[1] == channels
        torch.testing.assert_close(_as_nchw(have, channels, want.shape[-2:]), want, rtol=0, atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_forward_intermediates_gives_the_feature_info_maps(name):
    model = _meta_model(name)
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    size = _timm_test_size(model.pretrained_cfg, 96)[-2:]
    final, maps = model.forward_intermediates(_meta_images(size), output_fmt="NCHW")
    assert final.shape == model.forward_features(_meta_images(size)).shape
    assert [m.shape[1] for m in maps] == info.channels()
    for m, reduction in zip(maps, info.reduction()):
        assert m.shape[0] == 2 and all(s <= math.ceil(i / reduction) + 1 for s, i in zip(m.shape[-2:], size))


@pytest.mark.parametrize("name", ["deit_s_scale_rel", "deit_s_layernorm_rel_gap", "container_pam"])
def test_vit_forward_intermediates_options_behave_as_on_timms_vision_transformer(name):
    model = _tiny_model(name).eval()
    size = _tiny_size(name)
    x = torch.randn(2, 3, *size)
    patch = model.patch_embed.patch_size
    h, w, prefix = size[0] // patch[0], size[1] // patch[1], model.num_prefix_tokens
    with torch.no_grad():  # the blocks run one by one, every output kept
        tokens, outs = model.norm_pre(model._pos_embed(model.patch_embed(x))), []
        for block in model.blocks:
            tokens = block(tokens)
            outs.append(tokens)
        final, maps = model.forward_intermediates(x, indices=[0, 2], norm=True)
        last_two = model.forward_intermediates(x, indices=2, output_fmt="NLC", intermediates_only=True)
        with_prefix = model.forward_intermediates(x, indices=[1], return_prefix_tokens=True, intermediates_only=True)
        features = model.forward_features(x)
    torch.testing.assert_close(final, model.norm(tokens))
    torch.testing.assert_close(final, features)
    grid = [model.norm(outs[i])[:, prefix:].reshape(2, h, w, -1).permute(0, 3, 1, 2) for i in (0, 2)]
    torch.testing.assert_close(maps, grid)  # NCHW on the input's patch grid, prefix tokens dropped, normed
    torch.testing.assert_close(last_two, [outs[i][:, prefix:] for i in (len(outs) - 2, len(outs) - 1)])
    if prefix:  # (map, prefix tokens) pairs; a model without prefix tokens returns the maps alone
        with_prefix, prefix_tokens = zip(*with_prefix)
        torch.testing.assert_close(prefix_tokens[0], outs[1][:, :prefix])
    assert with_prefix[0].shape == (2, model.embed_dim, h, w)


@pytest.mark.parametrize("kwargs", [dict(), dict(class_token=False, global_pool="avg"),
                                    dict(no_embed_class=True, reg_tokens=2)])
def test_the_dynamic_position_embedding_is_timms(kwargs):
    from timm.models.vision_transformer import VisionTransformer

    model = timm.create_model("deit_s", embed_dim=32, depth=1, num_heads=2, patch_size=8, img_size=64, **kwargs)
    x = torch.randn(2, 6, 10, 32)  # a 6×10 patch grid (NHWC, as dynamic_img_size embeds), not the built 8×8
    torch.testing.assert_close(model._pos_embed(x), VisionTransformer._pos_embed(model, x), rtol=0, atol=0)
    assert model.token_grid.size == (6, 10)


def test_a_leaf_function_is_one_graph_node_with_any_tracer():
    from ctxagg.tracing import fx_leaf

    @fx_leaf
    def layout(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2) if x.ndim == 4 else x  # a branch on the shape: untraceable inside

    class Net(nn.Module):
        def forward(self, x):
            return layout(x) * 2

    graph = torch.fx.symbolic_trace(Net())  # plain torch.fx: no timm or torchvision settings
    calls = [n for n in graph.graph.nodes if n.op == "call_function" and getattr(n.target, "__name__", "") == "layout"]
    assert len(calls) == 1
    x = torch.randn(2, 3, 4, 5)
    assert torch.equal(graph(x), x.flatten(2) * 2) and torch.equal(layout(x), x.flatten(2))
    assert layout in timm.layers.get_notrace_functions()
