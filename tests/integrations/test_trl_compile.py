"""The compiled chunk (``compile=True``) does not leak into users' programs: a patched GRPO step with grpo_mel's chunk
compiled equals unpatched TRL, a model the user compiles (TRL's ``torch_compile=True``) trains as unpatched TRL does,
and a compile that fails runs the chunk eagerly with one warning and the same numbers.

Compiling a chunk's f costs tens of seconds per graph on a 2-core CPU (Inductor's on-disk cache makes a repeat
cheap), so the cases are few, share one model shape and one temperature (the compiled graphs are reused across
them), and each covers several traits at once.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from packaging.version import Version

import grpo_mel
import grpo_mel._compiled as compiled_mod
from grpo_mel import functions as G
from grpo_mel.integrations import _logps

from .conftest import (CHUNK, TRL_VERSION, build_trainer, check_parity, count_calls, generate, generation_batch,
                       loss_and_grads, make_model, make_trainer)

pytestmark = [pytest.mark.trl, pytest.mark.slow]

T = 0.9  # one temperature for every case: a float keyword is a constant in the compiled graph


def _bases_compiled() -> set:
    return {getattr(f, "__name__", f) for f in compiled_mod._COMPILED}


def test_grpo_step_parity_with_the_compiled_chunk(tmp_path):
    """The reference log-probs (no grad: one graph of f), the old policy's (num_iterations=2) and the policy's with
    grad (TRL >= 0.20: with the logged entropy; another graph), compiled: equal to unpatched TRL, no fall-back."""
    trainer = build_trainer(tmp_path, dict(beta=0.04, num_iterations=2, temperature=T))
    failed_before = dict(compiled_mod._FAILED)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_parity(trainer, patched=functools.partial(grpo_mel.grpo_patched, compile=True))
    assert not [w for w in caught if "runs eagerly" in str(w.message)]  # compiled, not the eager fall-back
    assert compiled_mod._FAILED == failed_before
    assert "token_logprobs" in _bases_compiled()


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches reset before and after (the user's compiled model leaves entries behind)."""
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.skipif(TRL_VERSION < Version("1.15"), reason="one TRL pin is enough (test_trl_schedules.py covers "
                                                         "torch_compile on every pin, without grpo_mel's compile)")
def test_users_torch_compile_with_the_compiled_chunk(tmp_path, monkeypatch, fresh_dynamo):
    """TRL's ``torch_compile=True`` (the Trainer compiles the model it prepares) and grpo_mel's ``compile=True``
    together: ``trainer.train()`` gives unpatched TRL's losses and parameters, and the chunk's graphs were compiled
    (through Inductor, by grpo_mel). The user's compile uses dynamo's "eager" backend, as test_trl_schedules.py
    does: the patched method runs the backbone outside the user's compiled module (docs/limits.md; the strict
    xfail there), so a code-generating backend for the model would only cost CI time."""
    import transformers
    from torch._dynamo.utils import counters

    ours = []
    real_backend = compiled_mod._inductor_with_backward

    def counting_backend(gm, example_inputs):
        ours.append(gm)
        return real_backend(gm, example_inputs)

    monkeypatch.setattr(compiled_mod, "_COMPILED", {})  # compiled afresh here, through the counting backend
    monkeypatch.setattr(compiled_mod, "_inductor_with_backward", counting_backend)
    runs = {}
    for patched in (False, True):
        trainer = make_trainer(tmp_path / str(patched), model=make_model(), beta=0.04, temperature=T,
                               torch_compile=True, torch_compile_backend="eager", max_steps=2)
        transformers.set_seed(0)
        graphs = counters["stats"]["unique_graphs"]
        if patched:
            with grpo_mel.grpo_patched(chunk_size=CHUNK, compile=True), \
                    count_calls(_logps, "chunked_linear") as spy:
                trainer.train()
            assert spy["n"] > 0
        else:
            trainer.train()
        assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
        runs[patched] = ([h["loss"] for h in trainer.state.log_history if "loss" in h],
                         {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
                         counters["stats"]["unique_graphs"] - graphs)
    (want_losses, want_params, _), (losses, params, graphs) = runs[False], runs[True]
    assert ours and graphs >= len(ours), (graphs, len(ours))
    assert len(losses) == len(want_losses) == 2
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), rtol=1e-4, atol=1e-6)
    for n in want_params:
        torch.testing.assert_close(params[n], want_params[n], rtol=1e-3, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def _failing_backend(gm, example_inputs):
    raise RuntimeError("no compiler here")


def test_a_compile_failure_runs_the_chunk_eagerly_with_one_warning(tmp_path, monkeypatch):
    """A backend that fails: the patched step warns once, naming why, and its loss and gradients are the eager
    patched step's, bit for bit."""
    for f in (G.token_logprobs, G.token_logprobs_and_entropy):
        monkeypatch.setitem(compiled_mod._COMPILED, f, torch.compile(f, backend=_failing_backend, dynamic=False))
    monkeypatch.setattr(compiled_mod, "_FAILED", {})
    monkeypatch.setattr(compiled_mod, "_WARNED", set())
    trainer = make_trainer(tmp_path, model=make_model(), temperature=T)  # the policy call only: one function
    inputs = generate(trainer, generation_batch(trainer, 1))
    results = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for comp in (True, True, False):
            with grpo_mel.grpo_patched(chunk_size=CHUNK, compile=comp), count_calls(_logps, "chunked_linear") as spy:
                results.setdefault(comp, []).append(loss_and_grads(trainer, inputs))
            assert spy["n"] > 0
    msgs = [str(w.message) for w in caught if "runs eagerly" in str(w.message)]
    assert len(msgs) == 1 and "no compiler here" in msgs[0], msgs
    (want_loss, want_grads), = results[False]
    for loss, grads in results[True]:
        assert torch.equal(loss, want_loss)
        for k in want_grads:
            assert torch.equal(grads[k], want_grads[k]), k
