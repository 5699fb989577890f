"""``PeakMemoryCallback``: peak memory of every optimizer step, in the Trainer's logs.

The peak is reset at ``on_step_begin`` and read at ``on_step_end``, so each value covers one whole
optimizer step: all its gradient-accumulation micro-steps, forward and backward, the optimizer step and,
for GRPO, the generation of the completions (TRL generates inside the training step). The value is
added to the next ``on_log`` (the max over the steps since the previous log, so set ``logging_steps=1``
for one value per step) and so appears in ``trainer.state.log_history``, in every reporter (TensorBoard,
W&B, MLflow, trackio, ...) and on the console; every step is also kept in ``callback.steps`` whatever the
logging interval. The callback only measures and logs; tables and plots are the caller's (the examples'
``peak_table``).

Ordering: transformers calls ``on_log`` on its callbacks in list order, and builds that list as its
defaults (including the console printer), then the ``report_to`` reporters, then the user's callbacks
(``callbacks=[...]`` or ``add_callback``), so a value added to ``logs`` by a user callback would come
after everything had been written. At its first event (``on_init_end``, or ``on_train_begin`` for a
callback added later) this callback therefore moves itself to the front of the Trainer's callback list.

Logged key, by measure:

* ``peak_vram_gb`` (CUDA): ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` at the
  step's start: the largest amount of memory held by tensors during the step, *including* the model,
  optimizer state and everything else alive (GiB, 2**30 bytes). ``peak_vram_reserved_gb`` (the caching
  allocator's reserved peak) is kept in ``callback.steps`` too.
* ``peak_rss_gb`` (CPU, the default there, ``cpu_measure="rss"``): the process's peak resident set size
  during the step (Linux ``VmHWM`` from ``/proc/self/status``, reset at the step's start by writing ``5``
  to ``/proc/self/clear_refs``), in GiB. It counts everything the process holds (Python, libraries, the
  model), so differences between runs are what matter, and it is only as fine as the OS's page
  accounting. Where the reset is not possible (not Linux, or not permitted) it falls back to
  ``getrusage(RUSAGE_SELF).ru_maxrss``, the peak since the process started (then monotone; reported
  by ``callback.rss_resettable``).
* ``peak_cpu_alloc_gb`` (CPU, ``cpu_measure="torch"``): the peak of torch's CPU allocator *above the
  level at the step's start* (tensors only), from :class:`grpo_mel.memory.PeakMemory` (torch.profiler
  memory events). Deterministic and precise, but it profiles every op: use it for small runs and tests.
"""

from __future__ import annotations

import resource
import sys
import warnings
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

__all__ = ["PeakMemoryCallback"]

_GIB = float(1 << 30)
_KEYS = {"cuda": "peak_vram_gb", "rss": "peak_rss_gb", "torch": "peak_cpu_alloc_gb"}


def _read_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _ru_maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


class PeakMemoryCallback(TrainerCallback):
    """Log the peak memory of every optimizer step (see the module docstring for the measures).

    Args:
        device: ``"cuda"``, ``"cuda:N"`` or ``"cpu"``; None picks the Trainer's device at train begin
            (``args.device``).
        cpu_measure: on CPU, ``"rss"`` (process peak RSS, key ``peak_rss_gb``) or ``"torch"`` (torch
            allocator peak above the step's starting level via torch.profiler, key ``peak_cpu_alloc_gb``).
        label: a name for this run, kept in each record of ``steps`` as ``"run"`` (e.g. ``"patched"``).

    Attributes:
        steps: one dict per optimizer step: ``{"step": global_step, <key>: GiB, ...}``.
        key: the logged key (``peak_vram_gb``, ``peak_rss_gb`` or ``peak_cpu_alloc_gb``); set at train begin.
    """

    def __init__(self, device: str | torch.device | None = None, cpu_measure: str = "rss",
                 label: str | None = None):
        if cpu_measure not in ("rss", "torch"):
            raise ValueError(f"cpu_measure must be 'rss' or 'torch', got {cpu_measure!r}")
        self.device = torch.device(device) if device is not None else None
        self.cpu_measure = cpu_measure
        self.label = label
        self.steps: list[dict[str, Any]] = []
        self.key: str | None = None
        self.rss_resettable: bool | None = None
        self._pending: list[float] = []
        self._prof = None
        self._in_step = False
        if self.device is not None:
            self._set_key()

    # ---------------------------------------------------------------------------------------------
    def _set_key(self) -> None:
        self.key = _KEYS["cuda"] if self.device.type == "cuda" else _KEYS[self.cpu_measure]

    @property
    def values(self) -> list[float]:
        """The per-step peaks (GiB) in step order."""
        return [s[self.key] for s in self.steps]

    @property
    def max_peak(self) -> float | None:
        return max(self.values) if self.steps else None

    def _begin(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.cpu_measure == "rss":
            self.rss_resettable = _reset_hwm() and _read_hwm_bytes() is not None
        else:
            from ..memory import PeakMemory

            self._prof = PeakMemory("cpu")
            self._prof.__enter__()
        self._in_step = True

    def _end(self) -> dict[str, float]:
        self._in_step = False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return {
                self.key: torch.cuda.max_memory_allocated(self.device) / _GIB,
                "peak_vram_reserved_gb": torch.cuda.max_memory_reserved(self.device) / _GIB,
            }
        if self.cpu_measure == "rss":
            hwm = _read_hwm_bytes() if self.rss_resettable else None
            return {self.key: (hwm if hwm is not None else _ru_maxrss_bytes()) / _GIB}
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        return {self.key: prof.peak_bytes / _GIB}

    def _go_first(self) -> None:
        """Move this callback to the front of the CallbackHandler that is calling it, so that its ``on_log``
        adds the peak to ``logs`` before the printer and the reporters read them (see the module docstring).

        The handler does not pass itself to the callbacks: it is found as ``self`` of a calling frame
        (``CallbackHandler.call_event``). Moving the item being visited from index i to 0 while the handler
        iterates its list is safe: items 0..i-1 shift to 1..i, so the iteration continues at the item after
        this one and every callback is still called exactly once.
        """
        frame = sys._getframe(1)
        while frame is not None:
            handler = frame.f_locals.get("self")
            if isinstance(handler, CallbackHandler) and any(cb is self for cb in handler.callbacks):
                cbs = handler.callbacks
                cbs.insert(0, cbs.pop(next(i for i, cb in enumerate(cbs) if cb is self)))
                return
            frame = frame.f_back
        warnings.warn("PeakMemoryCallback could not find the Trainer's callback list to go first in it: the peak "
                      "is in trainer.state.log_history, but reporters and the console may not show it", stacklevel=2)

    # ---------------------------------------------------------------------------------------------
    def on_init_end(self, args, state, control, **kwargs):
        self._go_first()

    def on_train_begin(self, args, state, control, **kwargs):
        self._go_first()
        self._resolve_device(args)

    def _resolve_device(self, args) -> None:
        if self.device is None:
            dev = getattr(args, "device", None)
            self.device = torch.device(dev) if dev is not None else torch.device(
                "cuda" if torch.cuda.is_available() else "cpu")
            if self.device.type == "cuda" and self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            if self.device.type not in ("cuda", "cpu"):
                self.device = torch.device("cpu")  # other accelerators: process RSS
        self._set_key()

    def on_step_begin(self, args, state, control, **kwargs):
        if self.device is None:
            self._resolve_device(args)
        if self._in_step and self._prof is not None:  # a step that never ended (should not happen)
            self._prof.__exit__(None, None, None)
            self._prof = None
        self._begin()

    def on_step_end(self, args, state, control, **kwargs):
        if not self._in_step:
            return
        rec = {"step": state.global_step, **self._end()}
        if self.label is not None:
            rec["run"] = self.label
        self.steps.append(rec)
        self._pending.append(rec[self.key])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._pending or logs is None or "loss" not in logs and "train_loss" in logs:
            return  # nothing new, or the end-of-training summary log
        value = round(max(self._pending), 6)
        self._pending.clear()
        logs[self.key] = value  # this callback is first in the list (_go_first): the printer and reporters see it
        # Trainer.log appended a copy of ``logs`` to log_history before calling on_log: update that copy
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1][self.key] = value

    def on_train_end(self, args, state, control, **kwargs):
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            self._prof = None
            self._in_step = False
