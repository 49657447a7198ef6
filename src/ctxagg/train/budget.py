"""Learning which dynamic paths a model keeps under a compute budget (`ctxagg train --dynamic-budget`).

Container-Light switches the dynamic affinity off in stages 1-3 by hand; the paper leaves learning it to future work
(container.txt §5, "Limitations"). Here every mixture block of a model built with switches (``container_auto``)
carries a hard concrete gate z on its dynamic path (:class:`~ctxagg.affinity.mixture.HardConcreteSwitch`) and the
training loss pays for what the kept paths cost at the training resolution:

- cost of a path = its MACs per image at the run's ``--img-size`` (:meth:`AggregationBlock.dynamic_macs`: building
  and applying A_dyn plus the Q, K rows of ``proj_in``), so the penalty is cost-aware: an early high-resolution
  block weighs more than a late one;
- expected model MACs = static MACs + Σ_b P(z_b ≠ 0)·cost_b (Louizos et al. 2018, Eq. 12, the expected L0 norm
  weighted by cost);
- ``--dynamic-budget B`` GMACs: loss += λ·max(0, E[MACs] − target)/C_dyn, with the target lowered linearly from the
  full model to B over the first half of the search phase and then held (the ramped target of Wang, Wohlwend & Lei
  2020, "Structured Pruning of Large Language Models"); without a budget, loss += λ·E[MACs_dyn]/C_dyn (C_dyn: the
  cost of every dynamic path, so λ is the loss the whole dynamic compute is worth);
- at ``--dynamic-search`` of the run the switches are fixed: on where their evaluation value is > 0, then, with a
  budget, the least likely on-paths are switched off until the pattern fits (so measured MACs ≤ B) and those that
  still fit are switched back on, most likely first; the rest of the run trains the weights of that fixed
  architecture.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from timm.optim import param_groups_weight_decay
from timm.utils.model import reparameterize_model
from torch import Tensor, nn

from ..bench.complexity import count_gmacs
from ..blocks import AggregationBlock
from ..errors import ConfigError
from .checkpoint import atomic_write

__all__ = ["DynamicBudget", "SwitchedPath", "switched_paths", "PATTERN_FILE"]

PATTERN_FILE = "dynamic_pattern.json"
DEFAULT_BUDGET_LAMBDA = 1.0  # the hinge acts only above the target: the weight sets how hard it pushes there


@dataclass
class SwitchedPath:
    """One block's switchable dynamic path, with its token count and cost at the training resolution."""
    name: str
    block: AggregationBlock
    tokens: int
    macs: int


def switched_paths(model: nn.Module, img_size: int) -> tuple[list[SwitchedPath], int]:
    """Every block with a learned switch, its tokens and dynamic-path MACs at ``img_size``², and the MACs of the
    whole model with every path computed (one counted forward pass, in eval mode: no random draws, no BN update)."""
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, AggregationBlock) and m.switch is not None]
    tokens: dict[str, int] = {}
    hooks = [block.register_forward_pre_hook(
        lambda _, args, name=name: tokens.__setitem__(name, args[0].shape[-2] * args[0].shape[-1]))
        for name, block in blocks]
    try:
        full = round(count_gmacs(model, (3, img_size, img_size)) * 1e9)
    finally:
        for hook in hooks:
            hook.remove()
    return [SwitchedPath(n, b, tokens[n], b.dynamic_macs(tokens[n])) for n, b in blocks], full


class DynamicBudget:
    """The cost penalty, the target schedule and the fixing of a model's dynamic-path switches (module docstring).

    Args:
        model: the (unwrapped) model; it must have switched mixture blocks.
        img_size: the training resolution the costs are counted at.
        budget_gmacs: GMACs per image of the whole model the learned pattern must fit, or None (λ alone prices it).
        lam: loss weight per unit of the full dynamic cost (None: 1 with a budget, 0 without).
        search: fraction of the run after which the switches are fixed, in (0, 1).
    """

    def __init__(self, model: nn.Module, img_size: int, budget_gmacs: Optional[float] = None,
                 lam: Optional[float] = None, search: float = 0.5):
        self.paths, self.full_macs = switched_paths(model, img_size)
        if not self.paths:
            raise ConfigError(f"{getattr(model, 'model_name', type(model).__name__)} has no switchable dynamic paths; "
                              "--dynamic-budget/--dynamic-lambda need a model built with switches (container_auto, "
                              "or --model-kwargs '{\"switch\": true}' on a Container model with mix(...) mixers)")
        self.img_size, self.search = img_size, search
        self.dynamic_macs = sum(p.macs for p in self.paths)
        self.static_macs = self.full_macs - self.dynamic_macs
        self.budget = None if budget_gmacs is None else round(budget_gmacs * 1e9)
        self.lam = lam if lam is not None else (DEFAULT_BUDGET_LAMBDA if budget_gmacs is not None else 0.0)
        if self.budget is not None and self.budget < self.static_macs:
            raise ConfigError(f"--dynamic-budget {budget_gmacs} GMACs is below what the model costs with every "
                              f"dynamic path off at {img_size}²: {self.static_macs / 1e9:.4g} GMACs (all on: "
                              f"{self.full_macs / 1e9:.4g}); give a budget between the two")

    @classmethod
    def for_run(cls, model: nn.Module, cfg: Any) -> Optional["DynamicBudget"]:
        """The run's budget (a ``TrainConfig``), or None for a model without switches and no budget flags."""
        asked = cfg.dynamic_budget is not None or cfg.dynamic_lambda is not None
        if not asked and not any(isinstance(m, AggregationBlock) and m.switch is not None for m in model.modules()):
            return None
        return cls(model, cfg.img_size, cfg.dynamic_budget, cfg.dynamic_lambda, cfg.dynamic_search)

    def param_groups(self, weight_decay: float, lr: float) -> Callable[[nn.Module], list[dict]]:
        """timm ``param_group_fn``: the usual weight-decay groups (the model's ``no_weight_decay`` respected) without
        the switch logits, plus one group for them at learning rate ``lr`` and no weight decay (they must move a few
        units within the search; at the weights' learning rate that takes tens of thousands of steps)."""
        switches = [q for p in self.paths for q in p.block.switch.parameters()]
        ids = {id(q) for q in switches}

        def groups(model: nn.Module) -> list[dict]:
            skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
            out = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)
            for group in out:
                group["params"] = [q for q in group["params"] if id(q) not in ids]
            return [g for g in out if g["params"]] + [dict(params=switches, lr=lr, weight_decay=0.0)]
        return groups

    # --- costs -------------------------------------------------------------------------------------------------
    def target(self, progress: float) -> float:
        """The MACs the penalty allows at ``progress`` ∈ [0, 1] of the run (linear ramp over half the search)."""
        if self.budget is None:
            return float(self.full_macs)
        ramp = min(1.0, progress / (self.search / 2))
        return self.full_macs - (self.full_macs - min(self.budget, self.full_macs)) * ramp

    def expected_macs(self) -> Tensor:
        """E[MACs per image] = static + Σ P(z ≠ 0)·cost, differentiable in the switch logits."""
        probs = torch.cat([p.block.switch.prob_on() for p in self.paths])
        costs = torch.tensor([float(p.macs) for p in self.paths], device=probs.device)
        return self.static_macs + (probs * costs).sum()

    def pattern_macs(self, on: list[bool]) -> int:
        """MACs per image of the model with exactly the paths ``on`` (in :attr:`paths` order) kept."""
        return self.static_macs + sum(p.macs for p, keep in zip(self.paths, on) if keep)

    def current_pattern(self) -> list[bool]:
        return [p.block.affinity.dynamic_on() for p in self.paths]

    def loss(self, progress: float) -> Optional[Tensor]:
        """The cost penalty at ``progress`` (None once the switches are fixed or λ = 0)."""
        if self.lam == 0 or self.fixed:
            return None
        excess = self.expected_macs() - (self.target(progress) if self.budget is not None else self.static_macs)
        return self.lam * excess.clamp(min=0) / self.dynamic_macs

    # --- fixing the pattern ------------------------------------------------------------------------------------
    @property
    def fixed(self) -> bool:
        return all(p.block.switch.fixed for p in self.paths)

    def before_step(self, progress: float) -> None:
        """Fix the switches once ``progress`` reaches the end of the search phase (once; kept in the checkpoint)."""
        if progress >= self.search and not self.fixed:
            self.fix()

    @torch.no_grad()
    def fix(self) -> list[bool]:
        """Fix every switch: on where its evaluation value is > 0; with a budget, switch off the on-paths least
        likely to be on (the most expensive first among equals) until the pattern fits, then switch back on, most
        likely first, those of them that still fit (so no path is dropped that the budget has room for). Returns
        the pattern."""
        on = self.current_pattern()
        if self.budget is not None:
            probs = [p.block.switch.prob_on().item() for p in self.paths]
            dropped = []
            for i in sorted((i for i, keep in enumerate(on) if keep), key=lambda i: (probs[i], -self.paths[i].macs)):
                if self.pattern_macs(on) <= self.budget:
                    break
                on[i] = False
                dropped.append(i)
            for i in reversed(dropped):
                on[i] = self.pattern_macs(on) + self.paths[i].macs <= self.budget
        for path, keep in zip(self.paths, on):
            path.block.switch.fix(keep)
        return on

    # --- reporting ---------------------------------------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        """Per-epoch numbers for metrics.csv: the evaluation pattern's GMACs, the expected GMACs, the paths on and
        whether they are fixed (then only such epochs compete for ``model_best``)."""
        on = self.current_pattern()
        with torch.no_grad():
            expected = float(self.expected_macs())
        return dict(gmacs=self.pattern_macs(on) / 1e9, expected_gmacs=expected / 1e9, dynamic_on=sum(on),
                    dynamic_fixed=self.fixed)

    def report(self, model: nn.Module) -> dict[str, Any]:
        """The learned pattern (per block: on, P(on), tokens, cost), its MACs counted on the deployed model (switches
        settled, switched-off paths removed), and the fixed architecture's ``mixers`` where the model has one."""
        was_training = model.training
        deployed = reparameterize_model(copy.deepcopy(model).eval(), inplace=True)
        measured = round(count_gmacs(deployed, (3, self.img_size, self.img_size)) * 1e9)
        model.train(was_training)
        blocks = [dict(name=p.name, on=p.block.affinity.dynamic_on(), fixed=p.block.switch.fixed,
                       prob_on=float(p.block.switch.prob_on().detach()), tokens=p.tokens, dynamic_gmacs=p.macs / 1e9)
                  for p in self.paths]
        out = dict(img_size=self.img_size, budget_gmacs=None if self.budget is None else self.budget / 1e9,
                   lam=self.lam, fixed=self.fixed, blocks=blocks, full_gmacs=self.full_macs / 1e9,
                   static_gmacs=self.static_macs / 1e9, pattern_gmacs=self.pattern_macs(self.current_pattern()) / 1e9,
                   deployed_gmacs=measured / 1e9, deployed_params=sum(q.numel() for q in deployed.parameters()))
        if hasattr(model, "dynamic_pattern"):
            out["pattern"] = ["".join("1" if on else "0" for on in stage) for stage in model.dynamic_pattern()]
        if hasattr(model, "learned_mixers"):
            out["mixers"] = _jsonable(model.learned_mixers())
        return out

    def finish(self, model: nn.Module, out: Path) -> dict[str, Any]:
        """Write ``dynamic_pattern.json`` to the run folder and print the pattern and how to rebuild it."""
        report = self.report(model)
        atomic_write(out / PATTERN_FILE, json.dumps(report, indent=2).encode())
        print(format_report(report), flush=True)
        return report


def _jsonable(mixers: Any) -> Any:
    return mixers if isinstance(mixers, str) else [_jsonable(m) for m in mixers]


def format_report(report: dict[str, Any]) -> str:
    """The printed end-of-run summary of a :meth:`DynamicBudget.report`."""
    budget = report["budget_gmacs"]
    state = "fixed" if report["fixed"] else "NOT fixed yet: the run stopped before --dynamic-search"
    lines = [f"dynamic paths ({state}; 1 = on, stages separated by |): {' | '.join(report.get('pattern', []))}",
             f"  {sum(b['on'] for b in report['blocks'])}/{len(report['blocks'])} on; deployed model "
             f"{report['deployed_gmacs']:.4g} GMACs at {report['img_size']}² (measured; all on "
             f"{report['full_gmacs']:.4g}, all off {report['static_gmacs']:.4g}"
             + (f", budget {budget:.4g}: {'within' if report['deployed_gmacs'] <= budget + 1e-9 else 'OVER'}"
                if budget is not None else "") + f"), {report['deployed_params']:,} parameters deployed"]
    if "mixers" in report:
        mixers = tuple(m if isinstance(m, str) else tuple(m) for m in report["mixers"])
        lines += [f"  fixed architecture: ContainerNet(mixers={mixers!r})",
                  f"  train it: --model container --model-kwargs '{json.dumps(dict(mixers=report['mixers']))}'"]
    return "\n".join(lines)
