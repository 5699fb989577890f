"""Padding costs nothing: completion positions whose mask is 0 never reach the LM head, on every TRL pin, and the step
is TRL's own (grpo_mel.integrations._logps._real_rows says why, per release).

Completions are made ragged through TRL's own path: the model's ``generate`` is wrapped so that row ``i`` of a
batch ends with EOS after ``LENGTHS[i]`` of its generated tokens (pad after it, as ``generate`` pads a finished
row); TRL then masks everything after the first EOS, so about half the completion positions are padding. Each case
runs a GRPO step unpatched and patched on the same trainer: the real positions' old-policy / reference log-probs,
the loss, every gradient and every logged metric match, and the rows that reached the head through
``_logps.chunked_linear`` are exactly the real completion tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import pytest
import torch

import grpo_mel
from grpo_mel.integrations import _logps, _trl_compat

from .conftest import CHUNK, TRL_VERSION, assert_grads_close, build_trainer, generate, generation_batch, trl

pytestmark = pytest.mark.trl

# generated tokens kept per row (cycled over the batch); rows longer than the generation keep it all (no EOS:
# "truncated", which mask_truncated_completions masks whole). About half the positions of a batch are padding.
LENGTHS = (10, 5, 8, 2, 6, 9, 3, 7)
MAX_COMPLETION = 10


@contextlib.contextmanager
def ragged_completions(trainer, lengths=LENGTHS):
    """Row ``i`` of every ``generate`` output keeps ``lengths[i % len(lengths)]`` generated tokens, the last one
    EOS, then pad."""
    model = trainer.model
    tok = trainer.processing_class
    eos, pad = tok.eos_token_id, tok.pad_token_id
    original = model.generate

    @functools.wraps(original)
    def generate_ragged(*args, **kwargs):
        out = original(*args, **kwargs)
        prompt = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        P, L = prompt.size(1), out.size(1) - prompt.size(1)
        out = out.clone()
        for i in range(out.size(0)):
            keep = lengths[i % len(lengths)]
            if keep < L:
                out[i, P + keep - 1] = eos
                out[i, P + keep:] = pad
        return out

    model.generate = generate_ragged
    try:
        yield
    finally:
        del model.generate


@contextlib.contextmanager
def rows_through_head():
    """The number of rows (tokens) of each ``chunked_linear`` call the patched method makes."""
    rows = []
    real = _logps.chunked_linear

    def spy(X, *a, **k):
        rows.append(X.reshape(-1, X.size(-1)).size(0))
        return real(X, *a, **k)

    _logps.chunked_linear = spy
    try:
        yield rows
    finally:
        _logps.chunked_linear = real


def _known(**kw):
    """The GRPOConfig options of ``kw`` that the installed TRL has."""
    fields = {f.name for f in dataclasses.fields(trl.GRPOConfig)}
    return {k: v for k, v in kw.items() if k in fields}


CASES = {
    # old-policy and reference log-probs (num_iterations=2, beta) read at every position by the ratio and the KL;
    # mask_truncated_completions (TRL >= 0.19) masks the rows that never reached EOS whole
    "beta-iter2-truncated": dict(beta=0.04, num_iterations=2, temperature=0.9,
                                 **_known(mask_truncated_completions=True)),
    # entropies (TRL >= 0.20): the top-entropy quantile mask and the entropy bonus read them; sharpened head, see
    # test_trl_parity.py's "untied-dapo-topentropy"
    "dapo-topentropy-bonus": dict(loss_type="dapo", top_entropy_quantile=0.5, entropy_coef=0.05, head_scale=40.0),
    "lora-bnpo-beta": dict(lora=True, beta=0.04, **_known(loss_type="bnpo")),
}


def _metrics(trainer) -> dict:
    """Every metric the step logged (time-based ones left out)."""
    return {(mode, k): list(v) for mode, d in trainer._metrics.items() for k, v in d.items() if "time" not in k}


def _step(trainer, batch):
    """One GRPO step on the ragged completions: (inputs, loss, gradients, logged metrics, rows through the head)."""
    for d in trainer._metrics.values():
        d.clear()
    trainer.state.num_input_tokens_seen = 0  # logged as "num_tokens", a running count (TRL 0.16: this one)
    trainer._total_train_tokens = 0
    with ragged_completions(trainer), rows_through_head() as rows:
        inputs = generate(trainer, batch)
        n_gen = len(rows)
        model = trainer.model
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
    grads = {n: (p.grad.detach().clone() if p.grad is not None else None)
             for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return inputs, loss.detach(), grads, _metrics(trainer), (rows[:n_gen], rows[n_gen:])


@pytest.mark.parametrize("case", list(CASES))
def test_padded_rows_never_reach_the_head(tmp_path, case):
    trainer = build_trainer(tmp_path, dict(CASES[case], max_completion_length=MAX_COMPLETION))
    batch = generation_batch(trainer, 2)
    ref_inputs, ref_loss, ref_grads, ref_metrics, _ = _step(trainer, batch)
    with grpo_mel.grpo_patched(chunk_size=CHUNK):
        inputs, loss, grads, metrics, (gen_rows, loss_rows) = _step(trainer, batch)

    mask = inputs["completion_mask"].bool()
    assert torch.equal(ref_inputs["completion_ids"], inputs["completion_ids"])
    assert torch.equal(ref_inputs["completion_mask"].bool(), mask)
    assert 0.35 <= 1 - mask.float().mean() <= 0.65, f"padding share {1 - mask.float().mean():.2f}: not ragged enough"
    real = int(mask.sum())
    # the head saw the real completion tokens only: once for the policy, once per old / reference log-prob call
    logp_calls = sum(inputs.get(k) is not None for k in ("old_per_token_logps", "ref_per_token_logps"))
    assert logp_calls == 1 + (CASES[case].get("beta", 0) != 0) - (CASES[case].get("num_iterations", 1) == 1)
    assert sum(gen_rows) == logp_calls * real and sum(loss_rows) == real, (gen_rows, loss_rows, real)

    flavour = _trl_compat.detect()
    for k in ("old_per_token_logps", "ref_per_token_logps"):
        a, b = ref_inputs.get(k), inputs.get(k)
        assert (a is None) == (b is None), k
        if a is None:
            continue
        torch.testing.assert_close(b[mask], a[mask], rtol=1e-5, atol=2e-6, msg=lambda m, k=k: f"{k}: {m}")
        assert torch.all(b[~mask] == 0), k  # what TRL >= 1.14 returns there too; TRL < 1.14 never reads it
        if flavour.masks_padding:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(ref_grads, grads)
    assert metrics.keys() == ref_metrics.keys()
    for key in ref_metrics:
        want, got = ref_metrics[key], metrics[key]
        assert len(want) == len(got), key
        for a, b in zip(want, got):
            assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), (key, a, b)


def _method_call(trainer, ids, am, K, **kw):
    f = _trl_compat.detect()
    kw = kw if f.returns != "tensor" else {}
    out = getattr(trainer, f.method_name)(trainer.model, ids, am, K, **kw)
    return (out,) if f.returns == "tensor" else out


def test_method_outputs_at_padded_positions(tmp_path):
    """The method itself on a ragged batch: real positions as TRL's, padded ones 0 (TRL >= 1.14: exactly TRL's),
    entropies included; the head projects the real rows only."""
    trainer = build_trainer(tmp_path, dict(temperature=0.8))
    torch.manual_seed(0)
    B, P, K = 6, 5, 9
    ids = torch.randint(5, 1000, (B, P + K))
    am = torch.ones_like(ids)
    am[:, :2] = 0  # left-padded prompts
    lengths = torch.tensor([9, 1, 4, 0, 7, 2])  # one row all padding
    am[:, P:] = (torch.arange(K) < lengths[:, None]).long()
    with torch.no_grad():
        want = _method_call(trainer, ids, am, K, compute_entropy=True)
        with grpo_mel.grpo_patched(chunk_size=CHUNK), rows_through_head() as rows:
            got = _method_call(trainer, ids, am, K, compute_entropy=True)
    assert sum(rows) == int(lengths.sum())
    mask = am[:, P:].bool()
    flavour = _trl_compat.detect()
    for a, b in zip(want, got):
        assert (a is None) == (b is None)
        if a is None:
            continue
        torch.testing.assert_close(b[mask], a[mask], rtol=1e-5, atol=1e-5)
        assert torch.all(b[~mask] == 0)
        if flavour.masks_padding:
            assert torch.all(a[~mask] == 0)  # TRL's own zeros


def test_all_padding_micro_batch_backpropagates_a_zero(tmp_path):
    """Every completion position padding (e.g. a micro-batch of truncated rows under mask_truncated_completions): the
    head is called with 0 rows, the output is 0 and on the graph, and the head gets a zero gradient (not None: DDP
    waits for it), as unpatched TRL gives it."""
    trainer = build_trainer(tmp_path, {})
    ids = torch.randint(5, 1000, (2, 12))
    am = torch.ones_like(ids)
    am[:, -5:] = 0
    head = trainer.model.get_output_embeddings().weight

    def head_grad():
        trainer.model.zero_grad(set_to_none=True)
        lp = _method_call(trainer, ids, am, 5)[0]
        (lp * am[:, -5:]).sum().backward()  # what TRL's loss does with it
        return lp.detach(), head.grad

    want_lp, want_grad = head_grad()
    with grpo_mel.grpo_patched(chunk_size=CHUNK), rows_through_head() as rows:
        lp, grad = head_grad()
    assert rows == [0]
    assert torch.all(lp == 0)
    assert want_grad is not None and grad is not None
    assert torch.all(grad == 0) and torch.all(want_grad == 0)


def test_where_padding_is_kept():
    """On a TRL that returns the pad token's values (< 1.14), padding goes through the head with Liger's loss
    (``use_liger_loss``, 1.x ``use_liger_kernel``: it pairs the reference log-probs with its own policy log-probs
    there, where an overflow would be NaN after the mask) and for a single completion position (whose [B, 1]
    tensors 0.2x - 1.13 average unmasked in their metrics); a TRL that zeroes padding itself (>= 1.14) skips it
    always. No padding: no gather."""
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])

    class Trainer:
        pass

    for masks_padding in (False, True):
        flavour = dataclasses.replace(_trl_compat.detect(), masks_padding=masks_padding)
        rows = functools.partial(_logps._real_rows, flavour=flavour)
        assert torch.equal(rows(Trainer(), comp_mask=mask), mask.bool())
        assert rows(Trainer(), comp_mask=torch.ones(2, 3)) is None
        for liger in ("use_liger_loss", "use_liger_kernel"):
            trainer = Trainer()
            setattr(trainer, liger, True)
            got = rows(trainer, comp_mask=mask)
            assert got is None if not masks_padding else torch.equal(got, mask.bool()), (liger, masks_padding)
        one = torch.tensor([[1], [0]])
        got = rows(Trainer(), comp_mask=one)
        assert got is None if not masks_padding else torch.equal(got, one.bool())


@pytest.mark.skipif(TRL_VERSION < _trl_compat._version(_trl_compat.MIN_TRL_RLOO),
                    reason=f"TRL {TRL_VERSION}'s RLOOTrainer cannot be patched")
def test_rloo_padded_rows_never_reach_the_head(tmp_path):
    trainer = build_trainer(tmp_path, dict(trainer="rloo", beta=0.04, max_completion_length=MAX_COMPLETION))
    batch = generation_batch(trainer, 2)
    ref_inputs, ref_loss, ref_grads, ref_metrics, _ = _step(trainer, batch)
    with grpo_mel.rloo_patched(chunk_size=CHUNK):
        inputs, loss, grads, metrics, (gen_rows, loss_rows) = _step(trainer, batch)
    mask = inputs["completion_mask"].bool()
    assert 0.35 <= 1 - mask.float().mean() <= 0.65
    assert sum(loss_rows) == int(mask.sum())
    # RLOO scores every generation with the old policy and (beta) the reference: the masked sums and the KL in the
    # advantages are all that it keeps of them
    assert sum(gen_rows) == 2 * int(mask.sum())
    for k in ("old_logps", "advantages"):
        torch.testing.assert_close(inputs[k], ref_inputs[k], rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(ref_grads, grads)
    assert metrics.keys() == ref_metrics.keys()
    for key in ref_metrics:
        for a, b in zip(ref_metrics[key], metrics[key]):
            assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), (key, a, b)
