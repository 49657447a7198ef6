"""LinGlos Figure 4 (§5.2): peak memory and latency vs input size, key-only vs dot-product attention.

Kept for its old entry point; the sweep now lives in :mod:`ctxagg.bench.sweep` and the memory counter in
:mod:`ctxagg.bench.throughput`. Equivalent to ``ctxagg bench --sweep resolution --families linglos``::

    python -m ctxagg.bench.linglos_fig4 --sizes 224,320,448 --batch 16 --out DIR
"""
from __future__ import annotations

from typing import Optional

from .throughput import PeakTensorBytes, peak_tensor_bytes

__all__ = ["PeakTensorBytes", "peak_tensor_bytes", "main"]


def main(argv: Optional[list[str]] = None) -> int:
    from ..cli import main as cli_main

    argv = list(argv or [])
    out = ["--out", "linglos_fig4"] if "--out" not in argv else []
    rename = {"--batch": "--batch-sizes", "--sizes": "--img-sizes", "--reps": "--repeats"}
    return cli_main(["bench", "--sweep", "resolution", "--families", "linglos",
                     *[rename.get(a, a) for a in argv], *out])


if __name__ == "__main__":
    raise SystemExit(main(__import__("sys").argv[1:]))
