"""The model table: measured parameters and GMACs next to the papers' numbers (`ctxagg models`)."""
from __future__ import annotations

import fnmatch
from typing import Any, Iterable, Optional

import timm
from timm.models._registry import model_entrypoint
from timm.utils.model import reparameterize_model
import torch

from ..models import model_names, paper_numbers
from .complexity import count_gmacs, count_params

__all__ = ["model_rows", "format_table"]


def _gap(measured: Optional[float], paper: Optional[float]) -> Optional[float]:
    if measured is None or paper is None:
        return None
    return (measured - paper) / paper


def model_rows(patterns: Iterable[str] = ("*",), flops: bool = True, img_size: int = 224) -> list[dict[str, Any]]:
    """One row per registered model matching any glob in ``patterns``. With ``flops`` each model runs one
    forward pass at ``img_size`` (that is how its MACs are measured)."""
    papers = paper_numbers()
    rows = []
    for name in model_names():
        if not any(fnmatch.fnmatch(name, p) for p in patterns):
            continue
        torch.manual_seed(0)
        model = timm.create_model(name).eval()
        paper = papers.get(name, {})
        params = count_params(model) / 1e6
        if paper.get("params_deployed"):  # the paper counts the re-parameterised (deploy-time) model
            params = count_params(reparameterize_model(model, inplace=False)) / 1e6
        gmacs = count_gmacs(model, (3, img_size, img_size)) if flops else None
        rows.append(dict(
            name=name, family=_family(name),
            params_m=params, paper_params_m=paper.get("params"), params_gap=_gap(params, paper.get("params")),
            gmacs=gmacs, paper_gflops=paper.get("gflops"), gflops_gap=_gap(gmacs, paper.get("gflops")),
            source=paper.get("source", "") + (" (deployed count)" if paper.get("params_deployed") else ""),
        ))
        del model
    return rows


def _family(name: str) -> str:
    return model_entrypoint(name).__module__.split(".")[-1]


def _fmt(value: Optional[float], spec: str) -> str:
    return "—" if value is None else format(value, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table (also readable in a terminal)."""
    header = ("| model | family | params (M) | paper (M) | gap | GMACs @224 | paper GFLOPs | gap | source |\n"
              "|---|---|---:|---:|---:|---:|---:|---:|---|")
    lines = [header]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['family']} | {r['params_m']:.3f} | {_fmt(r['paper_params_m'], '.3f')} | "
            f"{_fmt(r['params_gap'], '+.1%')} | {_fmt(r['gmacs'], '.3f')} | {_fmt(r['paper_gflops'], '.3f')} | "
            f"{_fmt(r['gflops_gap'], '+.1%')} | {r['source']} |")
    return "\n".join(lines)
