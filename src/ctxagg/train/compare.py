"""`ctxagg compare`: fixed-seed data-fraction and convergence comparison of several models.

The small-scale counterpart of Container Table 3 (accuracy vs fraction of training data) and
Figure 1 left (accuracy vs epoch)."""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

from ..runs import output_dir
from .checkpoint import atomic_write
from .config import TrainConfig
from .engine import train
from .plots import plt

__all__ = ["compare", "COMPARE_OUTPUTS"]

COMPARE_OUTPUTS = ("compare.md", "compare.json", "compare.png")


def compare(models: Sequence[str], base: TrainConfig, fractions: Sequence[float], output: Optional[str] = None,
            progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Train every model on every fraction (same seed, same subset) and tabulate the best val top-1.

    ``output`` None: a new folder ``runs/compare-<YYYYmmdd-HHMMSS>``; an explicit folder holding results is refused
    unless ``overwrite``. Each training run goes to ``<output>/<model>-f<fraction>``."""
    out = output_dir(output, "compare", overwrite=overwrite, outputs=COMPARE_OUTPUTS)
    runs: list[dict[str, Any]] = []
    for model in models:
        for fraction in fractions:
            cfg = replace(base, model=model, fraction=fraction, output=str(out / f"{model}-f{fraction:g}"))
            t0 = time.perf_counter()
            result = train(cfg, progress=progress, overwrite=overwrite)
            runs.append(dict(model=model, fraction=fraction, best_top1=result.best_top1,
                             final_top1=result.history[-1]["val_top1"], seconds=time.perf_counter() - t0,
                             curve=[h["val_top1"] for h in result.history]))
            print(f"{model} @ {fraction:g}: best val top-1 {result.best_top1:.2f}% ({runs[-1]['seconds']:.0f}s)",
                  flush=True)
    table = _table(runs, models, fractions)
    (out / "compare.md").write_text(table + "\n")
    atomic_write(out / "compare.json", json.dumps(dict(config=base.to_json(), runs=runs), indent=2).encode())
    _plot(runs, models, fractions, out)
    print(table)
    return dict(runs=runs, table=table, output=str(out))


def _table(runs: list[dict[str, Any]], models: Sequence[str], fractions: Sequence[float]) -> str:
    by = {(r["model"], r["fraction"]): r for r in runs}
    head = "| model | " + " | ".join(f"{f:g} of train" for f in fractions) + " | wall time |"
    lines = [head, "|---|" + "---:|" * (len(fractions) + 1)]
    for m in models:
        cells = [f"{by[(m, f)]['best_top1']:.2f}" for f in fractions]
        seconds = sum(by[(m, f)]["seconds"] for f in fractions)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {seconds:.0f}s |")
    return "\n".join(lines)


def _plot(runs: list[dict[str, Any]], models: Sequence[str], fractions: Sequence[float], out: Path) -> None:
    by = {(r["model"], r["fraction"]): r for r in runs}
    fig, (ax_frac, ax_epoch) = plt.subplots(1, 2, figsize=(11, 4))
    for m in models:
        ax_frac.plot(fractions, [by[(m, f)]["best_top1"] for f in fractions], marker="o", label=m)
        curve = by[(m, max(fractions))]["curve"]
        ax_epoch.plot(range(1, len(curve) + 1), curve, marker=".", label=m)
    ax_frac.set(xlabel="fraction of training data", ylabel="best val top-1 (%)", title="data efficiency")
    ax_epoch.set(xlabel="epoch", ylabel="val top-1 (%)", title=f"convergence (fraction {max(fractions):g})")
    for ax in (ax_frac, ax_epoch):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=100)
    plt.close(fig)
