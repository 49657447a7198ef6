"""int8 inference: post-training quantization through PyTorch 2 export (PT2E) with torchao's x86 inductor quantizer.

The flow (torchao.quantization.pt2e, where upstream moved ``torch.ao.quantization.quantize_pt2e``):
(re-parameterised model) → channels_last → ``torch.export`` with a dynamic batch axis →
``prepare_pt2e(X86InductorQuantizer)`` inserts observers → calibration batches run through it →
``convert_pt2e`` leaves a graph of quantize/dequantize nodes around the fp32 ops → ``torch.compile`` (inductor,
weight freezing) pattern-matches each dq → conv/linear → q into oneDNN's int8 kernels (VNNI on x86).

- ``static``: activations uint8 per tensor (histogram observer on the calibration images), weights int8 per
  output channel, for every conv (depth-wise ones included: :func:`_every_conv_quantizer`) and linear (and the
  pools / adds between quantized ops); timm ``ConvMlp`` channel MLPs are quantized as linears
  (:class:`LinearMlp`), so their GELU runs inside oneDNN's int8 linear;
- ``dynamic``: only linears, activation ranges measured per batch at run time (no calibration needed);
  what is left for a model whose graph the static flow cannot take.
Ops the quantizer does not annotate (attention's SDPA, LayerNorm, GELU, softmax) stay fp32, or bf16 when the
quantized model runs under bf16 autocast (``int8-mixed-bf16`` in PyTorch's x86 quantization guide).

The x86 quantizer targets x86 CPUs: a quantized model runs on the CPU whatever device the fp32 model was on.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..layers.fold import norm_scale_shift

__all__ = ["quantize_int8", "INT8_MODES", "INT8_OBSERVERS", "top1_agreement", "require_torchao", "LinearMlp",
           "conv_mlps_as_linears"]

INT8_MODES = ("static", "dynamic")
# activation observers of static quantization: the x86 default (a histogram whose clipping range minimises the
# quantization error; robust to outliers, but its range search takes seconds per observer) or the running min/max
INT8_OBSERVERS = ("histogram", "minmax")


def require_torchao():
    """torchao's PT2E module, or a clear error naming the extra that installs it."""
    try:
        from torchao.quantization import pt2e  # noqa: F401
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    except ImportError as exc:
        raise ConfigError("int8 quantization needs torchao (pip install 'ctxagg[int8]' or pip install torchao); "
                          f"it could not be imported: {exc}") from exc
    return x86


def _quantizer(mode: str, observer: str = "histogram"):
    x86 = require_torchao()
    if mode not in INT8_MODES:
        raise ConfigError(f"unknown int8 mode {mode!r}; choose one of {INT8_MODES}")
    if observer not in INT8_OBSERVERS:
        raise ConfigError(f"unknown int8 observer {observer!r}; choose one of {INT8_OBSERVERS}")
    quantizer = _every_conv_quantizer(x86)()
    config = x86.get_default_x86_inductor_quantization_config(is_dynamic=mode == "dynamic")
    if mode == "static" and observer == "minmax":
        from torchao.quantization.pt2e import MinMaxObserver

        spec = dataclasses.replace(config.input_activation,
                                   observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2 ** -12))
        config = dataclasses.replace(config, input_activation=spec, output_activation=spec)
    if mode == "dynamic":  # dynamic quantization covers linears only (their activation range is known per batch)
        quantizer.set_module_type_qconfig(nn.Linear, config)
    else:
        quantizer.set_global(config)
    return quantizer


class LinearMlp(nn.Module):
    """timm's ``ConvMlp`` (1×1 conv → activation → 1×1 conv, the channel MLP of Container Eq. 3) as two linears
    over the channel axis of the NHWC view of its input: the same function, and the same memory traffic on a
    channels_last tensor (the view is free). For int8 only: oneDNN's quantized linear takes GELU as a post-op
    (the activation is computed inside the kernel, which then writes uint8), the quantized conv does not in
    torchao 0.18, so as convs every hidden activation makes an extra fp32 round trip through memory. Inference
    only: the MLP's dropout is left out."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        if not isinstance(mlp.norm, nn.Identity):
            raise ConfigError("LinearMlp converts ConvMlp without a hidden norm layer")
        self.fc1, self.fc2 = (_as_linear(conv) for conv in (mlp.fc1, mlp.fc2))
        self.act = mlp.act

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)


def _as_linear(conv: nn.Conv2d) -> nn.Linear:
    linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None).to(conv.weight)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.flatten(1))
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear


def conv_mlps_as_linears(model: nn.Module) -> nn.Module:
    """Replace (in place) every timm ``ConvMlp`` without a hidden norm by :class:`LinearMlp`; returns ``model``."""
    from timm.layers import ConvMlp

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, ConvMlp) and isinstance(child.norm, nn.Identity):
                setattr(module, child_name, LinearMlp(child))
    return model


@functools.cache
def _every_conv_quantizer(x86):
    """``X86InductorQuantizer`` that also annotates the convolutions no fusion pattern covers (depth-wise convs
    followed by another conv). Its own search for them keys on ``source_fn_stack``, which non-strict
    ``torch.export`` (torch's default, and ours) does not record, so without this every depth-wise conv of
    Container/LinGlos stayed fp32 between a dequantize and a quantize (36 in Container-Light)."""
    class EveryConvQuantizer(x86.X86InductorQuantizer):
        def _annotate_conv2d(self, gm, quantization_config, filter_fn=None) -> None:
            for node in gm.graph.nodes:
                if (node.op == "call_function" and node.target == torch.ops.aten.conv2d.default
                        and not x86._skip_annotate([node], filter_fn)):
                    self._annotate_conv_node_helper(node, True, quantization_config)

    return EveryConvQuantizer


def _exported(model: nn.Module, example: Tensor) -> nn.Module:
    """``torch.export`` of the model with a dynamic batch axis (calibration batches need not match the example)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    return torch.export.export(model, (example,), dynamic_shapes=({0: batch},) if example.shape[0] > 1 else None
                               ).module()


@torch.no_grad()
def quantize_int8(model: nn.Module, calibration: Iterable[Tensor], mode: str = "static",
                  channels_last: bool = True, max_batches: Optional[int] = None, observer: str = "histogram"
                  ) -> nn.Module:
    """A PT2E int8 copy of ``model`` (see the module docstring), calibrated on ``calibration`` (batches of
    normalised images, NCHW float; for ``dynamic`` one batch is enough: it only fixes the example shape).

    Returns the converted graph module (fp32 in, fp32 logits out); it runs in eager as a simulation of the int8
    arithmetic and at int8 speed once ``torch.compile``'d with inductor freezing (:func:`ctxagg.export.optimize`
    with ``int8=True`` does both, after re-parameterising: pass a folded model, :func:`reparameterize`, for the
    fewest quantize/dequantize steps). ``observer``: how static calibration turns activations into ranges
    (:data:`INT8_OBSERVERS`)."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = _quantizer(mode, observer)
    net = conv_mlps_as_linears(copy.deepcopy(model).eval().cpu())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    batches = iter(calibration)
    first = next(batches, None)
    if first is None:
        raise ConfigError("int8 calibration needs at least one batch of images")
    example = first.cpu().contiguous(memory_format=fmt)
    prepared = prepare_pt2e(_exported(net, example), quantizer)
    seen = 0
    for batch in [first] if mode == "dynamic" else itertools.chain([first], batches):
        prepared(batch.cpu().contiguous(memory_format=fmt))
        seen += 1
        if max_batches is not None and seen >= max_batches:
            break
    converted = _drop_unused_tensors(convert_pt2e(_batch_norms_as_affine(prepared)))
    allow_exported_model_train_eval(converted)  # .eval() on an exported graph raises otherwise (wrappers call it)
    converted.int8_mode = mode  # what the caller asked for, readable from the result
    converted.calibration_batches = seen
    return converted


def _batch_norms_as_affine(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Each eval-mode batch norm left in the graph (``prepare_pt2e`` has folded those that follow a conv) as
    ``x * scale + shift`` with scale = γ/√(σ² + ε), shift = β − μ·scale: the same function, and ``convert_pt2e``
    then skips its QAT conv-BN pattern search, which exports ~100 pattern graphs whenever a BN node exists
    (minutes on a small CPU)."""
    aten, graph = torch.ops.aten, graph_module.graph
    legit = aten._native_batch_norm_legit_no_training.default  # returns (out, saved statistics...)
    norms = [n for n in graph.nodes if n.target == legit or (n.target == aten.batch_norm.default and not n.args[5])]
    for index, node in enumerate(norms):
        x, weight, bias, mean, var = node.args[:5]
        eps = node.args[6] if node.target == legit else node.args[7]
        w, b, mu, sigma2 = (functools.reduce(getattr, n.target.split("."), graph_module) if n is not None else None
                            for n in (weight, bias, mean, var))
        scale, shift = norm_scale_shift(w, b, mu, sigma2, eps)
        shape = (1, -1) + (1,) * (x.meta["val"].dim() - 2)
        with graph.inserting_before(node):
            nodes = []
            for kind, value in (("scale", scale), ("shift", shift)):
                name = f"_bn_as_affine_{kind}_{index}"
                graph_module.register_buffer(name, value.detach().reshape(shape))
                nodes.append(graph.get_attr(name))
            out = graph.call_function(aten.add.Tensor, (graph.call_function(aten.mul.Tensor, (x, nodes[0])), nodes[1]))
        for user in list(node.users) if node.target == legit else []:  # getitem(bn, 0) is the output
            user.replace_all_uses_with(out)
            graph.erase_node(user)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    graph_module.recompile()
    return graph_module


def _drop_unused_tensors(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Remove the parameters and buffers no graph node reads: ``convert_pt2e`` keeps each fp32 weight next to the
    int8 copy the graph uses, which would make a saved int8 program larger than the fp32 model."""
    used = {n.target for n in graph_module.graph.nodes if n.op == "get_attr"}
    for name in [k for k in graph_module.state_dict(keep_vars=True) if k not in used]:
        owner, _, attr = name.rpartition(".")
        module = graph_module.get_submodule(owner) if owner else graph_module
        module._parameters.pop(attr, None)
        module._buffers.pop(attr, None)
    return graph_module


@torch.no_grad()
def top1_agreement(reference: nn.Module, candidate: nn.Module, batches: Iterable[Tensor]) -> dict[str, float]:
    """Fraction of images whose top-1 class is the same under both models, and the largest |logit difference|
    relative to the reference's logit range, over ``batches``."""
    same = total = 0
    worst = 0.0
    for x in batches:
        ref, out = reference(x).float(), candidate(x).float()
        same += int((ref.argmax(1) == out.argmax(1)).sum())
        total += len(x)
        span = (ref.amax(1) - ref.amin(1)).clamp_min(1e-12)
        worst = max(worst, float(((out - ref).abs().amax(1) / span).max()))
    if total == 0:
        raise ConfigError("top-1 agreement needs at least one batch")
    return dict(agreement=same / total, images=total, max_rel_logit_error=worst)
