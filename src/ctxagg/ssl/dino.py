"""DINO: self-distillation with no labels (Caron et al., "Emerging Properties in Self-Supervised Vision
Transformers", ICCV 2021), the self-supervised framework of container.txt §4.5 / Table 6.

The pieces, each citing the paper:

- :class:`DINOHead` - the projection head (§3.1 "Network architecture", Appendix: 3-layer MLP, hidden 2048,
  GELU, bottleneck 256, L2 normalisation, weight-normalised last layer of K outputs);
- :class:`MultiCropWrapper` - backbone + head over a list of crops, one backbone pass per crop resolution;
- :class:`DINOLoss` - Eq. 1 (temperature softmax), Eq. 2-3 (cross-entropy of the teacher's distribution of each
  global view against the student's of every other view), Eq. 4 (the centre, an EMA of the teacher outputs);
- :func:`update_teacher` - the momentum teacher θt ← λθt + (1 − λ)θs (§3.1 "Teacher network");
- :func:`cosine_schedule`, :func:`teacher_temperature` - the schedules of the recipe (§3.1, Appendix / "Implementation
  details"): λ from 0.996 to 1 on a cosine, weight decay from 0.04 to 0.4 on a cosine, τt warmed up linearly;
- :func:`cancel_last_layer_gradients` - the last layer is frozen during the first epoch(s) (DINO's released recipe,
  ``freeze_last_layer``), which stabilises the start of training.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["DINOHead", "MultiCropWrapper", "DINOLoss", "update_teacher", "cosine_schedule", "teacher_temperature",
           "cancel_last_layer_gradients"]


class DINOHead(nn.Module):
    """DINO projection head g (Caron et al. 2021, §3.1 "Network architecture" and Appendix): a 3-layer MLP with
    hidden dimension ``hidden_dim`` (2048) and GELU, a bottleneck of ``bottleneck_dim`` (256), ℓ2 normalisation,
    then a weight-normalised linear layer without bias to ``out_dim`` (K = 65536) outputs.

    With ``norm_last_layer`` the weight-norm gain g is fixed to 1 (not trained), so every output row of the last
    layer is a unit vector, as in the released ViT recipes."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"DINOHead needs at least 1 MLP layer, got num_layers={num_layers}")
        if min(in_dim, out_dim, hidden_dim, bottleneck_dim) < 1:
            raise ValueError(f"DINOHead dimensions must be positive, got in {in_dim}, out {out_dim}, hidden "
                             f"{hidden_dim}, bottleneck {bottleneck_dim}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.mlp.apply(self._init_weights)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class MultiCropWrapper(nn.Module):
    """Backbone f and head g over a list of crops (Caron et al. 2021, §3.1 multi-crop): consecutive crops of the
    same resolution are concatenated and go through the backbone together (one pass per resolution), the pooled
    features of all crops through the head. The output is (sum of crop batches, K), crop-major.

    ``backbone`` is any timm model built with ``num_classes=0`` (its forward returns pooled pre-logits)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: Sequence[Tensor]) -> Tensor:
        if isinstance(crops, Tensor):
            crops = [crops]
        sizes = torch.tensor([c.shape[-1] for c in crops])
        ends = torch.cumsum(torch.unique_consecutive(sizes, return_counts=True)[1], 0).tolist()
        start, features = 0, []
        for end in ends:
            features.append(self.backbone(torch.cat(list(crops[start:end]))))
            start = end
        return self.head(torch.cat(features))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The backbone's no-decay names (position embeddings, tokens), prefixed, for timm's optimiser factory."""
        inner = getattr(self.backbone, "no_weight_decay", None)
        return {f"backbone.{n}" for n in (inner() if callable(inner) else ())}


class DINOLoss(nn.Module):
    """The DINO objective (Caron et al. 2021):

    - Eq. 1: P(x) = softmax(g(x) / τ); the student uses τs (0.1), the teacher τt after centring, with
      P_t(x) = softmax((g_t(x) − c) / τt) (§3.1 "Avoiding collapse": centring and sharpening);
    - Eq. 2-3: L = Σ_{x ∈ {x1g, x2g}} Σ_{x' ∈ V, x' ≠ x} H(P_t(x), P_s(x')), H(a, b) = −Σ a log b, averaged over the
      batch and over the number of (x, x') pairs (the released code's normalisation);
    - Eq. 4: c ← m c + (1 − m) (1/B) Σ_i g_t(x_i), the centre, an EMA (m = 0.9) of the teacher outputs of the
      global views, averaged over every process (:meth:`update_center`).

    ``forward`` takes student outputs for all ``n_crops`` crops (crop-major, (n_crops·B, K)) and teacher outputs
    for the 2 global crops ((2·B, K)); it does not update the centre."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        if student_temp <= 0:
            raise ValueError(f"student temperature must be positive, got {student_temp}")
        if not 0 <= center_momentum < 1:
            raise ValueError(f"centre momentum must be in [0, 1), got {center_momentum}")
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: Tensor, teacher_out: Tensor, teacher_temp: float, n_crops: int) -> Tensor:
        if student_out.shape[0] % n_crops or teacher_out.shape[0] * n_crops != 2 * student_out.shape[0]:
            raise ValueError(f"DINOLoss expects student outputs for {n_crops} crops and teacher outputs for the 2 "
                             f"global crops of the same batch, got {tuple(student_out.shape)} and "
                             f"{tuple(teacher_out.shape)}")
        student = F.log_softmax(student_out.float() / self.student_temp, dim=-1).chunk(n_crops)
        teacher = F.softmax((teacher_out.float() - self.center) / teacher_temp, dim=-1).detach().chunk(2)
        total, pairs = student_out.new_zeros(()).float(), 0
        for iq, q in enumerate(teacher):
            for v, log_p in enumerate(student):
                if v == iq:  # never compare a view with itself
                    continue
                total = total + torch.sum(-q * log_p, dim=-1).mean()
                pairs += 1
        return total / pairs

    @torch.no_grad()
    def update_center(self, teacher_out: Tensor) -> None:
        """Eq. 4 over the global batch (all-reduced under torch.distributed)."""
        batch_sum = teacher_out.float().sum(dim=0, keepdim=True)
        count = torch.tensor(float(teacher_out.shape[0]), device=teacher_out.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            dist.all_reduce(count)
        self.center.mul_(self.center_momentum).add_(batch_sum / count, alpha=1 - self.center_momentum)


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """θt ← λ θt + (1 − λ) θs (Caron et al. 2021, §3.1 "Teacher network"), parameter by parameter. Buffers are
    left alone: the teacher runs in train mode, so its BatchNorm statistics come from its own forward passes (as
    in the released code)."""
    if not 0 <= momentum <= 1:
        raise ValueError(f"teacher momentum must be in [0, 1], got {momentum}")
    s_params, t_params = list(student.parameters()), list(teacher.parameters())
    if len(s_params) != len(t_params):
        raise ValueError(f"student has {len(s_params)} parameters but teacher {len(t_params)}: not the same model")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, [p.detach() for p in s_params], alpha=1 - momentum)


def cosine_schedule(base: float, final: float, epochs: int, steps_per_epoch: int, warmup_epochs: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """One value per step: a linear warm-up from ``warmup_start`` to ``base`` over ``warmup_epochs``, then a half
    cosine from ``base`` to ``final`` (DINO's recipe for the learning rate, the weight decay 0.04→0.4 and the
    teacher momentum λ: 0.996→1, Caron et al. 2021 §3.1 and Appendix)."""
    if epochs < 1 or steps_per_epoch < 1:
        raise ValueError(f"a schedule needs at least one epoch and one step, got {epochs} x {steps_per_epoch}")
    warm = min(warmup_epochs, epochs) * steps_per_epoch
    ramp = np.linspace(warmup_start, base, warm, endpoint=False) if warm else np.array([])
    rest = epochs * steps_per_epoch - warm
    cos = final + 0.5 * (base - final) * (1 + np.cos(math.pi * np.arange(rest) / rest))
    return np.concatenate([ramp, cos])


def teacher_temperature(epoch: int, warmup_temp: float, final_temp: float, warmup_epochs: int) -> float:
    """τt at ``epoch``: linear from ``warmup_temp`` (0.04) to ``final_temp`` (0.07) over ``warmup_epochs`` (30 of
    the paper's 100/300), then constant (Caron et al. 2021, Appendix "Implementation details")."""
    if warmup_epochs <= 0 or epoch >= warmup_epochs:
        return final_temp
    return warmup_temp + (final_temp - warmup_temp) * epoch / warmup_epochs


def cancel_last_layer_gradients(model: nn.Module, epoch: int, freeze_epochs: int) -> None:
    """Drop the gradients of the head's last layer while ``epoch < freeze_epochs`` (DINO's ``freeze_last_layer``:
    the weight-normalised output layer is kept fixed during the first epoch)."""
    if epoch >= freeze_epochs:
        return
    for name, param in model.named_parameters():
        if "last_layer" in name:
            param.grad = None
