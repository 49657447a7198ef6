"""The unary/binary analyses of LESA (lesa.txt §3.1 Table 1, §4.1 Table 2's weight columns).

- :func:`unary_ablation`: for a self-attention model, the softmax weight of the diagonal (the unary term
  S_ii of Eq. 2) per layer, and the model's predictions with that term removed (Table 1).
- :func:`fusion_weight_shares`: for a LESA model, the mean unary and binary weights 1/(1+ω), ω/(1+ω)
  of the dynamic fusion (Eq. 7) per layer (Table 2).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn

from ..affinity.lesa import LocallyEnhancedSelfAttention, RelativeSelfAttention2d

__all__ = ["UnaryAblation", "attention_layers", "unary_removed", "diagonal_shares", "unary_ablation",
           "fusion_weight_shares", "mean_share"]


def attention_layers(model: nn.Module) -> dict[str, RelativeSelfAttention2d]:
    """Every LESA/SA binary-term attention of a model, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, RelativeSelfAttention2d)}


@contextmanager
def unary_removed(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every attention drops its diagonal term S_ii·v_i (lesa.txt Eq. 2, Table 1)."""
    layers = attention_layers(model).values()
    previous = [layer.drop_diagonal for layer in layers]
    try:
        for layer in layers:
            layer.drop_diagonal = True
        yield model
    finally:
        for layer, state in zip(layers, previous):
            layer.drop_diagonal = state


@torch.no_grad()
def diagonal_shares(model: nn.Module, images: Tensor) -> tuple[Tensor, dict[str, float]]:
    """Model output on ``images`` and, per attention layer, the mean softmax weight of the diagonal
    (averaged over images, heads and query positions; the binary share is one minus it). Call it in eval
    mode: the hook re-forms each attention matrix, which in training would update the logit BN twice."""
    shares: dict[str, float] = {}

    def record(name: str):
        def hook(module: RelativeSelfAttention2d, args: tuple, kwargs: dict, _output: Tensor) -> None:
            inputs = {**dict(zip(("v", "q", "k"), args)), **kwargs}
            a = module.matrix(inputs["v"].shape, inputs["q"], inputs["k"])
            shares[name] = a.diagonal(dim1=-2, dim2=-1).mean().item()
        return hook

    handles = [m.register_forward_hook(record(n), with_kwargs=True) for n, m in attention_layers(model).items()]
    try:
        output = model(images)
    finally:
        for handle in handles:
            handle.remove()
    return output, shares


def mean_share(shares: dict[str, Any]) -> Any:
    """Average over layers, as the paper reports its weight percentages: a float for
    :func:`diagonal_shares`, a (unary, binary) pair for :func:`fusion_weight_shares`."""
    values = list(shares.values())
    if not values:
        raise ValueError("no layers to average")
    if isinstance(values[0], tuple):
        return tuple(sum(v[i] for v in values) / len(values) for i in range(len(values[0])))
    return sum(values) / len(values)


@dataclass
class UnaryAblation:
    """Result of :func:`unary_ablation` (lesa.txt Table 1)."""
    diagonal_share: dict[str, float]  # per layer: mean S_ii
    logits: Tensor                    # full model
    ablated_logits: Tensor            # unary (diagonal) term removed in every attention layer
    top1: Optional[float] = None      # accuracies, when targets were given
    top1_ablated: Optional[float] = None

    @property
    def mean_diagonal_share(self) -> float:
        return mean_share(self.diagonal_share)


@torch.no_grad()
def unary_ablation(model: nn.Module, images: Tensor, targets: Optional[Tensor] = None) -> UnaryAblation:
    """Evaluate a self-attention model with and without its unary term (lesa.txt §3.1, Table 1).

    The model is put in eval mode (and restored). The diagonal weight is measured on the full model;
    removal zeroes S_ii without renormalising the remaining weights (Eq. 2 splits the sum, it does not
    renormalise it; paper-silent otherwise).
    """
    if not attention_layers(model):
        raise ValueError("the model has no RelativeSelfAttention2d layer to ablate")
    was_training = model.training
    model.eval()
    try:
        logits, shares = diagonal_shares(model, images)
        with unary_removed(model):
            ablated = model(images)
    finally:
        model.train(was_training)
    result = UnaryAblation(shares, logits, ablated)
    if targets is not None:
        result.top1 = (logits.argmax(-1) == targets).float().mean().item()
        result.top1_ablated = (ablated.argmax(-1) == targets).float().mean().item()
    return result


@torch.no_grad()
def fusion_weight_shares(model: nn.Module, images: Tensor) -> dict[str, tuple[float, float]]:
    """Per LESA layer, the mean unary and binary weights (1/(1+ω), ω/(1+ω)) over images, positions and
    channels on ``images`` (lesa.txt §4.1, Table 2), in eval mode. Average the values over layers with
    :func:`mean_share` for the paper's single numbers."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LocallyEnhancedSelfAttention) and m.fusion is not None}
    if not layers:
        raise ValueError("the model has no LESA layer with dynamic fusion")
    was_training = model.training
    model.eval()
    try:
        model(images)
    finally:
        model.train(was_training)
    shares = {}
    for name, layer in layers.items():
        omega = layer.last_omega.double()
        shares[name] = ((1 / (1 + omega)).mean().item(), (omega / (1 + omega)).mean().item())
    return shares
