"""grpo_mel's integrations with TRL and transformers (they need the ``trl`` extra)."""

from __future__ import annotations

import warnings

__all__ = ["patch_trl", "unpatch_trl"]


def patch_trl(chunk_size: int | None = None, memory_budget: float | None = None,
              override_fused_head: bool | None = None) -> list[str]:
    """Apply every trainer patch the installed TRL supports (:func:`~grpo_mel.patch_grpo`,
    :func:`~grpo_mel.patch_rloo`) with the same options; returns the patched trainers' names.

    GRPO is required (its :class:`UnsupportedTRLVersion` propagates). A trainer this TRL's version cannot have
    patched (RLOO before TRL 1.14) is left as TRL's, with one warning naming why.
    """
    from .trl_grpo import UnsupportedTRLVersion, patch_grpo
    from .trl_rloo import patch_rloo

    opts = dict(chunk_size=chunk_size, memory_budget=memory_budget, override_fused_head=override_fused_head)
    patch_grpo(**opts)
    patched = ["GRPOTrainer"]
    try:
        patch_rloo(**opts)
        patched.append("RLOOTrainer")
    except UnsupportedTRLVersion as e:
        warnings.warn(f"grpo_mel.patch_trl: RLOOTrainer left unpatched: {e}", stacklevel=2)
    return patched


def unpatch_trl() -> None:
    """Undo :func:`patch_trl` (every trainer patch; no-op for those not applied)."""
    from .trl_grpo import unpatch_grpo
    from .trl_rloo import unpatch_rloo

    unpatch_grpo()
    unpatch_rloo()
