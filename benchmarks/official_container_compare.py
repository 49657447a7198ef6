"""Official Container-Light against ctxagg's, side by side in one process on the same input.

The official model is allenai/container's ``container_v1_light`` (models.py of a checkout you provide; this
repository does not vendor it); ours is ``timm.create_model("container_light")`` with the official weights
loaded through ``ctxagg.models.container.checkpoint_filter_fn``, so both compute the same function (the
script prints the largest output difference). Three settings, each run on both models with identical
treatment through ``ctxagg.export.optimize`` (a no-op re-parameterisation for the official model, which has
no folds to apply):

- ``eager fp32``: the model as built, contiguous memory;
- ``compiled fp32``: channels_last + ``torch.compile`` with inductor freezing;
- ``compiled bf16``: the same under bf16 autocast.

Usage::

    git clone https://github.com/allenai/container /path/to/container
    python benchmarks/official_container_compare.py --official /path/to/container --batch 32 --repeats 5

The figures are img/s (median of ``--repeats`` timed passes after ``--warmup``); the ratio is ours ÷ official.
Settings alternate between the two models, so a machine whose load drifts affects both alike; still, on a
shared machine, repeat the run before quoting a ratio.
"""
from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
from pathlib import Path
from typing import Any, Callable

import timm
import torch
from torch import nn

import ctxagg  # noqa: F401  (registers container_light)
from ctxagg.bench.throughput import benchmark
from ctxagg.export import optimize
from ctxagg.models.container import checkpoint_filter_fn

SETTINGS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "eager fp32": lambda model: model,
    "compiled fp32 (channels_last, freezing)": lambda model: optimize(model, compile=True),
    "compiled bf16 autocast (channels_last, freezing)": lambda model: optimize(model, bf16=True, compile=True),
}


def load_official(path: Path) -> nn.Module:
    """``container_v1_light()`` from the official models.py (``path`` is the checkout or the file itself)."""
    file = path / "models.py" if path.is_dir() else path
    if not file.is_file():
        raise SystemExit(f"--official: no models.py at {file}; pass a checkout of github.com/allenai/container")
    spec = importlib.util.spec_from_file_location("allenai_container_models", file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its @register_model looks the module up by name
    spec.loader.exec_module(module)
    if not hasattr(module, "container_v1_light"):
        raise SystemExit(f"{file} defines no container_v1_light(); is it allenai/container's models.py?")
    return module.container_v1_light().eval()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_pair(official_path: Path, img_size: int) -> tuple[nn.Module, nn.Module, float]:
    """Both models with the official (random, seed 0) weights, and their largest output difference."""
    torch.manual_seed(0)
    official = load_official(official_path)
    ours = timm.create_model("container_light").eval()
    ours.load_state_dict(checkpoint_filter_fn(official.state_dict(), ours))
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        diff = (official(x) - ours(x)).abs().max().item()
    return official, ours, diff


def measure(official: nn.Module, ours: nn.Module, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for setting, prepare in SETTINGS.items():
        speeds = {}
        for label, model in (("official", official), ("ctxagg", ours)):
            result = benchmark(prepare(model), args.batch, args.img_size, "fp32", warmup=args.warmup,
                               repeats=args.repeats, memory=False, label=f"{label}:{setting}")
            speeds[label] = result["throughput"]
        rows.append(dict(setting=setting, **speeds, ratio=speeds["ctxagg"] / speeds["official"]))
        print(f"| {setting} | {speeds['official']:.1f} | {speeds['ctxagg']:.1f} | {rows[-1]['ratio']:.2f}× |",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="checkout of github.com/allenai/container")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes (compilation happens in the first)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    official, ours, diff = build_pair(args.official, args.img_size)
    print(f"CPU: {cpu_name()}; torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads; "
          f"batch {args.batch}, {args.img_size}², median of {args.repeats} after {args.warmup} warm-up")
    print(f"same function: max |official − ctxagg| = {diff:.2e} on the logits (official weights in both)")
    print("| setting | official img/s | ctxagg img/s | ctxagg ÷ official |\n|---|---:|---:|---:|")
    measure(official, ours, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
