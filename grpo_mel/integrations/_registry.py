"""What grpo_mel has installed on TRL's trainer classes, and which once-only messages it has given: one registry
for every trainer patch (``patch_grpo``, ``patch_rloo``; :mod:`grpo_mel.integrations._patch` calls it).

Each installed patch is one :class:`Installed` entry, keyed by its kind (``"grpo"``, ``"rloo"``): the class, the
attribute, the exact original function object, the options and the replacement. That entry is the only record;
uninstalling puts the original back from it. (``patch_causal_lm`` patches a model instance, not a class: its state
lives on that instance, see :mod:`grpo_mel.integrations.causal_lm`.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Callable

from ._options import Options

__all__ = ["Installed", "install", "uninstall", "installed", "is_patched", "patched_block", "first_time",
           "reset_warnings"]

KINDS = ("grpo", "rloo")


@dataclasses.dataclass(frozen=True)
class Installed:
    """One installed trainer patch."""

    kind: str  # "grpo" / "rloo"
    cls: type  # the patched class
    name: str  # the patched attribute (TRL's log-prob method)
    original: Callable  # the exact original function object (from the class __dict__, or inherited)
    had_own: bool  # whether the attribute was in the class's own __dict__ (else it is deleted on uninstall)
    options: Options
    replacement: Callable


class _State:
    def __init__(self):
        self.lock = threading.RLock()
        self.installed: dict[str, Installed] = {}
        self.said: set[str] = set()  # keys of the once-only warnings and log lines given so far


_STATE = _State()


def install(kind: str, cls: type, name: str, options: Options, make: Callable[[Callable], Callable]) -> Installed:
    """Install ``make(original)`` as ``cls.<name>`` for ``kind``. The same class and options again: nothing changes;
    new options: a new replacement over the same original; another class: the first is restored first."""
    with _STATE.lock:
        entry = _STATE.installed.get(kind)
        if entry is not None and entry.cls is not cls:
            uninstall(kind)
            entry = None
        if entry is not None and entry.options == options:
            return entry
        if entry is None:
            had_own = name in vars(cls)
            entry = Installed(kind, cls, name, vars(cls)[name] if had_own else getattr(cls, name), had_own, options,
                              replacement=None)
        entry = dataclasses.replace(entry, options=options, replacement=make(entry.original))
        setattr(cls, entry.name, entry.replacement)
        _STATE.installed[kind] = entry
        return entry


def uninstall(kind: str) -> None:
    """Give the class patched for ``kind`` back the exact original function object. No-op if not patched."""
    with _STATE.lock:
        entry = _STATE.installed.pop(kind, None)
        if entry is None:
            return
        if entry.had_own:
            setattr(entry.cls, entry.name, entry.original)
        else:
            delattr(entry.cls, entry.name)


def installed(kind: str) -> Installed | None:
    """The patch installed for ``kind`` (``"grpo"``, ``"rloo"``), or None."""
    _check_kind(kind)
    return _STATE.installed.get(kind)


def is_patched(kind: str = "grpo") -> bool:
    """Whether TRL's trainer of ``kind`` is patched: ``"grpo"`` (GRPOTrainer, the default) or ``"rloo"``
    (RLOOTrainer). A patched trainer may still run TRL's own method for a call it does not handle, with a warning."""
    return installed(kind) is not None


@contextlib.contextmanager
def patched_block(kind: str):
    """On leaving the block, put ``kind``'s patch back as it was on entering it (the same replacement object)."""
    with _STATE.lock:
        before = _STATE.installed.get(kind)
    try:
        yield
    finally:
        with _STATE.lock:
            uninstall(kind)
            if before is not None:
                setattr(before.cls, before.name, before.replacement)
                _STATE.installed[kind] = before


def first_time(key: str) -> bool:
    """True the first time ``key`` is seen (since the last :func:`reset_warnings`): a message keyed so is given
    once per process."""
    if key in _STATE.said:
        return False
    _STATE.said.add(key)
    return True


def reset_warnings() -> None:
    """Forget which once-only warnings and log lines were given, so the next occurrence of each is given again
    (for tests, and for a long-lived process that wants to hear them again)."""
    _STATE.said.clear()


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
