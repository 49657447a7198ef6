"""The model table: measured parameters, GMACs, activations and (optionally) throughput next to the papers'
numbers (`ctxagg models`)."""
from __future__ import annotations

import fnmatch
from typing import Any, Iterable, Optional, Sequence

import timm
from timm.models._registry import model_entrypoint
from timm.utils.model import reparameterize_model
import torch
from torch import nn

from ..analysis.switch_map import pattern_codes
from ..models import model_names, paper_numbers
from .activations import count_activations
from .complexity import count_gmacs, count_params, meta_model

__all__ = ["model_rows", "format_table"]


def _gap(measured: Optional[float], paper: Optional[float]) -> Optional[float]:
    if measured is None or paper is None:
        return None
    return (measured - paper) / paper


def model_rows(patterns: Iterable[str] = ("*",), flops: bool = True, img_size: int = 224,
               activations: bool = True, throughput: bool = False, throughput_batch: int = 1,
               repeats: int = 3, checkpoints: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One row per registered model matching any glob in ``patterns``. With ``flops`` each model runs one
    forward pass at ``img_size`` (that is how its MACs are measured) and, with ``activations``, one more to
    count activations (:func:`ctxagg.bench.activations.count_activations`); both run on the ``meta`` device
    when the model can be built there. ``throughput`` measures fp32 images/s at ``throughput_batch`` on this
    machine (median of ``repeats`` passes after one warm-up; slow). ``checkpoints`` (`ctxagg train` runs) add one
    row each: the trained model as it deploys — learned switches settled, switched-off dynamic paths removed — with
    its learned per-block pattern."""
    papers = paper_numbers()
    measure = dict(flops=flops, img_size=img_size, activations=activations, throughput=throughput,
                   throughput_batch=throughput_batch, repeats=repeats)
    rows = []
    for name in model_names():
        if not any(fnmatch.fnmatch(name, p) for p in patterns):
            continue
        paper = papers.get(name, {})
        model = _build(name, real=throughput or bool(paper.get("params_deployed")))
        params_model = reparameterize_model(model, inplace=False) if paper.get("params_deployed") else model
        rows.append(_row(name, _family(name), model, params_model, paper, **measure))
        del model, params_model
    for checkpoint in checkpoints:
        rows.append(_checkpoint_row(checkpoint, measure))
    return rows


def _row(name: str, family: str, model: nn.Module, params_model: nn.Module, paper: dict[str, Any], flops: bool,
         img_size: int, activations: bool, throughput: bool, throughput_batch: int, repeats: int) -> dict[str, Any]:
    """One table row; ``params_model`` is what the parameters are counted on (the paper's deployed count or the
    model itself)."""
    from .throughput import benchmark

    params = count_params(params_model) / 1e6
    gmacs = count_gmacs(model, (3, img_size, img_size)) if flops else None
    acts = count_activations(model, (3, img_size, img_size)) if (flops and activations) else None
    speed = None
    if throughput:
        speed = benchmark(model, throughput_batch, img_size, warmup=1, repeats=repeats, memory=False)["throughput"]
    return dict(
        name=name, family=family, dynamic_paths=pattern_codes(model),
        params_m=params, paper_params_m=paper.get("params"), params_gap=_gap(params, paper.get("params")),
        gmacs=gmacs, paper_gflops=paper.get("gflops"), gflops_gap=_gap(gmacs, paper.get("gflops")),
        activations_m=acts, paper_activations_m=paper.get("activations"),
        throughput=speed, throughput_batch=throughput_batch if throughput else None,
        source=paper.get("source", "") + (" (deployed count)" if paper.get("params_deployed") else ""),
    )


def _checkpoint_row(checkpoint: str, measure: dict[str, Any]) -> dict[str, Any]:
    """A trained run's row: its model with every learned switch settled (a switched-off block is static-only)."""
    import copy

    from ..blocks import AggregationBlock
    from ..train.model import load_trained_model

    model, cfg, _, path = load_trained_model(checkpoint, purpose="list")
    settled = copy.deepcopy(model).eval()
    for block in settled.modules():
        if isinstance(block, AggregationBlock):
            block.settle_switch()
    row = _row(f"{cfg.model} ({path.parent.name})", _family(cfg.model), settled, settled, {}, **measure)
    return dict(row, dynamic_paths=pattern_codes(model), source=f"trained: {path}")


def _build(name: str, real: bool) -> nn.Module:
    """The model in eval mode: on ``meta`` (shapes only) unless ``real`` is asked for or its constructor reads
    tensor values (e.g. ``linspace(...).tolist()`` for drop-path rates); else on the CPU, seed 0."""
    if not real:
        try:
            return meta_model(name)
        except (NotImplementedError, RuntimeError):  # "Cannot copy out of meta tensor": meta has no data
            pass
    torch.manual_seed(0)
    return timm.create_model(name).eval()


def _family(name: str) -> str:
    return model_entrypoint(name).__module__.split(".")[-1]


def _fmt(value: Optional[float], spec: str) -> str:
    return "—" if value is None else format(value, spec)


def format_table(rows: list[dict[str, Any]], img_size: int = 224) -> str:
    """A Markdown table (also readable in a terminal); the activation and throughput columns appear only
    when some row has them."""
    acts = any(r.get("activations_m") is not None for r in rows)
    paths = any(r.get("dynamic_paths") for r in rows)
    speed = next((r["throughput_batch"] for r in rows if r.get("throughput") is not None), None)
    head = f"| model | family | params (M) | paper (M) | gap | GMACs @{img_size} | paper GFLOPs | gap |"
    rule = "|---|---|---:|---:|---:|---:|---:|---:|"
    if acts:
        head, rule = head + " acts (M) | paper acts (M) |", rule + "---:|---:|"
    if speed is not None:
        head, rule = head + f" img/s (fp32, batch {speed}) |", rule + "---:|"
    if paths:
        head, rule = head + " dynamic paths (1 on, 0 static, s learned switch) |", rule + "---|"
    lines = [head + " source |", rule + "---|"]
    for r in rows:
        line = (f"| {r['name']} | {r['family']} | {r['params_m']:.3f} | {_fmt(r['paper_params_m'], '.3f')} | "
                f"{_fmt(r['params_gap'], '+.1%')} | {_fmt(r['gmacs'], '.3f')} | {_fmt(r['paper_gflops'], '.3f')} | "
                f"{_fmt(r['gflops_gap'], '+.1%')} |")
        if acts:
            line += f" {_fmt(r.get('activations_m'), '.3f')} | {_fmt(r.get('paper_activations_m'), '.3f')} |"
        if speed is not None:
            line += f" {_fmt(r.get('throughput'), '.1f')} |"
        if paths:
            line += f" {(r.get('dynamic_paths') or '—').replace('|', ' ')} |"  # '|' would split the cell
        lines.append(line + f" {r['source']} |")
    return "\n".join(lines)
