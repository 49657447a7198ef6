"""LinGlos Figure 4 (§5.2): peak memory and latency vs input size, key-only vs dot-product attention.

    python -m ctxagg.bench.linglos_fig4 --sizes 224,320,448 --batch 16 --out DIR

Compares a LinGlo model with its twin whose every key-only attention is dot-product attention (the paper:
LinGlo-b0 vs LinGlo-b0 with dot-product attention, batch 16, inference, on a V100). Both run re-parameterised
(deployed), in eval mode, under ``torch.no_grad``.

Memory (CPU): the peak of the bytes held by live tensors created during one forward pass, counted at the
ATen-op level by :class:`PeakTensorBytes` (a dispatch mode tracking each output's storage until it is freed);
weights and the input are not included, nor the private scratch of fused kernels. Dot-product attention is
measured two ways: ``dot (materialised)`` — softmax(QKᵀ/√d)V with the N×N scores stored, as 2022 code (and
the paper's measurement) did; its memory is counted on the ``meta`` device (exact, nothing allocated, any
size) and its latency only where that peak fits ``--math-budget-gb`` — and ``dot (fused)``, PyTorch's fused
SDPA kernel, which never stores the scores (memory then grows linearly, time stays quadratic). On CUDA
(``--device cuda``) memory is ``torch.cuda.max_memory_allocated`` minus the allocation before the pass.
Latency is the median wall time of ``--reps`` passes after one warm-up pass.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import weakref
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Optional

import timm
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import ctxagg.models.linglos  # noqa: F401  (registers the LinGlo models in timm)

__all__ = ["PeakTensorBytes", "peak_tensor_bytes", "run", "main"]


class PeakTensorBytes(TorchDispatchMode):
    """Tracks the bytes of live tensor storages produced by ATen ops while active; ``peak`` is the maximum.

    Views share a storage and are counted once (views of tensors made outside the mode, such as a transposed
    weight, not at all); a storage leaves the count when the last tensor created
    under the mode that refers to it is freed (``weakref.finalize``). Works on any device, ``meta`` included.
    ``largest`` is the largest single storage seen.
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


def _build(arch: str, attention: str, device: str) -> nn.Module:
    model = timm.create_model(arch, attention=attention).eval()
    return timm.models.reparameterize_model(model, inplace=True).to(device)


def _timed(model: nn.Module, x: torch.Tensor, reps: int) -> float:
    times = []
    for _ in range(reps):
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _measure(model: nn.Module, x: torch.Tensor, reps: int, backend: Optional[SDPBackend]) -> tuple[float, float]:
    """(peak MB, latency ms): the warm-up pass is the counted pass."""
    with torch.no_grad(), sdpa_kernel([backend]) if backend is not None else nullcontext():
        if x.is_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            model(x)
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = peak_tensor_bytes(lambda: model(x))
        return peak / 2 ** 20, _timed(model, x, reps)


def _materialised_peak_mb(arch: str, batch: int, size: int) -> float:
    """Peak MB of dot-product attention with stored N×N scores, counted on the meta device."""
    model = timm.create_model(arch, attention="dot").eval()
    model = timm.models.reparameterize_model(model, inplace=True).to("meta")
    x = torch.empty(batch, 3, size, size, device="meta")
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        return peak_tensor_bytes(lambda: model(x)) / 2 ** 20


def run(arch: str = "linglo_b0", sizes: tuple[int, ...] = (224, 320, 448), batch: int = 16, reps: int = 1,
        device: str = "cpu", math_budget_gb: float = 2.0) -> list[dict[str, Any]]:
    """One row per (input size, attention): peak memory (MB) and latency (ms)."""
    torch.manual_seed(0)
    key_only, dot = _build(arch, "key_only", device), _build(arch, "dot", device)
    rows = []
    for size in sizes:
        x = torch.randn(batch, 3, size, size, device=device)
        mem, ms = _measure(key_only, x, reps, None)
        rows.append(dict(size=size, attention="key_only", peak_mb=mem, latency_ms=ms))
        mem, ms = _measure(dot, x, reps, None)
        rows.append(dict(size=size, attention="dot (fused)", peak_mb=mem, latency_ms=ms))
        if device == "cpu":
            mem = _materialised_peak_mb(arch, batch, size)
            ms = _measure(dot, x, reps, SDPBackend.MATH)[1] if mem <= math_budget_gb * 1024 else None
        else:
            mem, ms = _measure(dot, x, reps, SDPBackend.MATH)
        rows.append(dict(size=size, attention="dot (materialised)", peak_mb=mem, latency_ms=ms))
        print(f"  {size}px done", flush=True)
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'size':>5}  {'attention':<19} {'peak MB':>10} {'latency ms':>11}"]
    for r in rows:
        ms = f"{r['latency_ms']:11.0f}" if r["latency_ms"] is not None else f"{'skipped':>11}"
        lines.append(f"{r['size']:>5}  {r['attention']:<19} {r['peak_mb']:10.1f} {ms}")
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], arch: str, batch: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, style in zip(dict.fromkeys(r["attention"] for r in rows), ("o-", "s--", "^:")):
        sel = [r for r in rows if r["attention"] == name]
        axes[0].plot([r["size"] for r in sel], [r["peak_mb"] for r in sel], style, label=name)
        timed = [r for r in sel if r["latency_ms"] is not None]
        axes[1].plot([r["size"] for r in timed], [r["latency_ms"] for r in timed], style, label=name)
    for ax, label in zip(axes, ("peak activation memory (MB)", "latency (ms)")):
        ax.set_xlabel("input size (px)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{arch}: key-only vs dot-product attention, batch {batch} (LinGlos Fig. 4)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="linglo_b0", help="LinGlo model; its twin uses attention='dot'")
    parser.add_argument("--sizes", default="224,320,448", help="comma-separated square input sizes")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--reps", type=int, default=1, help="timed passes after the warm-up pass")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--math-budget-gb", type=float, default=2.0,
                        help="CPU: time the materialised dot-product only when its counted peak fits")
    parser.add_argument("--out", default="linglos_fig4", help="output folder for JSON and PNG")
    args = parser.parse_args(argv)
    sizes = tuple(int(s) for s in args.sizes.split(","))
    print(f"{args.arch} vs dot-product twin, batch {args.batch}, {args.device}, "
          f"{torch.get_num_threads()} threads", flush=True)
    rows = run(args.arch, sizes, args.batch, args.reps, args.device, args.math_budget_gb)
    print(_table(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(arch=args.arch, batch=args.batch, reps=args.reps, device=args.device,
                threads=torch.get_num_threads(), torch=torch.__version__,
                memory=("torch.cuda.max_memory_allocated delta" if args.device == "cuda" else
                        "peak live tensor bytes per ATen op (PeakTensorBytes); materialised dot counted on meta"))
    (out / "linglos_fig4.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    _plot(rows, args.arch, args.batch, out / "linglos_fig4.png")
    print(f"wrote {out / 'linglos_fig4.json'} and {out / 'linglos_fig4.png'}")


if __name__ == "__main__":
    main()
