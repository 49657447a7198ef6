"""`ctxagg inspect`: what a model's affinities do on one image, as PNGs and the numbers behind them.

For every block's affinity (captured with forward hooks, see :mod:`.affinity_maps`):
- ``static_affinity.png`` — the static affinity of chosen query positions on the 2-D grid, per layer
  (Container Fig. 1 right: "emergence of local affinities");
- ``dynamic_attention.png`` — the dynamic affinity (attention) of the first query, per head, per layer;
- ``mixture_weights.png`` — α and β of each mixture block (Container Eq. 9), what the model learned to use;
- ``dynamic_paths.png`` — for Container models, which blocks run their dynamic path (a learned on/off pattern of
  ``container_auto``, or a hand-made one such as Container-Light's), from :mod:`.switch_map`;
- ``locality.png`` — the locality score per layer (affinity mass within radius r of the query) next to
  the uniform-affinity chance level, so "emergence of locality" is a number;
- ``affinity_matrices.png`` — the whole N×N matrix (head 0) of each kind of affinity, at its largest layer with
  N ≤ 1024: block-diagonal (windows), banded (neighbourhoods, convolutions), products (axial), dense (attention);
- ``lesa_shares.png`` — for LESA/SA ResNets, the unary/binary fusion weights (LESA Table 2) and the
  softmax weight of the diagonal (LESA Table 1), from :mod:`ctxagg.analysis.lesa`;
- ``inspect.json`` — all of the numbers, plus the model's top-5 prediction.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..runs import output_dir, refuse_existing
from .affinity_maps import (AffinityCall, affinity_rows, call_rows, capture_affinity_calls, layer_statistics,
                            mixture_weights, query_token, rows_to_grid)
from .lesa import attention_layers, diagonal_shares, fusion_weight_shares, mean_share
from .switch_map import model_pattern, pattern_string, plot_switch_map

__all__ = ["load_model", "load_image", "inspect_model", "render", "run_inspect", "INSPECT_OUTPUTS"]

INSPECT_OUTPUTS = ("static_affinity.png", "dynamic_attention.png", "affinity_matrices.png", "mixture_weights.png",
                   "dynamic_paths.png", "locality.png",
                   "lesa_shares.png", "inspect.json")


def load_model(name: Optional[str] = None, checkpoint: Optional[str] = None, img_size: Optional[int] = None,
               model_kwargs: Optional[dict[str, Any]] = None) -> tuple[nn.Module, dict[str, Any]]:
    """An eval-mode model and its input settings (img_size, mean, std, classes, name).

    With ``checkpoint`` (written by `ctxagg train`) the model is rebuilt from the run configuration stored in
    it and loaded; otherwise ``name`` is created untrained (seed 0) with its pretrained_cfg's input size and
    normalisation."""
    import timm

    import ctxagg  # noqa: F401  (registers the models)

    if checkpoint:
        from ..train.model import load_trained_model

        model, cfg, meta, path = load_trained_model(checkpoint, name or None, purpose="inspect")
        info = dict(name=cfg.model, checkpoint=str(path), img_size=cfg.img_size, mean=meta["mean"], std=meta["std"],
                    classes=meta.get("classes"))
    else:
        if not name:
            raise ConfigError("give a model name or a checkpoint")
        kwargs = dict(model_kwargs or {})
        if img_size and timm.get_pretrained_cfg_value(name, "fixed_input_size"):
            kwargs.setdefault("img_size", img_size)
        torch.manual_seed(0)
        model = timm.create_model(name, **kwargs)
        cfg = model.pretrained_cfg
        info = dict(name=name, checkpoint=None, img_size=img_size or cfg["input_size"][-1], mean=list(cfg["mean"]),
                    std=list(cfg["std"]), classes=None)
    if img_size:
        info["img_size"] = img_size
    return model.eval(), info


def load_image(path: str, img_size: int, mean: Sequence[float], std: Sequence[float]) -> tuple[Tensor, np.ndarray]:
    """(1, 3, S, S) normalised input (resize + centre crop, as `ctxagg eval`) and the RGB image it shows, in [0, 1]."""
    from PIL import Image

    from ..train.model import build_eval_transform

    with Image.open(path) as img:
        x = build_eval_transform(img_size, tuple(mean), tuple(std))(img.convert("RGB")).unsqueeze(0)
    shown = x[0] * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return x, shown.clamp(0, 1).permute(1, 2, 0).numpy()


def short_label(name: str) -> str:
    """``stages.3.blocks.0.affinity`` -> ``s3.b0``: a layer name short enough for an axis."""
    label = re.sub(r"\.(affinity|attention|attn)\b", "", name)
    return label.replace("stages.", "s").replace("blocks.", "b").replace("layers.", "l")


def _query_maps(call: AffinityCall, tokens: list[int], part: str) -> Optional[Tensor]:
    """(heads, Q, H, W) maps of a part of the call's affinity for the query tokens (batch element 0)."""
    rows = call_rows(call, torch.tensor(tokens))
    if part not in rows:
        return None
    return rows_to_grid(rows[part][0].float(), call.grid)


def _finite(value: Any) -> Any:
    """JSON-safe: NaN/inf -> None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


@torch.no_grad()
def inspect_model(model: nn.Module, image: Tensor, queries: Optional[Sequence[Sequence[int]]] = None,
                  radius: int = 1, max_queries: int = 256, max_heads: int = 8,
                  classes: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Numbers (JSON-able, under ``"numbers"``) and maps (tensors, under ``"maps"``) of every affinity of
    ``model`` on ``image`` (1, 3, H, W). ``queries`` are (y, x) input pixels (default: centre and the two
    quarter points of the diagonal); each layer maps them to its own grid."""
    model.eval()
    ih, iw = image.shape[-2:]
    queries = [tuple(q) for q in (queries or [(ih // 2, iw // 2), (ih // 4, iw // 4), (3 * ih // 4, 3 * iw // 4)])]
    logits, calls = capture_affinity_calls(model, image)
    layers, skipped, static_maps, dynamic_maps = [], [], [], []
    mixtures = mixture_weights(model)
    for call in calls:
        try:
            stats = layer_statistics(call, radius, max_queries)
            tokens = [query_token(q, (ih, iw), call.grid, call.prefix) for q in queries]
            static = _query_maps(call, tokens, "static")
            dynamic = _query_maps(call, tokens[:1], "dynamic")
        except (ValueError, RuntimeError) as exc:
            skipped.append(dict(name=call.name, reason=str(exc).splitlines()[0]))
            continue
        stats["label"] = short_label(call.name)
        stats["query_tokens"] = tokens
        if call.name in mixtures:
            stats.update(alpha=mixtures[call.name]["alpha"], beta=mixtures[call.name]["beta"])
        layers.append(stats)
        cell = lambda t: [divmod(query_token(q, (ih, iw), call.grid), call.grid[1]) for q in queries[:t]]  # noqa: E731
        if static is not None:  # mean |A| over heads: per-channel kernels of random sign would cancel out
            static_maps.append(dict(label=stats["label"], maps=static.abs().mean(0), cells=cell(len(queries))))
        if dynamic is not None:
            heads = torch.linspace(0, dynamic.shape[0] - 1, min(max_heads, dynamic.shape[0])).round().long().unique()
            dynamic_maps.append(dict(label=stats["label"], maps=dynamic[heads, 0], heads=heads.tolist(),
                                     cells=cell(1), windowed=call.batch > image.shape[0]))
    numbers: dict[str, Any] = dict(radius=radius, queries_px=[list(q) for q in queries], layers=layers,
                                   skipped=skipped, mixture_weights=mixtures)
    pattern = model_pattern(model)
    if pattern is not None:  # per block: 1 = the dynamic path runs (learned switches included), stages split by |
        numbers["dynamic_paths"] = pattern_string(pattern)
    if isinstance(logits, Tensor) and logits.ndim == 2:
        probs = logits.float().softmax(-1)[0]
        top = probs.topk(min(5, probs.numel()))
        numbers["top5"] = [[classes[i] if classes else i, p] for p, i in zip(top.values.tolist(), top.indices.tolist())]
    if attention_layers(model):
        _, shares = diagonal_shares(model, image)
        lesa: dict[str, Any] = dict(diagonal_share=shares, mean_diagonal_share=mean_share(shares))
        if any(getattr(m, "fusion", None) is not None for m in model.modules() if hasattr(m, "last_omega")):
            fusion = fusion_weight_shares(model, image)
            lesa.update(fusion_shares={k: list(v) for k, v in fusion.items()}, mean_fusion_share=list(mean_share(fusion)))
        numbers["lesa"] = lesa
    return dict(numbers=_finite(numbers), maps=dict(static=static_maps, dynamic=dynamic_maps,
                                                    full=full_matrices(calls)))


def full_matrices(calls: Sequence[AffinityCall], max_tokens: int = 1024) -> list[dict[str, Any]]:
    """For each kind of affinity, the |A| (first image, head 0) of its largest call with N ≤ ``max_tokens``."""
    chosen: dict[str, AffinityCall] = {}
    for call in calls:
        kind = type(call.affinity).__name__
        if call.prefix == 0 and call.tokens <= max_tokens and (kind not in chosen or call.tokens > chosen[kind].tokens):
            chosen[kind] = call
    out = []
    for kind, call in chosen.items():
        try:
            a = affinity_rows(call.affinity, call, torch.arange(call.tokens))
        except (ValueError, RuntimeError):  # no spatial N×N form (channel-mixing operators): nothing to draw
            continue
        out.append(dict(label=f"{short_label(call.name)}: {kind}", grid=call.grid, matrix=a[0, 0].abs().float()))
    return out


def _plot_matrices(entries: list[dict], path: Path, title: str) -> None:
    plt = _plt()
    cols = min(4, len(entries))
    rows = math.ceil(len(entries) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(6.0, 3.2 * cols), 3.8 * rows), squeeze=False)
    for ax, entry in zip(axes.flat, entries):
        a = entry["matrix"].numpy()
        ax.imshow(a ** 0.5, cmap="magma", interpolation="nearest")  # square root: small entries stay visible
        h, w = entry["grid"]
        ax.set_title(f"{entry['label']}\n{h}×{w} grid, N = {h * w}", fontsize=7)
        ax.set_xlabel("key token (y·W + x)", fontsize=6)
        ax.set_ylabel("query token", fontsize=6)
        ax.tick_params(labelsize=5)
    for ax in list(axes.flat)[len(entries):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _mark(ax, cell) -> None:
    ax.plot(cell[1], cell[0], marker="+", color="red", markersize=7, mew=1.5)
    ax.set_xticks([])
    ax.set_yticks([])


def _plot_static(maps: list[dict], shown: np.ndarray, queries, path: Path, title: str, max_cols: int = 10) -> None:
    """One block of panels per query: the image with the query marked, then that query's map in each layer."""
    plt = _plt()
    panels = len(maps) + 1
    cols = min(max_cols, panels)
    per_query = math.ceil(panels / cols)
    fig, axes = plt.subplots(per_query * len(queries), cols, figsize=(1.25 * cols, 1.35 * per_query * len(queries)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for qi, q in enumerate(queries):
        for p in range(panels):
            ax = axes[qi * per_query + p // cols, p % cols]
            ax.axis("on")
            if p == 0:
                ax.imshow(shown)
                _mark(ax, q)
                ax.set_title(f"query {tuple(q)}", fontsize=7)
                continue
            layer = maps[p - 1]
            ax.imshow(layer["maps"][qi].numpy(), cmap="viridis", interpolation="nearest")
            _mark(ax, layer["cells"][qi])
            ax.set_title(layer["label"], fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def _plot_dynamic(maps: list[dict], shown: np.ndarray, query, path: Path, title: str) -> None:
    plt = _plt()
    cols = max(len(layer["heads"]) for layer in maps)
    fig, axes = plt.subplots(len(maps), cols + 1, figsize=(1.4 * (cols + 1), 1.4 * len(maps)), squeeze=False)
    for i, layer in enumerate(maps):
        axes[i, 0].imshow(shown)
        _mark(axes[i, 0], query)
        axes[i, 0].set_ylabel(layer["label"] + (" (window 0)" if layer["windowed"] else ""), fontsize=7)
        for j in range(cols):
            ax = axes[i, j + 1]
            if j < len(layer["heads"]):
                ax.imshow(layer["maps"][j].numpy(), cmap="magma", interpolation="nearest")
                _mark(ax, layer["cells"][0])
                ax.set_title(f"head {layer['heads'][j]}", fontsize=6)
            else:
                ax.axis("off")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def _plot_bars(labels: list[str], series: dict[str, list[float]], path: Path, title: str, ylabel: str,
               lines: Optional[dict[str, list[float]]] = None) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(labels) + 1.5), 3.2))
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, [np.nan if v is None else v for v in values], width, label=name)
    for name, values in (lines or {}).items():
        ax.plot(x, [np.nan if v is None else v for v in values], "k--", marker=".", label=name)
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def render(result: dict[str, Any], shown: np.ndarray, out: Path, name: str) -> list[Path]:
    """Write the PNGs of :func:`inspect_model`'s result and ``inspect.json``; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    numbers, maps, files = result["numbers"], result["maps"], []
    ih, iw = shown.shape[:2]
    if maps["static"]:
        files.append(out / "static_affinity.png")
        _plot_static(maps["static"], shown, numbers["queries_px"], files[-1],
                     f"{name}: static affinity of each query, mean |A| over heads (Container Fig. 1 right)")
    if maps["dynamic"]:
        files.append(out / "dynamic_attention.png")
        _plot_dynamic(maps["dynamic"], shown, numbers["queries_px"][0], files[-1],
                      f"{name}: dynamic affinity of query {tuple(numbers['queries_px'][0])} per head")
    if maps.get("full"):
        files.append(out / "affinity_matrices.png")
        _plot_matrices(maps["full"], files[-1], f"{name}: the whole affinity matrix |A| (head 0, √ scale) per kind")
    if numbers.get("dynamic_paths"):
        files.append(out / "dynamic_paths.png")
        plot_switch_map([dict(label=name, pattern=numbers["dynamic_paths"])], files[-1],
                        f"{name}: dynamic paths per block")
    layers = numbers["layers"]
    mixed = [layer for layer in layers if "alpha" in layer]
    if mixed:
        files.append(out / "mixture_weights.png")
        _plot_bars([layer["label"] for layer in mixed], {"α (dynamic)": [layer["alpha"] for layer in mixed],
                                                         "β (static)": [layer["beta"] for layer in mixed]},
                   files[-1], f"{name}: mixture weights α·A_dyn + β·A_static (Container Eq. 9)", "weight")
    if layers:
        series = {"locality (A the block applies)": [layer["locality"].get("combined") for layer in layers]}
        if mixed:  # a mixture's parts; other layers have one part, the combined affinity itself
            for part in ("static", "dynamic"):
                series[f"{part} part"] = [layer["locality"].get(part) if "alpha" in layer else None for layer in layers]
        files.append(out / "locality.png")
        _plot_bars([layer["label"] for layer in layers], series, files[-1],
                   f"{name}: affinity mass within radius {numbers['radius']} of the query", "locality score",
                   lines={"uniform affinity": [layer["uniform_locality"] for layer in layers]})
    if "lesa" in numbers:
        lesa = numbers["lesa"]
        labels = [short_label(k) for k in lesa["diagonal_share"]]
        series = {"diagonal S_ii (Table 1)": list(lesa["diagonal_share"].values())}
        if "fusion_shares" in lesa and len(lesa["fusion_shares"]) == len(labels):
            series["unary 1/(1+ω) (Table 2)"] = [v[0] for v in lesa["fusion_shares"].values()]
            series["binary ω/(1+ω) (Table 2)"] = [v[1] for v in lesa["fusion_shares"].values()]
        files.append(out / "lesa_shares.png")
        _plot_bars(labels, series, files[-1], f"{name}: LESA unary/binary shares", "share")
    files.append(out / "inspect.json")
    files[-1].write_text(json.dumps(numbers, indent=2))
    return files


def _summary(numbers: dict[str, Any]) -> str:
    lines = [f"{'layer':<22} {'type':<26} {'grid':>7} {'locality':>9} {'static':>7} {'dynamic':>8} {'uniform':>8} "
             f"{'diag':>6} {'α':>6} {'β':>6}"]
    fmt = lambda v, spec=".3f": "—" if v is None else format(v, spec)  # noqa: E731
    for layer in numbers["layers"]:
        loc = layer["locality"]
        lines.append(f"{layer['label']:<22} {layer['type']:<26} {'×'.join(map(str, layer['grid'])):>7} "
                     f"{fmt(loc.get('combined')):>9} {fmt(loc.get('static')):>7} {fmt(loc.get('dynamic')):>8} "
                     f"{fmt(layer['uniform_locality']):>8} {fmt(layer['diagonal_share'].get('combined')):>6} "
                     f"{fmt(layer.get('alpha')):>6} {fmt(layer.get('beta')):>6}")
    for s in numbers["skipped"]:
        lines.append(f"{short_label(s['name']):<22} skipped: {s['reason']}")
    if "lesa" in numbers:
        lesa = numbers["lesa"]
        lines.append(f"LESA: mean diagonal share {fmt(lesa['mean_diagonal_share'])}"
                     + (f", mean unary/binary {fmt(lesa['mean_fusion_share'][0])}/{fmt(lesa['mean_fusion_share'][1])}"
                        if "mean_fusion_share" in lesa else ""))
    if "dynamic_paths" in numbers:
        lines.append(f"dynamic paths (1 = on, stages separated by |): {numbers['dynamic_paths']}")
    if "top5" in numbers:
        lines.append("top-5: " + ", ".join(f"{c} {p:.3f}" for c, p in numbers["top5"]))
    return "\n".join(lines)


def run_inspect(model: Optional[str], image: str, out: Optional[str] = None, checkpoint: Optional[str] = None,
                queries: Optional[Sequence[Sequence[int]]] = None, radius: int = 1, img_size: Optional[int] = None,
                model_kwargs: Optional[dict[str, Any]] = None, max_heads: int = 8, overwrite: bool = False
                ) -> dict[str, Any]:
    """Load (see :func:`load_model`), inspect one image and write PNGs + ``inspect.json`` to ``out`` (default: a
    new ``runs/inspect-<model>-<YYYYmmdd-HHMMSS>``; an existing folder holding results is refused unless
    ``overwrite``). Returns the numbers with ``files`` (paths written) and ``summary`` (a printable table)."""
    if out is not None:
        refuse_existing(out, overwrite, outputs=INSPECT_OUTPUTS)  # before any work
    net, info = load_model(model, checkpoint, img_size, model_kwargs)
    x, shown = load_image(image, info["img_size"], info["mean"], info["std"])
    result = inspect_model(net, x, queries, radius, max_heads=max_heads, classes=info["classes"])
    numbers = result["numbers"]
    numbers.update(model=info["name"], checkpoint=info["checkpoint"], image=str(image), img_size=info["img_size"])
    folder = output_dir(out, "inspect", info["name"], overwrite=overwrite, outputs=INSPECT_OUTPUTS)
    files = render(result, shown, folder, info["name"])
    return dict(numbers, files=[str(f) for f in files], summary=_summary(numbers), output=str(folder))
