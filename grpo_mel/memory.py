"""Peak memory of a piece of work, on CUDA or on the CPU, from the allocator's own accounting.

* CUDA: ``torch.cuda.reset_peak_memory_stats`` / ``max_memory_allocated`` (bytes above the level at the
  start of the measurement).
* CPU: torch.profiler with ``profile_memory=True`` records every allocation and free of torch's CPU
  allocator in order; the running sum's maximum is the peak. This counts tensors only (no Python objects,
  no allocator slack), is deterministic, and needs no environment variables, so tests may assert ratios.

``peak_memory(fn)`` runs ``fn`` once and returns ``(result, peak_bytes)``; ``PeakMemory`` is the
context-manager form.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["PeakMemory", "peak_memory", "format_bytes"]


class PeakMemory:
    """``with PeakMemory(device) as pm: ...`` then ``pm.peak_bytes`` (growth above the starting level)."""

    def __init__(self, device: torch.device | str | None = None):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.peak_bytes: int | None = None
        self._prof = None
        self._start = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        self._prof.__exit__(*exc)
        if exc[0] is None:
            self.peak_bytes = _cpu_peak(self._prof)


def _cpu_peak(prof) -> int:
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda t: t[0])
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return peak


def peak_memory(fn: Callable[[], Any], device: torch.device | str | None = None) -> tuple[Any, int]:
    """Run ``fn()`` and return ``(its result, peak bytes allocated above the starting level)``."""
    with PeakMemory(device) as pm:
        result = fn()
    return result, pm.peak_bytes


def format_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover
