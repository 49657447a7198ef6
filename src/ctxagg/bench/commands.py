"""The `ctxagg bench` tools as library functions, each writing its results to its own folder.

- :func:`run_throughput` (``ctxagg bench throughput``): img/s, latency and peak memory over a grid of models,
  batch sizes, resolutions, dtypes and memory formats → bench.json, bench.csv, bench.png;
- :func:`run_sweep` (``ctxagg bench sweep``): memory and latency vs input size (LinGlos Fig. 4; Container vs
  Container-Light) → sweep_resolution.json, sweep_resolution.png;
- :func:`run_deploy` (``ctxagg bench deploy``): eager fp32 vs the optimised deploy path (fp32, bf16, int8) with the
  measured matmul peak, batch-1 latency, optionally timm's peers → compare_eager.json;
- :func:`run_train_bench` (``ctxagg bench train``): training img/s and peak memory of eager / compiled / bf16 /
  channels_last steps → bench_train.json.

``output`` None writes to a new ``runs/bench-<tool>-<YYYYmmdd-HHMMSS>`` folder; an explicit folder that already
holds results is refused before anything is measured, unless ``overwrite`` (see :mod:`ctxagg.runs`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..runs import output_dir

__all__ = ["run_throughput", "run_sweep", "run_deploy", "run_train_bench", "THROUGHPUT_OUTPUTS", "SWEEP_OUTPUTS",
           "DEPLOY_OUTPUTS", "TRAIN_OUTPUTS"]

THROUGHPUT_OUTPUTS = ("bench.json", "bench.csv", "bench.png")
SWEEP_OUTPUTS = ("sweep_resolution.json", "sweep_resolution.png")
DEPLOY_OUTPUTS = ("compare_eager.json",)
TRAIN_OUTPUTS = ("bench_train.json",)
Echo = Callable[[str], None]


def _say(echo: Optional[Echo], text: str) -> None:
    if echo is not None:
        echo(text)


def _throughput_line(r: dict[str, Any]) -> str:
    what = f"error {r['error']}" if r.get("error") else f"{r['latency_ms']:.2f} ms, {r['throughput']:.1f} img/s"
    return f"  {r['model']} b{r['batch_size']} {r['img_size']}px {r['dtype']} {r['memory_format']}: {what}"


def run_throughput(models: Sequence[str], batch_sizes: Sequence[int] = (1,), img_sizes: Sequence[int] = (224,),
                   dtypes: Sequence[str] = ("fp32",), memory_formats: Sequence[str] = ("contiguous",),
                   warmup: int = 2, repeats: int = 5, device: str = "cpu", memory: bool = True,
                   model_kwargs: Optional[dict[str, Any]] = None, output: Optional[str] = None,
                   overwrite: bool = False, echo: Optional[Echo] = print) -> dict[str, Any]:
    """Benchmark the grid (a configuration that fails becomes a row with ``error``) and write the results.
    Returns ``rows``, ``files`` and ``table`` (Markdown)."""
    from .throughput import benchmark_grid, format_results, write_results

    out = output_dir(output, "bench", "throughput", overwrite=overwrite, outputs=THROUGHPUT_OUTPUTS)
    rows = benchmark_grid(models, batch_sizes, img_sizes, dtypes, memory_formats, warmup, repeats, device, memory,
                          model_kwargs, progress=lambda r: _say(echo, _throughput_line(r)))
    table = format_results(rows)
    _say(echo, table)
    files = write_results(rows, out, meta=dict(model_kwargs=model_kwargs or {}))
    return dict(rows=rows, files=[str(f) for f in files], table=table, output=str(out))


def run_sweep(sizes: Sequence[int] = (224, 320, 448, 640, 800), batch: int = 16,
              families: Sequence[str] = ("linglos", "container"), warmup: int = 1, repeats: int = 3,
              max_seconds: float = 15.0, device: str = "cpu", output: Optional[str] = None, overwrite: bool = False,
              echo: Optional[Echo] = print) -> dict[str, Any]:
    """The resolution sweep of :mod:`ctxagg.bench.sweep`, written as JSON (with how memory was measured) and a
    plot. Returns ``rows``, ``files`` and ``table``."""
    from .sweep import format_sweep, plot_sweep, resolution_sweep

    out = output_dir(output, "bench", "sweep", overwrite=overwrite, outputs=SWEEP_OUTPUTS)
    threads = torch.get_num_threads()
    _say(echo, f"resolution sweep {list(families)}, batch {batch}, sizes {list(sizes)}, {device}, {threads} threads, "
               f"{max_seconds:g} s budget a pass")
    rows = resolution_sweep(sizes, batch, families, warmup, repeats, max_seconds, device,
                            progress=lambda r: _say(echo, f"  {r['model']} {r['size']}px: {r['status']}"))
    table = format_sweep(rows)
    _say(echo, table)
    measured = ("measured: torch.cuda.max_memory_allocated delta" if device.startswith("cuda") else
                "measured: peak live tensor bytes per ATen op (PeakTensorBytes)")
    meta = dict(batch=batch, sizes=list(sizes), device=device, threads=threads, torch=torch.__version__,
                max_seconds=max_seconds,
                memory=measured + "; materialised: the same counter on the meta device (SDPA math path)")
    files = [out / name for name in SWEEP_OUTPUTS]
    files[0].write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    plot_sweep(rows, files[1], title=f"memory and latency vs input size, batch {batch}, {device} ({threads} threads)")
    return dict(rows=rows, files=[str(f) for f in files], table=table, output=str(out))


def run_deploy(models: Optional[Sequence[str]] = None, batch: int = 32, size: int = 224, warmup: int = 1,
               repeats: int = 3, compile: bool = True, output: Optional[str] = None, overwrite: bool = False,
               int8: bool = True, latency_batch: Optional[int] = 1, device: str = "cpu", peers: bool = False,
               breakdown: bool = True, echo: Optional[Echo] = print) -> dict[str, Any]:
    """:func:`ctxagg.bench.deploy_compare.compare_eager` (default models: its ``DEFAULT_MODELS``; ``peers`` adds
    timm's ``PEER_MODELS``), written as JSON. Returns the comparison with ``files``."""
    from .deploy_compare import DEFAULT_MODELS, compare_eager, format_latency

    out = output_dir(output, "bench", "deploy", overwrite=overwrite, outputs=DEPLOY_OUTPUTS)
    result = compare_eager(list(models or DEFAULT_MODELS), batch, size, warmup=warmup, repeats=repeats,
                           compile=compile, int8=int8, latency_batch=latency_batch, device=device, peers=peers,
                           breakdown=breakdown, echo=echo)
    latency = format_latency(result["rows"])
    if latency:
        _say(echo, f"\nlatency at batch {latency_batch} (median of {repeats}):\n{latency}")
    path = Path(out) / DEPLOY_OUTPUTS[0]
    path.write_text(json.dumps(result, indent=2))
    return dict(result, files=[str(path)], output=str(out))


def run_train_bench(models: Sequence[str], batch: int = 32, size: int = 224,
                    variants: Sequence[str] = ("eager", "compiled", "eager_bf16", "compiled_bf16"), warmup: int = 2,
                    repeats: int = 5, device: str = "cpu", memory: bool = True, output: Optional[str] = None,
                    overwrite: bool = False, breakdown: bool = True, echo: Optional[Echo] = print) -> dict[str, Any]:
    """:func:`ctxagg.bench.train_speed.measure_training` for each model (with the machine's fp32 and bf16 matmul
    peaks), written as JSON. Returns ``rows``, ``files`` and ``table``."""
    from .deploy_compare import matmul_peak_gmacs
    from .train_speed import format_training, measure_training

    out = output_dir(output, "bench", "train", overwrite=overwrite, outputs=TRAIN_OUTPUTS)
    _say(echo, f"training step (forward + backward + AdamW), batch {batch}, {size}², {device}, "
               f"{torch.get_num_threads()} threads; variants {list(variants)}, timed round-robin")
    peaks = {name: matmul_peak_gmacs(dtype, device=device) for name, dtype in
             (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    _say(echo, "matmul peak (2048³): " + ", ".join(f"{k} {v:.1f} GMAC/s" for k, v in peaks.items())
         + "; a training step counted as 3× the forward MACs")
    rows = []
    for name in models:
        rows += measure_training(name, batch, size, variants, warmup, repeats, device, memory, breakdown=breakdown,
                                 peaks=peaks)
        _say(echo, format_training(rows[-len(variants):]))
    table = format_training(rows)
    path = Path(out) / TRAIN_OUTPUTS[0]
    meta = dict(batch=batch, size=size, device=device, threads=torch.get_num_threads(), torch=torch.__version__,
                timing="round-robin over variants", peak_gmacs=peaks, memory="torch.cuda.max_memory_allocated delta" if
                device.startswith("cuda") else "peak running total of the CPU allocator (torch.profiler)")
    path.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    return dict(rows=rows, files=[str(path)], table=table, output=str(out))
