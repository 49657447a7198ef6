"""Activation counts as Radosavovic et al. define them ("Designing Network Design Spaces", 2020;
"Fast and Accurate Model Scaling", 2021): the number of elements in the outputs of the network's
convolution and linear layers — the cost measure that tracks GPU run time better than FLOPs.

Counting rule (the choices the definitions leave open, fixed by vit_as_dynamic_conv.txt Table 3):

- counted: every output of a convolution and of a matrix multiply — ``nn.Conv2d``/``nn.Linear`` and
  also the attention matmuls, i.e. the score matrix ``QKᵀ`` (B·heads·N·N) and ``A·V``, including inside
  a fused ``scaled_dot_product_attention`` (those are the "1×1 dynamic convolutions" of the paper, §3.2).
  Table 3 needs them: DeiT-S softmax 11.947M = 8.246M of linear/conv outputs + 12 × (6·197² + 197·384);
  DeiT-S scaling 9.448M is the same net computing ``Q(KᵀV)`` instead (outputs 6·64² + 197·384 a block).
- not counted: element-wise ops (normalisations, softmax, activations, residual adds, the q ⊙ k̄ of
  depth-wise attention, reductions such as means and pooling).
- not counted: the classification head (``model.get_classifier()``): with it DeiT-S/DeiT-B would read
  11.948M/23.896M, without it 11.947M/23.895M as the paper reports.

Counting happens at the ATen level (a ``TorchDispatchMode``), so it works for any model family:
``nn.Linear`` lowers to ``addmm``/``mm``, ``@`` to ``bmm``/``mm``, convolutions to ``convolution``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .complexity import SDPA_FLOP_FORMULAS, model_device

__all__ = ["count_activations", "ActivationCounter"]

_aten = torch.ops.aten
_MATMUL_OPS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
               _aten.convolution.default}
_SDPA_OPS = {packet.default for packet in SDPA_FLOP_FORMULAS}  # every fused SDPA kernel, whichever torch picks


class ActivationCounter(TorchDispatchMode):
    """Counts output elements of convolutions and matmuls (fused attention: scores + output) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.paused = False

    def __torch_dispatch__(self, func, types, args: Sequence[Any] = (), kwargs: Optional[dict] = None):
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        if func in _MATMUL_OPS:
            self.total += out.numel()
        elif func in _SDPA_OPS:
            q, k = args[0], args[1]  # (B, heads, N_q, d), (B, heads, N_k, d)
            self.total += q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] + out[0].numel()  # QKᵀ and A·V
        return out


def _classifier(model: nn.Module) -> Optional[nn.Module]:
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) else None


@torch.no_grad()
def count_activations(model: nn.Module, input_size: Sequence[int] = (3, 224, 224), include_head: bool = False) -> float:
    """Activations (millions) of one forward pass of one image, by the rule in this module's docstring.

    ``include_head=False`` (the default, as the paper's numbers require) skips the module returned by
    ``model.get_classifier()`` when the model has one. The input is made on the model's device, so a model
    built on ``meta`` (:func:`ctxagg.bench.complexity.meta_model`) is counted without allocating anything.
    """
    counter = ActivationCounter()
    handles = []
    head = None if include_head else _classifier(model)
    if head is not None:
        handles.append(head.register_forward_pre_hook(lambda *_: setattr(counter, "paused", True)))
        handles.append(head.register_forward_hook(lambda *_: setattr(counter, "paused", False)))
    was_training = model.training
    model.eval()
    try:
        with counter:
            model(torch.zeros(1, *input_size, device=model_device(model)))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return counter.total / 1e6
