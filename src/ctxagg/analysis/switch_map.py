"""Which dynamic paths trained models keep: the on/off map of runs side by side, with accuracy, MACs and speed.

For `ctxagg train` runs of Container models — a learned pattern (``container_auto`` under ``--dynamic-budget``,
train/budget.py) or a hand-made one (``container_light``: stages 1-3 off; ``container``: all on) — each run gives
one row: its per-block pattern, the validation top-1 of its last and best epochs, the MACs and parameters of its
deployed model (``timm.utils.reparameterize_model``: switched-off paths removed, BatchNorms folded) at the run's
image size and, optionally, that model's fp32 throughput on this machine. ``switch_map.png`` draws the patterns
(one row per run, one cell per block, stages separated); ``switch_report.md`` / ``.json`` hold the numbers and a
per-setting summary (mean ± standard deviation over seeds).
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any, Optional, Sequence

from torch import nn

__all__ = ["model_pattern", "pattern_string", "pattern_codes", "run_summary", "plot_switch_map", "switch_report"]


def model_pattern(model: nn.Module) -> Optional[list[list[bool]]]:
    """Per stage, per block: whether the block's dynamic path runs (``ContainerNet.dynamic_pattern``), or None."""
    pattern = getattr(model, "dynamic_pattern", None)
    return pattern() if callable(pattern) else None


def pattern_string(pattern: Sequence[Sequence[bool]]) -> str:
    """``[[F, F], [T]]`` -> ``"00|1"``."""
    return "|".join("".join("1" if on else "0" for on in stage) for stage in pattern)


def pattern_codes(model: nn.Module) -> Optional[str]:
    """The model's pattern as a string (``1`` dynamic path on, ``0`` static only, stages split by ``|``), or ``s`` for
    a learned switch whose state a ``meta``-device model cannot tell (a registered model: every switch starts on);
    None for models without a per-block pattern."""
    try:
        pattern = model_pattern(model)
    except (RuntimeError, NotImplementedError):  # meta tensors hold no values
        return "|".join("".join("s" if b.switch is not None else "1" if b.affinity.dynamic else "0" for b in s.blocks)
                        for s in model.stages)
    return None if pattern is None else pattern_string(pattern)


def _setting(cfg: Any) -> str:
    """What a run is, seeds aside: the model and, for a learned pattern, its budget or λ."""
    if cfg.dynamic_budget is not None:
        return f"{cfg.model} (budget {cfg.dynamic_budget:g} GMACs)"
    if cfg.dynamic_lambda is not None:
        return f"{cfg.model} (λ {cfg.dynamic_lambda:g})"
    return cfg.model


def run_summary(run: str, throughput: bool = False, batch_size: int = 64, repeats: int = 5) -> dict[str, Any]:
    """One run folder's row (module docstring): the model of its best epoch (``model_best.safetensors``; for a run
    with switches, the best epoch after they were fixed)."""
    import copy

    from timm.utils.model import reparameterize_model

    from ..bench.complexity import count_gmacs, count_params
    from ..train.model import load_trained_model

    model, cfg, meta, path = load_trained_model(run, purpose="map")
    with open(path.parent / "metrics.csv") as f:
        history = list(csv.DictReader(f))
    pattern = model_pattern(model)
    deployed = reparameterize_model(copy.deepcopy(model).eval(), inplace=True)
    row = dict(run=str(path.parent), model=cfg.model, setting=_setting(cfg), seed=cfg.seed, img_size=cfg.img_size,
               epochs=len(history), last_top1=float(history[-1]["val_top1"]), best_top1=float(meta["val_top1"]),
               pattern=pattern_string(pattern) if pattern is not None else None,
               dynamic_on=sum(map(sum, pattern)) if pattern is not None else None,
               gmacs=count_gmacs(deployed, (3, cfg.img_size, cfg.img_size)), params_m=count_params(deployed) / 1e6,
               budget_gmacs=cfg.dynamic_budget, throughput=None)
    if throughput:
        from ..bench.throughput import benchmark
        row["throughput"] = benchmark(deployed, batch_size, cfg.img_size, warmup=1, repeats=repeats,
                                      memory=False)["throughput"]
    return row


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_switch_map(rows: Sequence[dict[str, Any]], path: Path, title: str = "dynamic paths kept") -> None:
    """One row per entry (``label``, ``pattern`` as ``"000|0000|…"``), one cell per block: dark = dynamic path on,
    light = static only; white lines separate the stages."""
    import numpy as np

    plt = _plt()
    stages = [len(s) for s in rows[0]["pattern"].split("|")]
    grid = np.array([[c == "1" for c in r["pattern"].replace("|", "")] for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.32 * grid.shape[1] + 3.5), 0.38 * len(rows) + 1.2))
    ax.imshow(grid, cmap="Blues", vmin=-0.25, vmax=1.0, aspect="auto", interpolation="nearest")
    for edge in range(1, grid.shape[1]):  # thin lines between blocks, thick ones between stages
        ax.axvline(edge - 0.5, color="white", linewidth=3 if edge in set(np.cumsum(stages)) else 0.6)
    for edge in range(1, len(rows)):
        ax.axhline(edge - 0.5, color="white", linewidth=0.6)
    ax.set_yticks(range(len(rows)), [r["label"] for r in rows], fontsize=7)
    starts = np.concatenate([[0], np.cumsum(stages)[:-1]])
    ax.set_xticks([s + (n - 1) / 2 for s, n in zip(starts, stages)], [f"stage {i + 1}" for i in range(len(stages))],
                  fontsize=7)
    ax.set_title(f"{title}\ndark: α·A_dyn + β·A_static\nlight: static only (one cell per block)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "—"
    return f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")


def _tables(rows: list[dict[str, Any]]) -> str:
    speed = any(r["throughput"] is not None for r in rows)
    head = "| setting | runs | last top-1 | best top-1 | GMACs | params (M) | dynamic paths on |" + (
        " img/s |" if speed else "")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if speed else "")]
    for setting in dict.fromkeys(r["setting"] for r in rows):
        group = [r for r in rows if r["setting"] == setting]
        gmacs = sorted({round(r["gmacs"], 4) for r in group})  # a range where seeds learned different patterns
        span = "–".join(f"{g:.4f}" for g in dict.fromkeys((gmacs[0], gmacs[-1])))
        line = (f"| {setting} | {len(group)} | {_mean_sd([r['last_top1'] for r in group])} | "
                f"{_mean_sd([r['best_top1'] for r in group])} | {span}"
                f" | {_mean_sd([r['params_m'] for r in group])} | "
                f"{_mean_sd([r['dynamic_on'] for r in group if r['dynamic_on'] is not None])} |")
        lines.append(line + (f" {_mean_sd([r['throughput'] for r in group])} |" if speed else ""))
    lines += ["", "| run | seed | pattern (1 = dynamic on, stages apart) | last top-1 | GMACs | budget |",
              "|---|---:|---|---:|---:|---:|"]
    lines += [f"| {Path(r['run']).name} | {r['seed']} | {(r['pattern'] or '—').replace('|', ' ')} | "
              f"{r['last_top1']:.2f} | {r['gmacs']:.4f} | "
              f"{'—' if r['budget_gmacs'] is None else format(r['budget_gmacs'], 'g')} |" for r in rows]
    return "\n".join(lines)


def switch_report(runs: Sequence[str], out: str, throughput: bool = False, batch_size: int = 64
                  ) -> dict[str, Any]:
    """Rows of every run (:func:`run_summary`), ``switch_map.png``, ``switch_report.md`` and ``.json`` in ``out``."""
    rows = [run_summary(r, throughput, batch_size) for r in runs]
    rows = [r for r in rows if r["pattern"] is not None] + [r for r in rows if r["pattern"] is None]
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    drawn = [dict(r, label=f"{r['setting']} · seed {r['seed']}") for r in rows if r["pattern"] is not None]
    if drawn:
        plot_switch_map(drawn, folder / "switch_map.png",
                        title=f"dynamic paths kept at {drawn[0]['img_size']}²")
    table = _tables(rows)
    (folder / "switch_report.md").write_text(table + "\n")
    (folder / "switch_report.json").write_text(json.dumps(rows, indent=2))
    return dict(rows=rows, table=table, output=str(folder))
