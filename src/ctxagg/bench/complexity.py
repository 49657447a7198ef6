"""Model size and cost as the papers report them: parameters and multiply-accumulates."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_params", "count_gmacs"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BatchNorm statistics excluded, as in the papers)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_gmacs(model: nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> float:
    """Giga multiply-accumulates of one forward pass for one image, measured with
    ``torch.utils.flop_counter`` (which counts 2 FLOPs per MAC; the papers' "FLOPs" are MACs, as fvcore
    counts them). Matrix multiplies, convolutions and fused attention are counted; element-wise ops are not."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            model(torch.zeros(1, *input_size))
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2e9
