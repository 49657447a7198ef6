"""The ``ctxagg`` command: one entry point with a subcommand per tool."""
from __future__ import annotations

import argparse
import difflib
import json
import sys
from typing import Callable, Optional, Sequence

__all__ = ["main", "resolve_model_name"]


def resolve_model_name(name: str) -> str:
    """Return ``name`` if ctxagg or timm registers it, else exit with the nearest registered names."""
    import timm

    import ctxagg  # noqa: F401  (registers the models)
    from ctxagg.models import model_names

    if name in timm.list_models():
        return name
    ours = model_names()
    close = difflib.get_close_matches(name, ours, n=5, cutoff=0.5) or difflib.get_close_matches(
        name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise SystemExit(f"error: unknown model {name!r}.{hint} (`ctxagg models --no-flops` lists ctxagg's models)")


def _cmd_models(args: argparse.Namespace) -> int:
    from ctxagg.bench.zoo import format_table, model_rows

    rows = model_rows(args.filter or ["*"], flops=not args.no_flops, img_size=args.img_size)
    if not rows:
        raise SystemExit(f"error: no registered model matches {args.filter}")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="the model zoo: measured params and GMACs next to the papers' numbers",
                       description="Build every registered model, count its parameters and measure its "
                                   "multiply-accumulates with one forward pass (torch.utils.flop_counter).")
    p.add_argument("filter", nargs="*", help="glob patterns of model names (default: all)")
    p.add_argument("--no-flops", action="store_true", help="skip the forward pass that measures GMACs")
    p.add_argument("--img-size", type=int, default=224, help="input size for the MACs measurement")
    p.add_argument("--json", help="also write the rows as JSON to this path")
    p.set_defaults(func=_cmd_models)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_models]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctxagg", description="Spatial mixers as affinity matrices: "
                                     "model zoo, training, evaluation, benchmarks, analysis, export.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
