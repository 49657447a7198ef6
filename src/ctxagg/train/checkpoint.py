"""Checkpoints: safetensors only, written atomically (temp file, fsync, rename).

A training checkpoint is ONE safetensors file holding the model (``model.``), EMA (``ema.``), optimiser
(``optim.``) and RNG (``rng.``) tensors, with the run's JSON state (config, epoch, optimiser param groups,
metrics) in the file's metadata, so a crash can never leave the tensors and the state out of step.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor, nn

__all__ = ["atomic_write", "save_checkpoint", "load_checkpoint", "load_model_weights", "CheckpointError",
           "optimizer_state_to_flat", "optimizer_state_from_flat", "rng_state", "set_rng_state"]

META_KEY = "ctxagg"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, unsafe, or for another model."""


def atomic_write(path: Union[str, Path], data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(path: Union[str, Path], tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, save_safetensors_bytes(tensors, metadata={META_KEY: json.dumps(meta)}))


def load_checkpoint(path: Union[str, Path]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and JSON state of a ctxagg safetensors checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        data = path.read_bytes()
        tensors = load_safetensors_bytes(data)
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
    except (SafetensorError, json.JSONDecodeError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint: {exc}") from exc
    return tensors, meta


def _read_weights(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    if path.suffix == ".safetensors":
        tensors, meta = load_checkpoint(path)
        if any(k.startswith("model.") for k in tensors):
            tensors = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        return tensors, meta
    try:  # torch files: never unpickle arbitrary objects
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"refusing to load {path}: it is not a plain tensor checkpoint loadable with "
                              f"torch.load(weights_only=True) ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return obj, {}


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
