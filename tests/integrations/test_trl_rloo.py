"""patch_rloo: TRL's RLOOTrainer through the chunked head, checked as GRPO is (test_trl_parity.py,
test_trl_memory.py, test_trl_patch.py): unpatched vs patched on one trainer and the same inputs (every gradient),
the allocator peak of a step, the fallbacks, and a clear error on the TRLs whose RLOOTrainer cannot be patched."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from packaging.version import Version

import grpo_mel
from grpo_mel.integrations import _logps, _registry, _trl_compat, reset_warnings
from grpo_mel.integrations.trl_rloo import UnsupportedTRLVersion
from grpo_mel.memory import peak_memory

from .conftest import CHUNK, MEM_H, MEM_V, TRL_VERSION, build_trainer, check_parity, count_calls, loss_and_grads
from .conftest import make_model, make_trainer, memory_step_inputs

pytestmark = pytest.mark.trl

PATCHABLE = TRL_VERSION >= Version(_trl_compat.MIN_TRL_RLOO)
needs_rloo = pytest.mark.skipif(not PATCHABLE, reason=f"TRL {TRL_VERSION}'s RLOOTrainer cannot be patched")


CASES = {
    "untied-beta0": dict(),
    "tied-beta-T07-iter2": dict(tied=True, beta=0.04, temperature=0.7, num_iterations=2),
    "lora-beta": dict(lora=True, beta=0.04, temperature=0.9),
}


@needs_rloo
@pytest.mark.parametrize("case", list(CASES))
def test_rloo_gradient_parity(tmp_path, case):
    trainer = build_trainer(tmp_path, dict(CASES[case], trainer="rloo"))
    check_parity(trainer, patched=grpo_mel.rloo_patched)


@needs_rloo
def test_rloo_parity_fails_when_the_patch_is_wrong(tmp_path, monkeypatch):
    """Sanity: the same check catches a wrong temperature (so it is not vacuous for RLOO either)."""
    trainer = build_trainer(tmp_path, dict(trainer="rloo", beta=0.04, temperature=0.7))
    real = _logps._score

    def wrong_temperature(tr, *a):
        tr.temperature = 0.71
        try:
            return real(tr, *a)
        finally:
            tr.temperature = 0.7

    monkeypatch.setattr(_logps, "_score", wrong_temperature)
    with pytest.raises(AssertionError):
        check_parity(trainer, patched=grpo_mel.rloo_patched)


@needs_rloo
@pytest.mark.slow
def test_peak_memory_of_an_rloo_step_at_32k_vocab(tmp_path):
    trainer = make_trainer(tmp_path, model=make_model(vocab_size=MEM_V, hidden=MEM_H), max_completion_length=8,
                           trainer="rloo")
    inputs = memory_step_inputs(trainer)
    flavour = _trl_compat.detect(type(trainer), _trl_compat.RLOO)
    loss_and_grads(trainer, inputs)  # warm-up (lazy inits out of the measurement)
    (ref_loss, _), trl_peak = peak_memory(lambda: loss_and_grads(trainer, inputs), device="cpu")
    with grpo_mel.rloo_patched(), count_calls(_logps, "chunked_linear") as spy:
        loss_and_grads(trainer, inputs)
        (new_loss, _), ours_peak = peak_memory(lambda: loss_and_grads(trainer, inputs), device="cpu")
    assert spy["n"] > 0
    torch.testing.assert_close(new_loss, ref_loss, rtol=1e-5, atol=1e-6)
    logits_bytes = inputs["completion_ids"].numel() * MEM_V * 4
    print(f"\nRLOO, TRL {TRL_VERSION}: unpatched {trl_peak / 2**20:.1f} MiB, patched {ours_peak / 2**20:.1f} MiB "
          f"(ratio {ours_peak / trl_peak:.3f})")
    assert ours_peak < logits_bytes  # less than one fp32 [N, V] logits tensor above the model state
    if flavour.fused_head:
        assert ours_peak <= trl_peak
    else:
        assert ours_peak <= 0.40 * trl_peak


@needs_rloo
def test_rloo_falls_back_with_one_warning(tmp_path):
    """A forward hook on lm_head wants the logits: TRL's own method computes, with one warning naming why."""
    trainer = make_trainer(tmp_path, trainer="rloo")
    reset_warnings()
    head = trainer.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, i, o: None)
    ids = torch.randint(5, 1000, (2, 12))
    am = torch.ones_like(ids)
    try:
        with torch.no_grad():
            want = trainer._get_per_token_logps_and_entropies(trainer.model, ids, am, 4)[0]
            grpo_mel.patch_rloo(chunk_size=CHUNK)
            with pytest.warns(UserWarning, match="forward hook") as rec, count_calls(_logps, "chunked_linear") as spy:
                got = trainer._get_per_token_logps_and_entropies(trainer.model, ids, am, 4)[0]
                trainer._get_per_token_logps_and_entropies(trainer.model, ids, am, 4)
    finally:
        handle.remove()
    assert spy["n"] == 0 and len([w for w in rec if "grpo_mel" in str(w.message)]) == 1
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_rloo
def test_newer_trl_keeps_rloos_own_method_with_one_warning(monkeypatch):
    monkeypatch.setattr(_trl_compat, "trl_version", lambda: "1.17.0")
    with pytest.warns(UserWarning, match=r"newer .*RLOOTrainer\._get_per_token_logps_and_entropies stays TRL's own"):
        grpo_mel.patch_rloo()


def test_patch_trl_patches_each_trainer_and_unpatch_trl_restores():
    import trl

    name = "_get_per_token_logps_and_entropies"
    grpo_name = _trl_compat.detect().method_name
    grpo_original = vars(trl.GRPOTrainer)[grpo_name]
    rloo_original = vars(trl.RLOOTrainer).get(name)
    grpo_mel.patch_grpo()
    assert vars(trl.RLOOTrainer).get(name) is rloo_original  # one patch does not touch the other trainer
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        patched = grpo_mel.patch_trl(chunk_size=CHUNK)
    assert _registry.installed("grpo").options.chunk_size == CHUNK
    if PATCHABLE:
        assert list(patched) == ["GRPOTrainer", "RLOOTrainer"] and not rec
        assert _registry.installed("rloo").original is rloo_original
        assert vars(trl.RLOOTrainer)[name] is _registry.installed("rloo").replacement
    else:
        assert list(patched) == ["GRPOTrainer"] and "RLOOTrainer left as TRL's" in str(patched)
        assert [str(w.message) for w in rec if "RLOOTrainer left unpatched" in str(w.message)], rec
        assert vars(trl.RLOOTrainer).get(name) is rloo_original
    grpo_mel.unpatch_trl()
    assert vars(trl.GRPOTrainer)[grpo_name] is grpo_original and vars(trl.RLOOTrainer).get(name) is rloo_original


@pytest.mark.skipif(PATCHABLE, reason="this TRL's RLOOTrainer can be patched")
def test_unpatchable_rloo_raises_naming_the_version():
    with pytest.raises(UnsupportedTRLVersion, match=rf"PPO-style.*the installed TRL is {re.escape(str(TRL_VERSION))}"):
        grpo_mel.patch_rloo()
