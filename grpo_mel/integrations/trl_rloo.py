"""Patch TRL's ``RLOOTrainer`` like :mod:`grpo_mel.integrations.trl_grpo` patches ``GRPOTrainer``.

TRL's GRPO-style RLOOTrainer (1.14 - 1.16) computes its per-token log-probs through the same method as GRPOTrainer
(``_get_per_token_logps_and_entropies``, the same signature, the same temperature, padding mask and, from 1.15,
fused head), so the same replacement is installed on it: same options, same fallbacks, same result as TRL's own
method. TRL 0.16 - 0.19 ship the older PPO-style RLOOTrainer, which has no such method: :func:`patch_rloo` raises
:class:`UnsupportedTRLVersion` there, naming the version (version table: :mod:`grpo_mel.integrations._trl_compat`).
"""

from __future__ import annotations

import contextlib

from ._trl_compat import RLOO, UnsupportedTRLVersion, detect
from .trl_grpo import Options, install, patched_block, uninstall

__all__ = ["patch_rloo", "unpatch_rloo", "rloo_patched", "UnsupportedTRLVersion"]


def patch_rloo(chunk_size: int | None = None, memory_budget: float | None = None,
               override_fused_head: bool | None = None, trainer_cls=None) -> None:
    """Patch ``trl.RLOOTrainer`` (or ``trainer_cls``); the arguments are :func:`grpo_mel.patch_grpo`'s.

    Raises :class:`UnsupportedTRLVersion` on a TRL whose RLOOTrainer cannot be patched (< 1.14, e.g. 0.16 - 0.19's
    PPO-style trainer). On a TRL newer than the table, or whose method does not match it, one warning names the
    reason and TRL's own method keeps computing the log-probs.
    """
    options = Options(chunk_size, memory_budget, override_fused_head)
    flavour = detect(trainer_cls, RLOO)  # raises before TRL's RLOOTrainer is imported on a TRL it cannot patch
    if trainer_cls is None:
        from trl import RLOOTrainer as trainer_cls  # noqa: N813
    install("rloo", trainer_cls, flavour, options)


def unpatch_rloo() -> None:
    """Undo :func:`patch_rloo`: the class gets back the exact original function object. No-op if not patched."""
    uninstall("rloo")


@contextlib.contextmanager
def rloo_patched(chunk_size: int | None = None, memory_budget: float | None = None,
                 override_fused_head: bool | None = None, trainer_cls=None):
    """``with rloo_patched(chunk_size=...):`` patch for the block; restores the previous state on exit."""
    with patched_block("rloo"):
        patch_rloo(chunk_size=chunk_size, memory_budget=memory_budget, override_fused_head=override_fused_head,
                   trainer_cls=trainer_cls)
        yield
