"""Transformation functions f(z) for :func:`grpo_mel.chunked_linear`, in plain torch.

Each takes a chunk's logits ``z`` ([c, V], in the model's dtype) first, then per-row arguments, and
returns per-row values ([c]) or a tuple of them. Every one starts with :func:`prepare_logits`, which
upcasts to float32 *before* any softmax (bf16 log-softmax over 128K entries loses several bits).
None has a backward of its own: autograd differentiates them inside the chunked Function.

Constants (temperature, ignore_index, softcap) are bound with keyword arguments, e.g.
``functools.partial(token_logprobs, temperature=0.7)``; the front doors in :mod:`grpo_mel.fused` do that for you.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._chunk_graph import output_needs_grad

__all__ = [
    "prepare_logits",
    "token_logprobs",
    "token_entropy",
    "token_logprobs_and_entropy",
    "cross_entropy",
    "mse_onehot",
    "kl_to_reference",
    "z_loss",
    "check_labels",
]


def prepare_logits(
    z: torch.Tensor, temperature: float = 1.0, softcap: float | None = None, logit_scale: float = 1.0
) -> torch.Tensor:
    """float32 logits as the model and TRL see them: ``z·scale``, then ``softcap·tanh(·/softcap)``, then ``/T``.

    The order is the one of transformers' models (scale and softcapping inside the model's forward) followed
    by TRL's temperature division.
    """
    z = z.float()
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    if temperature != 1.0:
        z = z / temperature
    return z


def _safe_labels(labels: torch.Tensor, ignore_index: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if ignore_index is None:
        return labels.long(), None
    valid = labels != ignore_index
    return labels.masked_fill(~valid, 0).long(), valid


def _log_softmax(z, temperature, softcap, logit_scale) -> torch.Tensor:
    # one expression, so a scaled/softcapped/tempered copy of the logits is freed as soon as it is used
    return prepare_logits(z, temperature, softcap, logit_scale).log_softmax(-1)


def _label_logprob(logp: torch.Tensor, labels: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    safe, valid = _safe_labels(labels, ignore_index)
    if torch.compiler.is_compiling():
        # compiled (grpo_mel._compiled): the label's entry picked by a comparison with the column index, which
        # Inductor fuses with the log-softmax into one reduction, and whose backward fuses with log-softmax's into
        # one pass writing dZ (a gather's backward is a scatter into a [c, V] buffer of its own)
        cols = torch.arange(logp.shape[-1], device=logp.device)
        lp = torch.where(cols == safe.unsqueeze(-1), logp, 0.0).sum(-1)
    else:
        # eager: log_softmax + gather, one pass forward and one backward (gather - logsumexp costs ~2x on CPU)
        lp = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return lp if valid is None else lp.masked_fill(~valid, 0.0)


def _entropy(logp: torch.Tensor, differentiable: bool) -> torch.Tensor:
    if differentiable:
        return -(logp.exp() * logp).sum(-1)
    with torch.no_grad():  # only logged (GRPO's usual case): no graph, so the softmax is not saved for a backward
        return -(logp.exp().mul_(logp)).sum(-1)


def token_logprobs(z, labels, temperature=1.0, softcap=None, logit_scale=1.0, ignore_index=None):
    """log p(label | row): ``log_softmax(z)[label]`` ([c]); 0 where ``labels == ignore_index``."""
    return _label_logprob(_log_softmax(z, temperature, softcap, logit_scale), labels, ignore_index)


def token_entropy(z, temperature=1.0, softcap=None, logit_scale=1.0):
    """Entropy of softmax(z) per row ([c]): ``-Σ p·log p`` with ``log p = log_softmax(z)``."""
    return _entropy(_log_softmax(z, temperature, softcap, logit_scale), differentiable=True)


def token_logprobs_and_entropy(z, labels, temperature=1.0, softcap=None, logit_scale=1.0, ignore_index=None):
    """``(token_logprobs, token_entropy)`` from one float32 upcast and one log-softmax."""
    logp = _log_softmax(z, temperature, softcap, logit_scale)
    return _label_logprob(logp, labels, ignore_index), _entropy(logp, differentiable=output_needs_grad(1))


def cross_entropy(z, labels, ignore_index=-100, label_smoothing=0.0, softcap=None, logit_scale=1.0):
    """Per-row cross-entropy ([c]), 0 at ignored rows; float32 as ``F.cross_entropy`` on the logits as
    :func:`prepare_logits` gives them (the model's ``logit_scale`` and ``softcap``, no temperature)."""
    if torch.compiler.is_compiling():  # F.cross_entropy's formula, with the label picked as in _label_logprob
        logp = _log_softmax(z, 1.0, softcap, logit_scale)
        loss = -_label_logprob(logp, labels, ignore_index)
        if label_smoothing:
            smooth = -logp.mean(-1)
            loss = (1.0 - label_smoothing) * loss + label_smoothing * smooth.masked_fill(labels == ignore_index, 0.0)
        return loss
    return F.cross_entropy(
        prepare_logits(z, softcap=softcap, logit_scale=logit_scale), labels.long(), ignore_index=ignore_index,
        reduction="none", label_smoothing=label_smoothing,
    )


def mse_onehot(z, labels):
    """The seed notebook's second function, per row: ``mean_v (z_v - onehot(label)_v)²`` ([c])."""
    logits = z.float()
    onehot = torch.zeros_like(logits).scatter_(1, labels.long().view(-1, 1), 1.0)
    return (logits - onehot).pow(2).mean(-1)


def kl_to_reference(z, labels, ref_logprobs, temperature=1.0):
    """GRPO's per-token KL estimate to a reference policy (k3): ``exp(r - p) - (r - p) - 1`` ([c]).

    ``p`` is this row's log-prob of ``labels`` and ``r`` the reference's (``ref_logprobs``, [c]).
    """
    lp = token_logprobs(z, labels, temperature=temperature)
    delta = ref_logprobs.float() - lp
    return torch.exp(delta) - delta - 1.0


def z_loss(z):
    """PaLM's auxiliary z-loss per row: ``logsumexp(z)²`` ([c])."""
    return torch.logsumexp(z.float(), dim=-1).pow(2)


@torch.compiler.disable  # reads two numbers back to the host: a caller's torch.compile stops here, without a warning
def check_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int | None = None) -> None:
    """Raise ``ValueError`` if a label is outside ``[0, vocab_size)`` and is not ``ignore_index``.

    On CUDA this reads two numbers back to the host (one synchronisation).
    """
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.numel() == 0:
        return
    checked = labels if ignore_index is None else labels[labels != ignore_index]
    if checked.numel() == 0:
        return
    lo, hi = int(checked.min()), int(checked.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        extra = f" or ignore_index={ignore_index}" if ignore_index is not None else ""
        raise ValueError(f"labels must be in [0, {vocab_size}){extra}; found {bad}")

