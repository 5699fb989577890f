"""A resumed run is the same run: a patched trainer saves a checkpoint at step 2 and a fresh process resumes it.

The uninterrupted patched run (4 steps, gradient accumulation 2, two iterations per generation, a reference model)
writes ``checkpoint-2`` on its way; ``_resume_worker.py`` rebuilds the trainer in a new Python process, patches it and
resumes from that checkpoint to step 4. Its completions after the resume, its logged losses (steps 1-2 come from the
checkpoint's state, 3-4 from the resumed training) and its parameters must equal the uninterrupted run's bit for bit,
and the uninterrupted run must match unpatched TRL's at the tolerances of test_trl_train.py. Step 2 ends a generation
round here (2 steps x 2 iterations per generation), so the resumed process generates anew at step 3 as the
uninterrupted one does: TRL does not checkpoint a generation buffered for later steps (unpatched alike).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from packaging.version import Version

import grpo_mel

from . import _train_runs as tr
from .conftest import CHUNK, TRL_VERSION

pytestmark = [pytest.mark.trl, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = dict(max_steps=4, save_strategy="steps", save_steps=2, beta=0.04, num_iterations=2,
           gradient_accumulation_steps=2, temperature=0.9)


@pytest.fixture(autouse=True)
def _unpatched():
    grpo_mel.unpatch_trl()
    yield
    grpo_mel.unpatch_trl()


def _resume_in_fresh_process(tmp_path, trainer: str, checkpoint) -> dict:
    spec = dict(dir=str(tmp_path / "resumed"), trainer=trainer, cfg=CFG, checkpoint=str(checkpoint), patched=True,
                chunk_size=CHUNK, out=str(tmp_path / "resumed.pt"))
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-m", "tests.integrations._resume_worker", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return torch.load(spec["out"])


def _check_resume(tmp_path, trainer: str, patch):
    with patch(chunk_size=CHUNK):
        full = tr.train(tr.build(tmp_path / "full", trainer=trainer, **CFG))
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert checkpoint.is_dir(), sorted(os.listdir(tmp_path / "full"))
    resumed = _resume_in_fresh_process(tmp_path, trainer, checkpoint)
    assert resumed["global_step"] == 4
    # the resumed process ran the chunked head for steps 3-4 only: half the uninterrupted run's calls
    assert 0 < resumed["head_calls"] < full.head_calls
    n_after = len(resumed["completions"])
    assert 0 < n_after < len(full.completions)
    tr.assert_same_run(tr.Run(resumed["completions"], resumed["losses"], resumed["params"], resumed["head_calls"]),
                       tr.Run(full.completions[-n_after:], full.losses, full.params, full.head_calls),
                       exact=True, what="resumed vs uninterrupted")
    unpatched = tr.train(tr.build(tmp_path / "unpatched", trainer=trainer, **dict(CFG, save_strategy="no")))
    assert unpatched.head_calls == 0
    tr.assert_same_run(full, unpatched, what="patched vs unpatched")


def test_resumed_grpo_run_is_the_same_run(tmp_path):
    _check_resume(tmp_path, "grpo", grpo_mel.grpo_patched)


@pytest.mark.skipif(TRL_VERSION < Version("1.14"),
                    reason=f"TRL {TRL_VERSION}'s RLOOTrainer is the PPO-style one, which patch_rloo cannot patch")
def test_resumed_rloo_run_is_the_same_run(tmp_path):
    _check_resume(tmp_path, "rloo", grpo_mel.rloo_patched)
