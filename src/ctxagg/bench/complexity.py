"""Model size and cost as the papers report them: parameters and multiply-accumulates.

MACs are counted with ``torch.utils.flop_counter`` plus the attention formulas it lacks, so the count does
not depend on which scaled-dot-product-attention kernel torch dispatches to (on CPU, torch ≥ 2.5 runs
``_scaled_dot_product_flash_attention_for_cpu``, which the stock counter charges 0). Counting runs on the
``meta`` device when the model lives there: shapes only, no memory, no arithmetic.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_params", "count_gmacs", "attention_flops", "SDPA_FLOP_FORMULAS", "meta_model", "model_device"]

_aten = torch.ops.aten


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BatchNorm statistics excluded, as in the papers)."""
    return sum(p.numel() for p in model.parameters())


def attention_flops(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int],
                    *_: Any, out_shape: Any = None, **__: Any) -> int:
    """FLOPs (2 per MAC) of ``softmax(Q·Kᵀ)·V`` for query (…, N_q, d), key (…, N_k, d), value (…, N_k, d_v):
    the score matrix costs N_q·N_k·d MACs per leading index, the aggregation N_q·N_k·d_v. The leading
    dimensions are the query's (batch, heads), so grouped-query attention counts every query head."""
    *leading, n_q, d = query_shape
    return 2 * math.prod(leading) * n_q * key_shape[-2] * (d + value_shape[-1])


# every fused SDPA kernel (forward), all with (query, key, value, ...) first; the math backend needs no entry:
# it decomposes into the bmm calls the counter already charges, which is what these formulas reproduce
SDPA_FLOP_FORMULAS: dict[Any, Callable[..., int]] = {
    getattr(_aten, name): attention_flops for name in (
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_fused_attention_overrideable",
    ) if hasattr(_aten, name)
}


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return torch.device("cpu") if tensor is None else tensor.device


@torch.no_grad()
def count_gmacs(model: nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> float:
    """Giga multiply-accumulates of one forward pass for one image (the papers' "FLOPs" are MACs, as fvcore
    counts them; ``torch.utils.flop_counter`` counts 2 FLOPs per MAC). Matrix multiplies, convolutions and
    attention (every SDPA backend, see :data:`SDPA_FLOP_FORMULAS`) are counted; element-wise ops and
    normalisations are not. The input is made on the model's device: build the model under
    ``torch.device("meta")`` (:func:`meta_model`) to count without allocating or computing anything."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, custom_mapping=SDPA_FLOP_FORMULAS)
    try:
        with counter:
            model(torch.zeros(1, *input_size, device=model_device(model)))
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2e9


def meta_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, **kwargs)`` on the ``meta`` device, in eval mode: parameter shapes without
    storage, for counting parameters, MACs and activations of full-size models in well under a second."""
    with torch.device("meta"):
        return timm.create_model(name, **kwargs).eval()
