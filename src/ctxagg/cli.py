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

    rows = model_rows(args.filter or ["*"], flops=not args.no_flops, img_size=args.img_size,
                      activations=not args.no_activations, throughput=args.throughput,
                      throughput_batch=args.throughput_batch)
    if not rows:
        raise SystemExit(f"error: no registered model matches {args.filter}")
    print(format_table(rows, args.img_size))
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
    p.add_argument("--no-activations", action="store_true",
                   help="skip the activation count (a column only when ctxagg.bench.activations exists)")
    p.add_argument("--throughput", action="store_true",
                   help="also measure fp32 images/s on this machine (slow: a few forward passes per model)")
    p.add_argument("--throughput-batch", type=int, default=1, help="batch size of the throughput measurement")
    p.add_argument("--json", help="also write the rows as JSON to this path")
    p.set_defaults(func=_cmd_models)


def _csv(text: str, kind: Callable = str) -> list:
    return [kind(part.strip()) for part in text.split(",") if part.strip()]


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare_eager:
        return _cmd_compare_eager(args)
    if args.sweep == "resolution":
        return _bench_sweep(args)
    from ctxagg.bench.throughput import benchmark_grid, format_results, write_results

    models = [resolve_model_name(m) for m in _csv(args.models or "container_light")]
    rows = benchmark_grid(
        models, _csv(args.batch_sizes or "1", int), _csv(args.img_sizes or "224", int), _csv(args.dtypes),
        _csv(args.memory_formats), 2 if args.warmup is None else args.warmup,
        5 if args.repeats is None else args.repeats, args.device, not args.no_memory, args.model_kwargs,
        progress=lambda r: print(f"  {r['model']} b{r['batch_size']} {r['img_size']}px {r['dtype']} "
                                 f"{r['memory_format']}: " + (f"error {r['error']}" if r.get("error") else
                                 f"{r['latency_ms']:.2f} ms, {r['throughput']:.1f} img/s"), flush=True))
    print(format_results(rows))
    paths = write_results(rows, args.out, meta=dict(model_kwargs=args.model_kwargs))
    print("wrote " + ", ".join(map(str, paths)))
    return 1 if all(r.get("error") for r in rows) else 0


def _bench_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from ctxagg.bench.sweep import format_sweep, plot_sweep, resolution_sweep

    sizes = _csv(args.img_sizes or "224,320,448,640,800", int)
    batch = _csv(args.batch_sizes or "16", int)[0]
    families = _csv(args.families)
    print(f"resolution sweep {families}, batch {batch}, sizes {sizes}, {args.device}, "
          f"{torch.get_num_threads()} threads, {args.max_seconds:g} s budget a pass", flush=True)
    rows = resolution_sweep(sizes, batch, families, 1 if args.warmup is None else args.warmup,
                            3 if args.repeats is None else args.repeats, args.max_seconds, args.device,
                            progress=lambda r: print(f"  {r['model']} {r['size']}px: {r['status']}", flush=True))
    print(format_sweep(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(batch=batch, sizes=sizes, device=args.device, threads=torch.get_num_threads(),
                torch=torch.__version__, max_seconds=args.max_seconds,
                memory=("measured: torch.cuda.max_memory_allocated delta" if args.device.startswith("cuda") else
                        "measured: peak live tensor bytes per ATen op (PeakTensorBytes)")
                + "; materialised: the same counter on the meta device (SDPA math path)")
    (out / "sweep_resolution.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    plot_sweep(rows, out / "sweep_resolution.png",
               title=f"memory and latency vs input size, batch {batch}, {args.device} ({torch.get_num_threads()} threads)")
    print(f"wrote {out / 'sweep_resolution.json'}, {out / 'sweep_resolution.png'}")
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="throughput, latency and peak memory; --sweep resolution for LinGlos Fig. 4",
                       description="Measure inference throughput (img/s), latency (median and IQR over --repeats "
                                   "passes after --warmup) and peak memory of models over batch sizes, resolutions, "
                                   "dtypes and memory formats. CPU memory is the peak of live tensor bytes counted "
                                   "per ATen op; CUDA memory is torch.cuda.max_memory_allocated. Writes bench.json, "
                                   "bench.csv and bench.png.")
    p.add_argument("--models", help="comma-separated model names (default: container_light)")
    p.add_argument("--batch-sizes", help="comma-separated (default: 1; sweep: 16)")
    p.add_argument("--img-sizes", help="comma-separated square sizes (default: 224; sweep: 224,320,448,640,800)")
    p.add_argument("--dtypes", default="fp32", help="comma-separated: fp32, bf16 (autocast), fp16 (autocast)")
    p.add_argument("--memory-formats", default="contiguous", help="comma-separated: contiguous, channels_last")
    p.add_argument("--warmup", type=int, help="untimed passes (default: 2; sweep: 1)")
    p.add_argument("--repeats", type=int, help="timed passes (default: 5; sweep: up to 3, as many as fit the budget)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--model-kwargs", type=json.loads, default={}, help="extra model arguments as JSON")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--sweep", choices=("resolution",),
                   help="resolution: memory and latency vs input size (LinGlos Fig. 4; Container vs Light)")
    p.add_argument("--families", default="linglos,container", help="sweep: which comparisons (linglos, container)")
    p.add_argument("--max-seconds", type=float, default=15.0,
                   help="sweep: run a size only if its predicted time a pass fits (else predictions only)")
    p.add_argument("--compare-eager", action="store_true",
                   help="eager fp32 vs optimised fp32 vs optimised bf16 (default models: container_light, container, "
                        "linglo_b1, resnet50_lesa, deit_s; batch 32, 224²), with the measured matmul peak")
    p.add_argument("--no-compile", action="store_true", help="--compare-eager without torch.compile")
    p.add_argument("--out", default="runs/bench", help="output folder")
    p.set_defaults(func=_cmd_bench)


def _cmd_compare_eager(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ctxagg.bench.deploy_compare import DEFAULT_MODELS, compare_eager

    models = [resolve_model_name(m.strip()) for m in args.models.split(",")] if args.models else list(DEFAULT_MODELS)
    batch = int(args.batch_sizes.split(",")[0]) if args.batch_sizes else 32
    size = int(args.img_sizes.split(",")[0]) if args.img_sizes else 224
    result = compare_eager(models, batch, size, warmup=args.warmup or 1, repeats=args.repeats or 3,
                           compile=not args.no_compile)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare_eager.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'compare_eager.json'}")
    return 0


def _parse_query(text: str) -> tuple[int, int]:
    try:
        y, x = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a query is 'y,x' in input-image pixels, got {text!r}") from None
    return y, x


def _cmd_inspect(args: argparse.Namespace) -> int:
    from ctxagg.analysis.inspect import run_inspect

    if args.model:
        resolve_model_name(args.model)
    if not args.model and not args.checkpoint:
        raise SystemExit("error: give --model or --checkpoint")
    report = run_inspect(args.model, args.image, args.out, args.checkpoint, args.query or None, args.radius,
                         args.img_size, args.model_kwargs, args.max_heads)
    print(report["summary"])
    print("wrote " + ", ".join(report["files"]))
    return 0


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="affinity maps, mixture weights, locality and LESA shares of a model",
                       description="Capture every block's affinity for one image and render: static affinity of "
                                   "query positions per layer (Container Fig. 1 right), attention maps per head, "
                                   "mixture weights α/β, a locality score per layer, and LESA's unary/binary "
                                   "shares (LESA Tables 1-2). PNGs plus inspect.json.")
    p.add_argument("--model", help="model name (default: the checkpoint's)")
    p.add_argument("--checkpoint", help="model_best.safetensors from `ctxagg train` (or its run folder)")
    p.add_argument("--image", required=True, help="any PNG/JPEG; resized to the model's input size")
    p.add_argument("--out", default="runs/inspect", help="output folder")
    p.add_argument("--query", type=_parse_query, nargs="*", help="query positions 'y,x' in input pixels "
                                                                 "(default: centre and two quarter points)")
    p.add_argument("--radius", type=int, default=1, help="locality radius r in tokens (Chebyshev)")
    p.add_argument("--img-size", type=int, help="input size (default: checkpoint's, else the model's)")
    p.add_argument("--model-kwargs", type=json.loads, default={}, help="extra model arguments as JSON")
    p.add_argument("--max-heads", type=int, default=8, help="heads shown per layer in the attention maps")
    p.set_defaults(func=_cmd_inspect)


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


def _cmd_export(args: argparse.Namespace) -> int:
    import timm

    from ctxagg.export import export_model, reparameterize

    if args.checkpoint:
        from ctxagg.train.engine import load_trained_model

        model, cfg, _, _ = load_trained_model(args.checkpoint, args.model, purpose="export")
        size = args.img_size or cfg.img_size
    else:
        if not args.model:
            raise ValueError("pass --model NAME (and optionally --checkpoint from `ctxagg train`)")
        model = timm.create_model(resolve_model_name(args.model), **args.model_kwargs)
        size = args.img_size or model.pretrained_cfg["input_size"][-1]
    model = reparameterize(model) if not args.no_reparameterize else model.eval()
    report = export_model(model, args.output, args.format, img_size=(size, size),
                          dynamic_spatial=False if args.static_spatial else None)
    errors = ", ".join(f"{e:.1e}" for e in report["max_abs_error"])
    print(f"exported {args.format} to {report['path']} (dynamic batch; dynamic H, W: {report['dynamic_spatial']}); "
          f"max |export − PyTorch| over the check inputs: {errors}")
    if report.get("note"):
        print(f"note: {report['note']}")
    from pathlib import Path

    data = Path(report["path"] + ".data")
    if data.exists():
        print(f"the weights are in {data} (ONNX external data): keep it next to {Path(report['path']).name}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    from ctxagg.export import FORMATS

    p = sub.add_parser("export", help="re-parameterise and export to ONNX / TorchScript / torch.export, verified",
                       description="Re-parameterise (exact folds), export with a dynamic batch axis (and dynamic "
                                   "H, W in multiples of 32 where the model allows), then check the export against "
                                   "PyTorch (ONNX: in onnxruntime) on other batch sizes and image sizes.")
    p.add_argument("--model", help="registered model name")
    p.add_argument("--checkpoint", help="a model_best.safetensors from `ctxagg train` (model rebuilt from it)")
    p.add_argument("--format", choices=FORMATS, default="onnx")
    p.add_argument("--output", required=True, help="file to write (.onnx, .pt, or .pt2 for exported-program)")
    p.add_argument("--img-size", type=int, help="export size (default: the model's / run's)")
    p.add_argument("--static-spatial", action="store_true", help="fix H, W (the batch axis stays dynamic)")
    p.add_argument("--no-reparameterize", action="store_true", help="export the training-form model")
    p.add_argument("--model-kwargs", type=json.loads, default={}, help="extra model arguments as JSON")
    p.set_defaults(func=_cmd_export)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_models, _add_train, _add_eval, _add_compare,
                                                                   _add_bench, _add_inspect, _add_export]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctxagg", description="Spatial mixers as affinity matrices: "
                                     "model zoo, training, evaluation, benchmarks, analysis, export.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ctxagg.train.engine import NonFiniteLossError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, NonFiniteLossError) as exc:  # bad input or a run fault (non-finite loss, disk
        # full): the message says what and where; no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
