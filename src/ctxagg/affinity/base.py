"""The affinity contract shared by every spatial mixer (Container, Eq. 2-3).

An affinity maps values ``V`` to ``A·V`` where ``A`` is an N×N matrix per head.
``forward`` computes it the fast way; ``matrix`` returns ``A`` explicitly so
that ``apply_matrix(matrix(), V) + bias == forward(V)`` can be checked.

torch.fx: the layout helpers below branch on ``ndim``/shapes, so they are leaf functions (one graph node each,
run on real tensors; :func:`ctxagg.tracing.fx_leaf`); checks skip symbolic (Proxy) inputs. Operators built on
them trace through.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import TorchScriptUnsupportedError
from ..tracing import fx_leaf, is_symbolic

__all__ = ["Affinity", "split_heads", "merge_heads", "apply_matrix", "token_count", "to_tokens", "from_tokens",
           "check_fixed_tokens"]


@fx_leaf
def token_count(shape: Sequence[int]) -> int:
    """Number of tokens N of a (B, C, H, W) feature map or (B, N, C) token tensor shape."""
    return shape[2] * shape[3] if len(shape) == 4 else shape[1]


@fx_leaf
def to_tokens(x: Tensor) -> Tensor:
    """A (B, C, H, W) feature map or (B, N, C) tokens as (B, N, C) tokens (a view where possible)."""
    return x.flatten(2).transpose(1, 2) if x.ndim == 4 else x


@fx_leaf
def from_tokens(tokens: Tensor, like_shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`to_tokens`: (B, N, C) back to the layout of ``like_shape`` ((B, C, H, W) or (B, N, C))."""
    if len(like_shape) == 4:
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], like_shape[2], like_shape[3])
    return tokens


def check_fixed_tokens(op: "Affinity", v: Tensor, grid: Optional[Sequence[int]], advice: str) -> None:
    """Refuse values whose token count is not the ``op.fixed_tokens`` a fixed-size operator was built for, naming
    the size it was built for (``grid`` H×W when known) and what was given; ``advice`` says why and what to do."""
    if is_symbolic(v):
        return
    n = token_count(v.shape)
    if n != op.fixed_tokens:
        built = f"{grid[0]}×{grid[1]}" if grid else str(op.fixed_tokens)
        got = f"{v.shape[2]}×{v.shape[3]}" if v.ndim == 4 else str(n)
        raise ValueError(f"{type(op).__name__} was built for {built} tokens ({op.fixed_tokens}) and got {got} ({n}); "
                         + advice)


@fx_leaf
def split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, C, H, W) or (B, N, C) -> (B, M, N, C/M); channel c belongs to head c // (C/M).

    Goes through token layout, so a channels_last feature map splits without a copy."""
    if x.ndim == 4:
        x = x.flatten(2).transpose(1, 2)
    elif x.ndim != 3:
        raise ValueError(f"expected a (B, C, H, W) feature map or (B, N, C) tokens, got shape {tuple(x.shape)}")
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


@fx_leaf
def merge_heads(x: Tensor, like_shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`split_heads`: (B, M, N, d) back to the layout of ``like_shape``
    (a 4-D result has channels_last strides when ``x`` is contiguous)."""
    b, m, n, d = x.shape
    tokens = x.transpose(1, 2).clone(memory_format=torch.contiguous_format).reshape(b, n, m * d)  # explicit copy:
    # reshape would copy anyway, and under torch.export SDPA's decomposed strides differ from its meta strides
    if len(like_shape) == 4:
        return tokens.transpose(1, 2).reshape(b, m * d, like_shape[2], like_shape[3])
    return tokens


@fx_leaf
def apply_matrix(a: Tensor, v: Tensor, out_shape: Optional[Sequence[int]] = None) -> Tensor:
    """Reference aggregation ``A·V`` with an explicit affinity ``a`` of shape (B or 1, M, N, N).

    A non-square spatial affinity (B or 1, M, N_out, N) (pooled queries, MViT) gives N_out outputs laid out as
    ``out_shape`` (the operator's :meth:`Affinity.output_shape`); square ones come back shaped like ``v``."""
    heads = a.shape[1]
    vh = split_heads(v, heads)
    b, m, n, d = vh.shape
    if a.shape[-1] == n:
        return merge_heads(a @ vh, v.shape if out_shape is None else out_shape)
    if a.shape[-1] == n * d:  # channel-mixing affinity over (position, channel) pairs, index n·d + c
        return merge_heads((a @ vh.reshape(b, m, n * d, 1)).view(b, m, n, d), v.shape)
    raise ValueError(f"affinity of shape {tuple(a.shape)} does not fit values of shape {tuple(v.shape)}")


@fx_leaf
def _add_channel_bias(x: Tensor, bias: Tensor) -> Tensor:
    """``x`` plus a per-channel (C,) offset, in either layout."""
    return x + (bias.view(1, -1, 1, 1) if x.ndim == 4 else bias)


TORCHSCRIPT_REASON = (
    "ctxagg operators are not TorchScript-compatible (TorchScript is deprecated upstream): they take (B, C, H, W) "
    "or (B, N, C) values and optional q, k and bias inputs, Python that torch.jit.script cannot compile. Use "
    "torch.export or ONNX (`ctxagg export`), torch.compile, or torch.jit.trace")


class Affinity(nn.Module):
    """Base class of an affinity operator ``V -> A·V (+ bias)`` (Container §3.1, Eq. 3).

    Attributes:
        dynamic: whether ``A`` depends on the input (needs ``q``/``k``).
        heads: M; channel ``c`` belongs to head ``c // (C // M)``.
        fixed_tokens: the token count N an operator was built for, or None if any N works.
        needs_grid: whether the operator needs a 2-D (B, C, H, W) layout (convolutions).
        torchscript_unsupported: why ``torch.jit.script`` cannot compile the operator (None for one that can);
            scripting a model that holds it raises :class:`~ctxagg.errors.TorchScriptUnsupportedError` with it.
    """

    dynamic: bool = False
    needs_grid: bool = False
    torchscript_unsupported: Optional[str] = TORCHSCRIPT_REASON

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        self.dim = dim
        self.heads = heads
        self.fixed_tokens: Optional[int] = None

    def __prepare_scriptable__(self) -> "Affinity":
        """``torch.jit.script`` calls this on every submodule first: refuse with the reason, not a compiler error."""
        if self.torchscript_unsupported:
            raise TorchScriptUnsupportedError(f"{type(self).__name__}: {self.torchscript_unsupported}")
        return self

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def forward(self, v: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        raise NotImplementedError

    def matrix(self, v_shape: Sequence[int], q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        """The explicit affinity, shape (B or 1, heads, N, N)."""
        raise NotImplementedError

    def bias_term(self) -> Optional[Tensor]:
        """Per-channel offset added after ``A·V`` (a conv bias), shape (C,), or None."""
        return None

    def pop_bias(self) -> Optional[Tensor]:
        """Deployment fold: remove the constant per-channel offset this operator adds after ``A·V`` and return it
        (shape (C,)) for the next linear layer to absorb; None if nothing can be removed. Afterwards
        ``forward(v) + returned == old forward(v)``."""
        return None

    def macs(self, tokens: int) -> int:
        """Multiply-accumulates of ``A·V`` (and of building ``A``) for one image of ``tokens`` tokens."""
        raise NotImplementedError

    def output_shape(self, v_shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of ``forward``'s result for values of ``v_shape``: the same for every square affinity (an operator
        with pooled queries, whose A is N_out×N, returns its pooled grid)."""
        return tuple(v_shape)

    def check_input(self, v: Tensor) -> None:
        """Raise a clear error for layouts or sizes this operator cannot take (nothing to check while torch.fx
        traces: a Proxy has no shape)."""
        if is_symbolic(v):
            return
        if v.ndim not in (3, 4):
            raise ValueError(f"{type(self).__name__} expects (B, C, H, W) or (B, N, C), got {tuple(v.shape)}")
        if self.needs_grid and v.ndim != 4:
            raise ValueError(f"{type(self).__name__} is a convolution and needs a (B, C, H, W) feature map")
        channels = v.shape[1] if v.ndim == 4 else v.shape[2]
        if channels != self.dim:
            raise ValueError(f"{type(self).__name__} was built for {self.dim} channels, got {channels}")

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}"

    @staticmethod
    def add_bias(x: Tensor, bias: Optional[Tensor]) -> Tensor:
        return x if bias is None else _add_channel_bias(x, bias)

    def reference(self, v: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None) -> Tensor:
        """``A·V + bias`` computed through the explicit matrix: slow, for tests and analysis."""
        return self.add_bias(apply_matrix(self.matrix(v.shape, q, k), v, self.output_shape(v.shape)), self.bias_term())
