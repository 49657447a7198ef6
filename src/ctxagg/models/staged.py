"""Shared timm plumbing for 4-stage NCHW backbones (``stem`` → ``stages`` → ``norm`` → pool → ``head``).

A family's constructor builds its stages the way timm's convnext.py does (stem before the loop; per stage a
downsampling layer, blocks with their drop-path rates, a ``feature_info`` entry) and ends with
:meth:`StagedBackbone.finish_init`: final norm, head, the one weight init and the input-check pre-hook.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from timm.layers import SelectAdaptivePool2d
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from torch import Tensor, nn

from ..checks import add_input_checks

__all__ = ["Stage", "StagedBackbone", "init_weights", "stage_info"]


def init_weights(module: nn.Module) -> None:
    """The one weight init of the staged families (the official Container release and PVT, which LinGlos
    follows): truncated-normal (std 0.02) linear layers with zero bias; PyTorch defaults for convs and norms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def stage_info(index: int, dim: int, reduction: int) -> dict:
    """timm ``feature_info`` entry of stage ``index``."""
    return dict(num_chs=dim, reduction=reduction, module=f"stages.{index}")


def _pool(pool_type: str) -> SelectAdaptivePool2d:
    """timm's global pool, flattened to (B, C); ``""`` passes the (B, C, H, W) map through unflattened, so
    ``reset_classifier(0, "")`` gives the unpooled features (as timm's models)."""
    return SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type))


class Stage(nn.Module):
    """One resolution stage: a downsampling layer followed by a sequence of blocks."""

    def __init__(self, downsample: nn.Module, blocks: Sequence[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class StagedBackbone(nn.Module):
    """Base class giving a staged backbone the timm model interface: ``forward_features``,
    ``forward_head(pre_logits=)``, ``reset_classifier``, ``forward_intermediates``,
    ``prune_intermediate_layers``, ``set_grad_checkpointing``, ``group_matcher``, ``feature_info``.

    Subclasses set ``model_name``, ``stem``, ``stages`` (nn.Sequential of :class:`Stage`), ``feature_info``
    and ``fixed_img_size`` (models with fixed-size affinities), then call :meth:`finish_init`.
    Inputs are checked by :func:`ctxagg.checks.add_input_checks`'s forward-pre-hook, as for every family.
    """

    fixed_img_size: Optional[tuple[int, int]] = None
    model_name: str = "model"

    def finish_init(self, norm: nn.Module, num_features: int, num_classes: int, global_pool: str,
                    drop_rate: float) -> None:
        """Final norm and classifier head, the weight init, and the input checks."""
        self.norm = norm
        self.init_head(num_features, num_classes, global_pool, drop_rate)
        self.apply(init_weights)
        add_input_checks(self)

    def init_head(self, num_features: int, num_classes: int, global_pool: str, drop_rate: float) -> None:
        self.num_features = self.head_hidden_size = num_features
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.global_pool = _pool(global_pool)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.downsample", (0,)),
            (r"^stages\.(\d+)\.blocks\.(\d+)", None),
            (r"^norm", (99999,)),
        ])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = _pool(global_pool)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, list[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """Stage outputs (strides 4/8/16/32) as timm's ``forward_intermediates``; ``norm`` applies the
        final norm to the last stage's output."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]
        last = len(self.stages) - 1
        intermediates = []
        x = self.stem(x)
        for idx, stage in enumerate(stages):
            x = stage(x)
            if idx in take_indices:
                intermediates.append(self.norm(x) if norm and idx == last else x)
        if intermediates_only:
            return intermediates
        if idx == last:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, list[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices
