"""The trainer patches' shared surface: one Options object (or its fields as keywords) checked by type and range
for every entry point, the summary each patch returns and logs, is_patched, and reset_warnings."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from packaging.version import Version

import grpo_mel
import grpo_mel.integrations as gi
from grpo_mel.integrations import Options, PatchSummary, _logps, _patch, _registry, _trl_compat, is_patched
from grpo_mel.integrations import reset_warnings

from .conftest import TRL_VERSION, trl

pytestmark = pytest.mark.trl

RLOO_PATCHABLE = TRL_VERSION >= Version(_trl_compat.MIN_TRL_RLOO)

BAD = [
    (dict(override_fused_head="false"), TypeError, r"override_fused_head must be True, False or None .*got 'false'"),
    (dict(override_fused_head=1), TypeError, r"override_fused_head .*got 1"),
    (dict(compile="true"), TypeError, r"compile must be True, False or None .*got 'true'"),
    (dict(compile=1), TypeError, r"compile must be True, False or None .*got 1"),
    (dict(chunk_size=0), ValueError, r"chunk_size must be >= 1, got 0"),
    (dict(chunk_size="8"), TypeError, r"chunk_size must be an int .*got '8'"),
    (dict(chunk_size=True), TypeError, r"chunk_size .*got True"),
    (dict(memory_budget=float("nan")), ValueError, r"memory_budget must be a finite number of bytes > 0, got nan"),
    (dict(memory_budget="1e9"), TypeError, r"memory_budget must be a number of bytes or None, got '1e9'"),
    (dict(chunk=8), TypeError, r"unknown option chunk; the options are chunk_size, memory_budget, "
                               r"override_fused_head, compile"),
]


@pytest.mark.parametrize("kwargs,exc,msg", BAD, ids=[next(iter(b[0])) + "=" + repr(next(iter(b[0].values())))
                                                      for b in BAD])
@pytest.mark.parametrize("entry", ["Options", "patch_grpo", "grpo_patched", "patch_trl", "patch_rloo", "rloo_patched"])
def test_bad_options_are_named_and_nothing_is_patched(entry, kwargs, exc, msg):
    """The options are checked before anything else (RLOO's TRL version included): the same error on every TRL."""
    with pytest.raises(exc, match=msg):
        if entry == "Options":
            Options.of(**kwargs)
        elif entry.endswith("_patched"):
            with getattr(grpo_mel, entry)(**kwargs):
                pass
        else:
            getattr(grpo_mel, entry)(**kwargs)
    assert not is_patched("grpo") and not is_patched("rloo")


def test_options_object_and_keywords_are_the_same_call():
    from trl import GRPOTrainer

    name = _trl_compat.detect().method_name
    grpo_mel.patch_grpo(Options(chunk_size=5, memory_budget=2e6))
    first = vars(GRPOTrainer)[name]
    assert _registry.installed("grpo").options == Options(chunk_size=5, memory_budget=2e6)
    grpo_mel.patch_grpo(chunk_size=5, memory_budget=2e6)  # equal options: nothing reinstalled
    assert vars(GRPOTrainer)[name] is first
    grpo_mel.patch_grpo(Options(chunk_size=5), memory_budget=2e6)  # keywords on top of an object
    assert vars(GRPOTrainer)[name] is first
    grpo_mel.patch_grpo(Options(chunk_size=5), chunk_size=9)  # a keyword wins over the object's field
    assert _registry.installed("grpo").options == Options(chunk_size=9)
    with pytest.raises(TypeError, match=r"options must be a grpo_mel.integrations.Options .*got 64"):
        grpo_mel.patch_grpo(64)
    assert Options().describe() == "default options"
    assert Options(chunk_size=7, override_fused_head=False).describe() == "chunk_size=7, override_fused_head=False"
    assert Options(compile=False).describe() == "compile=False"  # False is set, not the default (None)


def test_options_are_frozen():
    opts = Options(chunk_size=3)
    with pytest.raises(AttributeError):
        opts.chunk_size = 4


def test_summary_is_one_line_logged_at_info(caplog):
    with caplog.at_level(logging.INFO, logger="grpo_mel"):
        summary = grpo_mel.patch_grpo(chunk_size=7)
    assert isinstance(summary, PatchSummary)
    line = str(summary)
    assert "\n" not in line
    assert line.startswith(f"grpo_mel: patched GRPOTrainer (TRL {trl.__version__}, chunk_size=7): ")
    assert [r.getMessage() for r in caplog.records if r.name == "grpo_mel"] == [line]
    assert list(summary) == ["GRPOTrainer"] and summary.trainers == ("GRPOTrainer",)
    (patch,) = summary.patched
    assert patch.method == _trl_compat.detect().method_name
    assert [h.device for h in patch.heads][-1] == "cpu"
    cpu = patch.heads[-1]
    assert cpu.ours  # on the CPU grpo_mel's head computes on every TRL in the table
    assert f"grpo_mel's head on cpu ({cpu.why})" in line


@pytest.mark.parametrize("override", [None, True, False])
def test_summary_names_the_head_per_device(monkeypatch, override):
    """The head each device type uses, as the calls decide it (TRL's Triton check faked: no GPU here)."""
    monkeypatch.setattr(_patch, "_device_types", lambda: ["cuda", "cpu"])
    monkeypatch.setattr(_logps, "_trl_runs_triton", lambda device: device.type == "cuda")
    flavour = _trl_compat.detect()
    summary = grpo_mel.patch_grpo(override_fused_head=override)
    heads = {h.device: h for h in summary.patched[0].heads}
    assert set(heads) == {"cuda", "cpu"}
    for device, h in heads.items():
        assert h == _logps.choose_head(flavour, Options(override_fused_head=override), torch.device(device))
    if not flavour.fused_head:  # TRL < 1.15 forms the full logits: grpo_mel everywhere, whatever the option says
        assert heads["cuda"].ours and heads["cpu"].ours
        assert str(summary).endswith(f"grpo_mel's head on cuda, cpu (TRL {trl.__version__} would form the full "
                                     "logits)")
    elif override is None:
        assert not heads["cuda"].ours and heads["cpu"].ours
        assert "TRL's head on cuda (TRL's fused head runs its Triton kernel there), grpo_mel's head on cpu" in \
            str(summary)
    else:
        assert heads["cuda"].ours == heads["cpu"].ours == override
        assert f"on cuda, cpu (override_fused_head={override})" in str(summary)


def test_patch_trl_summary_covers_both_trainers(caplog):
    with caplog.at_level(logging.INFO, logger="grpo_mel"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = grpo_mel.patch_trl(memory_budget=2**20)
    logged = [r.getMessage() for r in caplog.records if r.name == "grpo_mel"]
    assert logged == [str(summary)]  # one line for the whole call, not one per trainer
    assert "memory_budget=1048576" in str(summary)
    if RLOO_PATCHABLE:
        assert list(summary) == ["GRPOTrainer", "RLOOTrainer"] and not summary.left
        assert str(summary).startswith("grpo_mel: patched GRPOTrainer, RLOOTrainer (")
    else:
        assert list(summary) == ["GRPOTrainer"]
        assert [name for name, _ in summary.left] == ["RLOOTrainer"]
        assert "RLOOTrainer left as TRL's (" in str(summary)


def test_context_managers_yield_the_summary():
    with grpo_mel.grpo_patched(chunk_size=3) as summary:
        assert list(summary) == ["GRPOTrainer"] and summary.options == Options(chunk_size=3)
    assert not is_patched()
    if RLOO_PATCHABLE:
        with grpo_mel.rloo_patched(Options(chunk_size=3)) as summary:
            assert list(summary) == ["RLOOTrainer"] and is_patched("rloo") and not is_patched("grpo")
        assert not is_patched("rloo")


def test_is_patched_is_public_and_follows_the_registry():
    assert grpo_mel.is_patched is gi.is_patched is is_patched
    assert "is_patched" in grpo_mel.__all__ and "is_patched" in gi.__all__
    assert not is_patched() and not is_patched("grpo") and not is_patched("rloo")
    grpo_mel.patch_grpo()
    assert is_patched() and is_patched("grpo") and not is_patched("rloo")
    grpo_mel.unpatch_grpo()
    assert not is_patched()
    with pytest.raises(ValueError, match=r"kind must be one of 'grpo', 'rloo', got 'GRPO'"):
        is_patched("GRPO")


def test_reset_warnings_lets_a_once_only_warning_be_given_again(monkeypatch):
    """A TRL newer than the table warns once per process; reset_warnings() makes the next patch warn again."""
    monkeypatch.setattr(_trl_compat, "trl_version", lambda: "1.17.0")

    def warned() -> int:
        grpo_mel.unpatch_grpo()
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            summary = grpo_mel.patch_grpo()
        assert not summary.patched[0].heads[-1].ours  # TRL's own method computes: the summary says so
        return sum("newer than the newest release" in str(w.message) for w in rec)

    assert warned() == 1
    assert warned() == 0  # said once
    reset_warnings()
    assert warned() == 1


def test_summary_and_the_head_call_carry_compile():
    """``compile`` is shown where it is set and reaches every chunked_linear call (here: the method on a batch)."""
    summary = grpo_mel.patch_grpo(chunk_size=7, compile=False)
    assert f"(TRL {trl.__version__}, chunk_size=7, compile=False): " in str(summary)
    assert _registry.installed("grpo").options == Options(chunk_size=7, compile=False)
    assert "compile" not in str(grpo_mel.patch_grpo(chunk_size=7))  # None, the device's default: not set
