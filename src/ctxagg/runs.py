"""Run and results folders: a second command never destroys what the first one wrote.

The conventions every command that writes a folder follows (train, compare, eval, bench, inspect, dense, ssl):

- **Default: a new folder per run**, as timm's ``train.py`` does: :func:`new_run_dir` creates
  ``<root>/<part>-<part>-<YYYYmmdd-HHMMSS>`` with ``os.mkdir`` (atomic), adding ``-1``, ``-2``, ... when another
  process took the name in the same second. Under ``torchrun`` only rank 0 creates it; the other ranks
  receive its path (a ``broadcast_object_list``), so ranks never create folders of their own.
- **``<root>/latest``** points at the newest training run (:func:`update_latest`): a symlink, or a small
  pointer file where symlinks are unavailable; :func:`resolve_run_path` follows both, so
  ``runs/latest/model_best.safetensors`` works either way.
- **An explicit output folder that already holds results is refused** (:func:`refuse_existing`) with a
  message naming what is there (for a training run: model, data, epochs done, best accuracy, read by
  :func:`describe_run`) and the ways forward (``--resume DIR`` where the command can continue, ``--overwrite``).
  With ``overwrite=True`` the files the command writes are removed first (:func:`remove_outputs`), so an old
  run's checkpoint can never sit next to a new run's metrics.

Usage in a command, the one call (rank-aware; raises :class:`RunExistsError` on every rank alike)::

    out = output_dir(args.output, "dense", model, data_tag(data), overwrite=args.overwrite,
                     outputs=("metrics.csv", "last.safetensors"), resumable=True, latest=True)

``output=None`` gives ``runs/dense-<model>-<data>-<stamp>`` (and, with ``latest=True``, moves ``runs/latest``);
an explicit folder is checked by :func:`refuse_existing` and created. :func:`on_rank0` runs any other
file-system step on rank 0 and hands its result (or its error) to every rank.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
import struct
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

from .errors import CtxaggError, RunExistsError

__all__ = ["output_dir", "on_rank0", "remove_temp_files", "DEFAULT_ROOT", "new_run_dir", "refuse_existing", "update_latest", "resolve_run_path", "describe_run", "data_tag",
           "remove_outputs", "timestamp", "POINTER_MAGIC", "RunExistsError"]

log = logging.getLogger("ctxagg.runs")
PathLike = Union[str, Path]
DEFAULT_ROOT = "runs"  # where default run and results folders go (relative to the working directory)
POINTER_MAGIC = "ctxagg run pointer"  # first line of a `latest` pointer file (where symlinks are unavailable)


def timestamp(now: Optional[float] = None) -> str:
    """``YYYYmmdd-HHMMSS`` in local time (timm's run-folder stamp)."""
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(now))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+]+", "-", str(text)).strip("-.") or "x"


def data_tag(spec: str) -> str:
    """A short folder-name part for a data spec: ``digits``, ``cifar10``, ``mnist``, or an image folder's name."""
    kind, _, path = spec.partition(":")
    if kind == "imagefolder" and path:
        return _slug(Path(path).expanduser().resolve().name)
    return _slug(kind)


def _distributed() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _share_from_rank0(value: Optional[str]) -> str:
    """Rank 0's ``value`` on every rank (the identity in a single process)."""
    rank, world = _distributed()
    if world == 1:
        assert value is not None
        return value
    import torch.distributed as dist

    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only and return its result on every rank; a :class:`CtxaggError` it raises is raised
    on every rank (as :class:`RunExistsError` elsewhere than rank 0), so no rank waits for a rank that failed."""
    rank, world = _distributed()
    if world == 1:
        return fn()
    import torch.distributed as dist

    box: list[Any] = [None]
    if rank == 0:
        try:
            box = [(fn(), None)]
        except CtxaggError as exc:
            box = [(None, exc)]
    dist.broadcast_object_list(box, src=0)
    result, error = box[0]
    if error is not None:
        raise error if rank == 0 else RunExistsError(str(error))
    return result


def output_dir(output: Optional[PathLike], *parts: str, overwrite: bool = False, outputs: Iterable[str] = (),
               resumable: bool = False, root: PathLike = DEFAULT_ROOT, latest: bool = False,
               flag: str = "--output") -> Path:
    """The folder a command writes to, created on rank 0 and known to every rank.

    ``output`` None: a new ``root/<parts>-<stamp>[-N]`` (:func:`new_run_dir`), and with ``latest`` the
    ``root/latest`` pointer moves to it. Otherwise ``output`` (pointer files followed) after
    :func:`refuse_existing` (``overwrite`` removes the ``outputs`` it names first)."""
    def make() -> str:
        if output is None:
            out = _mkdir_unique(Path(root), _run_name(parts))
            if latest:
                update_latest(root, out)
            return str(out)
        out = refuse_existing(output, overwrite, resumable, flag, outputs)
        out.mkdir(parents=True, exist_ok=True)
        return str(out)

    return Path(on_rank0(make))


def _run_name(parts: Iterable[str], stamp: bool = True) -> str:
    return "-".join([_slug(p) for p in parts if p] + ([timestamp()] if stamp else [])) or timestamp()


def _mkdir_unique(root: Path, name: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for n in range(10_000):
        candidate = root / (name if n == 0 else f"{name}-{n}")
        try:
            os.mkdir(candidate)  # atomic: exactly one process gets each name
            return candidate
        except FileExistsError:
            continue
    raise RunExistsError(f"could not find a free folder name {name}-N under {root}")


def new_run_dir(root: PathLike, *parts: str, stamp: bool = True) -> Path:
    """Create and return a new, empty folder ``root/<parts...>-<YYYYmmdd-HHMMSS>[-N]``, unique even when several
    processes start in the same second. Under torch.distributed only rank 0 creates it; every rank gets its path.

    ``stamp=False`` leaves the time out (``root/<parts>[-N]``), for results kept next to a run (``eval-val``)."""
    rank, _ = _distributed()
    path = str(_mkdir_unique(Path(root), _run_name(parts, stamp))) if rank == 0 else None
    return Path(_share_from_rank0(path))


def _visible_entries(folder: Path) -> list[str]:
    # dot-files are temp files of interrupted atomic writes, never results
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def refuse_existing(output: PathLike, overwrite: bool = False, resumable: bool = False, flag: str = "--output",
                    outputs: Iterable[str] = ()) -> Path:
    """Return ``output`` if it is absent or empty; if it holds files, raise :class:`RunExistsError` naming what is
    there and how to go on, unless ``overwrite`` (then the ``outputs`` this command writes are removed first).

    Only checks (and removes with ``overwrite``); creating the folder is the caller's job, on rank 0 only."""
    out = resolve_run_path(output)
    if out.exists() and not out.is_dir():
        raise RunExistsError(f"{flag} {output} exists and is not a folder")
    held = _visible_entries(out) if out.is_dir() else []
    if not held:
        return out
    if overwrite:
        remove_outputs(out, outputs)
        return out
    ways = [f"--resume {output} to continue it"] if resumable and (out / "last.safetensors").is_file() else []
    ways += [f"another {flag}", "--overwrite to replace it"]
    raise RunExistsError(f"{flag} {output} already holds {describe_run(out)}; nothing was changed. "
                         f"Use {', '.join(ways[:-1])} or {ways[-1]}")


def remove_temp_files(folder: PathLike) -> None:
    """Delete the ``.<name>.*.tmp`` files an interrupted atomic write left in ``folder`` (a run being continued)."""
    for tmp in Path(folder).glob(".*.tmp"):  # left only by a kill mid-write
        log.warning("removing %s, left by an interrupted checkpoint write", tmp)
        tmp.unlink(missing_ok=True)


def remove_outputs(folder: PathLike, names: Iterable[str]) -> list[Path]:
    """Delete ``folder/name`` (files, and their ``.name.*.tmp`` leftovers) for every name; returns what went."""
    gone = []
    for name in names:
        for path in [Path(folder) / name, *Path(folder).glob(f".{name}.*.tmp")]:
            if path.is_file() or path.is_symlink():
                path.unlink()
                gone.append(path)
    return gone


def _safetensors_metadata(path: Path) -> dict:
    """The ``ctxagg`` JSON metadata of a safetensors file, read from its header only (no tensors)."""
    try:
        with open(path, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(min(size, 1 << 26)))
        return json.loads(header.get("__metadata__", {}).get("ctxagg", "{}"))
    except (OSError, ValueError, struct.error):
        return {}


def _run_summary(folder: Path) -> Optional[dict]:
    config = {}
    if (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            config = {}
    meta = _safetensors_metadata(folder / "last.safetensors") if (folder / "last.safetensors").is_file() else {}
    config = config or meta.get("config", {})
    history = meta.get("history") or []
    if (folder / "metrics.csv").is_file():
        try:
            history = list(csv.DictReader(open(folder / "metrics.csv")))
        except (OSError, csv.Error):
            pass
    if not config and not history:
        return None
    tops = [float(h["val_top1"]) for h in history if h.get("val_top1") not in (None, "")]
    return dict(model=config.get("model", "?"), data=config.get("data", "?"), epochs=len(history),
                of=config.get("epochs"), best=max(tops) if tops else None)


def describe_run(folder: PathLike) -> str:
    """One phrase for what ``folder`` holds, e.g. ``a container_light run on digits (8 of 8 epochs done, best
    val top-1 96.66%)``, or for other results the first file names."""
    folder = Path(folder)
    summary = _run_summary(folder)
    if summary is not None:
        of = f" of {summary['of']}" if summary["of"] else ""
        best = f", best val top-1 {summary['best']:.2f}%" if summary["best"] is not None else ""
        return (f"a {summary['model']} run on {summary['data']} ({summary['epochs']}{of} epochs done{best})")
    names = _visible_entries(folder)
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return f"{len(names)} file(s) from an earlier command ({shown})"


def _write_pointer(link: Path, target: Path) -> None:
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{POINTER_MAGIC}\n{os.path.relpath(target, link.parent)}\n")
    os.replace(tmp, link)


def _read_pointer(path: Path) -> Optional[Path]:
    try:
        if path.is_file() and path.stat().st_size < 4096:
            lines = path.read_text().splitlines()
            if len(lines) >= 2 and lines[0] == POINTER_MAGIC:
                return path.parent / lines[1]
    except (OSError, UnicodeDecodeError):
        pass
    return None


def update_latest(root: PathLike, run_dir: PathLike, name: str = "latest") -> Path:
    """Point ``root/name`` at ``run_dir`` (a relative symlink, replaced atomically; a pointer file where symlinks
    are unavailable). A real folder of that name (an older ctxagg's ``runs/latest``) is moved aside, never
    deleted. Call on rank 0 only."""
    link, target = Path(root) / name, Path(run_dir)
    if link.is_dir() and not link.is_symlink():
        aside = _mkdir_unique(Path(root), f"{name}-moved-{timestamp(link.stat().st_mtime)}")
        os.replace(link, aside)  # onto the fresh empty folder: an atomic rename
        log.warning("%s was a run folder, not a pointer; moved it to %s", link, aside)
    tmp = link.with_name(f".{name}.{os.getpid()}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(os.path.relpath(target, link.parent), tmp, target_is_directory=True)
        os.replace(tmp, link)
    except (OSError, NotImplementedError):
        tmp.unlink(missing_ok=True)
        _write_pointer(link, target)
    return link


def resolve_run_path(path: PathLike) -> Path:
    """``path`` with any ``latest`` pointer file on it followed (symlinks the OS follows itself)."""
    path = Path(path)
    parts = path.parts
    for i in range(1, len(parts) + 1):
        target = _read_pointer(Path(*parts[:i]))
        if target is not None:
            return resolve_run_path(Path(target, *parts[i:]))
    return path
