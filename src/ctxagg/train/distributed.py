"""Device choice and torch.distributed plumbing shared by `ctxagg train` and `ctxagg eval`.

One process, or several under ``torchrun`` (gloo on CPU, nccl on GPU); ``LOCAL_RANK`` picks each process's GPU.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["resolve_device", "init_distributed", "rank_and_world"]


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA if available, else CPU; under torchrun, ``cuda`` → this process's ``cuda:LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and os.environ.get("LOCAL_RANK"):
        name = f"cuda:{os.environ['LOCAL_RANK']}"
    return torch.device(name)


def init_distributed(device: torch.device) -> None:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); a no-op in a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
