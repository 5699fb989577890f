"""The patched path really runs for the policy, old-policy and reference calls, and never calls the LM head."""

from __future__ import annotations

import pytest
import torch

import grpo_mel
from grpo_mel.integrations import _logps, _trl_compat

from .conftest import CHUNK, count_calls, generate, generation_batch, loss_and_grads, make_model, make_trainer

pytestmark = pytest.mark.trl


def _record_calls(monkeypatch, trainer, heads):
    """Wrap the (patched) class method: per call, which model, how many chunked_linear and lm_head calls."""
    from trl import GRPOTrainer

    name = _trl_compat.detect().method_name
    patched = vars(GRPOTrainer)[name]
    log = []
    counters = {"head": 0}
    for h in heads:  # count calls of the head's own forward (a forward hook would make the patch fall back)
        def counting(*a, _orig=h.forward, **k):
            counters["head"] += 1
            return _orig(*a, **k)

        h.forward = counting

    def recorder(self, model, *a, **k):
        head0, chunk0 = counters["head"], spy["n"]
        out = patched(self, model, *a, **k)
        log.append(dict(model=model, head=counters["head"] - head0, chunked=spy["n"] - chunk0))
        return out

    with count_calls(_logps, "chunked_linear") as spy:
        monkeypatch.setattr(GRPOTrainer, name, recorder)
        yield log


@pytest.mark.parametrize("lora", [False, True], ids=["full-ref-model", "peft-ref-adapters-disabled"])
def test_patched_path_runs_for_policy_old_and_ref(tmp_path, monkeypatch, lora):
    peft_config = None
    if lora:
        peft = pytest.importorskip("peft")
        peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = make_trainer(tmp_path, model=make_model(), peft_config=peft_config, beta=0.04, num_iterations=2)
    heads = [trainer.model.get_output_embeddings()]
    if getattr(trainer, "ref_model", None) is not None:
        heads.append(trainer.ref_model.get_output_embeddings())
    assert (trainer.ref_model is None) == lora
    grpo_mel.patch_grpo(chunk_size=CHUNK)
    gen = _record_calls(monkeypatch, trainer, heads)
    log = next(gen)
    inputs = generate(trainer, generation_batch(trainer, 1))
    # old policy (num_iterations > 1) and reference (beta > 0)
    assert len(log) == 2, log
    old, ref = log
    assert old["model"] is trainer.model
    assert ref["model"] is (trainer.model if lora else trainer.ref_model)
    loss_and_grads(trainer, inputs)  # policy
    assert len(log) == 3
    for call in log:
        assert call["chunked"] > 0, call
        assert call["head"] == 0, call  # the LM head module is never called (no logits)
    gen.close()


def test_eval_prediction_step_uses_patched_path(tmp_path):
    trainer = make_trainer(tmp_path, beta=0.04)
    inputs = generate(trainer, generation_batch(trainer, 1))
    trainer.model.eval()
    with torch.no_grad():
        want = trainer.compute_loss(trainer.model, inputs)
    with grpo_mel.grpo_patched(chunk_size=CHUNK), count_calls(_logps, "chunked_linear") as spy:
        with torch.no_grad():
            got = trainer.compute_loss(trainer.model, inputs)
    assert spy["n"] > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_generation_unchanged_by_patch(tmp_path):
    """Generation never goes through the patched method (and on TRL >= 1.15 the fused forward is left alone)."""
    trainer = make_trainer(tmp_path)
    tok = trainer.processing_class
    enc = tok(["3+4=", "12-5="], return_tensors="pt", padding=True)
    enc.pop("token_type_ids", None)
    model = trainer.model
    torch.manual_seed(0)
    want = model.generate(**enc, max_new_tokens=6, do_sample=True)
    grpo_mel.patch_grpo(chunk_size=CHUNK)
    with count_calls(_logps, "chunked_linear") as spy:
        torch.manual_seed(0)
        got = model.generate(**enc, max_new_tokens=6, do_sample=True)
    assert spy["n"] == 0
    assert torch.equal(want, got)


def test_wrapped_model_goes_through_the_wrapper_forward(tmp_path, monkeypatch):
    """A DDP-like wrapper: the chunked computation runs inside the wrapper's forward (forward redirection)."""

    class Wrapper(torch.nn.Module):  # stands in for DDP / DeepSpeedEngine: forward calls the wrapped module
        def __init__(self, module):
            super().__init__()
            self.module = module
            self.calls = 0

        def forward(self, *a, **k):
            self.calls += 1
            return self.module(*a, **k)

    trainer = make_trainer(tmp_path)
    inner = trainer.model
    wrapped = Wrapper(inner)
    monkeypatch.setattr(trainer.accelerator, "unwrap_model", lambda m, *a, **k: m.module if m is wrapped else m)
    f = _trl_compat.detect()
    ids = torch.randint(5, 1000, (2, 12))
    am = torch.ones_like(ids)
    am[0, :3] = 0
    want = getattr(trainer, f.method_name)(inner, ids, am, 5)
    had_forward = "forward" in vars(inner)
    with grpo_mel.grpo_patched(chunk_size=CHUNK), count_calls(_logps, "chunked_linear") as spy:
        got = getattr(trainer, f.method_name)(wrapped, ids, am, 5)
    assert wrapped.calls == 1 and spy["n"] == 1
    assert ("forward" in vars(inner)) == had_forward  # the module's forward is restored
    want, got = (want, got) if f.returns == "tensor" else (want[0], got[0])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
