"""Deployment: exact re-parameterisation, channels_last, optional bf16 autocast, int8 (PT2E) and torch.compile."""
from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Iterable, Optional

import torch
from timm.utils.model import reparameterize_model
from torch import Tensor, nn

from ..errors import ConfigError
from ..layers.fold import fold_bn_into_prev_conv

__all__ = ["reparameterize", "optimize", "deploy_module", "DeployedModel"]

_CONV_BN_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))


@torch.no_grad()
def _fold_conv_bn_pairs(model: nn.Module) -> int:
    """Fold every ``bnK(convK(x))`` pair of timm ResNet blocks/stems and every ``Sequential(conv, bn)``
    shortcut into the conv (exact in eval mode). Returns the number of folded BatchNorms."""
    folded = 0
    for module in model.modules():
        for conv_name, bn_name in _CONV_BN_PAIRS:
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                fold_bn_into_prev_conv(conv, bn)
                setattr(module, bn_name, nn.Identity())
                folded += 1
        if isinstance(module, nn.Sequential) and len(module) == 2 and isinstance(module[0], nn.Conv2d) \
                and isinstance(module[1], nn.BatchNorm2d):
            fold_bn_into_prev_conv(module[0], module[1])
            module[1] = nn.Identity()
            folded += 1
    return folded


def reparameterize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The eval-mode model with every exact fold applied: each module's own ``reparameterize()`` (Container
    blocks, RP-CPE, anything timm's ``reparameterize_model`` finds) and conv→BN pairs of ResNet blocks."""
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    reparameterize_model(model, inplace=True)
    _fold_conv_bn_pairs(model)
    return model


class DeployedModel(nn.Module):
    """A re-parameterised (optionally int8-quantized) model run in channels_last memory format, optionally under
    bf16 autocast.

    Outputs are float32 logits either way; bf16 changes numerics (see the README for the measured top-1
    agreement), fp32 equals the training model to float tolerance."""

    def __init__(self, model: nn.Module, channels_last: bool = True, bf16: bool = False):
        super().__init__()
        self.model = model
        self.channels_last = channels_last
        self.bf16 = bf16

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast(x.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with autocast:
            out = self.model(x)
        return out.float()


def _enable_freezing() -> None:
    # inference-only graphs: freezing lets inductor constant-fold weights and fuse oneDNN convs with their
    # element-wise neighbours (GELU, residual adds), and pattern-match int8 dq → conv → q into oneDNN int8 kernels;
    # it is process-wide, and only applies under no_grad
    import torch._inductor.config as inductor_config
    inductor_config.freezing = True


def optimize(model: nn.Module, channels_last: bool = True, bf16: bool = False, compile: bool = False,
             compile_mode: str = "default", device: Optional[str] = None, int8: Optional[str] = None,
             calibration: Optional[Iterable[Tensor]] = None, int8_observer: str = "histogram") -> nn.Module:
    """Re-parameterise (a copy of) ``model`` for inference, convert it to channels_last, and optionally
    run it under bf16 autocast and ``torch.compile`` it. The result is in eval mode and must not be trained.

    ``device``: where the deployed model runs (default: where ``model`` is); inputs must be on it.
    ``int8``: ``"static"`` or ``"dynamic"`` PT2E quantization (:func:`ctxagg.export.quantize.quantize_int8`,
    calibrated on ``calibration`` with ``int8_observer``); x86 CPUs only, so it refuses any other device. With
    ``bf16`` the ops left unquantized run in bf16 (int8-mixed-bf16)."""
    target = torch.device(device) if device else next(model.parameters()).device
    deployed = reparameterize(model).to(target)
    if int8 is not None:
        if target.type != "cpu":
            raise ConfigError(f"int8 quantization uses the x86 inductor quantizer and runs on the CPU, not "
                              f"{target}; deploy with bf16 there (optimize(..., bf16=True))")
        if calibration is None:
            raise ConfigError("int8 needs calibration batches (images normalised as the model expects)")
        from .quantize import quantize_int8
        deployed = quantize_int8(deployed, calibration, mode=int8, channels_last=channels_last, observer=int8_observer)
    elif channels_last:
        deployed = deployed.to(memory_format=torch.channels_last)
    # an uncompiled int8 graph only simulates int8 (fp32 q/dq arithmetic): int8 is always compiled
    return deploy_module(deployed, channels_last, bf16, compile or int8 is not None, compile_mode)


def deploy_module(model: nn.Module, channels_last: bool = True, bf16: bool = False, compile: bool = True,
                  compile_mode: str = "default") -> nn.Module:
    """``model`` (already re-parameterised or quantized) wrapped as :class:`DeployedModel` in eval mode and, with
    ``compile``, compiled by inductor with weight freezing (static shapes)."""
    wrapped: nn.Module = DeployedModel(model, channels_last=channels_last, bf16=bf16).eval()
    if compile:
        _enable_freezing()
        wrapped = torch.compile(wrapped, mode=compile_mode, dynamic=False)
    return wrapped
