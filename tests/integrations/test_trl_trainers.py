"""Several trainers in one process, and patching while a trainer exists.

The patch replaces a method on the trainer *class* (docs/usage.md, "Trainers that already exist"): what a trainer
computes with is decided at each log-prob call by whether its class is patched then, not by when the trainer was
built. Each run here is a whole ``train()`` from the same seed; the chunked head's forwards are counted, so a run
that should be patched is seen to be, and one that should not is seen not to be. Patched and unpatched runs of the
same trainer must agree at the tolerances of test_trl_train.py.
"""

from __future__ import annotations

import pytest
from packaging.version import Version

import grpo_mel

from . import _train_runs as tr
from .conftest import CHUNK, TRL_VERSION, trl

pytestmark = [pytest.mark.trl, pytest.mark.slow]

CFG = dict(beta=0.04, num_iterations=2, temperature=0.9, max_steps=2)


@pytest.fixture(autouse=True)
def _unpatched():
    grpo_mel.unpatch_trl()
    yield
    grpo_mel.unpatch_trl()


def test_patching_applies_to_existing_trainers_from_their_next_call(tmp_path):
    grpo_mel.patch_grpo(chunk_size=CHUNK)
    built_patched = tr.build(tmp_path / "a", **CFG)
    grpo_mel.unpatch_grpo()
    built_unpatched = tr.build(tmp_path / "b", **CFG)

    grpo_mel.patch_grpo(chunk_size=CHUNK)  # after the trainer was built: it computes with the patch
    late = tr.train(built_unpatched)
    grpo_mel.unpatch_grpo()  # built while patched, trained after unpatch_grpo: TRL's own method
    early = tr.train(built_patched)

    assert late.head_calls > 0 and early.head_calls == 0
    tr.assert_same_run(late, early, what="patched after build vs built patched, trained unpatched")


def test_two_grpo_trainers_one_patched_through_a_subclass(tmp_path):
    """``patch_grpo(trainer_cls=Sub)`` patches ``Sub`` alone: a GRPOTrainer alive beside it keeps TRL's method."""

    class OwnGRPO(trl.GRPOTrainer):
        pass

    grpo_mel.patch_grpo(chunk_size=CHUNK, trainer_cls=OwnGRPO)
    own, plain = tr.build(tmp_path / "own", **CFG), tr.build(tmp_path / "plain", **CFG)
    own.__class__ = OwnGRPO  # the same trainer, now of the patched subclass
    mine, theirs = tr.train(own), tr.train(plain)
    assert mine.head_calls > 0 and theirs.head_calls == 0
    tr.assert_same_run(mine, theirs, what="subclass patched vs GRPOTrainer")


@pytest.mark.skipif(TRL_VERSION < Version("1.14"),
                    reason=f"TRL {TRL_VERSION}'s RLOOTrainer is the PPO-style one, which patch_rloo cannot patch")
def test_grpo_and_rloo_trainers_in_one_process(tmp_path):
    # GRPO patched (patch_trl), then RLOO built after unpatch_trl()
    grpo_mel.patch_trl(chunk_size=CHUNK)
    grpo_patched = tr.train(tr.build(tmp_path / "g1", **CFG))
    grpo_mel.unpatch_trl()
    rloo_unpatched = tr.train(tr.build(tmp_path / "r1", trainer="rloo", **CFG))
    # the other way round, with patch_rloo alone: RLOO patched, GRPO (trained next, its class untouched) not
    grpo_mel.patch_rloo(chunk_size=CHUNK)
    rloo_patched = tr.train(tr.build(tmp_path / "r2", trainer="rloo", **CFG))
    grpo_unpatched = tr.train(tr.build(tmp_path / "g2", **CFG))

    assert grpo_patched.head_calls > 0 and rloo_patched.head_calls > 0
    assert rloo_unpatched.head_calls == 0 and grpo_unpatched.head_calls == 0
    tr.assert_same_run(grpo_patched, grpo_unpatched, what="GRPO")
    tr.assert_same_run(rloo_patched, rloo_unpatched, what="RLOO")
    # the two trainers really computed different things (RLOO's advantages are leave-one-out, GRPO's group-normalised)
    assert grpo_patched.losses != rloo_patched.losses
