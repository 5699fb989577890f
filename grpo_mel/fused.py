"""The fused front doors: the LM head and a built-in loss in one call, without the [N, V] logits.

Each checks its labels and binds a function of :mod:`grpo_mel.functions` for :func:`grpo_mel.chunked_linear`.
"""

from __future__ import annotations

import functools

import torch

from ._checks import check_temperature, check_x
from .functions import check_labels, cross_entropy, token_logprobs, token_logprobs_and_entropy
from .linear import chunked_linear

__all__ = ["linear_cross_entropy", "linear_token_logprobs"]


def linear_cross_entropy(
    X, weight, labels, bias=None, reduction="mean", ignore_index=-100, label_smoothing=0.0,
    chunk_size=None, memory_budget=None, softcap=None, logit_scale=1.0, compile=None,
):
    """Cross-entropy of ``X·Wᵀ + b`` against ``labels`` without the full logits.

    ``logit_scale`` and ``softcap`` transform the logits first (``softcap·tanh(z·scale/softcap)``, as Gemma 2 and
    Cohere models do). ``reduction="mean"`` divides by the number of non-ignored labels over the whole batch
    (exact whatever the chunking), ``"sum"`` sums, ``"none"`` returns per-row losses shaped like ``labels``.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    check_x(X)
    _check_row_labels(X, labels)
    check_labels(labels, weight.shape[0], ignore_index)
    fn = functools.partial(cross_entropy, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           softcap=softcap, logit_scale=logit_scale)
    per_row = chunked_linear(X, weight, fn, labels, bias=bias, chunk_size=chunk_size, memory_budget=memory_budget,
                             compile=compile)
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    return total / (labels != ignore_index).sum()


def linear_token_logprobs(
    X, weight, labels, bias=None, temperature=1.0, softcap=None, logit_scale=1.0, ignore_index=None,
    with_entropy=False, chunk_size=None, memory_budget=None, compile=None,
):
    """Per-token log-probs (and entropies if ``with_entropy``) of ``labels`` under ``softmax((X·Wᵀ+b)/T)``.

    ``X`` is ``[..., N, H]`` (at least 2-D), ``labels`` X's leading shape; ``temperature`` a finite number > 0.
    Returns a tensor shaped like ``labels`` (or a pair of them), float32. ``chunk_size``, ``memory_budget``,
    ``compile``: as :func:`grpo_mel.chunked_linear`.
    """
    check_x(X)
    check_temperature(temperature)
    _check_row_labels(X, labels)
    check_labels(labels, weight.shape[0], ignore_index)
    kw = dict(temperature=temperature, softcap=softcap, logit_scale=logit_scale, ignore_index=ignore_index)
    fn = functools.partial(token_logprobs_and_entropy if with_entropy else token_logprobs, **kw)
    return chunked_linear(X, weight, fn, labels, bias=bias, chunk_size=chunk_size, memory_budget=memory_budget,
                          compile=compile)


def _check_row_labels(X, labels) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a tensor, got {type(labels).__name__}")
    if tuple(labels.shape) != tuple(X.shape[:-1]):
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but X has shape {tuple(X.shape)}; "
            f"labels must have X's leading shape {tuple(X.shape[:-1])}"
        )
