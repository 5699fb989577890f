"""Argument and result checks of :func:`grpo_mel.chunked_linear`: bad input is a clear error, never a silently
different number."""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

REDUCTIONS = ("mean", "sum")


def as_outputs(out) -> tuple[torch.Tensor, ...]:
    """f's result as a tuple of tensors; a clear error for anything else."""
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out) and len(out) > 0:
        return tuple(out)
    raise TypeError(
        "the transformation function must return a tensor or a non-empty tuple of tensors, "
        f"got {type(out).__name__}"
    )


def check_x(X) -> None:
    """X is a tensor of at least 2 dimensions, ``[..., H]`` with one or more leading (row) dimensions: a 1-D X would
    be one hidden vector with no row axis, which none of the entry points' outputs (one value per row) can index."""
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"X must be a tensor [..., H], got {type(X).__name__}")
    if X.dim() < 2:
        raise ValueError(f"X must have at least 2 dimensions [N, H] or [..., N, H] (rows, then hidden), got shape "
                         f"{tuple(X.shape)}; for a single row use X[None]")


def validate_inputs(X, weight, bias, row_args, reduction) -> None:
    """chunked_linear's arguments: a clear error naming the problem, before any work."""
    check_x(X)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a tensor [V, H], got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got shape {tuple(weight.shape)}")
    if X.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden size mismatch: X has shape {tuple(X.shape)} (H={X.shape[-1]}) but weight has shape "
            f"{tuple(weight.shape)} (H={weight.shape[1]})"
        )
    if not X.is_floating_point() or not weight.is_floating_point():
        raise TypeError(f"X and weight must be floating point, got X {X.dtype} and weight {weight.dtype}")
    if X.dtype != weight.dtype:
        raise TypeError(
            f"dtype mismatch: X is {X.dtype} but weight is {weight.dtype}; cast one (under autocast, cast X "
            "to the weight's dtype, as the LM head's own matmul would)"
        )
    if X.device != weight.device:
        raise ValueError(f"device mismatch: X is on {X.device} but weight is on {weight.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be a tensor of shape ({weight.shape[0]},), got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        if bias.device != weight.device or bias.dtype != weight.dtype:
            raise TypeError(f"bias must match weight's dtype and device ({weight.dtype}, {weight.device}), "
                            f"got ({bias.dtype}, {bias.device})")
    lead = tuple(X.shape[:-1])
    for k, a in enumerate(row_args):
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"row argument {k} must be a tensor, got {type(a).__name__}; "
                            "pass constants through functools.partial")
        if tuple(a.shape[: len(lead)]) != lead:
            raise ValueError(
                f"row argument {k} has shape {tuple(a.shape)} but must start with X's leading shape {lead} "
                f"(X is {tuple(X.shape)})"
            )
        if a.device != X.device:
            raise ValueError(f"device mismatch: row argument {k} is on {a.device} but X is on {X.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_temperature(temperature) -> None:
    """A finite number > 0 (the logits are divided by it; 0 gives NaN and a negative one reverses them)."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__} {temperature!r}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")


def check_chunk_outputs(res: Sequence[torch.Tensor], scalar: Sequence[bool], rows: int) -> None:
    """Every chunk's f returns the same number of outputs, each per-row ([rows, ...]) or 0-dim on all."""
    if len(res) != len(scalar):
        raise ValueError(f"the transformation function returned {len(res)} outputs on one chunk "
                         f"and {len(scalar)} on another")
    for k, (r, s) in enumerate(zip(res, scalar)):
        if s and r.dim() != 0:
            raise ValueError(f"output {k} of the transformation function is a scalar on one chunk but has shape "
                             f"{tuple(r.shape)} on another")
        if not s and (r.dim() == 0 or r.shape[0] != rows):
            raise ValueError(
                f"output {k} of the transformation function has shape {tuple(r.shape)} for a chunk of {rows} rows; "
                "per-row outputs must have the chunk's rows as their first dimension (or be 0-dim scalars)"
            )
