"""PeakMemoryCallback: a value per optimizer step, reset every step, in trainer.state.log_history; in a real
GRPOTrainer the peak reaches the reporters and the console too (reporters run before user callbacks in
transformers' callback list)."""

from __future__ import annotations

import glob
import os
import types
import warnings

import pytest
import torch

import grpo_mel
from grpo_mel.integrations.callbacks import PeakMemoryCallback, _read_hwm_bytes, _reset_hwm

from .conftest import dataset, grpo_config, make_model, tokenizer


def _tb_scalars(logdir: str, tag: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(logdir, "**", "events.out.tfevents*"), recursive=True)
    assert files, f"no TensorBoard event file under {logdir}"
    points = []
    for f in files:
        acc = EventAccumulator(f, size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            points += [(e.step, e.value) for e in acc.Scalars(tag)]
    return sorted(points)


@pytest.mark.parametrize("added", ["constructor", "add_callback"])
def test_peak_reaches_tensorboard_and_console(tmp_path, capsys, added):
    pytest.importorskip("tensorboard")
    from trl import GRPOTrainer

    cb = PeakMemoryCallback(cpu_measure="rss")
    args = grpo_config(tmp_path, report_to="tensorboard", disable_tqdm=True, max_steps=2, logging_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=make_model(), reward_funcs=[lambda completions, **k: [float(len(c)) for c in
                                                                                       completions]],
                              args=args, train_dataset=dataset(8), processing_class=tokenizer(),
                              callbacks=[cb] if added == "constructor" else None)
        if added == "add_callback":
            trainer.add_callback(cb)
        trainer.train()
    assert cb.key == "peak_rss_gb" and len(cb.steps) == 2
    logged = {h["step"]: h[cb.key] for h in trainer.state.log_history if cb.key in h}
    assert sorted(logged) == [1, 2]
    # TensorBoard (transformers writes train/<key>): one value per logged step, the logged value
    points = _tb_scalars(str(tmp_path), f"train/{cb.key}")
    assert [s for s, _ in points] == [1, 2], points
    for step, value in points:
        assert value == pytest.approx(logged[step], rel=1e-6)
    # the console (PrinterCallback with disable_tqdm=True) printed it with each step's logs
    printed = [line for line in capsys.readouterr().out.splitlines() if "'loss'" in line]
    assert len(printed) == 2 and all(f"'{cb.key}'" in line for line in printed), printed


_GIB = float(1 << 30)


def _state(step=1):
    return types.SimpleNamespace(global_step=step, log_history=[])


def _step(cb, step, work):
    state = _state(step)
    cb.on_step_begin(None, state, None)
    work()
    state.global_step = step
    cb.on_step_end(None, state, None)
    return state


def test_lazy_export():
    assert grpo_mel.PeakMemoryCallback is PeakMemoryCallback


def test_torch_measure_sees_a_step_allocation_and_resets():
    cb = PeakMemoryCallback(device="cpu", cpu_measure="torch", label="t")
    assert cb.key == "peak_cpu_alloc_gb"

    def big():
        x = torch.ones(32 << 20, dtype=torch.uint8)  # 32 MiB, freed at once
        del x

    _step(cb, 1, big)
    _step(cb, 2, lambda: torch.ones(1 << 10))
    v1, v2 = cb.values
    assert v1 >= 32 / 1024 * 0.99  # GiB
    assert v2 < 1e-4  # the peak was reset: step 2 does not inherit step 1's peak


_RSS_PROBE = """
import json, torch
from transformers import TrainerState
from grpo_mel.integrations.callbacks import PeakMemoryCallback
cb = PeakMemoryCallback(device="cpu", cpu_measure="rss")
def step(n, work):
    st = TrainerState(); st.global_step = n - 1
    cb.on_step_begin(None, st, None); work(); st.global_step = n; cb.on_step_end(None, st, None)
def big():
    x = torch.ones(256 << 20, dtype=torch.uint8)  # 256 MiB, touched (so resident), then freed
    del x
step(1, big)
step(2, lambda: None)
print(json.dumps({"key": cb.key, "values": cb.values, "resettable": cb.rss_resettable}))
"""


@pytest.mark.skipif(_read_hwm_bytes() is None or not _reset_hwm(), reason="needs /proc/self/status and clear_refs")
def test_rss_measure_sees_a_step_allocation_and_resets():
    # A fresh process: inside pytest the resident set depends on what earlier tests left mapped, which made this
    # reading flaky; a new interpreter has a small, predictable baseline.
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _RSS_PROBE], capture_output=True, text=True, timeout=300, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["key"] == "peak_rss_gb"
    assert res["resettable"] is True
    v1, v2 = res["values"]
    assert v1 - v2 > 0.2  # GiB: step 2's peak does not include step 1's 256 MiB


def test_on_log_adds_the_max_since_the_last_log_to_logs_and_log_history():
    cb = PeakMemoryCallback(device="cpu", cpu_measure="torch")
    _step(cb, 1, lambda: torch.ones(4 << 20, dtype=torch.uint8))
    _step(cb, 2, lambda: torch.ones(8 << 20, dtype=torch.uint8))
    state = _state(2)
    logs = {"loss": 1.0}
    state.log_history.append({**logs, "step": 2})  # what Trainer.log does before on_log
    cb.on_log(None, state, None, logs=logs)
    assert logs[cb.key] == pytest.approx(max(cb.values), abs=1e-6)
    assert state.log_history[-1][cb.key] == logs[cb.key]
    # the end-of-training summary log is left alone
    end = {"train_loss": 1.0, "train_runtime": 1.0}
    cb.on_log(None, state, None, logs=end)
    assert cb.key not in end


def test_bad_measure():
    with pytest.raises(ValueError):
        PeakMemoryCallback(cpu_measure="vram")


@pytest.mark.parametrize("measure,logging_steps", [("rss", 1), ("torch", 2)])
def test_in_a_trainer(tmp_path, measure, logging_steps):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from grpo_mel.testing import tiny_llama

    model = tiny_llama(vocab_size=128)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (16, 12), generator=g).tolist()]
    cb = PeakMemoryCallback(cpu_measure=measure, label=measure)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, logging_steps=logging_steps, report_to="none",
                             save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), callbacks=[cb])
    trainer.train()
    assert cb.key == ("peak_rss_gb" if measure == "rss" else "peak_cpu_alloc_gb")
    assert [s["step"] for s in cb.steps] == [1, 2, 3, 4]
    assert all(v > 0 for v in cb.values)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 4 // logging_steps
    for h in logged:
        assert h[cb.key] > 0
        mine = [s[cb.key] for s in cb.steps if h["step"] - logging_steps < s["step"] <= h["step"]]
        assert h[cb.key] == pytest.approx(max(mine), abs=1e-6)
