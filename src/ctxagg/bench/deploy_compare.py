"""`ctxagg bench deploy`: eager fp32 vs the deploy path (fp32, bf16, int8), with the machine's measured matrix-multiply
peak so every figure is also a fraction of what the hardware can do, batch-1 latency (what a deployed model sees),
and optionally timm's closest peers measured in the same run.

Timing is round-robin: after every variant of a model is built and warmed up (compiled), each repeat times one
pass of every variant in turn, so a change in the machine's load touches all of them alike and the ratios between
variants stay comparable even on a shared machine.

int8 (x86 CPUs only; :mod:`ctxagg.export.quantize`): static PT2E quantization, calibrated here on two batches of
random normal images with min/max observers (calibration sets the scales, not the speed; accuracy is measured
by `ctxagg export --int8` on real images with the default histogram observers); where the static flow fails for
a model, dynamic int8 of its linears, and the row says which ran. ``opt_int8_bf16`` runs the ops left
unquantized (attention, norms, GELU) in bf16. A variant that fails to compile is reported as failed, with its
error in the row's ``errors``, and the others are still measured.

With ``breakdown`` (default), one more profiled pass of every variant splits its time into dense MAC kernels and
the rest (:mod:`ctxagg.bench.kernel_split`), and each variant gets its ceiling over compiled bf16: the speed-up
it would reach over ``opt_bf16`` if nothing but its kernels took time (what bounds int8 on a given CPU).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import timm
import torch
from timm.models import model_entrypoint
from torch import nn

from ..export import optimize
from .complexity import count_gmacs
from .kernel_split import ceiling, kernel_split
from .throughput import round_robin_times, summarise_times, time_passes

__all__ = ["matmul_peak_gmacs", "compare_eager", "format_compare", "format_latency", "format_breakdown",
           "DEFAULT_MODELS", "PEER_MODELS", "VARIANTS"]

DEFAULT_MODELS = ("container_light", "container", "linglo_b1", "resnet50_lesa", "deit_s")
# timm's models closest in size to ours (ImageNet-1k, ~20-30 M parameters, 224²)
PEER_MODELS = ("resnet50", "convnext_tiny", "deit_small_patch16_224", "pvt_v2_b2", "twins_svt_small",
               "swin_tiny_patch4_window7_224")
# variant -> (optimize() arguments, the precision whose matmul peak it is compared with)
VARIANTS: dict[str, tuple[Optional[dict[str, Any]], str]] = {
    "eager_fp32": (None, "fp32"),
    "opt_fp32": (dict(), "fp32"),
    "opt_bf16": (dict(bf16=True), "bf16"),
    "opt_int8": (dict(int8="static", int8_observer="minmax"), "int8"),
    "opt_int8_bf16": (dict(int8="static", int8_observer="minmax", bf16=True), "int8"),
}
LATENCY_VARIANTS = ("eager_fp32", "opt_fp32", "opt_bf16", "opt_int8", "opt_int8_bf16")


def _median_rate(fn: Callable[[], Any], macs: float, repeats: int, device: torch.device) -> float:
    time_passes(fn, 2, device)
    return macs / sorted(time_passes(fn, repeats, device))[repeats // 2] * 1e3 / 1e9


def matmul_peak_gmacs(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 7, device: str = "cpu"
                      ) -> float:
    """Median multiply-accumulates per second (G) of an n×n×n matmul on ``device``: the machine's practical peak.
    ``torch.int8`` (CPU): oneDNN's u8×s8 int8 linear (the kernel inductor emits for a quantized linear; VNNI where
    the CPU has it)."""
    dev = torch.device(device)
    if dtype == torch.int8:
        x = torch.randint(0, 255, (n, n), dtype=torch.uint8)
        weight = torch.ops.onednn.qlinear_prepack(torch.randint(-128, 127, (n, n), dtype=torch.int8), [n, n])
        scales, zeros = torch.full((n,), 0.01), torch.zeros(n, dtype=torch.long)
        return _median_rate(lambda: torch.ops.onednn.qlinear_pointwise(
            x, 0.1, 0, weight, scales, zeros, None, 1.0, 0, torch.float32, "none", [], ""), n ** 3, repeats, dev)
    a, b = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
    return _median_rate(lambda: a @ b, n ** 3, repeats, dev)


def _build_variants(model: nn.Module, names: Sequence[str], batch: tuple[int, int], device: str, compile: bool
                    ) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The deployed modules of ``names`` and, for int8, which mode ran (static, or dynamic where static failed)."""
    built, notes = {}, {}
    batch_size, size = batch
    for name in names:
        kwargs, _ = VARIANTS[name]
        if kwargs is None:
            built[name] = model
            continue
        if "int8" not in kwargs:
            built[name] = optimize(model, compile=compile, device=device, **kwargs)
            continue
        calibration = [torch.randn(batch_size, 3, size, size) for _ in range(2)]
        try:
            built[name], notes[name] = optimize(model, device=device, calibration=calibration, **kwargs), "static"
        except Exception as exc:  # noqa: BLE001 - a graph the static flow cannot take: dynamic int8 of the linears
            notes[name] = f"dynamic (static failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]})"
            built[name] = optimize(model, device=device, calibration=calibration, **dict(kwargs, int8="dynamic"))
    return built, notes


@torch.no_grad()
def _round_robin(built: dict[str, nn.Module], x: torch.Tensor, warmup: int, repeats: int,
                 errors: dict[str, str]) -> dict[str, list[float]]:
    """Per-variant pass times (ms): ``warmup`` untimed passes each (the first compiles), then ``repeats`` rounds.
    A variant whose compilation or first pass fails is left out, its error kept in ``errors``."""
    for name, net in list(built.items()):
        try:
            for _ in range(max(warmup, 1)):
                net(x)
        except Exception as exc:  # noqa: BLE001 - e.g. an inductor lowering bug for one precision
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            del built[name]
    return round_robin_times({name: functools.partial(net, x) for name, net in built.items()}, repeats, x.device)


@torch.no_grad()
def _add_breakdown(row: dict[str, Any], built: dict[str, nn.Module], x: torch.Tensor) -> None:
    """Per variant: ``{key}_pass_ms``, ``_kernel_ms``, ``_other_ms`` of one profiled pass, and ``_ceiling_over_bf16``
    (opt bf16's pass time ÷ this variant's kernel time)."""
    for key, net in built.items():
        for part, value in kernel_split(lambda: net(x), x.device).items():
            row[f"{key}_{part.replace('total', 'pass')}"] = value
    if "opt_bf16" in built:
        for key in built:
            row[f"{key}_ceiling_over_bf16"] = ceiling(row["opt_bf16_pass_ms"], row[f"{key}_kernel_ms"])


def _measure_model(name: str, batch_size: int, img_size: int, variants: Sequence[str], warmup: int, repeats: int,
                   device: str, latency_batch: Optional[int], peaks: dict[str, float], compile: bool,
                   breakdown: bool = True) -> dict[str, Any]:
    torch.manual_seed(0)
    model = timm.create_model(name).eval().to(device)
    gmacs = count_gmacs(model, (3, img_size, img_size))
    source = "ctxagg" if model_entrypoint(name).__module__.startswith("ctxagg") else "timm"
    row: dict[str, Any] = dict(model=name, source=source,
                               params_m=sum(p.numel() for p in model.parameters()) / 1e6, gmacs=gmacs,
                               batch_size=batch_size, img_size=img_size, device=device)
    built, row["int8_mode"] = _build_variants(model, variants, (batch_size, img_size), device, compile)
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    row["errors"] = {}
    for key, times in _round_robin(built, x, warmup, repeats, row["errors"]).items():
        row[f"{key}_img_s"] = summarise_times(times, batch_size)["throughput"]
        row[f"{key}_peak_frac"] = gmacs * row[f"{key}_img_s"] / peaks[VARIANTS[key][1]]
        row[f"{key}_speedup"] = row[f"{key}_img_s"] / row["eager_fp32_img_s"] if "eager_fp32" in built else None
    if breakdown:
        _add_breakdown(row, built, x)
    if latency_batch:  # freshly built: a frozen int8 graph cannot be recompiled for another shape
        del built
        one = torch.randn(latency_batch, 3, img_size, img_size, device=device)
        chosen, _ = _build_variants(model, [v for v in variants if v in LATENCY_VARIANTS],
                                    (latency_batch, img_size), device, compile)
        for key, times in _round_robin(chosen, one, warmup, repeats, row["errors"]).items():
            row[f"{key}_latency_ms"] = summarise_times(times, latency_batch)["latency_ms"]
        row["latency_batch"] = latency_batch
    return row


def compare_eager(models: Sequence[str] = DEFAULT_MODELS, batch_size: int = 32, img_size: int = 224,
                  warmup: int = 1, repeats: int = 3, compile: bool = True, int8: bool = True,
                  latency_batch: Optional[int] = 1, device: str = "cpu", peers: bool = False,
                  breakdown: bool = True, echo: Optional[Callable[[str], None]] = print) -> dict[str, Any]:
    """For each model (and, with ``peers``, each of :data:`PEER_MODELS`): params, GMACs, eager fp32 and optimised
    fp32 / bf16 / int8 throughput, their ratios to eager, the achieved fraction of the measured matmul peak of
    that precision (GMACs per image × img/s ÷ peak), and batch-``latency_batch`` latency of each variant.
    ``compile`` False: the deploy variants without torch.compile and without int8 (which needs it); int8 runs on
    CPUs only. ``breakdown``: also each variant's kernel / other time and ceiling over compiled bf16
    (:func:`format_breakdown`)."""
    dev = torch.device(device)
    int8 = int8 and compile and dev.type == "cpu"
    peaks = dict(fp32=matmul_peak_gmacs(torch.float32, device=device),
                 bf16=matmul_peak_gmacs(torch.bfloat16, device=device))
    if int8:
        peaks["int8"] = matmul_peak_gmacs(torch.int8)
    variants = [v for v in VARIANTS if "int8" not in v or int8]
    names = list(models) + [p for p in (PEER_MODELS if peers else ()) if p not in models]
    rows = []
    for name in names:
        rows.append(_measure_model(name, batch_size, img_size, variants, warmup, repeats, device, latency_batch,
                                   peaks, compile, breakdown))
        if echo is not None:
            echo(format_compare(rows[-1:], peaks, header=len(rows) == 1)
                 + (f"\n{format_breakdown(rows[-1:])}\n" if breakdown else "")
                 + "".join(f"\n  {name} {variant} failed: {error}" for variant, error in rows[-1]["errors"].items()))
    return dict(peak_gmacs=peaks, threads=torch.get_num_threads(), compiled=compile, variants=variants,
                device=device, timing="round-robin over variants", rows=rows)


_LABELS = dict(eager_fp32="eager fp32", opt_fp32="opt fp32", opt_bf16="opt bf16", opt_int8="opt int8",
               opt_int8_bf16="opt int8+bf16")


def format_compare(rows: Sequence[dict[str, Any]], peaks: dict[str, float], header: bool = True) -> str:
    """Markdown: one line per model, img/s of each variant (× eager fp32), % of the matching matmul peak."""
    variants = [v for v in VARIANTS if any(f"{v}_img_s" in r or v in r.get("errors", {}) for r in rows)]
    lines = []
    if header:
        lines += ["matmul peak (2048³): " + ", ".join(f"{k} {v:.1f} GMAC/s" for k, v in peaks.items()),
                  "| model | from | params M | GMACs/img | " + " | ".join(f"{_LABELS[v]} img/s" for v in variants)
                  + " | % of peak: " + " / ".join(_LABELS[v] for v in variants) + " |",
                  "|---|---|---:|---:|" + "---:|" * len(variants) + "---:|"]
    for r in rows:
        cells = [("failed" if f"{v}_img_s" not in r else f"{r[f'{v}_img_s']:.1f}" + (
            f" ({r[f'{v}_speedup']:.2f}×)" if v != "eager_fp32" and r.get(f"{v}_speedup") else "")) for v in variants]
        fracs = " / ".join(f"{100 * r[f'{v}_peak_frac']:.0f}%" if f"{v}_img_s" in r else "—" for v in variants)
        lines.append(f"| {r['model']} | {r['source']} | {r['params_m']:.1f} | {r['gmacs']:.2f} | " + " | ".join(cells)
                     + f" | {fracs} |")
    return "\n".join(lines)


def format_latency(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: batch-1 (``latency_batch``) latency in ms of each variant, one line per model."""
    variants = [v for v in LATENCY_VARIANTS if any(f"{v}_latency_ms" in r or v in r.get("errors", {}) for r in rows)]
    if not variants:
        return ""
    lines = ["| model | batch | " + " | ".join(f"{_LABELS[v]} ms" for v in variants) + " |",
             "|---|---:|" + "---:|" * len(variants)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['latency_batch']} | " + " | ".join(
            f"{r[f'{v}_latency_ms']:.1f}" if f"{v}_latency_ms" in r else "failed" for v in variants) + " |")
    return "\n".join(lines)


def format_breakdown(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: per model and variant, one profiled pass split into dense MAC kernels and the rest, the measured
    speed-up over compiled bf16 and its ceiling (the speed-up if nothing but the variant's kernels took time)."""
    lines = ["| model | variant | pass ms | MAC kernels ms | other ms | × opt bf16 measured | × opt bf16 ceiling |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        for v in VARIANTS:
            if f"{v}_pass_ms" not in r:
                continue
            measured = (f"{r[f'{v}_img_s'] / r['opt_bf16_img_s']:.2f}×" if "opt_bf16_img_s" in r else "—")
            top = f"{r[f'{v}_ceiling_over_bf16']:.2f}×" if f"{v}_ceiling_over_bf16" in r else "—"
            lines.append(f"| {r['model']} | {_LABELS[v]} | {r[f'{v}_pass_ms']:.0f} | {r[f'{v}_kernel_ms']:.0f} | "
                         f"{r[f'{v}_other_ms']:.0f} | {measured} | {top} |")
    return "\n".join(lines)
