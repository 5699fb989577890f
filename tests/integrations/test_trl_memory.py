"""The patched path never builds [N, V] logits: peak memory of a GRPO step (compute_loss + backward) at V=32000.

CPU peaks from grpo_mel.memory.peak_memory (torch profiler allocator events: deterministic). The model has a small
hidden size (64) and a 32000-way head, with 8 x 128 completion tokens, so the logits dominate. Pre-fused TRL:
patched <= 40% of unpatched. TRL >= 1.15 (its own fused head): patched <= TRL's.
Set GRPO_MEL_MEM_REPORT=path to append the figures as JSON lines.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import grpo_mel
from grpo_mel.memory import format_bytes, peak_memory
from grpo_mel.integrations import _trl_compat

from .conftest import MEM_H, MEM_V, loss_and_grads, make_model, make_trainer, memory_step_inputs, trl

pytestmark = [pytest.mark.trl, pytest.mark.slow]


def test_peak_memory_of_a_grpo_step_at_32k_vocab(tmp_path):
    trainer = make_trainer(tmp_path, model=make_model(vocab_size=MEM_V, hidden=MEM_H), max_completion_length=8)
    inputs = memory_step_inputs(trainer)
    flavour = _trl_compat.detect()

    loss_and_grads(trainer, inputs)  # warm-up (lazy inits out of the measurement)
    (ref_loss, ref_grads), trl_peak = peak_memory(lambda: loss_and_grads(trainer, inputs), device="cpu")
    with grpo_mel.grpo_patched():  # default memory budget
        loss_and_grads(trainer, inputs)
        (new_loss, new_grads), ours_peak = peak_memory(lambda: loss_and_grads(trainer, inputs), device="cpu")
    ratio = ours_peak / trl_peak
    logits_bytes = inputs["completion_ids"].numel() * MEM_V * 4
    line = dict(trl=trl.__version__, fused_head=flavour.fused_head, trl_peak=trl_peak, ours_peak=ours_peak,
                ratio=round(ratio, 4), fp32_logits_bytes=logits_bytes)
    print(f"\nTRL {trl.__version__}: unpatched {format_bytes(trl_peak)}, patched {format_bytes(ours_peak)} "
          f"(ratio {ratio:.3f}); one fp32 [N, V] logits tensor = {format_bytes(logits_bytes)}")
    if os.environ.get("GRPO_MEL_MEM_REPORT"):
        with open(os.environ["GRPO_MEL_MEM_REPORT"], "a") as f:
            f.write(json.dumps(line) + "\n")
    torch.testing.assert_close(new_loss, ref_loss, rtol=1e-5, atol=1e-6)
    # the patched step holds less than one full fp32 logits tensor above the model state
    assert ours_peak < logits_bytes
    if flavour.fused_head:
        assert ours_peak <= trl_peak
    else:
        assert ratio <= 0.40
