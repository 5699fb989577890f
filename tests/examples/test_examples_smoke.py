"""The two examples at tiny size on CPU: patched and unpatched runs give the same curves, and the
PeakMemoryCallback logged a peak-memory value for every optimizer step of both runs."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import calls_per_run, has_bnb_cpu, load_example

TOL = 1e-3  # largest |Δloss| allowed, CPU fp32, tiny size


def _check_run(run, steps: int):
    assert len(run.losses) == steps, run.losses
    assert all(math.isfinite(x) for x in run.losses)
    # one peak per optimizer step, recorded by the callback and logged into the Trainer's log history
    assert len(run.peaks) == steps and all(p > 0 for p in run.peaks)
    logged = [h for h in run.extra["log_history"] if "loss" in h and "train_loss" not in h]
    assert len(logged) == steps
    assert all(h.get(run.peak_key, 0) > 0 for h in logged), run.peak_key


@pytest.fixture(scope="module")
def grpo_result():
    mod = load_example("grpo_reward_task")
    threads = torch.get_num_threads()  # the example sets 1 thread for its tiny model: restore for later tests
    # beta > 0: the loss has a KL term, so it is not identically 0 (see the example's docstring)
    try:
        return _grpo_main(mod)
    finally:
        torch.set_num_threads(threads)


def _grpo_main(mod):
    from grpo_mel.integrations import _logps

    with calls_per_run(mod, _logps, "chunked_linear") as calls:
        res = _grpo_argv(mod)
    return dict(res, calls=calls)


def _grpo_argv(mod):
    return mod.main(["--compare", "--steps", "3", "--num-generations", "2", "--prompts-per-step", "2",
                     "--max-completion-length", "8", "--beta", "0.04", "--learning-rate", "1e-3",
                     "--chunk-size", "5", "--num-prompts", "32", "--no-warmup",
                     "--output-dir", "/tmp/grpo_mel_test_outputs/grpo"])


def test_grpo_example_patched_matches_unpatched(grpo_result):
    unpatched, patched = grpo_result["runs"]
    assert (unpatched.label, patched.label) == ("unpatched", "patched")
    for r in (unpatched, patched):
        _check_run(r, 3)
    # real numbers from both runs
    assert grpo_result["max_abs_diff"] == max(abs(a - b) for a, b in zip(unpatched.losses, patched.losses))
    assert grpo_result["max_abs_diff"] <= TOL
    assert any(abs(x) > 0 for x in unpatched.losses[1:])  # the KL term makes the loss non-zero after step 1
    # the gradient (grad_norm) and the entropy go through the patched head: they match tightly
    for key in ("grad_norm", "entropy"):
        a, b = unpatched.metrics[key], patched.metrics[key]
        assert len(a) == len(b) == 3 and all(x > 0 for x in a)
        for x, y in zip(a, b):
            assert abs(x - y) <= 1e-4 * max(1.0, abs(x)), (key, a, b)
    calls = grpo_result["calls"]
    assert calls["unpatched"] == 0 and calls["patched"] > 0, calls  # the patched run went through grpo_mel
    # the verdict: every compared quantity within its tolerance, and the peaks' ratio
    assert grpo_result["ok"] is True
    assert grpo_result["verdict"].startswith("verdict: patched matches unpatched over 3 steps (max |Δ|: loss ")
    assert "grad_norm" in grpo_result["verdict"] and "x unpatched" in grpo_result["verdict"]


@pytest.mark.parametrize("flag,value", [("auto", None), ("true", True), ("false", False)])
def test_grpo_example_override_fused_head_reaches_the_patch(monkeypatch, capsys, flag, value):
    """``--override-fused-head`` is handed to the patch as ``override_fused_head`` (the GPU suite passes ``true``),
    and what ``patch_grpo`` returns is printed (when not None) and undone on leaving."""
    from grpo_mel.integrations import trl_grpo

    seen, undone = {}, []
    monkeypatch.setattr(trl_grpo, "patch_grpo", lambda **kw: seen.update(kw) or "SUMMARY")
    monkeypatch.setattr(trl_grpo, "unpatch_grpo", lambda: undone.append(1))
    mod = load_example("grpo_reward_task")
    with mod._patch_ctx(mod.parse_args(["--override-fused-head", flag]), patched=True) as summary:
        assert summary == "SUMMARY"
    assert "override_fused_head" in seen and seen["override_fused_head"] is value
    assert undone == [1]
    assert capsys.readouterr().out == "patched run: SUMMARY\n"


def _sft_main(argv):
    from grpo_mel.integrations import causal_lm

    mod = load_example("sft_loss_match")
    with calls_per_run(mod, causal_lm, "causal_lm_loss") as calls:
        res = mod.main(argv)
    return res, calls


def test_sft_example_loss_match_lora():
    res, calls = _sft_main(["--no-4bit", "--steps", "3", "--chunk-size", "7", "--num-rows", "16", "--no-warmup",
                    "--output-dir", "/tmp/grpo_mel_test_outputs/sft"])
    unpatched, patched = res["runs"]
    for r in (unpatched, patched):
        _check_run(r, 3)
    assert all(x > 1.0 for x in unpatched.losses)  # ~ln(vocab) for a random model: a real loss
    assert res["max_abs_diff"] == max(abs(a - b) for a, b in zip(unpatched.losses, patched.losses))
    assert res["max_abs_diff"] <= TOL
    assert calls == {"unpatched": 0, "patched": 3 * 2}  # 3 steps x grad accum 2, all through the patch


@pytest.mark.skipif(not has_bnb_cpu(), reason="bitsandbytes not installed")
def test_sft_example_loss_match_4bit_qlora():
    res, calls = _sft_main(["--steps", "2", "--num-rows", "8", "--no-warmup",
                            "--output-dir", "/tmp/grpo_mel_test_outputs/sft4"])
    unpatched, patched = res["runs"]
    for r in (unpatched, patched):
        _check_run(r, 2)
    assert res["max_abs_diff"] <= TOL
    assert calls == {"unpatched": 0, "patched": 2 * 2}


def test_sft_example_comparison_can_fail(monkeypatch):
    """A head that is off by 1% must make the example's comparison exceed the tolerance."""
    import grpo_mel.integrations.causal_lm as cl

    real = cl.linear_cross_entropy
    monkeypatch.setattr(cl, "linear_cross_entropy", lambda *a, **k: real(*a, **k) * 1.01)
    mod = load_example("sft_loss_match")
    res = mod.main(["--no-4bit", "--steps", "1", "--num-rows", "4", "--no-warmup",
                    "--output-dir", "/tmp/grpo_mel_test_outputs/sft_fail"])
    assert res["max_abs_diff"] > TOL

