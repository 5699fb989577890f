"""Whole ``trainer.train()`` runs for the reliability tests (resume, schedules, several trainers in one process).

A run builds a fresh trainer on the tiny model of ``conftest.make_model`` (seeded, so every run starts from the same
weights), seeds, trains, and returns what the comparisons need: the completions of every generation round, the
logged losses by step, the parameters after training, and how many times the chunked head ran. Only grpo_mel's
public API is used (the head is counted through the Function's ``forward``, ``grpo_mel.linear.ChunkedLinear``), so the tests survive a
reorganisation of grpo_mel's modules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch

import grpo_mel

from .conftest import make_model, make_trainer, recorded_completions

#: Adam after a few steps: a 1e-7 gradient difference on a near-zero entry can move a parameter ~1e-6 (see
#: test_trl_train.py); patched vs unpatched parameters and losses are compared at these tolerances
PARAM_TOL = dict(rtol=1e-3, atol=1e-5)
LOSS_TOL = dict(rtol=1e-4, atol=1e-6)


@contextlib.contextmanager
def count_head_calls():
    """Count the chunked head's forwards (the Function's ``forward``: ``grpo_mel.linear.ChunkedLinear``, which
    ``MemoryEfficientLinear`` subclasses), whichever module calls it."""
    from grpo_mel.linear import ChunkedLinear as fn_cls

    own = vars(fn_cls).get("forward")  # put back as it was (a staticmethod)
    forward = fn_cls.forward
    box = {"n": 0}

    def counting(*args):
        box["n"] += 1
        return forward(*args)

    fn_cls.forward = staticmethod(counting)
    try:
        yield box
    finally:
        if own is None:
            del fn_cls.forward
        else:
            fn_cls.forward = own


@dataclasses.dataclass
class Run:
    completions: list  # completion_ids of every generation round
    losses: dict  # step -> logged loss
    params: dict  # name -> tensor after training
    head_calls: int  # chunked head forwards during train()
    trainer: object = None


def build(tmp_path, trainer: str = "grpo", tied: bool = False, peft_config=None, model=None, **cfg):
    """A fresh trainer on the seeded tiny model (``model``: one built by the caller)."""
    return make_trainer(tmp_path, model=model if model is not None else make_model(tied=tied), trainer=trainer,
                        peft_config=peft_config, **cfg)


def train(trainer, resume_from_checkpoint=None, seed: int = 0) -> Run:
    """``trainer.train()`` from ``transformers.set_seed(seed)``, recording every generation round's completions."""
    import transformers

    transformers.set_seed(seed)
    with recorded_completions(trainer) as seen, count_head_calls() as spy:
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return Run(seen, losses_by_step(trainer), params_of(trainer), spy["n"], trainer)


def losses_by_step(trainer) -> dict:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def params_of(trainer) -> dict:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def assert_same_run(got: Run, want: Run, exact: bool = False, what: str = "") -> None:
    """Same completions in every round; losses and parameters equal (``exact``) or within :data:`PARAM_TOL`."""
    assert len(got.completions) == len(want.completions) > 0, what
    for i, (a, b) in enumerate(zip(got.completions, want.completions)):
        assert torch.equal(a, b), f"{what}: completions of generation round {i} differ"
    assert got.losses.keys() == want.losses.keys() and got.losses, (what, got.losses, want.losses)
    steps = sorted(want.losses)
    assert all(math.isfinite(v) for v in [*got.losses.values(), *want.losses.values()]), (what, got.losses)
    a = torch.tensor([got.losses[s] for s in steps], dtype=torch.float64)
    b = torch.tensor([want.losses[s] for s in steps], dtype=torch.float64)
    assert_params_close(got.params, want.params, exact=exact, what=what)
    if exact:
        assert torch.equal(a, b), f"{what}: losses {a.tolist()} != {b.tolist()}"
    else:
        torch.testing.assert_close(a, b, **LOSS_TOL, msg=lambda m: f"{what}: losses: {m}")


def assert_params_close(got: dict, want: dict, exact: bool = False, what: str = "") -> None:
    assert got.keys() == want.keys(), what
    for n in want:
        if exact:
            assert torch.equal(got[n], want[n]), f"{what}: {n} differs (max {(got[n] - want[n]).abs().max():.3g})"
        else:
            torch.testing.assert_close(got[n], want[n], **PARAM_TOL, msg=lambda m, n=n: f"{what}: {n}: {m}")


def assert_trained(run: Run, first: dict) -> None:
    """Training moved the parameters (so equal parameters are not vacuous)."""
    assert any(not torch.equal(first[n], p) for n, p in run.params.items() if n in first), \
        "training did not change the parameters"


def params_of_model(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}
