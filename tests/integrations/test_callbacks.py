"""PeakMemoryCallback in a real GRPOTrainer: the peak reaches the reporters and the console, not only
``trainer.state.log_history`` (reporters run before user callbacks in transformers' callback list)."""

from __future__ import annotations

import glob
import os
import warnings

import pytest

from grpo_mel import PeakMemoryCallback

from .conftest import dataset, grpo_config, make_model, tokenizer

pytest.importorskip("tensorboard")


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
