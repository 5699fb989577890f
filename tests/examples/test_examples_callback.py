"""The examples' peak-memory table, built from PeakMemoryCallback records (the callback itself prints nothing)."""

from __future__ import annotations

from grpo_mel.integrations.callbacks import PeakMemoryCallback

from conftest import load_example


def test_examples_peak_table():
    """The examples' table (the callback itself prints nothing): each run's per-step peaks, '-' for a step a
    run does not have, the maxima and their ratio."""
    C = load_example("grpo_reward_task").C
    runs = []
    for label, peaks in (("unpatched", {1: 2.0, 2: 3.0, 3: 2.5}), ("patched", {1: 1.0, 2: 1.5})):
        cb = PeakMemoryCallback(device="cpu", cpu_measure="torch", label=label)
        cb.steps = [{"step": st, cb.key: v, "run": label} for st, v in peaks.items()]
        runs.append(C.RunResult(label=label, callback=cb, peak_key=cb.key, peaks=cb.values))
    lines = C.peak_table(runs).splitlines()
    assert lines[0] == ("peak memory per optimizer step, GiB (peak_cpu_alloc_gb: torch CPU allocator peak above the "
                        "step's start, via torch.profiler)")
    assert lines[1].split() == ["step", "unpatched", "patched"]
    rows = [line.split() for line in lines[3:]]
    assert rows == [["1", "2.0000", "1.0000"], ["2", "3.0000", "1.5000"], ["3", "2.5000", "-"],
                    ["max", "3.0000", "1.5000"], ["patched", "/", "unpatched", "max", "peak:", "0.500"]]
