"""bf16 autocast (GRPOConfig(bf16=True), fp32 weights, CPU autocast): patched vs unpatched TRL.

The patched head runs under the autocast the unpatched call runs under (TRL >= 1.15 enters it itself; earlier TRLs
through the forward accelerate wrapped when it prepared the model), so its GEMM runs in the same dtype (asserted
inside f), log-softmax in float32 in both, and dX is formed as the installed TRL forms it (rounded to bf16 by
nn.Linear's autograd before 1.15, accumulated in float32 by TRL's fused head from 1.15). What is left is dW, which
TRL rounds to bf16 and grpo_mel accumulates in float32.
"""

from __future__ import annotations

import os

import pytest
import torch

import grpo_mel

from grpo_mel.integrations import _logps

from .conftest import CHUNK, generate, generation_batch, loss_and_grads, make_trainer

pytestmark = pytest.mark.trl

# worst measured (tests/integrations, CPU): 0.12% on TRL 1.16, 0.17% on 1.14.2 and 0.19.1 (prepared model), 3e-7 where
# the unpatched call runs without autocast. What is left: TRL rounds dW to bf16, grpo_mel accumulates it in float32.
BF16_GRAD_RTOL = 3e-3


@pytest.fixture(autouse=True)
def _restore_mixed_precision():
    """transformers' TrainingArguments(bf16=True) exports ACCELERATE_MIXED_PRECISION=bf16 and nothing unsets it,
    so every later trainer in the process (even with bf16=False) would run under bf16 autocast (seen with
    TRL 0.19 / 1.14 and their transformers): restore the environment and accelerate's shared state afterwards."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("ACCELERATE_")}
    yield
    for k in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        del os.environ[k]
    os.environ.update(saved)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _record_gemm_dtypes(monkeypatch):
    """The dtype of the logits each chunked f receives: the dtype the head's GEMM ran in."""
    seen = []
    for name in ("token_logprobs", "token_logprobs_and_entropy"):
        orig = getattr(_logps, name)

        def spy(z, *a, _orig=orig, **k):
            seen.append(z.dtype)
            return _orig(z, *a, **k)

        monkeypatch.setattr(_logps, name, spy)
    return seen


@pytest.mark.parametrize("prepared", [True, False], ids=["prepared-model", "bare-model"])
def test_bf16_autocast_parity(tmp_path, monkeypatch, prepared):
    """Patched vs unpatched under GRPOConfig(bf16=True) with fp32 weights: the patched head's GEMM runs in the dtype
    the unpatched one does (bf16 where the unpatched call is under autocast: always on TRL >= 1.15, which enters it
    itself; on earlier TRLs once accelerate has prepared the model, as train() does), and gradients agree."""
    trainer = make_trainer(tmp_path, bf16=True, beta=0.04, temperature=0.7)
    if not trainer.accelerator.mixed_precision == "bf16":
        pytest.skip("this TRL/accelerate does not enable bf16 autocast on CPU")
    if prepared:  # as Trainer.train() does: under mixed precision the model's forward is wrapped in autocast
        trainer.model = trainer.accelerator.prepare_model(trainer.model)
        assert "_original_forward" in vars(trainer.model)
    inner = trainer.accelerator.unwrap_model(trainer.model)
    autocast_seen = []
    inner.model.norm.register_forward_hook(lambda *a: autocast_seen.append(torch.is_autocast_enabled("cpu")))
    batch = generation_batch(trainer, 2)
    ref_inputs = generate(trainer, batch)
    ref_loss, ref_grads = loss_and_grads(trainer, ref_inputs)
    unpatched_autocast = autocast_seen[-1]  # the policy's forward in compute_loss
    assert prepared <= unpatched_autocast  # a prepared model always runs under autocast
    gemm = _record_gemm_dtypes(monkeypatch)
    with grpo_mel.grpo_patched(chunk_size=CHUNK):
        new_inputs = generate(trainer, batch)
        gemm.clear()  # only the policy's calls in compute_loss (the reference model is prepared by TRL itself)
        new_loss, new_grads = loss_and_grads(trainer, new_inputs)
    assert gemm and set(gemm) == {torch.bfloat16 if unpatched_autocast else torch.float32}, (gemm, unpatched_autocast)
    assert torch.equal(ref_inputs["completion_ids"], new_inputs["completion_ids"])
    assert ref_inputs["advantages"].abs().max() > 0
    # the same GEMM dtype, then float32 log-softmax in both: log-probs agree far below bf16's resolution
    for k in ("old_per_token_logps", "ref_per_token_logps"):
        a, b = ref_inputs.get(k), new_inputs.get(k)
        if a is not None:
            torch.testing.assert_close(b.float(), a.float(), rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    torch.testing.assert_close(new_loss.float(), ref_loss.float(), rtol=1e-4, atol=1e-6)
    worst = 0.0
    for name, g in ref_grads.items():
        if g is None:
            continue
        rel = ((new_grads[name].float() - g.float()).norm() / g.float().norm().clamp_min(1e-12)).item()
        worst = max(worst, rel)
        assert rel < BF16_GRAD_RTOL, f"grad of {name}: relative L2 difference {rel:.3g} above {BF16_GRAD_RTOL}"
    print(f"bf16 ({'prepared' if prepared else 'bare'}) worst relative L2 grad difference: {worst:.3g}")
    assert any(g is not None and g.abs().max() > 0 for g in ref_grads.values())
