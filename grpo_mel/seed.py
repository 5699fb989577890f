"""The seed notebook's calling convention, mapped onto :func:`grpo_mel.chunked_linear`: ``MemoryEfficientLinear``.

``MemoryEfficientLinear.apply(X, linear, labels, forward_function[, chunk_size[, reduction]])`` where
``forward_function(batch, linear, labels)`` calls ``linear(batch)`` itself. Each chunk's function gets a
stand-in module whose call returns the chunk's logits (computed by the Function, under ``no_grad`` in
forward and with autograd on in backward), so ``linear(batch)`` costs nothing and its gradient arrives at
the logits as dZ_c, the same route as any ``chunked_linear`` function.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn

from ._checks import as_outputs
from .linear import ChunkedLinear, chunked_linear

_IGNORE_INDEX = -100  # torch's cross_entropy default, the seed convention's labels


class MemoryEfficientLinear(ChunkedLinear):
    """The chunked Function (:class:`grpo_mel.linear.ChunkedLinear`) with the seed notebook's calling convention:
    ``MemoryEfficientLinear.apply(X, linear, labels, forward_function[, chunk_size[, reduction]])`` where
    ``forward_function(batch, linear, labels)`` calls ``linear(batch)`` itself. Prefer
    :func:`grpo_mel.chunked_linear`. Any other ``apply`` is the Function's own."""

    @classmethod
    def apply(cls, *args, **kwargs):  # noqa: D102 - documented on the class
        if _is_seed_call(args, kwargs):
            return _seed_apply(*args)
        return super().apply(*args, **kwargs)


def _is_seed_call(args: tuple, kwargs: dict) -> bool:
    """``apply(X, linear, labels, forward_function, ...)``, told apart from the Function's own arguments."""
    return len(args) >= 4 and isinstance(args[1], nn.Module) and callable(args[3]) and not kwargs


def _seed_apply(X, linear: nn.Module, labels, forward_function: Callable, *extra):
    if len(extra) > 2:
        raise TypeError("MemoryEfficientLinear.apply(X, linear, labels, forward_function, "
                        "[chunk_size, [reduction]]) takes at most 6 arguments")
    chunk_size = extra[0] if len(extra) > 0 else None
    reduction = extra[1] if len(extra) > 1 else "mean"
    fn = _SeedFunction(forward_function, linear)
    # X rides along as a row argument only so f can be handed its chunk's rows; detached, it gets no gradient
    # of its own (the stand-in linear ignores it: dX comes through the logits)
    out = chunked_linear(
        X, linear.weight, fn, X.detach(), labels, bias=getattr(linear, "bias", None),
        chunk_size=chunk_size, reduction=reduction,
    )
    _warn_mean_over_ignored_labels(out, labels, reduction)
    return out


class _LogitsStandIn(nn.Module):
    """Handed to ``forward_function`` in place of the real ``linear``: calling it returns the chunk's logits."""

    def __init__(self, logits: torch.Tensor, linear: nn.Module):
        super().__init__()
        self._logits = logits
        self.weight = linear.weight  # for f that reads e.g. ``linear.weight.size(0)``
        self.bias = getattr(linear, "bias", None)
        self.in_features = getattr(linear, "in_features", linear.weight.shape[1])
        self.out_features = getattr(linear, "out_features", linear.weight.shape[0])

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        rows = self._logits.shape[0]
        if batch.shape[-1] != self.in_features or batch.numel() // max(batch.shape[-1], 1) != rows:
            raise ValueError(
                f"forward_function called linear() on a tensor of shape {tuple(batch.shape)}, but the chunk "
                f"it was given has {rows} rows of width {self.in_features}; call linear() on the batch it received"
            )
        return self._logits.view(*batch.shape[:-1], self._logits.shape[-1])


class _SeedFunction:
    """Adapts ``forward_function(batch, linear, labels)`` to the ``fn(z, x_c, labels_c)`` form."""

    def __init__(self, forward_function: Callable, linear: nn.Module):
        self.forward_function = forward_function
        self.linear = linear

    def __call__(self, z: torch.Tensor, x_c: torch.Tensor, *rest: torch.Tensor):
        return self.forward_function(x_c, _LogitsStandIn(z, self.linear), *rest)


def _warn_mean_over_ignored_labels(out, labels: torch.Tensor, reduction: str) -> None:
    """The seed convention weights a scalar f's chunks by their share of rows: exact for a mean over all rows,
    not for a mean over the labels that are not ignored (cross-entropy's default), so say so when it applies."""
    scalar = any(o.dim() == 0 for o in as_outputs(out))
    if reduction == "mean" and scalar and bool((labels == _IGNORE_INDEX).any()):
        warnings.warn(
            "MemoryEfficientLinear.apply: forward_function returned a scalar, which reduction='mean' combines over "
            f"chunks by their share of rows, and labels contain {_IGNORE_INDEX} (ignored). A mean over the "
            "labels that are not ignored (e.g. cross_entropy's default) then differs from the full-batch value "
            "(NaN if a chunk has only ignored labels). For cross-entropy use grpo_mel.linear_cross_entropy(X, "
            "linear.weight, labels, bias=linear.bias); otherwise return a sum per chunk, pass reduction='sum' and "
            f"divide by (labels != {_IGNORE_INDEX}).sum().",
            UserWarning, stacklevel=4,
        )
