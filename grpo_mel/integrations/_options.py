"""The trainer patches' options: one frozen object that every entry point accepts (keywords are the convenience).

``patch_grpo(chunk_size=1024)`` and ``patch_grpo(Options(chunk_size=1024))`` are the same call; so are
``patch_rloo``, ``patch_trl``, ``grpo_patched``, ``rloo_patched`` and ``patch_causal_lm`` (which has no use for
``override_fused_head``). The options are checked by type and range once, here, with a message naming the option
and the value, and the installed replacement keeps the frozen object.
"""

from __future__ import annotations

import dataclasses

from ..planning import validate_chunk_size, validate_compile, validate_memory_budget

__all__ = ["Options"]


@dataclasses.dataclass(frozen=True)
class Options:
    """How a patched trainer computes its log-probs.

    Attributes:
        chunk_size: rows (completion tokens) per chunk, an int >= 1; None plans it from ``memory_budget``.
        memory_budget: bytes for one chunk's working set when ``chunk_size`` is None, a finite number > 0; None
            takes the default (:mod:`grpo_mel.planning`).
        override_fused_head: on TRL >= 1.15, which has its own fused LM head: True routes through grpo_mel, False
            keeps TRL's, None (default) decides per device (see :func:`grpo_mel.patch_grpo`). A bool or None only.
        compile: True runs each chunk's f (log-probs and entropy; the SFT loss under :func:`patch_causal_lm`) and
            its autograd backward through ``torch.compile`` (Inductor), False eagerly; None (default) takes the
            measured default for the device and the call's size (:func:`grpo_mel.planning.default_compile`). Only
            grpo_mel's own chunk is compiled, never the model; a compile failure runs the chunk eagerly, with one
            warning. A bool or None only.
    """

    chunk_size: int | None = None
    memory_budget: float | None = None
    override_fused_head: bool | None = None
    compile: bool | None = None

    def __post_init__(self):
        validate_chunk_size(self.chunk_size)
        validate_memory_budget(self.memory_budget)
        if self.override_fused_head is not None and not isinstance(self.override_fused_head, bool):
            # a string such as "false" is truthy: taking it would do the opposite of what was asked
            raise TypeError(f"override_fused_head must be True, False or None (decide per device), got "
                            f"{self.override_fused_head!r}")
        validate_compile(self.compile)  # a bool or None; "true" would be truthy, as above

    @classmethod
    def of(cls, options: Options | None = None, **kwargs) -> Options:
        """The options an entry point was called with: ``options`` (None: the defaults) with ``kwargs`` on top."""
        if options is None:
            options = cls()
        elif not isinstance(options, cls):
            raise TypeError(f"options must be a grpo_mel.integrations.Options (or pass the options as keywords: "
                            f"{', '.join(_NAMES)}), got {options!r}")
        unknown = sorted(set(kwargs) - set(_NAMES))
        if unknown:
            raise TypeError(f"unknown option {', '.join(unknown)}; the options are {', '.join(_NAMES)}")
        return dataclasses.replace(options, **kwargs) if kwargs else options

    def describe(self) -> str:
        """The options set away from their defaults, ``"chunk_size=7"``; ``"default options"`` if none is."""
        set_ = [f"{name}={getattr(self, name)!r}" for name in _NAMES if getattr(self, name) is not None]
        return ", ".join(set_) or "default options"


_NAMES = tuple(f.name for f in dataclasses.fields(Options))
