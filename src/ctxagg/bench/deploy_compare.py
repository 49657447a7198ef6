"""`ctxagg bench --compare-eager`: eager fp32 vs the deploy path (fp32 and bf16), with the machine's
measured matrix-multiply peak so every figure is also a fraction of what the hardware can do."""
from __future__ import annotations

import time
from typing import Any, Sequence

import timm
import torch

from ..export import optimize
from .complexity import count_gmacs
from .throughput import benchmark

__all__ = ["matmul_peak_gmacs", "compare_eager", "format_compare", "DEFAULT_MODELS"]

DEFAULT_MODELS = ("container_light", "container", "linglo_b1", "resnet50_lesa", "deit_s")


def matmul_peak_gmacs(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 7) -> float:
    """Median multiply-accumulates per second (G) of an n×n×n matmul: the machine's practical peak."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return n ** 3 / sorted(times)[repeats // 2] / 1e9


def compare_eager(models: Sequence[str] = DEFAULT_MODELS, batch_size: int = 32, img_size: int = 224,
                  warmup: int = 1, repeats: int = 3, compile: bool = True) -> dict[str, Any]:
    """For each model: eager fp32, optimised fp32 and optimised bf16 throughput, their ratios, and the
    achieved fraction of the measured fp32 / bf16 matmul peak (GMACs per image × img/s ÷ peak)."""
    peaks = dict(fp32=matmul_peak_gmacs(torch.float32), bf16=matmul_peak_gmacs(torch.bfloat16))
    rows = []
    for name in models:
        torch.manual_seed(0)
        model = timm.create_model(name).eval()
        gmacs = count_gmacs(model, (3, img_size, img_size))
        row: dict[str, Any] = dict(model=name, batch_size=batch_size, img_size=img_size, gmacs=gmacs)
        variants = (("eager_fp32", model, "fp32"),
                    ("opt_fp32", optimize(model, compile=compile, compile_mode="default"), "fp32"),
                    ("opt_bf16", optimize(model, bf16=True, compile=compile, compile_mode="default"), "bf16"))
        for key, net, precision in variants:
            result = benchmark(net, batch_size, img_size, "fp32", warmup=warmup, repeats=repeats, memory=False,
                               label=f"{name}:{key}")
            row[f"{key}_img_s"] = result["throughput"]
            row[f"{key}_peak_frac"] = gmacs * result["throughput"] / peaks[precision]
        row["opt_fp32_speedup"] = row["opt_fp32_img_s"] / row["eager_fp32_img_s"]
        row["opt_bf16_speedup"] = row["opt_bf16_img_s"] / row["eager_fp32_img_s"]
        rows.append(row)
        print(format_compare([row], peaks, header=not rows[:-1]), flush=True)
    return dict(peak_gmacs=peaks, threads=torch.get_num_threads(), compiled=compile, rows=rows)


def format_compare(rows: Sequence[dict[str, Any]], peaks: dict[str, float], header: bool = True) -> str:
    lines = []
    if header:
        lines += [f"matmul peak (2048³): fp32 {peaks['fp32']:.1f} GMAC/s, bf16 {peaks['bf16']:.1f} GMAC/s",
                  "| model | GMACs/img | eager fp32 img/s | opt fp32 img/s (×) | opt bf16 img/s (×) | "
                  "% of fp32 peak: eager / opt | % of bf16 peak: opt |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['gmacs']:.2f} | {r['eager_fp32_img_s']:.1f} | "
                     f"{r['opt_fp32_img_s']:.1f} ({r['opt_fp32_speedup']:.2f}×) | "
                     f"{r['opt_bf16_img_s']:.1f} ({r['opt_bf16_speedup']:.2f}×) | "
                     f"{100 * r['eager_fp32_peak_frac']:.0f}% / {100 * r['opt_fp32_peak_frac']:.0f}% | "
                     f"{100 * r['opt_bf16_peak_frac']:.0f}% |")
    return "\n".join(lines)
