"""The ``ctxagg`` command (also ``python -m ctxagg``): one entry point with a subcommand per tool.

This module only parses arguments and dispatches to the package (train/, bench/, analysis/, export/); it prints
what the library returns. Errors the library raises on purpose (:class:`ctxagg.errors.CtxaggError`, input
errors, file-system errors) become one ``error: ...`` line and exit code 2; ``--debug`` or ``CTXAGG_DEBUG=1``
shows their traceback. Any other exception (a bug, in ctxagg or inside torch) keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Optional, Sequence

from .checks import InputError
from .errors import ConfigError, CtxaggError, RunExistsError
from .models import resolve_model_name

__all__ = ["main", "build_parser", "resolve_model_name", "LIBRARY_ERRORS"]

# what `main` reports in one line: the library's own errors, bad inputs, and the file system's (a full disk,
# a missing path: the message names the file)
LIBRARY_ERRORS = (CtxaggError, InputError, OSError)
BENCH_TOOLS = ("throughput", "sweep", "deploy", "dense", "train")


def _csv(text: str, kind: Callable = str) -> list:
    return [kind(part.strip()) for part in text.split(",") if part.strip()]


def _hw_size(text: str) -> tuple[int, int]:
    """``"800x1333"`` (or a side alone) -> (800, 1333)."""
    parts = text.lower().split("x")
    if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"size {text!r} is not HxW (e.g. 800x1333) or a side")
    return (int(parts[0]), int(parts[-1]))


def _models(text: str) -> list[str]:
    return [resolve_model_name(m) for m in _csv(text)]


class _DeprecatedAlias(argparse.Action):
    """An old flag spelling: still works, with a note naming the new one."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"note: {option_string} is deprecated; use --{self.dest.replace('_', '-')}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _add_output(p: argparse.ArgumentParser, help: str, required: bool = False) -> None:
    """``--output`` (old spelling ``--out`` accepted) and ``--overwrite``, the same in every subcommand."""
    p.add_argument("--output", required=required, help=help)
    p.add_argument("--out", dest="output", action=_DeprecatedAlias, help=argparse.SUPPRESS)
    p.add_argument("--overwrite", action="store_true",
                   help="replace what an earlier command wrote there (default: refuse and say what is there)")


def _add_parser(sub: argparse._SubParsersAction, name: str, **kwargs) -> argparse.ArgumentParser:
    p = sub.add_parser(name, **kwargs)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the traceback of an error (also: CTXAGG_DEBUG=1)")
    return p


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", help="also write the rows as JSON to this path")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")


def _refuse_existing_json(args: argparse.Namespace) -> None:
    """Before any work: an existing --json file is kept unless --overwrite."""
    if args.json and os.path.exists(args.json) and not args.overwrite:
        raise RunExistsError(f"--json {args.json} already exists; nothing was changed. Use another path or "
                             "--overwrite to replace it")


def _write_json(args: argparse.Namespace, rows: list) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"wrote {args.json}")


def _cmd_models(args: argparse.Namespace) -> int:
    from ctxagg.bench.zoo import format_table, model_rows

    _refuse_existing_json(args)
    rows = model_rows(args.filter or (["*"] if not args.checkpoint else []), flops=not args.no_flops,
                      img_size=args.img_size, activations=not args.no_activations, throughput=args.throughput,
                      throughput_batch=args.throughput_batch, checkpoints=args.checkpoint)
    if not rows:
        raise ConfigError(f"no registered model matches {args.filter}")
    print(format_table(rows, args.img_size))
    _write_json(args, rows)
    return 0


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = _add_parser(sub, "models", help="the model zoo: measured params and GMACs next to the papers' numbers",
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
    p.add_argument("--checkpoint", action="append", default=[], metavar="RUN",
                   help="also a row for this `ctxagg train` run (repeatable; alone, only such rows): the trained model "
                        "as deployed, with its learned per-block dynamic-path pattern")
    _add_json(p)
    p.set_defaults(func=_cmd_models)


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from ctxagg.bench import commands

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tool == "sweep":
        report = commands.run_sweep(_csv(args.img_sizes, int), args.batch_size, _csv(args.families), args.warmup,
                                    args.repeats, args.max_seconds, args.device, args.output, args.overwrite)
    elif args.tool == "dense":
        from ctxagg.dense.bench import run_dense_bench
        report = run_dense_bench(_models(args.models), [_hw_size(t) for t in _csv(args.sizes)], args.batch_size,
                                 args.warmup, args.repeats, args.max_seconds, args.device, args.output, args.overwrite)
    elif args.tool == "deploy":
        report = commands.run_deploy(_models(args.models) if args.models else None, args.batch_size, args.img_size,
                                     args.warmup, args.repeats, not args.no_compile, args.output, args.overwrite,
                                     not args.no_int8, args.latency_batch or None, args.device, args.peers,
                                     not args.no_breakdown)
    elif args.tool == "train":
        report = commands.run_train_bench(_models(args.models), args.batch_size, args.img_size, _csv(args.variants),
                                          args.warmup, args.repeats, args.device, not args.no_memory, args.output,
                                          args.overwrite, breakdown=not args.no_breakdown)
    else:
        report = commands.run_throughput(
            _models(args.models), _csv(args.batch_sizes, int), _csv(args.img_sizes, int), _csv(args.dtypes),
            _csv(args.memory_formats), args.warmup, args.repeats, args.device, not args.no_memory,
            args.model_kwargs, args.output, args.overwrite)
    print("wrote " + ", ".join(report["files"]))
    return 1 if args.tool == "throughput" and all(r.get("error") for r in report["rows"]) else 0


def _bench_common(p: argparse.ArgumentParser, warmup: int, repeats: int) -> None:
    p.add_argument("--warmup", type=int, default=warmup, help=f"untimed passes (default: {warmup})")
    p.add_argument("--repeats", type=int, default=repeats, help=f"timed passes (default: {repeats})")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    _add_output(p, "results folder (default: a new runs/bench-<tool>-<YYYYmmdd-HHMMSS>)")
    p.set_defaults(func=_cmd_bench)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = _add_parser(sub, "bench", help="speed and memory: `bench throughput|sweep|deploy|dense|train`",
                    description="Five measuring tools; each writes its numbers to a results folder.")
    tools = p.add_subparsers(dest="tool", required=True, metavar="{throughput,sweep,deploy,dense,train}")
    t = _add_parser(tools, "throughput", help="img/s, latency (median, IQR) and peak memory over a grid",
                    description="Inference throughput, latency over --repeats passes after --warmup, and peak "
                                "memory (CPU: peak live tensor bytes per ATen op; CUDA: max_memory_allocated) over "
                                "models × batch sizes × resolutions × dtypes × memory formats. Writes bench.json, "
                                "bench.csv, bench.png.")
    t.add_argument("--models", default="container_light", help="comma-separated model names")
    t.add_argument("--batch-sizes", default="1", help="comma-separated")
    t.add_argument("--img-sizes", default="224", help="comma-separated square sizes")
    t.add_argument("--dtypes", default="fp32", help="comma-separated: fp32, bf16 (autocast), fp16 (autocast)")
    t.add_argument("--memory-formats", default="contiguous", help="comma-separated: contiguous, channels_last")
    t.add_argument("--device", default="cpu")
    t.add_argument("--model-kwargs", type=json.loads, default={}, help="extra model arguments as JSON")
    t.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    _bench_common(t, warmup=2, repeats=5)
    s = _add_parser(tools, "sweep", help="memory and latency vs input size (LinGlos Fig. 4; Container vs Light)",
                    description="Predicted GMACs and materialised-attention memory at every size; measured "
                                "latency and peak memory where a pass fits --max-seconds. Writes "
                                "sweep_resolution.json and sweep_resolution.png.")
    s.add_argument("--img-sizes", default="224,320,448,640,800", help="comma-separated square sizes")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--families", default="linglos,container", help="which comparisons: linglos, container")
    s.add_argument("--max-seconds", type=float, default=15.0,
                   help="run a size only if its predicted time a pass fits (else predictions only)")
    s.add_argument("--device", default="cpu")
    _bench_common(s, warmup=1, repeats=3)
    _add_bench_deploy(tools)
    _add_bench_train(tools)
    n = _add_parser(tools, "dense", help="backbones as detectors see them, at 512×512 and 800×1333",
                    description="Each backbone built for dense prediction (any input size; the four FPN levels) "
                                "at segmentation and detection sizes: predicted GMACs and materialised-attention "
                                "memory everywhere, measured latency and peak memory where a pass fits "
                                "--max-seconds. Writes bench_dense.json.")
    n.add_argument("--models", default="container_light,container,linglo_b0,resnet50_lesa,swin_t",
                   help="comma-separated backbone names (any ctxagg or timm model)")
    n.add_argument("--sizes", default="512x512,800x1333", help="comma-separated HxW")
    n.add_argument("--batch-size", type=int, default=1)
    n.add_argument("--max-seconds", type=float, default=30.0,
                   help="run a size only if its predicted time a pass fits (else predictions only)")
    n.add_argument("--device", default="cpu")
    _bench_common(n, warmup=1, repeats=3)


def _add_bench_deploy(tools: argparse._SubParsersAction) -> None:
    d = _add_parser(tools, "deploy",
                    help="eager fp32 vs optimised fp32 / bf16 / int8, as fractions of the matmul peaks",
                    description="Eager fp32 vs the deploy path (re-parameterised, torch.compile; fp32, bf16, int8 "
                                "and int8 with bf16) with the machine's measured matmul peaks, batch-1 latency and "
                                "where each variant's time goes (MAC kernels or the rest). Writes compare_eager.json.")
    d.add_argument("--models", help="comma-separated (default: container_light, container, linglo_b1, "
                                    "resnet50_lesa, deit_s)")
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--img-size", type=int, default=224)
    d.add_argument("--no-compile", action="store_true", help="the deploy variants without torch.compile (no int8)")
    d.add_argument("--no-int8", action="store_true", help="skip the int8 variants (PT2E, x86 CPUs only)")
    d.add_argument("--latency-batch", type=int, default=1,
                   help="also the latency of every variant at this batch size (0: skip; default: 1)")
    d.add_argument("--peers", action="store_true", help="also timm's closest models of similar size: "
                                                        "resnet50, convnext_tiny, deit_small_patch16_224, pvt_v2_b2, "
                                                        "twins_svt_small, swin_tiny_patch4_window7_224")
    d.add_argument("--device", default="cpu", help="cpu or cuda[:N] (int8 variants run on CPUs only)")
    _add_no_breakdown(d, "compiled bf16")
    _bench_common(d, warmup=1, repeats=3)


def _add_bench_train(tools: argparse._SubParsersAction) -> None:
    from ctxagg.bench.train_speed import TRAIN_VARIANTS

    r = _add_parser(tools, "train", help="training img/s and peak memory: eager / compiled / bf16 / channels_last",
                    description="One optimiser step (forward + backward + AdamW) per variant of each model, timed "
                                "round-robin across variants, with the peak memory of a step (CPU: the allocator's "
                                "running total seen by torch.profiler; CUDA: max_memory_allocated) and the first "
                                "(compiling) step's time. What `ctxagg train --compile/--amp/--channels-last` buy. "
                                "Writes bench_train.json.")
    r.add_argument("--models", default="container_light", help="comma-separated model names")
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--img-size", type=int, default=224)
    r.add_argument("--variants", default="eager,compiled,eager_bf16,compiled_bf16",
                   help=f"comma-separated, from {', '.join(TRAIN_VARIANTS)}")
    r.add_argument("--device", default="cpu")
    r.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    _add_no_breakdown(r, "the first variant")
    _bench_common(r, warmup=2, repeats=5)


def _add_no_breakdown(parser: argparse.ArgumentParser, reference: str) -> None:
    parser.add_argument("--no-breakdown", action="store_true",
                        help="skip the profiled pass that splits each variant's time into dense MAC kernels "
                             f"(conv, matmul, attention) and the rest, with its ceiling over {reference}")


def _old_bench_usage(argv: Sequence[str]) -> Optional[str]:
    """The message for the pre-subcommand form ``ctxagg bench --sweep ... / --compare-eager / --models ...``."""
    words = [a for a in argv if a != "--debug"]
    if not words or words[0] != "bench" or len(words) < 2 or words[1] in BENCH_TOOLS or words[1] in ("-h", "--help"):
        return None
    if not words[1].startswith("-"):
        return None  # argparse names the unknown tool
    tool = "sweep" if "--sweep" in words else "deploy" if "--compare-eager" in words else "throughput"
    return (f"error: `ctxagg bench` now takes a tool first: ctxagg bench {{{','.join(BENCH_TOOLS)}}} [options]. "
            f"For these options use `ctxagg bench {tool} ...` (--sweep resolution is `bench sweep`, "
            "--compare-eager is `bench deploy`, --out is --output); `ctxagg bench TOOL --help` lists each tool's "
            "options")


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
        raise ConfigError("give --model or --checkpoint")
    report = run_inspect(args.model, args.image, args.output, args.checkpoint, args.query or None, args.radius,
                         args.img_size, args.model_kwargs, args.max_heads, args.overwrite)
    print(report["summary"])
    print("wrote " + ", ".join(report["files"]))
    return 0


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = _add_parser(sub, "inspect", help="affinity maps, mixture weights, locality and LESA shares of a model",
                    description="Capture every block's affinity for one image and render: static affinity of "
                                "query positions per layer (Container Fig. 1 right), attention maps per head, "
                                "mixture weights α/β, a locality score per layer, and LESA's unary/binary "
                                "shares (LESA Tables 1-2). PNGs plus inspect.json.")
    p.add_argument("--model", help="model name (default: the checkpoint's)")
    p.add_argument("--checkpoint", help="model_best.safetensors from `ctxagg train` (or its run folder)")
    p.add_argument("--image", required=True, help="any PNG/JPEG; resized to the model's input size")
    _add_output(p, "output folder (default: a new runs/inspect-<model>-<YYYYmmdd-HHMMSS>)")
    p.add_argument("--query", type=_parse_query, nargs="*", help="query positions 'y,x' in input pixels "
                                                                 "(default: centre and two quarter points)")
    p.add_argument("--radius", type=int, default=1, help="locality radius r in tokens (Chebyshev)")
    p.add_argument("--img-size", type=int, help="input size (default: checkpoint's, else the model's)")
    p.add_argument("--model-kwargs", type=json.loads, default={}, help="extra model arguments as JSON")
    p.add_argument("--max-heads", type=int, default=8, help="heads shown per layer in the attention maps")
    p.set_defaults(func=_cmd_inspect)


def _add_train_options(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per TrainConfig field (``--batch-size`` for ``batch_size``), typed from its annotation."""
    from ctxagg.flags import add_dataclass_flags
    from ctxagg.train.config import TrainConfig

    add_dataclass_flags(p, TrainConfig, skip=skip, none_help="from the recipe")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run an explicit --output holds (default: refuse and say what is there)")


def _config_from(args: argparse.Namespace, **overrides):
    from ctxagg.flags import dataclass_values
    from ctxagg.train.config import TrainConfig

    return TrainConfig(**dataclass_values(TrainConfig, args, **overrides))


def _cmd_train(args: argparse.Namespace) -> int:
    from ctxagg.train import train

    resolve_model_name(args.model)
    cfg = _config_from(args).validate()
    result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    out, last = result.output, result.history[-1]
    print(f"\n{cfg.model} on {cfg.data}: best val top-1 {result.best_top1:.2f}% "
          f"(last epoch {last['val_top1']:.2f}%, top-5 {last['val_top5']:.2f}%)")
    print(f"run folder: {out}")
    print(f"checkpoint: {out / 'model_best.safetensors'} (resume state: {out / 'last.safetensors'})")
    print(f"metrics:    {out / 'metrics.csv'}\nplot:       {out / 'curves.png'}")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = _add_parser(sub, "train", help="train a model on images (embedded default: digits)",
                    description="Train any registered model with timm's pipeline. DATA: digits (embedded), "
                                "imagefolder:PATH, cifar10:PATH, mnist:PATH. Recipes: deit (default), sgd "
                                "(LESA ResNets), light (short runs on small data). Each run writes to a new "
                                "folder runs/<model>-<data>-<YYYYmmdd-HHMMSS> (runs/latest points to the newest) "
                                "unless --output names one.")
    _add_train_options(p)
    p.add_argument("--resume", help="continue the run in this folder (or from this last.safetensors); it keeps "
                                    "writing there unless --output names another (new) folder")
    p.set_defaults(func=_cmd_train)


def _cmd_eval(args: argparse.Namespace) -> int:
    from ctxagg.train.evaluate import evaluate_checkpoint

    if args.model:
        resolve_model_name(args.model)
    r = evaluate_checkpoint(args.checkpoint, args.data, args.model, args.output, args.batch_size, args.split,
                            args.device, args.amp, args.overwrite)
    print(f"{r['model']} on {r['data']} ({r['split']}, {r['count']} images): top-1 {r['top1']:.2f}%  "
          f"top-5 {r['top5']:.2f}%  loss {r['loss']:.4f}")
    for name, acc in r["per_class_top1"].items():
        print(f"  {name:>12}: {acc:6.2f}%")
    print(f"confusion matrix: {r['output']}/confusion.png\nnumbers: {r['output']}/eval.json")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = _add_parser(sub, "eval", help="evaluate a trained checkpoint: top-1/5, per-class accuracy, confusion matrix")
    p.add_argument("--checkpoint", required=True, help="model_best.safetensors (or a run folder)")
    p.add_argument("--model", help="expected model name (checked against the checkpoint)")
    p.add_argument("--data", help="data SPEC (default: the one the run trained on)")
    p.add_argument("--split", choices=("val", "train"), default="val")
    _add_output(p, "folder for confusion.png and eval.json (default: a new eval-<split>[-N] next to the checkpoint)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.set_defaults(func=_cmd_eval)


def _vary(text: str) -> tuple[str, list]:
    """``attn_norm=softmax,scale`` -> ("attn_norm", ["softmax", "scale"]); values are JSON where they parse."""
    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise ConfigError(f"--vary {text!r}: write KEY=VALUE1,VALUE2 (e.g. attn_norm=softmax,scale_relu)")

    def value(word: str):
        try:
            return json.loads(word)
        except json.JSONDecodeError:
            return word
    return key.replace("-", "_"), [value(w) for w in _csv(values)]


def _cmd_compare(args: argparse.Namespace) -> int:
    from ctxagg.affinity.registry import split_arguments
    from ctxagg.train.compare import Variant, compare, kwarg_variants, match_parameters, mixer_variants

    models = _models(args.models)
    base = _config_from(args, model=models[0], output=None).validate()
    if args.mixers or args.vary:
        if len(models) != 1 or (args.mixers and args.vary):
            raise ConfigError("--mixers or --vary changes one base model; give exactly one --models name and one of them")
        variants = [Variant(v.label, v.model, {**base.model_kwargs, **v.kwargs})
                    for v in (mixer_variants(models[0], split_arguments(args.mixers.replace(" ", "")))
                              if args.mixers else kwarg_variants(models[0], *_vary(args.vary)))]
    else:
        variants = [Variant(m, m, dict(base.model_kwargs)) for m in models]
    if args.match_params is not None:
        variants = match_parameters(variants, base.img_size, args.match_params)
    result = compare(variants, base, _csv(args.fractions, float), args.output, overwrite=args.overwrite,
                     seeds=_csv(args.seeds, int) if args.seeds else None, cost_img_size=args.cost_img_size,
                     jobs=args.jobs, resume=args.resume)
    print(f"table: {result['output']}/compare.md  plot: {result['output']}/compare.png")
    return 0


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = _add_parser(sub, "compare", help="train several models on fixed-seed data fractions; table + plots",
                    description="The small-scale counterpart of Container Table 3 (data efficiency) and "
                                "Figure 1 (convergence). Writes to a new runs/compare-<YYYYmmdd-HHMMSS> unless "
                                "--output names a folder.")
    p.add_argument("--models", required=True, help="comma-separated model names (one base model with --mixers)")
    p.add_argument("--fractions", default="0.1,0.5,1.0", help="comma-separated training-data fractions")
    p.add_argument("--mixers", help="comma-separated affinity specs (commas inside mix(...) are kept) that each "
                                    "replace the base model's mixer in every stage (Container Table 2), e.g. "
                                    "'sa,dw5,mix(sa,dw5)'; 'a/b/c/d' sets one spec per stage")
    p.add_argument("--vary", metavar="KEY=V1,V2",
                   help="one variant of the base model per value of one model argument, e.g. "
                        "attn_norm=softmax,none,scale,scale_relu,layernorm,ln_relu (ViT-as-DynConv Figures 4, 6)")
    p.add_argument("--seeds", help="comma-separated seeds (data subset and initialisation); table shows mean ± std")
    p.add_argument("--match-params", type=float, metavar="TOL",
                   help="scale each variant's channel-MLP widths so its backbone parameters match the first "
                        "variant's within TOL (e.g. 0.05)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted comparison in --output: "
                                                             "finished runs are read back, unfinished ones resumed")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once in worker processes (CPU threads "
                                                        "are shared out; results do not depend on it)")
    p.add_argument("--cost-img-size", type=int, metavar="SIZE",
                   help="also measure params, GMACs, img/s and peak memory of every variant at SIZE² (e.g. 224)")
    _add_train_options(p, skip=("model", "fraction"))
    p.set_defaults(func=_cmd_compare)


def _cmd_export_int8(args: argparse.Namespace) -> int:
    from ctxagg.export.int8 import run_int8_export
    from ctxagg.export.run import refuse_existing_file

    if args.format not in (None, "exported-program"):
        raise ConfigError(f"--int8 saves a torch.export program (.pt2); --format {args.format} cannot hold it")
    if not args.calib:
        raise ConfigError("--int8 needs --calib DATA: images to calibrate on (digits, imagefolder:PATH, cifar10:PATH, "
                          "mnist:PATH); its validation split measures the top-1 agreement with fp32")
    refuse_existing_file(args.output, args.overwrite)
    r = run_int8_export(args.output, args.calib, args.model, args.checkpoint, args.int8_mode, args.img_size,
                        args.calib_images, args.val_images, bf16=args.int8_bf16, model_kwargs=args.model_kwargs,
                        observer=args.int8_observer)
    print(f"int8 ({r['mode']}, calibrated on {r['calib_images']} images of {r['calib']}) saved to {r['path']} "
          f"({r['size_mb']:.1f} MB); reloaded program vs in-memory: max |diff| {r['max_abs_error'][0]:.1e}")
    print(f"on {r['val_images']} validation images: fp32 top-1 {r['fp32_top1']:.2f}%, "
          f"int8 top-1 {r['int8_top1']:.2f}%, top-1 agreement {r['top1_agreement']:.2f}% "
          f"(compiled int8{' + bf16' if r['bf16_rest'] else ''})")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from ctxagg.export import run_export

    if args.model:
        resolve_model_name(args.model)
    if args.int8:
        return _cmd_export_int8(args)
    args.format = args.format or "onnx"
    report = run_export(args.output, args.model, args.checkpoint, args.format, args.img_size, args.static_spatial,
                        not args.no_reparameterize, args.model_kwargs, args.overwrite)
    errors = ", ".join(f"{e:.1e}" for e in report["max_abs_error"])
    print(f"exported {args.format} to {report['path']} (dynamic batch; dynamic H, W: {report['dynamic_spatial']}); "
          f"max |export − PyTorch| over the check inputs: {errors}")
    if report.get("note"):
        print(f"note: {report['note']}")
    if report.get("data_file"):
        print(f"the weights are in {report['data_file']} (ONNX external data): keep it next to {report['path']}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    from ctxagg.export import FORMATS

    p = _add_parser(sub, "export", help="re-parameterise and export to ONNX / TorchScript / torch.export, verified",
                    description="Re-parameterise (exact folds), export with a dynamic batch axis (and dynamic "
                                "H, W in multiples of 32 where the model allows), then check the export against "
                                "PyTorch (ONNX: in onnxruntime) on other batch sizes and image sizes.")
    p.add_argument("--model", help="registered model name")
    p.add_argument("--checkpoint", help="a model_best.safetensors from `ctxagg train` (model rebuilt from it)")
    p.add_argument("--format", choices=FORMATS, help="default: onnx (exported-program with --int8)")
    _add_output(p, "file to write (.onnx, .pt, or .pt2 for exported-program)", required=True)
    p.add_argument("--img-size", type=int, help="export size (default: the model's / run's)")
    p.add_argument("--static-spatial", action="store_true", help="fix H, W (the batch axis stays dynamic)")
    p.add_argument("--no-reparameterize", action="store_true", help="export the training-form model")
    p.add_argument("--model-kwargs", type=json.loads, default={}, help="extra model arguments as JSON")
    p.add_argument("--int8", action="store_true", help="int8 post-training quantization (PT2E, x86 inductor "
                                                       "quantizer; needs torchao) saved as a .pt2 program")
    p.add_argument("--int8-mode", choices=("static", "dynamic"), default="static",
                   help="static: convs and linears, activations calibrated; dynamic: linears only, ranges per batch")
    p.add_argument("--int8-observer", choices=("histogram", "minmax"), default="histogram",
                   help="static calibration: histogram (x86 default, robust to outliers, slower) or min/max")
    p.add_argument("--int8-bf16", action="store_true", help="measure the agreement with the unquantized ops in bf16")
    p.add_argument("--calib", help="images to calibrate on (a data SPEC as in `ctxagg train --data`)")
    p.add_argument("--calib-images", type=int, default=256, help="calibration images from its training split")
    p.add_argument("--val-images", type=int, default=1000,
                   help="validation images on which int8 and fp32 top-1 are compared")
    p.set_defaults(func=_cmd_export)


def _cmd_space(args: argparse.Namespace) -> int:
    from ctxagg.bench.space import format_reading_list, format_space_table, space_rows

    _refuse_existing_json(args)
    rows = space_rows(measure=not args.no_measure)
    print(format_space_table(rows))
    if args.reading_list:
        print()
        print(format_reading_list())
    _write_json(args, rows)
    return 0


def _add_space(sub: argparse._SubParsersAction) -> None:
    p = _add_parser(sub, "space", help="the design space: every affinity's paper, pattern, cost, measured block",
                    description="One row per registered affinity: paper, static/dynamic, which entries of A may be "
                                "non-zero, the cost of A·V, and params/GMACs of one Container block with it at "
                                "C=128 on 56² and 14² grids (counted on the meta device).")
    p.add_argument("--no-measure", action="store_true", help="skip the params/GMACs columns")
    p.add_argument("--reading-list", action="store_true", help="also print where each reading-list paper stands")
    _add_json(p)
    p.set_defaults(func=_cmd_space)


def _add_ssl(sub: argparse._SubParsersAction) -> None:
    from ctxagg.ssl.cli import add_ssl_subcommands

    add_ssl_subcommands(sub)


def _add_dense(sub: argparse._SubParsersAction) -> None:
    from ctxagg.dense.cli import add_dense_subcommands

    add_dense_subcommands(sub)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_models, _add_train, _add_eval, _add_compare, _add_bench, _add_inspect, _add_export, _add_space,
    _add_ssl, _add_dense]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctxagg", description="Spatial mixers as affinity matrices: "
                                     "model zoo, training, evaluation, benchmarks, analysis, export.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also: CTXAGG_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one subcommand; returns the exit code (2: an error the library reported in one line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    old_usage = _old_bench_usage(argv)
    if old_usage:
        print(old_usage, file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LIBRARY_ERRORS as exc:
        if args.debug or os.environ.get("CTXAGG_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
