"""End-to-end: full ``trainer.train()`` runs, patched and unpatched, from the same seed.

Fresh trainer per run, same seed before ``train()``; completions of every generation round are recorded and must
be identical; per-step losses and the parameters after training must match. Optimizer steps amplify fp32 rounding
differences (Adam normalises tiny gradients: a 1e-7 gradient difference on a near-zero entry becomes ~1e-6 in the
update), so parameters are compared at rtol 1e-3 / atol 1e-5 after 2-3 steps and losses at rtol 1e-4, while
the single-step gradient parity is tested tightly in test_trl_parity.py.
"""

from __future__ import annotations

import pytest
import torch

import grpo_mel
from grpo_mel.integrations import _logps

from .conftest import CHUNK, count_calls, make_model, make_trainer, recorded_completions

pytestmark = [pytest.mark.trl, pytest.mark.slow]


def _train(tmp_path, patched: bool, **cfg):
    import transformers

    trainer = make_trainer(tmp_path, model=make_model(tied=cfg.pop("tied", False)), **cfg)
    transformers.set_seed(0)
    with recorded_completions(trainer) as seen:
        if patched:
            with grpo_mel.grpo_patched(chunk_size=CHUNK), count_calls(_logps, "chunked_linear") as spy:
                trainer.train()
            assert spy["n"] > 0
        else:
            trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return seen, losses, params


@pytest.mark.parametrize(
    "cfg",
    [
        dict(beta=0.04, num_iterations=2, gradient_accumulation_steps=2, loss_type="grpo", temperature=0.7,
             max_steps=3),
        dict(tied=True, beta=0.0, gradient_accumulation_steps=2, loss_type="dr_grpo", max_steps=2),
    ],
    ids=["beta-iter2-ga2-grpo-T07", "tied-ga2-drgrpo"],
)
def test_train_end_to_end_matches(tmp_path, cfg):
    seen_a, losses_a, params_a = _train(tmp_path / "a", False, **dict(cfg))
    seen_b, losses_b, params_b = _train(tmp_path / "b", True, **dict(cfg))
    assert len(seen_a) == len(seen_b) > 0
    for x, y in zip(seen_a, seen_b):
        assert torch.equal(x, y)
    assert len(losses_a) == len(losses_b) > 0
    torch.testing.assert_close(torch.tensor(losses_b), torch.tensor(losses_a), rtol=1e-4, atol=1e-6)
    changed = 0
    for n in params_a:
        torch.testing.assert_close(params_b[n], params_a[n], rtol=1e-3, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    first = make_model(tied=cfg.get("tied", False))
    for n, p in first.named_parameters():
        if n in params_a:
            changed += int(not torch.equal(p, params_a[n]))
    assert changed > 0, "training did not change the parameters"
