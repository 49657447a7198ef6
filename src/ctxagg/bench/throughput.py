"""Throughput, latency and peak memory of a model forward pass (`ctxagg bench`).

:func:`benchmark` measures one configuration — model, batch size, resolution, dtype (fp32, or bf16/fp16
autocast), memory format (contiguous or channels_last), device — and returns a plain dict: latency median
and inter-quartile range over ``repeats`` timed passes after ``warmup`` untimed ones, throughput in
images/s, and peak memory. It takes a registered model name or an already-built ``nn.Module`` (eager,
``torch.compile``'d or re-parameterised), so other comparisons can be built on it.

Peak memory:
- CPU: the peak of the bytes held by live tensors created during one forward pass, counted at the ATen-op
  level by :class:`PeakTensorBytes` (a dispatch mode tracking each output storage until it is freed).
  Weights and the input are excluded, and so is the private scratch of fused kernels (oneDNN, flash
  attention). It is deterministic and per configuration, unlike the process RSS high-water mark.
  The count is taken on the first warm-up pass (or on an extra pass when ``warmup == 0``), never on a
  timed pass, because the dispatch mode slows every op down.
- CUDA: ``torch.cuda.max_memory_allocated`` during the pass minus the allocation before it.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
import time
import weakref
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..errors import ConfigError

__all__ = ["PeakTensorBytes", "peak_tensor_bytes", "benchmark", "benchmark_grid", "build_bench_model",
           "time_passes", "summarise_times", "write_results", "format_results", "DTYPES", "MEMORY_FORMATS"]

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


class PeakTensorBytes(TorchDispatchMode):
    """Tracks the bytes of live tensor storages produced by ATen ops while active; ``peak`` is the maximum.

    Views share a storage and are counted once (views of tensors made outside the mode, such as a transposed
    weight, not at all); a storage leaves the count when the last tensor created under the mode that refers
    to it is freed (``weakref.finalize``). Works on any device, ``meta`` included (there it counts what a
    real run would allocate, with nothing allocated). ``largest`` is the largest single storage seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage id -> [nbytes, tensors alive]
        self.current = 0
        self.peak = 0
        self.largest = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                storage = leaf.untyped_storage()
                key = storage._cdata
                if key in self.live:
                    self.live[key][1] += 1
                elif key in inputs:  # a view of memory that existed before (weights, the input): not counted
                    continue
                else:
                    self.live[key] = [storage.nbytes(), 1]
                    self.current += storage.nbytes()
                    self.largest = max(self.largest, storage.nbytes())
                weakref.finalize(leaf, self._release, key)
        self.peak = max(self.peak, self.current)
        return out


def peak_tensor_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes of live tensors created while running ``fn()`` (its result is dropped before returning)."""
    with PeakTensorBytes() as counter:
        fn()
    return counter.peak


def build_bench_model(name: str, img_size: int = 224, **kwargs: Any) -> nn.Module:
    """A registered model in eval mode; fixed-size models (token MLPs) are built for ``img_size``."""
    import timm

    import ctxagg  # noqa: F401  (registers the models)

    if timm.get_pretrained_cfg_value(name, "fixed_input_size"):
        kwargs.setdefault("img_size", img_size)
    return timm.create_model(name, **kwargs).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_passes(fn: Callable[[], Any], repeats: int, device: torch.device) -> list[float]:
    """Wall time in ms of ``repeats`` calls of ``fn`` (CUDA synchronised around each)."""
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def round_robin_times(fns: dict[Any, Callable[[], Any]], repeats: int, device: torch.device
                      ) -> dict[Any, list[float]]:
    """Wall time in ms of ``repeats`` calls of each function, timed in rounds (one call of every function per
    round), so a change in the machine's load touches all of them alike."""
    times: dict[Any, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name] += time_passes(fn, 1, device)
    return times


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of sorted values."""
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarise_times(times_ms: Sequence[float], batch_size: int) -> dict[str, float]:
    """Median, quartiles, IQR, min and mean latency (ms) and the matching throughputs (images/s)."""
    s = sorted(times_ms)
    median, q1, q3 = statistics.median(s), _quantile(s, 0.25), _quantile(s, 0.75)
    return dict(latency_ms=median, latency_q1_ms=q1, latency_q3_ms=q3, latency_iqr_ms=q3 - q1,
                latency_min_ms=s[0], latency_mean_ms=statistics.fmean(s),
                throughput=batch_size * 1e3 / median,
                throughput_q1=batch_size * 1e3 / q3, throughput_q3=batch_size * 1e3 / q1)


def _autocast(device: torch.device, dtype: str):
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return nullcontext() if DTYPES[dtype] is None else torch.autocast(device.type, dtype=DTYPES[dtype])


@torch.no_grad()
def benchmark(model: Union[str, nn.Module], batch_size: int = 1, img_size: Union[int, tuple[int, int]] = 224,
              dtype: str = "fp32", memory_format: str = "contiguous", warmup: int = 2, repeats: int = 5, device: str = "cpu",
              memory: bool = True, model_kwargs: Optional[dict[str, Any]] = None, label: Optional[str] = None,
              in_chans: int = 3) -> dict[str, Any]:
    """Measure one inference configuration; see the module docstring for what is measured and how.

    ``model``: a registered name (built with ``model_kwargs``, in eval mode) or a module, which is put in
    eval mode and moved to ``device`` and ``memory_format`` *in place*. ``dtype``: ``fp32``, or ``bf16`` /
    ``fp16`` autocast (weights stay fp32); ``img_size`` is a side or (H, W). Returns a JSON-able dict (see
    :func:`summarise_times` for the timing keys; ``peak_mb`` is None when ``memory`` is off).
    """
    if memory_format not in MEMORY_FORMATS:
        raise ConfigError(f"unknown memory format {memory_format!r}; choose one of {sorted(MEMORY_FORMATS)}")
    if repeats < 1 or warmup < 0 or batch_size < 1:
        raise ConfigError("need repeats >= 1, warmup >= 0 and batch_size >= 1")
    dev = torch.device(device)
    name = label or (model if isinstance(model, str) else getattr(model, "model_name", type(model).__name__))
    net = build_bench_model(model, img_size, **(model_kwargs or {})) if isinstance(model, str) else model
    fmt = MEMORY_FORMATS[memory_format]
    net = net.eval().to(dev, memory_format=fmt)
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    x = torch.randn(batch_size, in_chans, height, width, device=dev).contiguous(memory_format=fmt)

    def forward() -> None:
        with torch.no_grad(), _autocast(dev, dtype):  # inference: no autograd graph, no saved activations
            net(x)

    peak = None
    if memory:
        if dev.type == "cuda":
            _sync(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
            forward()
            _sync(dev)
            peak = torch.cuda.max_memory_allocated(dev) - base
        else:
            peak = peak_tensor_bytes(forward)
    time_passes(forward, max(warmup - (1 if memory else 0), 0), dev)  # the counted pass is the first warm-up
    times = time_passes(forward, repeats, dev)
    params = sum(p.numel() for p in net.parameters())
    return dict(model=name, batch_size=batch_size, img_size=img_size, dtype=dtype, memory_format=memory_format,
                device=str(dev), threads=torch.get_num_threads(), warmup=max(warmup, 1 if memory else 0),
                repeats=repeats, params_m=params / 1e6, **summarise_times(times, batch_size),
                peak_mb=None if peak is None else peak / 2 ** 20,
                memory_method=None if peak is None else (
                    "torch.cuda.max_memory_allocated delta" if dev.type == "cuda"
                    else "peak live tensor bytes per ATen op (PeakTensorBytes)"),
                times_ms=times)


def benchmark_grid(models: Sequence[str], batch_sizes: Sequence[int], img_sizes: Sequence[int],
                   dtypes: Sequence[str] = ("fp32",), memory_formats: Sequence[str] = ("contiguous",),
                   warmup: int = 2, repeats: int = 5, device: str = "cpu", memory: bool = True,
                   model_kwargs: Optional[dict[str, Any]] = None,
                   progress: Optional[Callable[[dict[str, Any]], None]] = None) -> list[dict[str, Any]]:
    """:func:`benchmark` over the product of the options; a configuration that fails (a fixed-size model
    at another resolution, a dtype the device lacks) becomes a row with ``error`` instead of stopping."""
    rows = []
    for name in models:
        for img_size in img_sizes:
            torch.manual_seed(0)
            try:
                net: Optional[nn.Module] = build_bench_model(name, img_size, **(model_kwargs or {}))
                error = None
            except Exception as exc:  # noqa: BLE001 - reported in the row
                net, error = None, f"{type(exc).__name__}: {exc}"
            for fmt in memory_formats:
                for dtype in dtypes:
                    for batch in batch_sizes:
                        base = dict(model=name, batch_size=batch, img_size=img_size, dtype=dtype,
                                    memory_format=fmt, device=device)
                        if net is None:
                            row = dict(base, error=error)
                        else:
                            try:
                                row = benchmark(net, batch, img_size, dtype, fmt, warmup, repeats, device, memory,
                                                label=name)
                            except Exception as exc:  # noqa: BLE001
                                row = dict(base, error=f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
                        rows.append(row)
                        if progress:
                            progress(row)
            del net
    return rows


_COLUMNS = ("model", "batch_size", "img_size", "dtype", "memory_format", "device", "threads", "params_m",
            "latency_ms", "latency_q1_ms", "latency_q3_ms", "latency_iqr_ms", "latency_min_ms", "latency_mean_ms",
            "throughput", "throughput_q1", "throughput_q3", "peak_mb", "memory_method", "warmup", "repeats",
            "times_ms", "error")


def format_results(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of the results."""
    lines = ["| model | batch | size | dtype | format | latency ms (median) | IQR ms | img/s | peak MB |",
             "|---|---:|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        head = f"| {r['model']} | {r['batch_size']} | {r['img_size']} | {r['dtype']} | {r['memory_format']} |"
        if r.get("error"):
            lines.append(f"{head} error: {r['error'][:80]} | | | |")
            continue
        peak = "—" if r.get("peak_mb") is None else f"{r['peak_mb']:.1f}"
        lines.append(f"{head} {r['latency_ms']:.2f} | {r['latency_iqr_ms']:.2f} | {r['throughput']:.1f} | {peak} |")
    return "\n".join(lines)


def _plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.get("error")]
    labels = [f"{r['model']} b{r['batch_size']} {r['img_size']}px {r['dtype']} "
              f"{'CL' if r['memory_format'] == 'channels_last' else 'NCHW'}" for r in ok]
    height = max(2.5, 0.3 * len(ok) + 1.2)
    fig, axes = plt.subplots(1, 2, figsize=(11, height), sharey=True)
    ys = range(len(ok))
    thr = [r["throughput"] for r in ok]
    err = [[r["throughput"] - r["throughput_q1"] for r in ok], [r["throughput_q3"] - r["throughput"] for r in ok]]
    axes[0].barh(ys, thr, xerr=err, color="tab:blue", capsize=3)
    axes[0].set_xlabel("throughput (img/s), median; bars: IQR")
    axes[0].set_yticks(list(ys), labels, fontsize=8)
    axes[0].invert_yaxis()
    axes[1].barh(ys, [r.get("peak_mb") or 0 for r in ok], color="tab:orange")
    axes[1].set_xlabel("peak activation memory (MB)")
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    device = ok[0]["device"] if ok else "?"
    fig.suptitle(f"ctxagg bench on {device}, {torch.get_num_threads()} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_results(rows: Sequence[dict[str, Any]], out: Union[str, Path], stem: str = "bench",
                  meta: Optional[dict[str, Any]] = None) -> list[Path]:
    """``<stem>.json`` (meta + rows), ``<stem>.csv`` and ``<stem>.png`` under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), **(meta or {}))
    paths = [out / f"{stem}.json", out / f"{stem}.csv", out / f"{stem}.png"]
    paths[0].write_text(json.dumps(dict(meta=meta, rows=list(rows)), indent=2))
    with open(paths[1], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "times_ms": ";".join(f"{t:.3f}" for t in r.get("times_ms", []))})
    _plot(rows, paths[2])
    return paths
