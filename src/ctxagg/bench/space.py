"""The design-space table (``ctxagg space``): every registered affinity with its paper, kind, sparsity pattern
and cost class (:mod:`ctxagg.affinity.space`), measured in one Container block (Eq. 2-3: norm, 1×1 projections,
the affinity, MLP) at C=128 on 56² and 14² grids, and the reading list's coverage."""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..affinity import affinity_names, build_affinity
from ..affinity.space import COMBINATOR_EXAMPLES, DESIGN_SPACE, READING_LIST
from ..blocks.aggregation import AggregationBlock
from .complexity import SDPA_FLOP_FORMULAS, count_params

__all__ = ["space_rows", "format_space_table", "format_reading_list", "block_cost"]

DIM, HEADS = 128, 4
GRIDS = (56, 14)


@torch.no_grad()
def block_cost(spec: str, grid: int, dim: int = DIM, heads: int = HEADS) -> tuple[int, float]:
    """(parameters, GMACs) of one :class:`AggregationBlock` with affinity ``spec`` on a grid×grid map, counted on
    the meta device (nothing allocated), or on the CPU for operators whose index arithmetic needs real values
    (boolean masks of sparse patterns). The parameters depend on the grid only for fixed-N affinities."""
    from torch.utils.flop_counter import FlopCounterMode

    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                block = AggregationBlock(dim, build_affinity(spec, dim=dim, heads=heads, grid=(grid, grid))).eval()
                counter = FlopCounterMode(display=False, custom_mapping=SDPA_FLOP_FORMULAS)
                with counter:
                    block(torch.zeros(1, dim, grid, grid))
            return count_params(block), counter.get_total_flops() / 2e9
        except NotImplementedError:
            if device == "cpu":
                raise
    raise AssertionError("unreachable")


def _instance(name: str) -> str:
    return COMBINATOR_EXAMPLES.get(name, name)


def space_rows(measure: bool = True) -> list[dict[str, Any]]:
    """One row per registered affinity name (combinators with a concrete instance), in registry order."""
    rows = []
    for name in affinity_names():
        entry = DESIGN_SPACE[name]
        row: dict[str, Any] = dict(name=name, instance=_instance(name), paper=entry.paper, kind=entry.kind,
                                   pattern=entry.pattern, cost=entry.cost, bank=entry.bank,
                                   selection=entry.selection, kernel_type=entry.kernel_type,
                                   kernel_size=entry.kernel_size,
                                   tested="yes: matrix()·V + bias == forward() == float64 reference")
        if measure:
            for grid in GRIDS:
                try:
                    params, gmacs = block_cost(_instance(name), grid)
                    row[f"params_{grid}"], row[f"gmacs_{grid}"] = params, gmacs
                except ValueError as exc:  # a size the operator refuses, stated
                    row[f"params_{grid}"], row[f"gmacs_{grid}"], row[f"error_{grid}"] = None, None, str(exc)
        rows.append(row)
    return rows


def _scaled(value: Optional[float], scale: float) -> str:
    return "—" if value is None else f"{value / scale:.3f}"


def format_space_table(rows: list[dict[str, Any]]) -> str:
    head = (f"| paper | ctxagg name | static / dynamic | non-zeros of A | cost of A·V | kernel bank | kernel selection "
            f"| kernel type | kernel size | block params @{GRIDS[0]}² (M) "
            f"| block GMACs @{GRIDS[0]}² | block params @{GRIDS[1]}² (M) | block GMACs @{GRIDS[1]}² | tested |")
    lines = [head, "|" + "---|" * 9 + "---:|" * 4 + "---|"]
    for r in rows:
        name = f"`{r['instance']}`" if r["instance"] == r["name"] else f"`{r['name']}`, e.g. `{r['instance']}`"
        measured = [_scaled(r.get(f"{m}_{g}"), 1e6 if m == "params" else 1) for g in GRIDS for m in ("params", "gmacs")]
        lines.append(f"| {r['paper']} | {name} | {r['kind']} | {r['pattern']} | {r['cost']} | {r['bank']} | "
                     f"{r['selection']} | {r['kernel_type']} | {r['kernel_size']} | "
                     + " | ".join(measured) + f" | {r['tested']} |")
    return "\n".join(lines)


def format_reading_list() -> str:
    lines = ["| # | reading-list paper | in ctxagg |", "|---:|---|---|"]
    lines += [f"| {i} | {title} | {status} |" for i, (title, status) in enumerate(READING_LIST, 1)]
    return "\n".join(lines)
