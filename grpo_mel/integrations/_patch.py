"""What every trainer patch's entry point does (:func:`grpo_mel.patch_grpo`, :func:`grpo_mel.patch_rloo`): find the
installed TRL's log-prob method in the version table, install the chunked-head replacement in the registry, and
report what was patched."""

from __future__ import annotations

import functools
import logging

import torch

from ._logps import choose_head, make_replacement
from ._options import Options
from ._registry import install
from ._summary import PatchSummary, TrainerPatch
from ._trl_compat import Trainer, detect

_LOG = logging.getLogger("grpo_mel")


def patch(trainer: Trainer, trainer_cls: type | None, options: Options, log: bool = True) -> PatchSummary:
    """Patch ``trainer_cls`` (None: TRL's class for ``trainer``) with ``options``; the summary is logged at INFO
    unless ``log`` is False. Raises :class:`~grpo_mel.integrations._trl_compat.UnsupportedTRLVersion` before
    anything changes where the class cannot be patched."""
    flavour = detect(trainer_cls, trainer)  # raises before TRL's class is imported on a TRL it cannot patch
    if trainer_cls is None:
        import trl

        trainer_cls = getattr(trl, trainer.name)
    install(trainer.kind, trainer_cls, flavour.method_name, options,
            functools.partial(make_replacement, flavour=flavour, options=options))
    heads = tuple(choose_head(flavour, options, device) for device in _device_types())
    summary = PatchSummary(flavour.version, options, (TrainerPatch(trainer_cls.__name__, flavour.method_name,
                                                                   heads),))
    if log:
        _LOG.info("%s", summary)
    return summary


def _device_types() -> list[str]:
    """This machine's device types, accelerators first."""
    types = [t for t in ("cuda", "xpu") if getattr(torch, t, None) is not None and getattr(torch, t).is_available()]
    if torch.backends.mps.is_available():
        types.append("mps")
    return [*types, "cpu"]
