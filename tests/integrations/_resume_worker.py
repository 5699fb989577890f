"""Resume a checkpointed run in a fresh process: ``python -m tests.integrations._resume_worker SPEC.json``.

SPEC (written by test_trl_resume.py) names the trainer (``"grpo"`` / ``"rloo"``), its config overrides (``cfg``),
whether grpo_mel patches it (``patched``, with ``chunk_size``), the checkpoint to resume from, a directory for the
trainer (``dir``) and where to write the result (``out``): a ``torch.save`` of the logged losses by step, the
parameters after training, the completions of every generation round after the resume, the chunked head's forward
count and the final global step.
"""

from __future__ import annotations

import json
import sys

import torch


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    import grpo_mel

    from . import _train_runs as tr  # imports conftest: the same tiny model, tokenizer, task and thread count

    if spec["patched"]:
        patch = grpo_mel.patch_rloo if spec["trainer"] == "rloo" else grpo_mel.patch_grpo
        patch(chunk_size=spec["chunk_size"])
    trainer = tr.build(spec["dir"], trainer=spec["trainer"], **spec["cfg"])
    run = tr.train(trainer, resume_from_checkpoint=spec["checkpoint"])
    torch.save(dict(losses=run.losses, params=run.params, completions=run.completions, head_calls=run.head_calls,
                    global_step=trainer.state.global_step), spec["out"])


if __name__ == "__main__":
    main(sys.argv[1])
