"""Checkpoints: safetensors only, written atomically (temp file, fsync, rename).

A training checkpoint is ONE safetensors file holding the model (``model.``), EMA (``ema.``), optimiser
(``optim.``) and RNG (``rng.``) tensors, with the run's JSON state (config, epoch, optimiser param groups,
metrics) in the file's metadata, so a crash can never leave the tensors and the state out of step, and a
SHA-256 of the tensors, so corrupt tensor bytes are refused. Weights are read from safetensors, or from
``torch.load(weights_only=True)`` files; a pickle that would import anything else is refused unexecuted.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import struct
import tempfile
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor, nn

from ..errors import CtxaggError

__all__ = ["atomic_write", "eager_keys", "write_metrics_csv", "save_checkpoint", "load_checkpoint",
           "load_model_weights", "CheckpointError", "tensor_digest", "optimizer_state_to_flat",
           "optimizer_state_from_flat", "rng_state", "set_rng_state"]

META_KEY = "ctxagg"
DIGEST_KEY = "ctxagg.sha256"


class CheckpointError(CtxaggError, ValueError):
    """A checkpoint that cannot be used: unreadable, corrupt, unsafe, or for another model."""


def atomic_write(path: Union[str, Path], data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a torn one.

    The bytes go to a temp file in the same folder, are fsynced, then renamed over ``path``. If anything fails
    (a full disk, an interrupt) the temp file is removed, ``path`` is left as it was, and an ``OSError`` naming
    ``path`` is raised."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            kept = "the previous file is unchanged" if path.exists() else "nothing was written"
            raise OSError(exc.errno, f"could not write {path} ({exc.strerror or exc}); {kept}") from exc
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def tensor_digest(tensors: dict[str, Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes (in name order): detects corrupt tensor data,
    which safetensors' own header checks cannot see."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def write_metrics_csv(path: Union[str, Path], history: list[dict[str, Any]]) -> None:
    """One row per epoch record, columns in first-seen order; list or dict values (confusion matrices, per-class
    IoU) stay out of the CSV. Written atomically."""
    keys = list(dict.fromkeys(k for h in history for k in h if not isinstance(h[k], (list, dict))))
    lines = [",".join(keys)] + [",".join(f"{h[k]:.6g}" if isinstance(h.get(k), float) else str(h.get(k, ""))
                                         for k in keys) for h in history]
    atomic_write(path, ("\n".join(lines) + "\n").encode())


def save_checkpoint(path: Union[str, Path], tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """One safetensors file with ``meta`` as JSON and a SHA-256 of the tensors in its metadata, written atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {META_KEY: json.dumps(meta), DIGEST_KEY: tensor_digest(tensors)}
    atomic_write(path, save_safetensors_bytes(tensors, metadata=metadata))


def _header_metadata(data: bytes, path: Path) -> dict[str, str]:
    if len(data) < 8:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint: it is {len(data)} bytes long "
                              "(truncated or empty)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint: its header claims {n} bytes but the "
                              f"file has {len(data) - 8} after the length field (truncated, or not safetensors)")
    try:
        header = json.loads(data[8: 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint: its header is not JSON ({exc})") \
            from exc
    return header.get("__metadata__") or {} if isinstance(header, dict) else {}


def load_checkpoint(path: Union[str, Path]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and JSON state of a ctxagg safetensors checkpoint; a truncated or corrupt file (including tensor
    bytes that do not match the stored SHA-256) raises :class:`CheckpointError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from exc
    metadata = _header_metadata(data, path)
    try:
        tensors = load_safetensors_bytes(data)
        meta = json.loads(metadata.get(META_KEY, "{}"))
    except (SafetensorError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint: {exc}") from exc
    expected = metadata.get(DIGEST_KEY)
    if expected is not None and tensor_digest(tensors) != expected:
        raise CheckpointError(f"{path} is corrupt: its tensor data does not match the SHA-256 stored when it was "
                              "written")
    return tensors, meta


COMPILED_PREFIX = "_orig_mod."  # what torch.compile(module) puts before every key of the wrapped module


def eager_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with torch.compile's ``_orig_mod.`` removed from every key (at any depth), so the weights of a
    ``torch.compile(model)`` wrapper load into the eager model; eager keys pass unchanged."""
    return {key.replace(COMPILED_PREFIX, ""): value for key, value in state.items()}


def _file_kind(path: Path) -> str:
    """'safetensors', 'zip' (torch.save), 'pickle' (legacy torch.save / raw pickle) or 'unknown', by content."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def _read_weights(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    kind = _file_kind(path)
    if path.suffix == ".safetensors" or kind == "safetensors":
        tensors, meta = load_checkpoint(path)
        if any(k.startswith("model.") for k in tensors):
            tensors = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        return eager_keys(tensors), meta
    try:  # torch files: never unpickle arbitrary objects
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # what weights_only raises for any global it does not allow
        first = str(exc).strip().splitlines()
        detail = next((line.strip() for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first
                      else type(exc).__name__)
        raise CheckpointError(f"refusing to load {path}: it holds pickled Python objects that could run code when "
                              f"loaded ({detail}). Only safetensors files and plain tensor state dicts "
                              "(torch.load(weights_only=True)) are loaded; if you trust the file, convert it to "
                              "safetensors yourself") from exc
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint (expected safetensors, or a torch.save state dict"
                              f"; {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})"
                              ) from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors (found {type(obj).__name__})")
    return eager_keys(obj), {}


def load_model_weights(model: nn.Module, path: Union[str, Path], filter_fn=None) -> dict[str, Any]:
    """Load weights into ``model`` strictly, explaining any missing, unexpected or mis-shaped key.
    Returns the checkpoint's JSON state (empty for plain weight files)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state, meta = _read_weights(path)
    if filter_fn is not None:
        state = filter_fn(state, model)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        trained_for = meta.get("config", {}).get("model")
        lines = [f"checkpoint {path} does not fit this model"
                 + (f" (it was trained as {trained_for!r})" if trained_for else "") + ":"]
        for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", shapes)):
            if keys:
                lines.append(f"  {len(keys)} {title}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state, strict=True)
    return meta


def optimizer_state_to_flat(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (``optim.<param>.<key>``) and JSON-able rest."""
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_state_from_flat(tensors: dict[str, Tensor], js: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in js["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": js["param_groups"]}


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Every random generator a training step draws from, to make resume exact."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    js = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
          "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, js


def set_rng_state(tensors: dict[str, Tensor], js: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = js["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = js["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
