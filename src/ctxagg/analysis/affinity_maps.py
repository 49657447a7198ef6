"""The numbers behind `ctxagg inspect`: capture each block's affinity for an input, compute chosen rows of
it, and measure them. No plotting here.

- :func:`capture_affinity_calls` runs a model once with forward hooks on its (outermost) affinities and keeps
  the ``(v shape, q, k, extra)`` each received, with the token grid the call worked on.
- :func:`affinity_rows` gives rows of ``A`` (the affinity of chosen query tokens, (B or 1, heads, R, N))
  without forming the whole N×N matrix where the operator allows it: depthwise/grouped convolutions place
  their kernel, attention slices its queries, key-only attention repeats its saliency vector; other operators
  fall back to :meth:`~ctxagg.affinity.Affinity.matrix` when it fits a budget.
- :func:`locality_score` (Container §4.1 / Fig. 1 right, "emergence of locality", made a number),
  :func:`diagonal_share` (the unary share of LESA Table 1), :func:`mixture_weights` (α, β of Container Eq. 9).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ..affinity import Affinity, AffinityMixture, DepthwiseConvAffinity
from ..affinity.attention import SelfAttentionAffinity
from ..affinity.conv import GroupConvAffinity
from ..affinity.key_only import KeyOnlyAttention
from ..affinity.base import to_tokens
from ..affinity.mixture import expand_heads

__all__ = ["AffinityCall", "capture_affinity_calls", "outer_affinities", "conv_rows", "affinity_rows", "call_rows",
           "locality_score", "diagonal_share", "uniform_locality", "sample_queries", "query_token",
           "mixture_weights", "layer_statistics", "rows_to_grid", "MAX_PREFIX_TOKENS"]

MAX_PREFIX_TOKENS = 8  # leading non-grid tokens (class/distillation/register tokens) a token layout may carry


@dataclass
class AffinityCall:
    """What one affinity received in a forward pass. ``grid`` is the (H, W) token grid and ``prefix`` the
    number of leading tokens that are not on it (a class token), so N = prefix + H·W."""

    name: str
    affinity: Affinity
    v_shape: tuple[int, ...]
    q: Optional[Tensor]
    k: Optional[Tensor]
    grid: tuple[int, int]
    prefix: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.prefix + self.grid[0] * self.grid[1]

    @property
    def batch(self) -> int:
        return self.v_shape[0]


def outer_affinities(model: nn.Module) -> dict[str, Affinity]:
    """Affinity modules that are not part of another affinity (a mixture's parts are reached through it)."""
    found = {n: m for n, m in model.named_modules() if isinstance(m, Affinity)}
    return {n: m for n, m in found.items()
            if not any(n.startswith(other + ".") for other in found if other != n)}


def _infer_grid(n: int, recent: list[tuple[int, int]]) -> tuple[tuple[int, int], int]:
    """Grid and prefix of N tokens: the latest 4-D feature map with H·W = N − p (0 ≤ p ≤ MAX_PREFIX_TOKENS),
    else the square grid of N − p tokens, else one row of N."""
    for h, w in reversed(recent):
        if 0 <= n - h * w <= MAX_PREFIX_TOKENS:
            return (h, w), n - h * w
    for p in range(MAX_PREFIX_TOKENS + 1):
        side = math.isqrt(n - p)
        if side * side == n - p:
            return (side, side), p
    return (1, n), 0


@torch.no_grad()
def capture_affinity_calls(model: nn.Module, images: Tensor) -> tuple[Any, list[AffinityCall]]:
    """Run ``model(images)`` once and return its output and the first call of each outer affinity.
    The model is used as it is (call ``eval()`` first for inference behaviour)."""
    calls: list[AffinityCall] = []
    seen: set[str] = set()
    recent: list[tuple[int, int]] = [tuple(images.shape[-2:])]

    def record_shape(_module, _args, output) -> None:
        if isinstance(output, Tensor) and output.ndim == 4:
            recent.append(tuple(output.shape[-2:]))

    def record_call(name: str):
        def hook(module: Affinity, args: tuple, kwargs: dict, _output: Any) -> None:
            if name in seen:
                return
            seen.add(name)
            signature = inspect.signature(type(module).forward)
            bound = signature.bind(module, *args, **kwargs).arguments
            slots = list(signature.parameters)[1:4]  # the contract's (v, q, k), whatever an operator names them
            v, q, k = (bound.get(name) for name in slots)
            extra = {key: val for key, val in bound.items() if key not in ("self", *slots) and val is not None}
            if v.ndim == 4:
                grid, prefix = tuple(v.shape[-2:]), 0
            else:
                grid, prefix = _infer_grid(v.shape[1], recent)
            detach = lambda t: t.detach() if isinstance(t, Tensor) else t  # noqa: E731
            calls.append(AffinityCall(name, module, tuple(v.shape), detach(q), detach(k),
                                      grid, prefix, {key: detach(val) for key, val in extra.items()}))
        return hook

    handles = [m.register_forward_hook(record_shape) for m in model.modules()]
    handles += [m.register_forward_hook(record_call(n), with_kwargs=True) for n, m in outer_affinities(model).items()]
    try:
        output = model(images)
    finally:
        for handle in handles:
            handle.remove()
    return output, calls


def conv_rows(kernel: Tensor, grid: Sequence[int], rows: Tensor) -> Tensor:
    """Rows ``rows`` of the 'same'-padded cross-correlation matrix of ``kernel`` (M, k, k) on an H×W grid:
    (M, R, H·W), equal to ``conv_toeplitz(kernel, H, W)[:, rows]`` without building the N×N matrix."""
    m, kh, kw = kernel.shape
    h, w = grid
    rows = torch.as_tensor(rows, device=kernel.device).long()
    r = rows.numel()
    canvas = kernel.new_zeros(m, r, h + kh - 1, w + kw - 1)
    # the kernel of query (y, x) sits with its top-left corner at canvas (y, x); key (y', x') is canvas
    # (y' + kh//2, x' + kw//2), i.e. kernel entry (y' − y + kh//2, x' − x + kw//2)
    iy = (rows // w).view(r, 1, 1) + torch.arange(kh, device=kernel.device).view(1, kh, 1)
    ix = (rows % w).view(r, 1, 1) + torch.arange(kw, device=kernel.device).view(1, 1, kw)
    canvas[:, torch.arange(r, device=kernel.device).view(r, 1, 1), iy, ix] = kernel.unsqueeze(1).expand(m, r, kh, kw)
    return canvas[:, :, kh // 2:kh // 2 + h, kw // 2:kw // 2 + w].reshape(m, r, h * w)


@torch.no_grad()
def affinity_rows(affinity: Affinity, call: AffinityCall, rows: Tensor, budget: int = 2 ** 26) -> Tensor:
    """Rows ``rows`` (token indices, (R,)) of the affinity ``A`` of ``call``: (B or 1, heads, R, N).

    Paper-silent summaries where ``A`` is not one N×N matrix per head: a grouped convolution gives the
    spatial magnitude Σ|w| over each group's channel pairs; key-only attention gives its spatial part 1·aᵀ
    (every query reads the saliency weights a of LinGlos Eq. 2; the gate, U1 and the K skip are left out).
    Other operators are sliced from ``matrix()`` when B·heads·N² ≤ ``budget`` elements, else refused.
    """
    rows = torch.as_tensor(rows).long()
    if isinstance(affinity, AffinityMixture):
        alpha, beta = affinity.weights()
        dyn = expand_heads(affinity_rows(affinity.dynamic_affinity, call, rows, budget), affinity.heads)
        static = expand_heads(affinity_rows(affinity.static_affinity, call, rows, budget), affinity.heads)
        return alpha * dyn + beta * static
    if isinstance(affinity, DepthwiseConvAffinity):
        return conv_rows(affinity.weight[:, 0], call.grid, rows).unsqueeze(0)
    if isinstance(affinity, GroupConvAffinity):
        w = affinity.conv.weight.abs()  # (C, d, k, k), out channel c in group c // d
        groups = w.view(affinity.heads, affinity.head_dim, *w.shape[1:]).sum((1, 2))
        return conv_rows(groups, call.grid, rows).unsqueeze(0)
    if isinstance(affinity, KeyOnlyAttention):
        a = affinity.attention_weights(call.k if call.k is not None else call.q)  # (B, M, N)
        return a.unsqueeze(2).expand(a.shape[0], a.shape[1], rows.numel(), a.shape[2])
    n = call.tokens
    if isinstance(affinity, SelfAttentionAffinity) and not call.extra:
        return affinity.matrix(call.v_shape, to_tokens(call.q)[:, rows.to(call.q.device)], call.k)
    size = (call.q.shape[0] if call.q is not None else 1) * affinity.heads * n * n
    if size > budget:
        raise ValueError(f"{type(affinity).__name__} needs its full {n}×{n} matrix ({size:,} elements > budget {budget:,})")
    a = affinity.matrix(call.v_shape, call.q, call.k, **call.extra)
    if a.shape[-1] != n:
        raise ValueError(f"{type(affinity).__name__} relates (position, channel) pairs; no spatial rows")
    return a[..., rows.to(a.device), :]


def call_rows(call: AffinityCall, rows: Tensor, budget: int = 2 ** 26) -> dict[str, Tensor]:
    """Rows of the parts of a call's affinity: ``static`` and/or ``dynamic``, and ``combined`` (what the
    block applies: α·A_dyn + β·A_static for a mixture, Container Eq. 9)."""
    aff = call.affinity
    if isinstance(aff, AffinityMixture):
        dyn = affinity_rows(aff.dynamic_affinity, call, rows, budget)
        static = affinity_rows(aff.static_affinity, call, rows, budget)
        alpha, beta = aff.weights()
        combined = alpha * expand_heads(dyn, aff.heads) + beta * expand_heads(static, aff.heads)
        return dict(dynamic=dyn, static=static, combined=combined)
    a = affinity_rows(aff, call, rows, budget)
    return {("dynamic" if aff.dynamic else "static"): a, "combined": a}


def _rows_index(a: Tensor, rows: Optional[Tensor]) -> Tensor:
    count = a.shape[-2]
    rows = torch.arange(count) if rows is None else torch.as_tensor(rows).long().flatten()
    if rows.numel() != count:
        raise ValueError(f"{rows.numel()} query indices for {count} affinity rows")
    return rows.to(a.device)


def _near_mask(grid: Sequence[int], query: Tensor, radius: int) -> Tensor:
    """(R, H·W) mask of the grid keys within Chebyshev distance ``radius`` of each grid query index."""
    h, w = grid
    qy, qx = query.clamp(min=0) // w, query.clamp(min=0) % w
    ky = torch.arange(h, device=query.device).repeat_interleave(w)
    kx = torch.arange(w, device=query.device).repeat(h)
    return ((ky[None] - qy[:, None]).abs() <= radius) & ((kx[None] - qx[:, None]).abs() <= radius)


def _per_query(ratio: Tensor) -> Tensor:
    """(..., R) -> (R,): mean over the leading dimensions (batch, heads), ignoring NaN (rows with no mass)."""
    return ratio.reshape(-1, ratio.shape[-1]).nanmean(0)


def _row_statistics(a: Tensor, grid: Sequence[int], radius: int, rows: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-query locality and diagonal share, (R,) each, from one pass over |a|."""
    h, w = grid
    n = a.shape[-1]
    prefix = n - h * w
    if prefix < 0:
        raise ValueError(f"{n} keys cannot hold a {h}×{w} grid")
    rows = _rows_index(a, rows)
    query = rows - prefix
    mag = a.detach().abs().float()
    total = mag.sum(-1)  # a row with no mass gives NaN below and is ignored
    local = _per_query((mag[..., prefix:] * _near_mask(grid, query, radius)).sum(-1) / total)
    local = torch.where(query >= 0, local, torch.full_like(local, float("nan")))
    diag = _per_query(mag[..., torch.arange(len(rows), device=a.device), rows] / total)
    return local, diag


def locality_score(a: Tensor, grid: Sequence[int], radius: int, rows: Optional[Tensor] = None,
                   reduce: bool = True) -> Any:
    """Share of affinity mass within Chebyshev distance ``radius`` of the query, Σ_{|p_j−p_i|∞ ≤ r}|A_ij| / Σ_j|A_ij|.

    ``a``: (..., R, N) rows of an affinity over N = prefix + H·W keys, the ``prefix`` leading ones (class
    tokens) off the grid: they count in the denominator only. ``rows``: the query token index of each row
    (default 0..R−1); queries in the prefix and rows with no mass are ignored. Averaged over the leading
    dimensions (batch, heads) per query, then over queries (``reduce``; else the (R,) per-query values).
    Container Fig. 1 (right) shows locality emerging in a learned static affinity; this makes it a number.
    """
    local, _ = _row_statistics(a, grid, radius, rows)
    return local.nanmean().item() if reduce else local


def diagonal_share(a: Tensor, rows: Optional[Tensor] = None, reduce: bool = True) -> Any:
    """Share of each row's mass on the query itself, |A_ii| / Σ_j |A_ij| — for a softmax affinity the
    weight S_ii of the unary term (LESA Eq. 2, Table 1). Same conventions as :func:`locality_score`."""
    rows = _rows_index(a, rows)
    mag = a.detach().abs().float()
    diag = _per_query(mag[..., torch.arange(len(rows), device=a.device), rows] / mag.sum(-1))
    return diag.nanmean().item() if reduce else diag


def uniform_locality(grid: Sequence[int], radius: int, rows: Optional[Tensor] = None, prefix: int = 0) -> float:
    """:func:`locality_score` of a uniform affinity (every key equal): the chance level of a layer."""
    n = prefix + grid[0] * grid[1]
    count = n if rows is None else torch.as_tensor(rows).numel()
    return locality_score(torch.ones(count, n), grid, radius, rows)


def sample_queries(grid: Sequence[int], max_queries: int = 256) -> Tensor:
    """Grid token indices of a regular sub-grid of at most ``max_queries`` queries (all when they fit)."""
    h, w = grid
    step = max(1, math.ceil(math.sqrt(h * w / max_queries)))
    ys, xs = torch.arange(step // 2, h, step), torch.arange(step // 2, w, step)
    if not len(ys) or not len(xs):
        ys, xs = torch.arange(0, h, step), torch.arange(0, w, step)
    return (ys[:, None] * w + xs[None, :]).flatten()


def query_token(pixel: Sequence[int], image_hw: Sequence[int], grid: Sequence[int], prefix: int = 0) -> int:
    """Token index of the grid cell holding input pixel (y, x)."""
    (y, x), (ih, iw), (h, w) = pixel, image_hw, grid
    gy = min(h - 1, max(0, int(y) * h // ih))
    gx = min(w - 1, max(0, int(x) * w // iw))
    return prefix + gy * w + gx


def rows_to_grid(a: Tensor, grid: Sequence[int]) -> Tensor:
    """(..., R, prefix + H·W) rows -> (..., R, H, W) maps over the grid keys (prefix keys dropped)."""
    h, w = grid
    return a[..., a.shape[-1] - h * w:].reshape(*a.shape[:-1], h, w)


def mixture_weights(model: nn.Module) -> dict[str, dict[str, Any]]:
    """α and β of every :class:`AffinityMixture` (Container Eq. 9): what each block learned to use."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, AffinityMixture):
            alpha, beta = module.weights()
            out[name] = dict(alpha=float(alpha.detach()), beta=float(beta.detach()), gate=module.gate,
                             dynamic=type(module.dynamic_affinity).__name__, static=type(module.static_affinity).__name__)
            if module.switch is not None:  # a learned on/off switch of the dynamic path (train/budget.py)
                out[name].update(dynamic_on=module.dynamic_on(), switch_fixed=module.switch.fixed,
                                 switch_z=float(module.switch.deterministic().detach()),
                                 switch_prob_on=float(module.switch.prob_on().detach()))
    return out


@torch.no_grad()
def layer_statistics(call: AffinityCall, radius: int = 1, max_queries: int = 256,
                     chunk_elements: int = 2 ** 24, budget: int = 2 ** 26) -> dict[str, Any]:
    """Locality and diagonal share of each part of one call's affinity, over a regular sub-grid of at most
    ``max_queries`` queries (processed in chunks of about ``chunk_elements`` affinity entries)."""
    queries = sample_queries(call.grid, max_queries) + call.prefix
    per_row = max(1, call.batch * call.affinity.heads * call.tokens)
    chunk = max(1, chunk_elements // per_row)
    local: dict[str, list[Tensor]] = {}
    diag: dict[str, list[Tensor]] = {}
    for part_rows in queries.split(chunk):
        done: dict[int, tuple[Tensor, Tensor]] = {}  # a non-mixture's "combined" is its only part: measure once
        for part, a in call_rows(call, part_rows, budget).items():
            if id(a) not in done:
                done[id(a)] = _row_statistics(a, call.grid, radius, part_rows)
            local.setdefault(part, []).append(done[id(a)][0])
            diag.setdefault(part, []).append(done[id(a)][1])
    mean = lambda parts: {k: torch.cat(v).nanmean().item() for k, v in parts.items()}  # noqa: E731
    return dict(name=call.name, type=type(call.affinity).__name__, grid=list(call.grid), prefix=call.prefix,
                heads=call.affinity.heads, batch=call.batch, dynamic=call.affinity.dynamic, queries=len(queries),
                radius=radius, locality=mean(local), diagonal_share=mean(diag),
                uniform_locality=uniform_locality(call.grid, radius, queries, call.prefix))
