"""grpo_mel's integrations with TRL and transformers (they need the ``trl`` extra).

The trainer patches (:func:`~grpo_mel.patch_grpo`, :func:`~grpo_mel.patch_rloo`, :func:`patch_trl`) take one
:class:`Options` object or its fields as keywords, return a :class:`PatchSummary`, and share one registry of what
is installed (:func:`is_patched`) and of the once-only warnings given (:func:`reset_warnings`). Importing this
package does not import TRL; the patches do.
"""

from __future__ import annotations

import logging
import warnings

from ._options import Options
from ._registry import is_patched, reset_warnings
from ._summary import PatchSummary

__all__ = ["patch_trl", "unpatch_trl", "is_patched", "reset_warnings", "Options", "PatchSummary"]


def patch_trl(options: Options | None = None, **kwargs) -> PatchSummary:
    """Apply every trainer patch the installed TRL supports (:func:`~grpo_mel.patch_grpo`,
    :func:`~grpo_mel.patch_rloo`) with the same options (an :class:`Options`, or its fields as keywords); returns
    one :class:`PatchSummary` for both (iterating it gives the patched trainers' names), also logged at INFO.

    GRPO is required (its :class:`UnsupportedTRLVersion` propagates). A trainer this TRL's version cannot have
    patched (RLOO before TRL 1.14) is left as TRL's, with one warning naming why (and a line in the summary).
    """
    from ._patch import patch
    from ._trl_compat import GRPO, RLOO, UnsupportedTRLVersion

    options = Options.of(options, **kwargs)
    summary = patch(GRPO, None, options, log=False)
    try:
        summary += patch(RLOO, None, options, log=False)
    except UnsupportedTRLVersion as e:
        warnings.warn(f"grpo_mel.patch_trl: RLOOTrainer left unpatched: {e}", stacklevel=2)
        summary += PatchSummary(summary.trl_version, options, left=((RLOO.name, str(e)),))
    logging.getLogger("grpo_mel").info("%s", summary)
    return summary


def unpatch_trl() -> None:
    """Undo :func:`patch_trl` (every trainer patch; no-op for those not applied)."""
    from ._registry import uninstall

    uninstall("grpo")
    uninstall("rloo")
