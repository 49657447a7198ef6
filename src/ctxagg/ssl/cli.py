"""The ``ctxagg ssl`` command group (``train``, ``probe``), registered by :func:`add_ssl_subcommands`; the work lives
in :mod:`ctxagg.ssl.engine` and :mod:`ctxagg.ssl.probe`."""
from __future__ import annotations

import argparse
import json

from ..flags import add_dataclass_flags, dataclass_values
from .config import SSLConfig

__all__ = ["add_ssl_subcommands"]


def _cmd_train(args: argparse.Namespace) -> int:
    from .engine import train_ssl

    result = train_ssl(SSLConfig(**dataclass_values(SSLConfig, args)), resume=args.resume, progress=not args.no_progress,
                       overwrite=args.overwrite)
    last = result.history[-1] if result.history else {}
    print(f"wrote {result.output} (k-NN top-1 {last.get('knn_top1', float('nan')):.2f}% after epoch "
          f"{last.get('epoch', 0)})")
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import RunExistsError
    from ..runs import refuse_existing, resolve_run_path
    from .probe import probe

    output = args.output
    if output is None:
        run = resolve_run_path(args.run)
        output = (run if run.is_dir() else run.parent) / "probe.json"
        if output.exists() and not args.overwrite:
            raise RunExistsError(f"{output} exists (an earlier probe); pass --overwrite or --output")
    elif Path(output).is_dir():
        refuse_existing(output, args.overwrite)
        output = Path(output) / "probe.json"
    result = probe(args.run, args.data, args.epochs, args.lr, args.knn_k, args.fraction, args.val_limit,
                   args.device, args.seed, output)
    print(json.dumps(result, indent=2))
    print(f"wrote {output}")
    return 0


def add_ssl_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``ctxagg ssl train`` (DINO pre-training with a k-NN monitor) and ``ctxagg ssl probe``."""
    ssl = subparsers.add_parser("ssl", help="self-supervised pre-training (DINO) with a k-NN monitor; linear probe",
                                description="DINO (Caron et al. 2021) as in container.txt §4.5 / Table 6.")
    group = ssl.add_subparsers(dest="ssl_command", required=True)
    train = group.add_parser("train", help="pre-train a backbone with DINO; k-NN accuracy every epoch",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataclass_flags(train, SSLConfig, none_help="from the DINO recipe")
    train.add_argument("--resume", help="a run folder (or its last.safetensors) to continue exactly")
    train.add_argument("--overwrite", action="store_true", help="replace the run an explicit --output holds")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(func=_cmd_train)
    probe = group.add_parser("probe", help="k-NN and linear-probe accuracy of a run's frozen teacher backbone")
    probe.add_argument("run", help="a `ctxagg ssl train` run folder (or its teacher.safetensors)")
    probe.add_argument("--data", help="labelled data spec (default: the run's data)")
    probe.add_argument("--epochs", type=int, default=100, help="linear-probe epochs (default 100, DINO's)")
    probe.add_argument("--lr", type=float, default=1e-3, help="linear-probe AdamW learning rate")
    probe.add_argument("--knn-k", type=int, default=20)
    probe.add_argument("--fraction", type=float, default=1.0, help="fraction of the train split used (stratified)")
    probe.add_argument("--val-limit", type=int, default=0, help=">0: evaluate on this many validation images")
    probe.add_argument("--device", default="auto")
    probe.add_argument("--seed", type=int, default=0)
    probe.add_argument("--output", help="JSON file or folder (default: <run>/probe.json)")
    probe.add_argument("--overwrite", action="store_true", help="replace an existing probe.json")
    probe.set_defaults(func=_cmd_probe)
