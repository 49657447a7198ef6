"""The library's own error types: what `ctxagg` (the command) reports in one line without a traceback.

Every error a user can cause by what they pass (settings, paths, data, checkpoints, an output folder that
already holds results) derives from :class:`CtxaggError`. Anything else, e.g. a bug raised inside torch, is
not one of these and keeps its traceback.
"""
from __future__ import annotations

__all__ = ["CtxaggError", "ConfigError", "RunExistsError", "TorchScriptUnsupportedError"]


class CtxaggError(Exception):
    """Base of every error the library raises on purpose for bad input, with a message saying what to do."""


class ConfigError(CtxaggError, ValueError):
    """Settings that cannot work (a ``ValueError`` too, so ``except ValueError`` keeps catching it)."""


class RunExistsError(CtxaggError, FileExistsError):
    """An output folder already holds what an earlier command wrote; nothing was changed."""


class TorchScriptUnsupportedError(CtxaggError, RuntimeError):
    """``torch.jit.script`` of a model holding a part that declares itself unscriptable; the message names the part
    and why, and what to use instead (torch.export, ONNX, torch.compile)."""
