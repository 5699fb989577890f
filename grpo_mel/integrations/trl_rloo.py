"""Patch TRL's ``RLOOTrainer`` as :mod:`grpo_mel.integrations.trl_grpo` patches ``GRPOTrainer``.

TRL's GRPO-style RLOOTrainer (1.14 - 1.16) computes its per-token log-probs through the same method as GRPOTrainer
(``_get_per_token_logps_and_entropies``, the same signature, the same temperature, padding mask and, from 1.15,
fused head), so the same replacement is installed on it: same options, same fallbacks, same result as TRL's own
method. TRL 0.16 - 0.19 ship the older PPO-style RLOOTrainer, which has no such method: :func:`patch_rloo` raises
:class:`UnsupportedTRLVersion` there, naming the version (version table: :mod:`grpo_mel.integrations._trl_compat`).
"""

from __future__ import annotations

import contextlib

from ._options import Options
from ._patch import patch
from ._registry import patched_block, uninstall
from ._summary import PatchSummary
from ._trl_compat import RLOO, UnsupportedTRLVersion

__all__ = ["patch_rloo", "unpatch_rloo", "rloo_patched", "UnsupportedTRLVersion"]


def patch_rloo(options: Options | None = None, *, trainer_cls: type | None = None, **kwargs) -> PatchSummary:
    """Patch ``trl.RLOOTrainer`` (or ``trainer_cls``); the options and the summary are :func:`grpo_mel.patch_grpo`'s.

    Raises :class:`UnsupportedTRLVersion` on a TRL whose RLOOTrainer cannot be patched (< 1.14, e.g. 0.16 - 0.19's
    PPO-style trainer). On a TRL newer than the table, or whose method does not match it, one warning names the
    reason and TRL's own method keeps computing the log-probs.
    """
    return patch(RLOO, trainer_cls, Options.of(options, **kwargs))


def unpatch_rloo() -> None:
    """Undo :func:`patch_rloo`: the class gets back the exact original function object. No-op if not patched."""
    uninstall(RLOO.kind)


@contextlib.contextmanager
def rloo_patched(options: Options | None = None, *, trainer_cls: type | None = None, **kwargs):
    """``with rloo_patched(chunk_size=...) as summary:`` :func:`patch_rloo` for the block; the previous state is
    restored on exit."""
    with patched_block(RLOO.kind):
        yield patch_rloo(options, trainer_cls=trainer_cls, **kwargs)
