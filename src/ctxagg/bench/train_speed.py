"""`ctxagg bench train`: training speed and peak memory of one optimiser step (forward + backward + AdamW step) under
each switch `ctxagg train` offers: eager or ``--compile``, fp32 or bf16 autocast (``--amp``), contiguous or
``--channels-last``.

Every variant trains its own copy of the same initial weights on the same batch. After warm-up (the first step
of a compiled variant includes its compilation, reported as ``first_step_s``), timing is **round-robin**: each
repeat times one step of every variant in turn, so a change in the machine's load (other processes) touches all
variants alike and the ratios stay comparable.

Peak memory of a step, above what was allocated before it (weights, optimiser state, the batch):
- CUDA: ``torch.cuda.max_memory_allocated``;
- CPU: the largest running total of the CPU allocator's allocations recorded by ``torch.profiler``
  (``profile_memory``) during one step. Unlike :class:`~ctxagg.bench.throughput.PeakTensorBytes` it also sees
  the buffers a compiled (inductor) graph allocates in C++, so eager and compiled are counted alike; kernels'
  private scratch (oneDNN) is not counted.

With ``breakdown`` (default), one more profiled step of every variant splits it into dense MAC kernels
(convolutions and matmuls, forward and backward) and the rest (:mod:`ctxagg.bench.kernel_split`): the first
variant's step time ÷ a variant's kernel time is its ceiling, the speed-up it would reach if nothing but its
kernels took time. On CPUs inductor leaves those kernels to oneDNN/MKL, so this bounds what ``--compile`` can buy.
With ``peaks`` (the matmul peaks of :func:`~ctxagg.bench.deploy_compare.matmul_peak_gmacs`), each row also gets
the fraction of the peak of its precision its step reaches, counting a training step as 3× the forward MACs
(forward, gradient of the input, gradient of the weights).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .complexity import count_gmacs
from .kernel_split import ceiling, kernel_split
from .throughput import build_bench_model, round_robin_times, summarise_times

__all__ = ["TRAIN_VARIANTS", "TrainVariant", "training_step", "step_peak_bytes", "measure_training",
           "format_training"]


@dataclass(frozen=True)
class TrainVariant:
    """One combination of `ctxagg train`'s speed switches."""
    name: str
    compile: bool = False
    bf16: bool = False
    channels_last: bool = False


TRAIN_VARIANTS = {v.name: v for v in (
    TrainVariant("eager"), TrainVariant("compiled", compile=True),
    TrainVariant("eager_bf16", bf16=True), TrainVariant("compiled_bf16", compile=True, bf16=True),
    TrainVariant("eager_cl", channels_last=True), TrainVariant("compiled_cl", compile=True, channels_last=True),
    TrainVariant("compiled_cl_bf16", compile=True, bf16=True, channels_last=True))}


def training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, variant: TrainVariant,
                  lr: float = 1e-4) -> Callable[[], float]:
    """A closure doing one AdamW step of ``model`` (trained in place) on ``(x, y)`` as `ctxagg train` does under
    ``variant``; returns the loss. The model is compiled in place, as ``--compile`` does."""
    fmt = torch.channels_last if variant.channels_last else torch.contiguous_format
    model.train().to(memory_format=fmt)
    x = x.contiguous(memory_format=fmt)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    if variant.compile:
        from ..train.engine import COMPILE_OPTIONS
        model.compile(**COMPILE_OPTIONS)
    device_type = x.device.type

    def step() -> float:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=variant.bf16):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def _walk(nodes):
    for node in nodes:
        yield node
        yield from _walk(node.children)


def step_peak_bytes(step: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated during one ``step()`` above what was held before it (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch._C._profiler import _EventType

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    totals = [(n.start_time_ns, n.extra_fields.total_allocated, n.extra_fields.alloc_size)
              for n in _walk(prof.profiler.kineto_results.experimental_event_tree())
              if n.tag == _EventType.Allocation and n.extra_fields.device.type == "cpu"]
    if not totals:
        return 0
    totals.sort()
    base = totals[0][1] - totals[0][2]  # the running total just before the step's first allocation
    return max(total for _, total, _ in totals) - base


def _variant_rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor, variants: Sequence[TrainVariant],
                  warmup: int, memory: bool) -> list[dict[str, Any]]:
    """Build, warm up (timing the first step) and memory-count every variant; returns rows holding their step."""
    import time

    rows = []
    for variant in variants:
        torch.manual_seed(0)
        net = copy.deepcopy(model)
        step = training_step(net, x, y, variant)
        start = time.perf_counter()
        first_loss = step()
        first = time.perf_counter() - start
        for _ in range(max(warmup - 1, 0)):
            step()
        peak = step_peak_bytes(step, x.device) if memory else None
        rows.append(dict(variant=variant.name, compile=variant.compile, bf16=variant.bf16,
                         channels_last=variant.channels_last, first_step_s=first, first_loss=first_loss,
                         peak_mb=None if peak is None else peak / 2 ** 20, _step=step))
    return rows


def measure_training(model_name: str, batch_size: int = 32, img_size: int = 224,
                     variants: Sequence[str] = ("eager", "compiled", "eager_bf16", "compiled_bf16"),
                     warmup: int = 2, repeats: int = 5, device: str = "cpu", memory: bool = True,
                     num_classes: int = 1000, model_kwargs: Optional[dict[str, Any]] = None, breakdown: bool = True,
                     peaks: Optional[dict[str, float]] = None) -> list[dict[str, Any]]:
    """One row per variant of ``model_name``: step latency (median, IQR), training img/s, the speed-up over the
    first variant, peak memory of a step, the first (compiling) step's seconds and, with ``breakdown`` and
    ``peaks``, the kernel / other split, the ceiling over the first variant and the fraction of the matmul peak
    (see the module docstring)."""
    unknown = [v for v in variants if v not in TRAIN_VARIANTS]
    if unknown or not variants:
        raise ConfigError(f"unknown training variants {unknown}; choose from {list(TRAIN_VARIANTS)}")
    if warmup < 1 or repeats < 1 or batch_size < 1:
        raise ConfigError("need warmup >= 1 (the first step compiles), repeats >= 1 and batch_size >= 1")
    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_bench_model(model_name, img_size, num_classes=num_classes, **(model_kwargs or {})).to(dev)
    x = torch.randn(batch_size, 3, img_size, img_size, device=dev)
    y = torch.randint(0, num_classes, (batch_size,), device=dev)
    rows = _variant_rows(model, x, y, [TRAIN_VARIANTS[v] for v in variants], warmup, memory)
    times = round_robin_times({index: row["_step"] for index, row in enumerate(rows)}, repeats, dev)
    if breakdown:
        for row in rows:
            row.update({key.replace("total", "step"): value for key, value in kernel_split(row["_step"], dev).items()})
            row["ceiling"] = ceiling(rows[0]["step_ms"], row["kernel_ms"])
    train_gmacs = 3 * count_gmacs(model, (3, img_size, img_size))
    base = None
    for index, row in enumerate(rows):
        row.pop("_step")
        row.update(model=model_name, batch_size=batch_size, img_size=img_size, device=str(dev), repeats=repeats,
                   threads=torch.get_num_threads(), times_ms=times[index],
                   **summarise_times(times[index], batch_size))
        base = base or row["throughput"]
        row["speedup"] = row["throughput"] / base
        row["train_gmacs_per_img"] = train_gmacs
        if peaks:
            row["peak_frac"] = train_gmacs * row["throughput"] / peaks["bf16" if row["bf16"] else "fp32"]
    return rows


def format_training(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table: one line per model and variant (the breakdown and peak columns where measured)."""
    lines = ["| model | variant | batch | size | step ms (median) | IQR ms | train img/s | × first variant | "
             "ceiling × first | MAC kernels ms | other ms | % of peak | peak MB | first step s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        return "—" if row.get(key) is None else format(row[key], fmt)

    for r in rows:
        percent = "—" if r.get("peak_frac") is None else f"{100 * r['peak_frac']:.0f}%"
        lines.append(f"| {r['model']} | {r['variant']} | {r['batch_size']} | {r['img_size']} | {r['latency_ms']:.0f} | "
                     f"{r['latency_iqr_ms']:.0f} | {r['throughput']:.2f} | {r['speedup']:.2f}× | "
                     f"{cell(r, 'ceiling', '.2f')}{'×' if r.get('ceiling') else ''} | {cell(r, 'kernel_ms', '.0f')} | "
                     f"{cell(r, 'other_ms', '.0f')} | {percent} | {cell(r, 'peak_mb', '.0f')} | "
                     f"{r['first_step_s']:.1f} |")
    return "\n".join(lines)
