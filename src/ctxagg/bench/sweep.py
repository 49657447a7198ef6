"""Memory and latency vs input size (`ctxagg bench --sweep resolution`).

Comparisons on one fixed architecture each, batch 16 by default:
- ``linglos``: LinGlos Figure 4 (§5.2) — LinGlo-b0 with key-only attention vs the same network with every
  key-only attention replaced by dot-product attention (both re-parameterised, i.e. deployed);
- ``container``: Container vs Container-Light (container.txt §3.5: Light switches the dynamic affinity off
  in the high-resolution stages, which is what lets it scale to detection inputs);
- ``patterns``: dense, window, neighbourhood, axial and key-only attention in the same Container base.

Each (model, size) gets two numbers that need no run, from one pass on the ``meta`` device (nothing is
computed or allocated): its GMACs and its peak tensor memory with attention *materialised* (softmax of a
stored N×N score matrix, as 2021-22 code and the papers' measurements did; on ``meta`` SDPA takes its math
path). Then, if the predicted time of ``warmup + repeats`` passes fits ``max_seconds`` per pass — predicted
from the model's measured time at the smallest size, scaled by GMACs — it is run for real: latency
(median, IQR) and measured peak memory, where PyTorch's fused attention never stores the scores (so a
dot-product model's measured memory grows linearly while its time stays quadratic). Sizes beyond the budget
keep their predictions and are marked ``skipped`` with the reason.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .throughput import PeakTensorBytes, benchmark, build_bench_model

__all__ = ["SWEEPS", "predict_cost", "sweep_models", "resolution_sweep", "format_sweep", "plot_sweep", "size_label"]

# family -> (source, [(label, model name, create kwargs)])
SWEEPS: dict[str, tuple[str, list[tuple[str, str, dict[str, Any]]]]] = {
    "linglos": ("LinGlos Fig. 4", [("linglo_b0 key-only", "linglo_b0", {}),
                                   ("linglo_b0 dot-product", "linglo_b0", {"attention": "dot"})]),
    "container": ("Container §3.5", [("container_light", "container_light", {}),
                                     ("container", "container", {})]),
    # where attention looks (design space part 1), everything else equal: the Container-Light base with one
    # mixer in all four stages
    "patterns": ("design space: sparsity patterns", [
        ("dense sa (container_hdeit_s)", "container_hdeit_s", {}),
        ("window7/shifted (container_swin)", "container_swin", {}),
        ("neighbourhood5", "container_light", {"mixers": ["neighbourhood5"] * 4}),
        ("axial (container_axial)", "container_axial", {}),
        ("key-only", "container_light", {"mixers": ["key_only"] * 4})]),
}


def _deployed(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """Eval-mode model with re-parameterisable branches folded (LinGlos' RP-CPE), as it is deployed."""
    torch.manual_seed(0)
    return timm.models.reparameterize_model(build_bench_model(name, **kwargs), inplace=True)


Size = Union[int, tuple[int, int]]


def _hw(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def size_label(size: Size) -> Union[int, str]:
    """A square size as its side, any other as ``"HxW"``."""
    h, w = _hw(size)
    return h if h == w else f"{h}x{w}"


@torch.no_grad()
def predict_cost(model: nn.Module, batch: int, size: Size) -> tuple[float, float]:
    """(GMACs, peak MB) of one forward pass, counted on a ``meta`` copy: exact for any size, nothing allocated.
    Attention goes through SDPA's math path there, so the memory is that of materialised N×N scores."""
    import copy

    meta = copy.deepcopy(model).to("meta")
    x = torch.empty(batch, 3, *_hw(size), device="meta")
    with FlopCounterMode(display=False) as flops, PeakTensorBytes() as memory:
        meta(x)
    return flops.get_total_flops() / 2e9, memory.peak / 2 ** 20


def sweep_models(members: Sequence[tuple[str, Callable[[], nn.Module]]], sizes: Sequence[Size], batch: int = 16,
                 warmup: int = 1, repeats: int = 3, max_seconds: float = 15.0, device: str = "cpu",
                 progress: Optional[Callable[[dict[str, Any]], None]] = None, **fields: Any) -> list[dict[str, Any]]:
    """One row per (model, size), sizes in increasing area, for models built by ``members`` ((label, builder)
    pairs): predicted GMACs and materialised peak MB; measured latency, throughput and peak MB where the time
    budget allows. ``fields`` are copied into every row (family, source).

    ``max_seconds`` bounds one pass: a size is run only if its predicted pass time fits, and then with as
    many of the ``repeats`` timed passes as fit in ``max_seconds`` (at least one). The prediction is the last
    measured size's ms per GMAC times this size's GMACs (``predicted_latency_ms``)."""
    rows = []
    for label, build in members:
        model = build()
        rate = None  # ms per GMAC at the largest size measured so far
        for size in sorted(sizes, key=lambda s: _hw(s)[0] * _hw(s)[1]):
            gmacs, predicted_mb = predict_cost(model, batch, size)
            predicted_ms = None if rate is None else rate * gmacs
            row = dict(fields, model=label, size=size_label(size), batch=batch, gmacs=gmacs,
                       materialised_peak_mb=predicted_mb, predicted_latency_ms=predicted_ms, status="measured")
            if predicted_ms is not None and predicted_ms > max_seconds * 1e3:
                row["status"] = f"skipped: predicted {predicted_ms / 1e3:.0f} s a pass > {max_seconds:g} s budget"
            else:
                reps = repeats if predicted_ms is None else max(1, min(repeats, int(max_seconds * 1e3 // predicted_ms)))
                r = benchmark(model, batch, _hw(size), warmup=warmup, repeats=reps, device=device, label=label)
                row.update({k: r[k] for k in ("latency_ms", "latency_q1_ms", "latency_q3_ms", "latency_iqr_ms",
                                              "throughput", "peak_mb", "memory_method", "repeats", "times_ms")})
                rate = r["latency_ms"] / max(gmacs, 1e-9)
            rows.append(row)
            if progress:
                progress(row)
        del model
    return rows


def resolution_sweep(sizes: Sequence[int] = (224, 320, 448, 640, 800), batch: int = 16,
                     families: Sequence[str] = ("linglos", "container"), warmup: int = 1, repeats: int = 3,
                     max_seconds: float = 15.0, device: str = "cpu",
                     progress: Optional[Callable[[dict[str, Any]], None]] = None) -> list[dict[str, Any]]:
    """The named comparisons of :data:`SWEEPS` through :func:`sweep_models` (see the module docstring)."""
    rows = []
    for family in families:
        source, members = SWEEPS[family]
        builders = [(label, lambda name=name, kwargs=kwargs: _deployed(name, kwargs)) for label, name, kwargs in members]
        rows += sweep_models(builders, sizes, batch, warmup, repeats, max_seconds, device, progress,
                             family=family, source=source)
    return rows


def _mb(value: Optional[float]) -> str:
    if value is None:
        return "—"
    return f"{value / 1024:.1f} GB" if value >= 10240 else f"{value:.0f} MB"


def format_sweep(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of a resolution sweep."""
    lines = ["| model | size | batch | GMACs | peak, attention materialised (meta) | peak, measured | "
             "latency ms (median ± IQR/2) | img/s | status |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        measured = r.get("latency_ms") is not None
        latency = f"{r['latency_ms']:.0f} ± {r['latency_iqr_ms'] / 2:.0f}" if measured else "—"
        thr = f"{r['throughput']:.2f}" if measured else "—"
        lines.append(f"| {r['model']} | {r['size']} | {r['batch']} | {r['gmacs']:.0f} | {_mb(r['materialised_peak_mb'])} | "
                     f"{_mb(r.get('peak_mb'))} | {latency} | {thr} | {r['status']} |")
    return "\n".join(lines)


def plot_sweep(rows: Sequence[dict[str, Any]], path, title: str = "") -> None:
    """Memory (left) and latency (right) vs input size, one row of panels per family (LinGlos Fig. 4 layout)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(r["family"] for r in rows))
    fig, axes = plt.subplots(len(families), 2, figsize=(10, 3.6 * len(families)), squeeze=False)
    for (ax_mem, ax_lat), family in zip(axes, families):
        sel = [r for r in rows if r["family"] == family]
        for i, model in enumerate(dict.fromkeys(r["model"] for r in sel)):
            m = [r for r in sel if r["model"] == model]
            color = f"C{i}"
            ax_mem.plot([r["size"] for r in m], [r["materialised_peak_mb"] for r in m], "--", color=color,
                        alpha=0.6, label=f"{model} (materialised, predicted)")
            done = [r for r in m if r.get("latency_ms") is not None]
            ax_mem.plot([r["size"] for r in done], [r["peak_mb"] for r in done], "o-", color=color,
                        label=f"{model} (measured)")
            ax_lat.errorbar([r["size"] for r in done], [r["latency_ms"] for r in done],
                            yerr=[[r["latency_ms"] - r["latency_q1_ms"] for r in done],
                                  [r["latency_q3_ms"] - r["latency_ms"] for r in done]],
                            fmt="o-", color=color, capsize=3, label=f"{model} (measured)")
            guess = [r for r in m if r.get("latency_ms") is None and r.get("predicted_latency_ms")]
            if guess and done:  # extrapolated from the last measured size by GMACs
                ax_lat.plot([done[-1]["size"]] + [r["size"] for r in guess],
                            [done[-1]["latency_ms"]] + [r["predicted_latency_ms"] for r in guess], ":", color=color,
                            marker="o", mfc="none", label=f"{model} (predicted, by GMACs)")
        ax_mem.set_ylabel("peak activation memory (MB)")
        ax_lat.set_ylabel("latency (ms), median")
        for ax in (ax_mem, ax_lat):
            ax.set_xlabel("input size (px)")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        ax_mem.set_title(f"{sel[0]['source']}: batch {sel[0]['batch']}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
