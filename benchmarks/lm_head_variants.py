"""The LM-head benchmark's tasks and variants (``benchmarks/bench_lm_head.py``): what each variant computes for
one task, ``fn(task, X, W, labels) -> outputs`` (the first output gets the upstream gradient), and why a variant
cannot run here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import grpo_mel

TASKS = ("logprobs", "logprobs_entropy", "ce")
IGNORE = -100
TRL_VOCAB_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16


@dataclass
class Variant:
    name: str
    fn: Callable | None  # fn(task, X, W, labels) -> tuple of outputs (first one gets the upstream gradient)
    chunk: str = ""
    unavailable: str | None = None  # reason it cannot run here
    tasks: tuple[str, ...] = TASKS


def _naive(task, X, W, labels):
    z = F.linear(X, W)  # [N, V] in X's dtype
    if task == "ce":
        return (F.cross_entropy(z.float(), labels, ignore_index=IGNORE),)
    logp = z.float().log_softmax(-1)  # [N, V] fp32
    lp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if task == "logprobs":
        return (lp,)
    with torch.no_grad():  # TRL ≤ 1.14: entropy_from_logits(logits) under no_grad, 128 rows at a time
        ent = torch.cat([-(c.exp() * c).sum(-1) for c in (r.float().log_softmax(-1) for r in z.detach().split(128))])
    return lp, ent


def _trl_fused(task, X, W, labels):
    from trl.kernels import ChunkedLogProbFunction

    outputs = ("entropy",) if task == "logprobs_entropy" else ()
    if task == "ce":
        mask = labels != IGNORE
        lp = ChunkedLogProbFunction.apply(X, W, None, labels.clamp(min=0), 1.0, TRL_VOCAB_CHUNK, None, 1.0, outputs)[0]
        return (-(lp.masked_fill(~mask, 0)).sum() / mask.sum().clamp(min=1),)
    lp, ent, *_ = ChunkedLogProbFunction.apply(X, W, None, labels, 1.0, TRL_VOCAB_CHUNK, None, 1.0, outputs)
    return (lp,) if task == "logprobs" else (lp, ent)


def _liger(task, X, W, labels):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    if task == "ce":
        return (liger_fused_linear_cross_entropy(X, W, labels, ignore_index=IGNORE),)
    return (-liger_fused_linear_cross_entropy(X, W, labels, reduction="none"),)


def _cce(task, X, W, labels):
    from cut_cross_entropy import linear_cross_entropy

    if task == "ce":
        return (linear_cross_entropy(X, W, labels, ignore_index=IGNORE, filter_eps=None),)
    return (-linear_cross_entropy(X, W, labels, reduction="none", filter_eps=None),)


def _grpo_mel(chunk_size, compile_f=False):
    def fn(task, X, W, labels):
        if task == "ce":
            return (grpo_mel.linear_cross_entropy(X, W, labels, ignore_index=IGNORE, chunk_size=chunk_size,
                                                  compile=compile_f),)
        out = grpo_mel.linear_token_logprobs(X, W, labels, with_entropy=task == "logprobs_entropy",
                                             chunk_size=chunk_size, compile=compile_f)
        return out if isinstance(out, tuple) else (out,)
    return fn


def _probe(module: str, device: torch.device) -> str | None:
    """None if ``module`` imports and can run on ``device``, else the exact reason it cannot."""
    if device.type != "cuda":
        reason = "Triton kernels, CUDA only"
        try:
            __import__(module)
        except Exception as e:  # noqa: BLE001 - the reason is what we report
            reason += f"; on this machine `import {module}` fails: {type(e).__name__}: {e}"
        return reason
    try:
        __import__(module)
    except Exception as e:  # noqa: BLE001
        return f"`import {module}` fails: {type(e).__name__}: {e}"
    return None


def build_variants(device: torch.device, chunks, compiled: bool = False) -> list[Variant]:
    """``compiled``: each grpo_mel variant also with f compiled per chunk (``compile=True``), named ``...+compile``."""
    vs = [Variant("naive", _naive), Variant("trl_fused", _trl_fused, chunk=f"vocab {TRL_VOCAB_CHUNK}")]
    try:
        from trl.kernels import ChunkedLogProbFunction  # noqa: F401
    except Exception as e:  # noqa: BLE001
        vs[1].unavailable = f"`from trl.kernels import ChunkedLogProbFunction` fails: {type(e).__name__}: {e}"
    vs.append(Variant("liger", _liger, unavailable=_probe("liger_kernel.ops.fused_linear_cross_entropy", device),
                      tasks=("logprobs", "ce")))
    vs.append(Variant("cce", _cce, unavailable=_probe("cut_cross_entropy.cce", device), tasks=("logprobs", "ce")))
    for c in [*chunks, None]:
        name = f"grpo_mel@{c or 'auto'}"
        vs.append(Variant(name, _grpo_mel(c), chunk=str(c or "auto")))
        if compiled:
            vs.append(Variant(name + "+compile", _grpo_mel(c, True), chunk=str(c or "auto")))
    return vs
