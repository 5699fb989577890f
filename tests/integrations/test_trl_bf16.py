"""bf16 autocast (GRPOConfig(bf16=True), CPU autocast): patched vs unpatched TRL at bf16 tolerance.

Under autocast the LM-head matmul runs in bf16 in both paths (grpo_mel replays the autocast state when it
recomputes a chunk); log-softmax runs in float32 in grpo_mel. TRL's backward GEMMs run in bf16 where grpo_mel's
dX/dW GEMMs run in float32, so gradients agree to bf16 precision, not to fp32's (worst relative L2 difference measured: 0.68%).
"""

from __future__ import annotations

import os

import pytest
import torch

import grpo_mel

from .conftest import CHUNK, generate, generation_batch, loss_and_grads, make_trainer

pytestmark = pytest.mark.trl


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


def test_bf16_autocast_parity(tmp_path):
    trainer = make_trainer(tmp_path, bf16=True, beta=0.04, temperature=0.7)
    if not trainer.accelerator.mixed_precision == "bf16":
        pytest.skip("this TRL/accelerate does not enable bf16 autocast on CPU")
    batch = generation_batch(trainer, 2)
    ref_inputs = generate(trainer, batch)
    ref_loss, ref_grads = loss_and_grads(trainer, ref_inputs)
    with grpo_mel.grpo_patched(chunk_size=CHUNK):
        new_inputs = generate(trainer, batch)
        new_loss, new_grads = loss_and_grads(trainer, new_inputs)
    assert torch.equal(ref_inputs["completion_ids"], new_inputs["completion_ids"])
    assert ref_inputs["advantages"].abs().max() > 0
    # log-probs of the old policy / reference: bf16 logits in both paths
    for k in ("old_per_token_logps", "ref_per_token_logps"):
        a, b = ref_inputs.get(k), new_inputs.get(k)
        if a is not None:
            torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-2, msg=lambda m, k=k: f"{k}: {m}")
    torch.testing.assert_close(new_loss.float(), ref_loss.float(), rtol=2e-2, atol=1e-3)
    worst = 0.0
    for name, g in ref_grads.items():
        if g is None:
            continue
        rel = ((new_grads[name].float() - g.float()).norm() / g.float().norm().clamp_min(1e-12)).item()
        worst = max(worst, rel)
        assert rel < 2e-2, f"grad of {name}: relative L2 difference {rel:.3g} above bf16 tolerance"
    print(f"bf16 worst relative L2 grad difference: {worst:.3g}")
    assert worst > 0 or all(g is None or g.abs().max() == 0 for g in ref_grads.values())
