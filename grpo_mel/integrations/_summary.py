"""What a trainer patch reports: :func:`grpo_mel.patch_grpo`, :func:`grpo_mel.patch_rloo` and
:func:`grpo_mel.patch_trl` return a :class:`PatchSummary` (and log it at INFO on the ``grpo_mel`` logger)."""

from __future__ import annotations

import dataclasses

from ._options import Options

__all__ = ["PatchSummary", "TrainerPatch", "HeadChoice"]


@dataclasses.dataclass(frozen=True)
class HeadChoice:
    """Which head computes a patched trainer's log-probs on one device type, and why."""

    device: str  # "cpu", "cuda", ...
    ours: bool  # grpo_mel's chunked head (else TRL's own method)
    why: str

    def __str__(self) -> str:
        return f"{self.device}: {'grpo_mel' if self.ours else 'TRL'}'s head ({self.why})"


@dataclasses.dataclass(frozen=True)
class TrainerPatch:
    """One patched trainer class: its log-prob method, and the head each of this machine's device types uses
    (before any per-call fallback, e.g. a vision-language input, which warns when it happens)."""

    trainer: str  # the class's name, "GRPOTrainer"
    method: str  # the replaced method, "_get_per_token_logps_and_entropies"
    heads: tuple[HeadChoice, ...]


@dataclasses.dataclass(frozen=True)
class PatchSummary:
    """What a patch call did. ``str(summary)`` is one line; iterating gives the patched trainers' names
    (``list(patch_trl())`` is ``["GRPOTrainer", "RLOOTrainer"]`` where both were patched)."""

    trl_version: str
    options: Options
    patched: tuple[TrainerPatch, ...] = ()
    left: tuple[tuple[str, str], ...] = ()  # (trainer, why) left as TRL's (patch_trl: RLOO on TRL < 1.14)

    @property
    def trainers(self) -> tuple[str, ...]:
        return tuple(p.trainer for p in self.patched)

    def __iter__(self):
        return iter(self.trainers)

    def __add__(self, other: PatchSummary) -> PatchSummary:
        return dataclasses.replace(self, patched=self.patched + other.patched, left=self.left + other.left)

    def __str__(self) -> str:
        # trainers whose heads agree share one description (GRPO and RLOO do on every TRL in the table)
        groups: dict[tuple[HeadChoice, ...], list[str]] = {}
        for p in self.patched:
            groups.setdefault(p.heads, []).append(p.trainer)
        heads = [_heads(h) if len(groups) == 1 else f"{', '.join(names)}: {_heads(h)}" for h, names in groups.items()]
        left = [f"{name} left as TRL's ({why})" for name, why in self.left]
        return (f"grpo_mel: patched {', '.join(self.trainers)} (TRL {self.trl_version}, {self.options.describe()}): "
                + "; ".join(heads + left))


def _heads(heads: tuple[HeadChoice, ...]) -> str:
    """``"grpo_mel's head on cpu (why)"``; device types with the same head and reason share one entry."""
    groups: dict[tuple[bool, str], list[str]] = {}
    for h in heads:
        groups.setdefault((h.ours, h.why), []).append(h.device)
    return ", ".join(f"{'grpo_mel' if ours else 'TRL'}'s head on {', '.join(devices)} ({why})"
                     for (ours, why), devices in groups.items())
