"""`ctxagg compare`: several models (or one backbone with several mixers) trained on the same fixed-seed data
fractions over one or more seeds, tabulated as mean ± std.

The small-scale counterpart of Container Table 3 (accuracy vs fraction of training data), Figure 1 left
(accuracy vs epoch) and, with ``mixers``, Table 2 (one base network, the spatial mixer swapped) at a matched
parameter count."""
from __future__ import annotations

import json
import re
import statistics
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Optional, Sequence

import timm
import torch
from torch import nn

from ..errors import ConfigError
from ..runs import output_dir
from .checkpoint import atomic_write
from .config import TrainConfig, input_size_overrides
from .engine import train
from .plots import plt

__all__ = ["Variant", "compare", "mixer_variants", "kwarg_variants", "match_parameters", "backbone_params", "COMPARE_OUTPUTS"]

COMPARE_OUTPUTS = ("compare.md", "compare.json", "compare.png")


@dataclass(frozen=True)
class Variant:
    """One row of a comparison: a registered model and the arguments that make this row differ."""
    label: str
    model: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def folder(self) -> str:
        """The label as a folder name (``mix(sa,dw5)`` -> ``mix_sa_dw5``)."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.label).strip("_")


def mixer_variants(model: str, mixers: Sequence[str], stages: int = 4) -> list[Variant]:
    """One variant of ``model`` per mixer spec: the spec in every stage, or ``a/b/c/d`` for one spec per stage
    (Container Table 2 swaps the mixer of the whole base network)."""
    variants = []
    for spec in mixers:
        per_stage = spec.split("/")
        if len(per_stage) not in (1, stages):
            raise ConfigError(f"mixer {spec!r}: give one spec for every stage or {stages} separated by '/'")
        variants.append(Variant(spec, model, dict(mixers=tuple(per_stage * stages if len(per_stage) == 1
                                                                 else per_stage))))
    return variants


def kwarg_variants(model: str, key: str, values: Sequence[Any]) -> list[Variant]:
    """One variant of ``model`` per value of one constructor argument (``attn_norm`` over ViT-as-DynConv's
    normalisers, Figures 4 and 6); the label is ``key=value``."""
    return [Variant(f"{key}={value}", model, {key: value}) for value in values]


def _meta_backbone(model: str, img_size: int, kwargs: dict[str, Any]) -> nn.Module:
    """The model without its classifier, built on the meta device (shapes only, nothing allocated)."""
    with torch.device("meta"):
        return timm.create_model(model, num_classes=0, **{**input_size_overrides(model, img_size), **kwargs})


def backbone_params(model: str, img_size: int, **kwargs: Any) -> int:
    """Parameters without the classifier (the part the mixer changes), counted on the meta device."""
    return sum(p.numel() for p in _meta_backbone(model, img_size, kwargs).parameters())


def _stage_mlp_ratios(model: str, img_size: int, kwargs: dict[str, Any]) -> list[float]:
    """The channel-MLP ratio of each stage, read off the built model (hidden width / width of its first block)."""
    net = _meta_backbone(model, img_size, kwargs)
    stages = getattr(net, "stages", None)
    if stages is None or not all(hasattr(s.blocks[0], "mlp") for s in stages):
        raise ConfigError(f"--match-params scales the channel MLPs of staged models (stages[i].blocks[j].mlp); "
                          f"{model} has none")
    return [s.blocks[0].mlp.fc1.out_channels / s.blocks[0].mlp.fc1.in_channels for s in stages]


def _scaled_params(v: Variant, ratios: Sequence[float], img_size: int, scale: float) -> int:
    return backbone_params(v.model, img_size, **{**v.kwargs, "mlp_ratios": [r * scale for r in ratios]})


def match_parameters(variants: Sequence[Variant], img_size: int, tolerance: float = 0.05) -> list[Variant]:
    """Give every variant the first one's backbone parameter count (within ``tolerance``) by scaling its
    channel-MLP widths (``mlp_ratios``) by one common factor, found by bisection; the mixers, widths, depths and
    heads stay as they are (a choice: the comparison is about the mixer, so only the part every block shares moves).
    Raises ConfigError, naming the variant, when no factor in [1/16, 16] reaches the target."""
    target = backbone_params(variants[0].model, img_size, **variants[0].kwargs)
    matched = [variants[0]]
    for v in variants[1:]:
        ratios = _stage_mlp_ratios(v.model, img_size, v.kwargs)
        params = partial(_scaled_params, v, ratios, img_size)
        lo, hi = 1 / 16, 16.0
        if not params(lo) <= target <= params(hi):
            raise ConfigError(f"{v.label}: no channel-MLP width brings its {params(1.0):,} backbone parameters "
                              f"to the reference's {target:,} (tried ×1/16 to ×16)")
        for _ in range(40):
            mid = (lo * hi) ** 0.5
            lo, hi = (mid, hi) if params(mid) < target else (lo, mid)
        scale = min((lo, hi), key=lambda s: abs(params(s) - target))
        if abs(params(scale) - target) > tolerance * target:
            raise ConfigError(f"{v.label}: the closest match has {params(scale):,} parameters, "
                              f"more than {tolerance:.0%} from {target:,}")
        matched.append(replace(v, kwargs={**v.kwargs, "mlp_ratios": tuple(round(r * scale, 4) for r in ratios)}))
    return matched


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _run(v: Variant, base: TrainConfig, fraction: float, seed: int, out: Path, progress: bool,
         overwrite: bool, resume: bool = False) -> dict[str, Any]:
    folder = out / f"{v.folder}-f{fraction:g}-s{seed}"
    cfg = replace(base, model=v.model, fraction=fraction, seed=seed,
                  model_kwargs={**base.model_kwargs, **v.kwargs}, output=str(folder))
    t0 = time.perf_counter()
    started = resume and (folder / "last.safetensors").exists()  # an interrupted comparison continues exactly
    result = train(cfg, resume=str(folder) if started else None, progress=progress, overwrite=overwrite)
    run = dict(label=v.label, model=v.model, fraction=fraction, seed=seed, best_top1=result.best_top1,
               final_top1=result.history[-1]["val_top1"], seconds=time.perf_counter() - t0,
               curve=[h["val_top1"] for h in result.history])
    print(f"{v.label} @ {fraction:g}, seed {seed}: best val top-1 {run['best_top1']:.2f}% ({run['seconds']:.0f}s)",
          flush=True)
    return run


def compare(models: Sequence[str | Variant], base: TrainConfig, fractions: Sequence[float],
            output: Optional[str] = None, progress: bool = True, overwrite: bool = False,
            seeds: Optional[Sequence[int]] = None, cost_img_size: Optional[int] = None,
            jobs: int = 1, resume: bool = False) -> dict[str, Any]:
    """Train every variant on every fraction with every seed (the data subset and the initialisation follow the
    seed) and tabulate best val top-1 as mean ± std over seeds.

    ``models``: registered names or :class:`Variant` rows. ``seeds`` None: the base config's seed only.
    ``cost_img_size``: also measure each variant's parameters, GMACs, inference throughput and peak memory at
    that size (batch 8, fp32, eager). ``jobs`` > 1: that many runs at once in worker processes, each with its
    share of the CPU threads (results do not depend on it: every run is seeded on its own). ``resume``: runs
    already in ``output`` continue from their last epoch (finished ones are read back). ``output`` None: a new ``runs/compare-<YYYYmmdd-HHMMSS>``; an explicit
    folder holding results is refused unless ``overwrite``. Each run goes to ``<output>/<label>-f<F>-s<S>``."""
    variants = [m if isinstance(m, Variant) else Variant(m, m) for m in models]
    seeds = list(seeds) if seeds else [base.seed]
    out = output_dir(output, "compare", overwrite=overwrite or resume, outputs=COMPARE_OUTPUTS)  # resume: tables redone
    jobs_args = [(v, base, f, s, out, progress and jobs == 1, overwrite, resume) for v in variants
                 for f in fractions for s in seeds]
    runs = _run_all(jobs_args, jobs)
    params = {v.label: backbone_params(v.model, base.img_size, **{**base.model_kwargs, **v.kwargs})
              for v in variants}
    costs = {v.label: variant_cost(v, cost_img_size) for v in variants} if cost_img_size else {}
    table = format_compare(runs, variants, fractions, params, costs, cost_img_size)
    (out / "compare.md").write_text(table + "\n")
    atomic_write(out / "compare.json", json.dumps(dict(
        config=base.to_json(), seeds=seeds, variants=[dict(label=v.label, model=v.model, kwargs=v.kwargs)
                                                       for v in variants],
        backbone_params=params, cost=costs, cost_img_size=cost_img_size, runs=runs), indent=2).encode())
    plot_compare(runs, variants, fractions, costs, out / "compare.png")
    print(table)
    return dict(runs=runs, table=table, output=str(out), backbone_params=params, cost=costs)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _run_all(jobs_args: list[tuple], jobs: int) -> list[dict[str, Any]]:
    """Every run, in order; ``jobs`` > 1 spreads them over spawned worker processes."""
    if jobs <= 1:
        return [_run(*a) for a in jobs_args]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, torch.get_num_threads() // jobs)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        return list(pool.map(_run, *zip(*jobs_args)))


def variant_cost(v: Variant, img_size: int, batch_size: int = 8) -> dict[str, float]:
    """Parameters, GMACs/image, eager fp32 inference img/s and peak live-tensor memory at ``img_size``."""
    from ..bench.complexity import count_gmacs
    from ..bench.throughput import benchmark

    net = timm.create_model(v.model, **{**v.kwargs, "img_size": img_size}).eval()  # fixed-size mixers: rebuilt
    row = benchmark(net, batch_size=batch_size, img_size=img_size, repeats=3, warmup=1)
    return dict(params_m=row["params_m"], gmacs=count_gmacs(net, (3, img_size, img_size)),
                throughput=row["throughput"], peak_mb=row["peak_mb"])


def _stat(runs: Sequence[dict[str, Any]], key: str = "best_top1") -> str:
    mean, std = _mean_std([r[key] for r in runs])
    return f"{mean:.2f} ± {std:.2f}" if len(runs) > 1 else f"{mean:.2f}"


def format_compare(runs: Sequence[dict[str, Any]], variants: Sequence[Variant], fractions: Sequence[float],
                   params: dict[str, int], costs: dict[str, dict[str, float]], cost_img_size: Optional[int]) -> str:
    """Markdown: best val top-1 per fraction (mean ± std over seeds), per-epoch curve at the largest fraction,
    and, if measured, the cost of each variant at ``cost_img_size``."""
    group = {(v.label, f): [r for r in runs if r["label"] == v.label and r["fraction"] == f]
             for v in variants for f in fractions}
    n = len(group[(variants[0].label, fractions[0])])
    lines = [f"| model | backbone params (M) | " + " | ".join(f"{f:g} of train" for f in fractions)
             + " | wall time |", "|---|" + "---:|" * (len(fractions) + 2)]
    for v in variants:
        seconds = sum(r["seconds"] for f in fractions for r in group[(v.label, f)])
        lines.append(f"| {v.label} | {params[v.label] / 1e6:.3f} | "
                     + " | ".join(_stat(group[(v.label, f)]) for f in fractions) + f" | {seconds:.0f}s |")
    last = max(fractions)
    epochs = len(group[(variants[0].label, last)][0]["curve"])
    lines += ["", f"Val top-1 per epoch at {last:g} of train" + (f" (mean ± std over {n} seeds)" if n > 1 else ""),
              "", "| model | " + " | ".join(f"epoch {e + 1}" for e in range(epochs)) + " |",
              "|---|" + "---:|" * epochs]
    for v in variants:
        curves = [r["curve"] for r in group[(v.label, last)]]
        cells = [_stat([dict(best_top1=c[e]) for c in curves]) for e in range(epochs)]
        lines.append(f"| {v.label} | " + " | ".join(cells) + " |")
    if costs:
        lines += ["", f"Cost at {cost_img_size}² (batch 8, fp32, eager; {torch.get_num_threads()} threads)", "",
                  "| model | params (M) | GMACs | img/s | peak MB |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {label} | {c['params_m']:.2f} | {c['gmacs']:.2f} | {c['throughput']:.1f} | {c['peak_mb']:.0f} |"
                  for label, c in costs.items()]
    return "\n".join(lines)


def plot_compare(runs: Sequence[dict[str, Any]], variants: Sequence[Variant], fractions: Sequence[float],
                 costs: dict[str, dict[str, float]], path: Path) -> None:
    """Data efficiency (mean, error bar = std), convergence at the largest fraction (band = std) and, when
    measured, final accuracy against GMACs."""
    fig, axes = plt.subplots(1, 3 if costs else 2, figsize=(16 if costs else 11, 4.5))
    last = max(fractions)
    for v in variants:
        stats = [_mean_std([r["best_top1"] for r in runs if r["label"] == v.label and r["fraction"] == f])
                 for f in fractions]
        if len(fractions) > 1:
            axes[0].errorbar(fractions, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3,
                             label=v.label)
        else:  # one fraction: one bar per variant
            axes[0].barh([v.label], [stats[0][0]], xerr=[stats[0][1]], capsize=3)
        curves = torch.tensor([r["curve"] for r in runs if r["label"] == v.label and r["fraction"] == last])
        mean, std = curves.mean(0), (curves.std(0) if len(curves) > 1 else torch.zeros(curves.shape[1]))
        epochs = range(1, curves.shape[1] + 1)
        axes[1].plot(epochs, mean, marker=".", label=v.label)
        axes[1].fill_between(epochs, mean - std, mean + std, alpha=0.15)
        if costs:
            axes[2].errorbar([costs[v.label]["gmacs"]], [stats[-1][0]], yerr=[stats[-1][1]], marker="o",
                             capsize=3, label=v.label)
            axes[2].annotate(v.label, (costs[v.label]["gmacs"], stats[-1][0]), fontsize=7, xytext=(4, 4),
                             textcoords="offset points")
    if len(fractions) > 1:
        axes[0].set(xlabel="fraction of training data", ylabel="best val top-1 (%)", title="data efficiency")
    else:
        axes[0].set(xlabel="best val top-1 (%)", title=f"fraction {fractions[0]:g} of train")
        axes[0].invert_yaxis()
    axes[1].set(xlabel="epoch", ylabel="val top-1 (%)", title=f"convergence (fraction {last:g})")
    if costs:
        axes[2].set(xlabel="GMACs / image at the cost size", ylabel="best val top-1 (%)", title="accuracy vs cost")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
