"""Patch TRL's ``GRPOTrainer`` so per-token log-probs never materialise the ``[B, T, V]`` logits.

``patch_grpo()`` replaces the trainer's log-prob method (``_get_per_token_logps`` on TRL 0.16 - 0.19,
``_get_per_token_logps_and_entropies`` from 0.20; version table: :mod:`grpo_mel.integrations._trl_compat`) with
one that computes the completion tokens' log-probs (and entropies) from the last hidden states through the chunked
LM head (:mod:`grpo_mel.integrations._logps`), with the same signature, return type and numbers as TRL's.
:mod:`grpo_mel.integrations.trl_rloo` is the same entry point for ``RLOOTrainer``.
"""

from __future__ import annotations

import contextlib

from ._options import Options
from ._patch import patch
from ._registry import is_patched, patched_block, uninstall
from ._summary import PatchSummary
from ._trl_compat import GRPO, UnsupportedTRLVersion

__all__ = ["patch_grpo", "unpatch_grpo", "grpo_patched", "is_patched", "Options", "UnsupportedTRLVersion"]


def patch_grpo(options: Options | None = None, *, trainer_cls: type | None = None, **kwargs) -> PatchSummary:
    """Patch ``trl.GRPOTrainer`` (or ``trainer_cls``) to compute per-token log-probs with the chunked LM head.

    Args:
        options: an :class:`~grpo_mel.integrations.Options` (None: the defaults).
        trainer_cls: the class to patch (default ``trl.GRPOTrainer``).
        **kwargs: the options as keywords, on top of ``options``: ``chunk_size`` (rows per chunk; None plans it
            from ``memory_budget``), ``memory_budget`` (bytes for one chunk's working set), ``override_fused_head``
            (TRL >= 1.15: True routes through grpo_mel, False keeps TRL's fused head, None (default) keeps TRL's
            where TRL runs its Triton kernel (CUDA/XPU with Triton), measured faster there
            (docs/benchmarks.md, "GPU results"), and grpo_mel's everywhere else, where TRL takes its torch
            fallback; the choice is logged once per device, naming why), ``compile`` (True / False: each chunk's
            f and its backward through ``torch.compile``, or eager; None: the measured default for the device and
            the call's size).

    Returns a :class:`~grpo_mel.integrations.PatchSummary` (also logged at INFO): what was patched and which head
    each device type uses, and why. Idempotent: a second call only updates the options. Raises
    :class:`UnsupportedTRLVersion` on a TRL whose GRPOTrainer cannot be patched (< 0.16, or neither method
    present), and TypeError / ValueError naming a bad option. On a TRL newer than the version table (> 1.16.0), or
    whose method does not match it, one warning names the reason and TRL's own method keeps computing.
    """
    return patch(GRPO, trainer_cls, Options.of(options, **kwargs))


def unpatch_grpo() -> None:
    """Undo :func:`patch_grpo`: the class gets back the exact original function object. No-op if not patched."""
    uninstall(GRPO.kind)


@contextlib.contextmanager
def grpo_patched(options: Options | None = None, *, trainer_cls: type | None = None, **kwargs):
    """``with grpo_patched(chunk_size=...) as summary:`` :func:`patch_grpo` for the block; the previous state
    (unpatched, or patched with other options) is restored on exit."""
    with patched_block(GRPO.kind):
        yield patch_grpo(options, trainer_cls=trainer_cls, **kwargs)
