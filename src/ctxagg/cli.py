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


def _add_train_options(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per TrainConfig field (``--batch-size`` for ``batch_size``), typed from its default."""
    import dataclasses
    import typing

    from ctxagg.train.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "model_kwargs":
            p.add_argument(flag, type=json.loads, default={}, help="extra model arguments as JSON")
            continue
        kind = typing.get_args(hints[f.name])[0] if typing.get_origin(hints[f.name]) is typing.Union else hints[f.name]
        if kind is bool and f.default:
            p.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false", default=True)
        elif kind is bool:
            p.add_argument(flag, action="store_true", default=False)
        else:
            default = f.default
            p.add_argument(flag, type=kind, default=default,
                           help=f"default: {default if default is not None else 'from the recipe'}")


def _config_from(args: argparse.Namespace, **overrides):
    import dataclasses

    from ctxagg.train.config import TrainConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    values.update(overrides)
    return TrainConfig(**values)


def _cmd_train(args: argparse.Namespace) -> int:
    from ctxagg.train import train

    resolve_model_name(args.model)
    cfg = _config_from(args).validate()
    result = train(cfg, resume=args.resume)
    out = result.output
    last = result.history[-1]
    print(f"\n{cfg.model} on {cfg.data}: best val top-1 {result.best_top1:.2f}% "
          f"(last epoch {last['val_top1']:.2f}%, top-5 {last['val_top5']:.2f}%)")
    print(f"checkpoint: {out / 'model_best.safetensors'} (resume state: {out / 'last.safetensors'})")
    print(f"metrics:    {out / 'metrics.csv'}\nplot:       {out / 'curves.png'}")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on images (embedded default: digits)",
                       description="Train any registered model with timm's pipeline. DATA: digits (embedded), "
                                   "imagefolder:PATH, cifar10:PATH, mnist:PATH. Recipes: deit (default), sgd "
                                   "(LESA ResNets), light (short runs on small data).")
    _add_train_options(p)
    p.add_argument("--resume", help="continue the run in this folder (or from this last.safetensors)")
    p.set_defaults(func=_cmd_train)


def _cmd_eval(args: argparse.Namespace) -> int:
    from ctxagg.train.evaluate import evaluate_checkpoint

    if args.model:
        resolve_model_name(args.model)
    r = evaluate_checkpoint(args.checkpoint, args.data, args.model, args.output, args.batch_size, args.split,
                            args.device, args.amp)
    print(f"{r['model']} on {r['data']} ({r['split']}, {r['count']} images): top-1 {r['top1']:.2f}%  "
          f"top-5 {r['top5']:.2f}%  loss {r['loss']:.4f}")
    for name, acc in r["per_class_top1"].items():
        print(f"  {name:>12}: {acc:6.2f}%")
    print(f"confusion matrix: {r['output']}/confusion.png\nnumbers: {r['output']}/eval.json")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a trained checkpoint: top-1/5, per-class accuracy, confusion matrix")
    p.add_argument("--checkpoint", required=True, help="model_best.safetensors (or a run folder)")
    p.add_argument("--model", help="expected model name (checked against the checkpoint)")
    p.add_argument("--data", help="data SPEC (default: the one the run trained on)")
    p.add_argument("--split", choices=("val", "train"), default="val")
    p.add_argument("--output", help="folder for confusion.png and eval.json (default: next to the checkpoint)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.set_defaults(func=_cmd_eval)


def _cmd_compare(args: argparse.Namespace) -> int:
    from ctxagg.train.compare import compare

    models = [resolve_model_name(m.strip()) for m in args.models.split(",") if m.strip()]
    fractions = [float(f) for f in args.fractions.split(",")]
    base = _config_from(args, model=models[0]).validate()
    compare(models, base, fractions, args.output)
    print(f"table: {args.output}/compare.md  plot: {args.output}/compare.png")
    return 0


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="train several models on fixed-seed data fractions; table + plots",
                       description="The small-scale counterpart of Container Table 3 (data efficiency) and "
                                   "Figure 1 (convergence).")
    p.add_argument("--models", required=True, help="comma-separated model names")
    p.add_argument("--fractions", default="0.1,0.5,1.0", help="comma-separated training-data fractions")
    _add_train_options(p, skip=("model", "fraction"))
    p.set_defaults(func=_cmd_compare, output="runs/compare")


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_models, _add_train, _add_eval, _add_compare]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctxagg", description="Spatial mixers as affinity matrices: "
                                     "model zoo, training, evaluation, benchmarks, analysis, export.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # bad input: say what and stop, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
