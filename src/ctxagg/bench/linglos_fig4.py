"""LinGlos Figure 4 (§5.2): peak memory and latency vs input size, key-only vs dot-product attention.

Kept for its old entry point; the sweep lives in :mod:`ctxagg.bench.sweep` (written by
:func:`ctxagg.bench.commands.run_sweep`) and the memory counter in :mod:`ctxagg.bench.throughput`. Equivalent to
``ctxagg bench sweep --families linglos``::

    python -m ctxagg.bench.linglos_fig4 --sizes 224,320,448 --batch 16 --reps 3 --output DIR
"""
from __future__ import annotations

import argparse
from typing import Optional

from .commands import run_sweep
from .throughput import PeakTensorBytes, peak_tensor_bytes

__all__ = ["PeakTensorBytes", "peak_tensor_bytes", "main"]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ctxagg.bench.linglos_fig4", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="224,320,448,640,800", help="comma-separated square input sizes")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=3, help="timed passes (as many as fit --max-seconds)")
    p.add_argument("--max-seconds", type=float, default=15.0)
    p.add_argument("--output", "--out", dest="output", help="output folder (default: a new runs/bench-sweep-*)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    run_sweep(sizes, args.batch, ("linglos",), repeats=args.reps, max_seconds=args.max_seconds, output=args.output,
              overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
