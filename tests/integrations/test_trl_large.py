"""The TRL patch's row handling past 2³¹ logits: 170 sequences × 100 completion tokens × a 128,256-way head.

The patched log-prob method of a GRPOTrainer is called once on the whole batch (N = 17,000 completion rows, N·V =
2.18e9; TRL's ``batch_size`` where the pin has it, so the rows come from several backbone calls), with a frozen head
(LoRA's case: no [V, H] gradient, so the chunk's gradients are formed in the forward), left-padded prompts of three
widths and completions of different lengths (TRL >= 1.14 zeroes the padded rows). Unpatched TRL on a few of the same
sequences is the reference (its full logits fit for 4 sequences): the first one, the last one and the two whose rows
straddle the 2³¹st logit. Their log-probs (and entropies where the pin returns them) and the gradient that reaches
the last hidden states (from random per-token weights of the log-probs) must match. The core's numbers at this size
against float64 are tests/core/test_large.py.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from packaging.version import Version

import grpo_mel

from ._train_runs import count_head_calls
from .conftest import TRL_VERSION, make_model, make_trainer

pytestmark = [
    pytest.mark.trl,
    pytest.mark.slow,
    # ~40 s of CPU per run: once per CI, with the newest pin (batch_size, padded rows zeroed, entropies). The code
    # under test (the patch's row selection, masking and concatenation) is the same on every pin; each pin's own
    # flags are checked at small sizes by test_trl_parity.py (e.g. its ragged-prompts case)
    pytest.mark.skipif(TRL_VERSION < Version("1.16"), reason=f"run with TRL >= 1.16 only (CI time): TRL "
                       f"{TRL_VERSION}'s row handling is the same code, tested at small sizes in test_trl_parity.py"),
]

V, H, B, K, PROMPT = 128_256, 16, 170, 100, 8
assert B * K * V > 2**31
# the sequences whose rows hold the 2**31st logit, the first and the last
SAMPLE = sorted({0, 2**31 // (K * V), 2**31 // (K * V) + 1, B - 1})


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (B, PROMPT + K), generator=g)
    am = torch.ones(B, PROMPT + K, dtype=torch.long)
    for b in range(B):
        am[b, : 2 * (b % 3)] = 0  # left padding: prompts of 8, 6 and 4 tokens
        am[b, PROMPT + K - 5 * (b % 4):] = 0  # completions of 100, 95, 90 and 85 tokens
    ids[am == 0] = 0
    weights = torch.randn(B, K, generator=g)
    return ids, am, weights


def _call(trainer, ids, am, **kw):
    """The trainer's log-prob method (patched or not) on ``ids``; the last hidden states' gradient from
    ``(log-probs * weights).sum()``, concatenated over the backbone's calls."""
    method = _method(trainer)
    params = inspect.signature(method).parameters
    kw = {k: v for k, v in kw.items() if k in params}
    if "compute_entropy" in params:
        kw["compute_entropy"] = True
    hidden = []
    norm = trainer.model.model.norm  # the backbone's last module: its output is the last hidden states

    def keep(_module, _args, out):
        out.retain_grad()
        hidden.append(out)

    handle = norm.register_forward_hook(keep)
    try:
        out = method(trainer.model, ids, am, K, **kw)
    finally:
        handle.remove()
    logps, *rest = out if isinstance(out, tuple) else (out,)
    return logps, (rest[0] if rest else None), hidden


def test_row_handling_past_2_pow_31_logits(tmp_path):
    model = make_model(vocab_size=V, hidden=H)
    trainer = make_trainer(tmp_path, model=model, temperature=0.7)
    trainer.model.get_output_embeddings().weight.requires_grad_(False)  # as under LoRA
    ids, am, weights = _batch()

    with grpo_mel.grpo_patched(override_fused_head=True), count_head_calls() as spy:
        logps, ents, hidden = _call(trainer, ids, am, batch_size=64)
        (logps * weights).sum().backward()
    assert spy["n"] == len(hidden) == (3 if "batch_size" in inspect.signature(_method(trainer)).parameters else 1)
    assert logps.shape == (B, K)
    grad = torch.cat([h.grad for h in hidden])[:, PROMPT - 1: -1]  # the rows that predict completion tokens

    sample = torch.tensor(SAMPLE)
    ref_logps, ref_ents, ref_hidden = _call(trainer, ids[sample], am[sample])
    (ref_logps * weights[sample]).sum().backward()
    ref_grad = torch.cat([h.grad for h in ref_hidden])[:, PROMPT - 1: -1]

    torch.testing.assert_close(logps[sample].detach(), ref_logps.detach(), rtol=1e-5, atol=1e-5)
    if ref_ents is not None:
        torch.testing.assert_close(ents[sample].detach(), ref_ents.detach(), rtol=1e-5, atol=1e-5)
    assert ref_grad.abs().max() > 0
    torch.testing.assert_close(grad[sample], ref_grad, rtol=1e-4, atol=1e-7)
    # padded completion rows: 0 on TRL >= 1.14 (and then here too), computed on older TRLs; the sample has both kinds
    padded = am[:, PROMPT:] == 0
    assert padded[sample].any() and (~padded[sample]).any()
    assert torch.all(logps.detach()[~padded] < 0)


def _method(trainer):
    """The per-token log-prob method: ``_get_per_token_logps_and_entropies`` from TRL 0.20, else
    ``_get_per_token_logps``."""
    for name in ("_get_per_token_logps_and_entropies", "_get_per_token_logps"):
        if hasattr(trainer, name):
            return getattr(trainer, name)
    raise AssertionError("GRPOTrainer has no per-token log-prob method")
