"""patch_grpo / unpatch_grpo / grpo_patched: API, idempotence, exact restore, version errors, fallbacks."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

import grpo_mel
from grpo_mel.integrations import Options, _logps, _registry, _trl_compat, is_patched, reset_warnings

from .conftest import CHUNK, assert_grads_close, count_calls, generate, generation_batch, loss_and_grads, make_trainer, trl

pytestmark = pytest.mark.trl


def _method_name():
    from trl import GRPOTrainer

    for n in ("_get_per_token_logps_and_entropies", "_get_per_token_logps"):
        if n in vars(GRPOTrainer):
            return n
    raise AssertionError("no log-prob method")


def test_flavour_matches_installed_trl():
    from packaging.version import Version

    f = _trl_compat.detect()
    v = Version(trl.__version__)
    if v < Version("0.20"):
        assert (f.method_name, f.returns) == ("_get_per_token_logps", "tensor")
    elif v < Version("1.7"):
        assert (f.method_name, f.returns) == ("_get_per_token_logps_and_entropies", "pair")
    else:
        assert (f.method_name, f.returns) == ("_get_per_token_logps_and_entropies", "triple")
    assert f.fused_head == (v >= Version("1.15"))
    # every release in the supported range (>= 0.16) divides by the temperature (1.15+: inside TRL's fused head)
    sources = [inspect.getsource(getattr(trl.GRPOTrainer, n))
               for n in (f.method_name, "_full_logits_logps") if hasattr(trl.GRPOTrainer, n)]
    assert f.fused_head or any("self.temperature" in src for src in sources)
    assert f.masks_padding == (v >= Version("1.14"))
    assert ("batch_size" in f.signatures[0].parameters) == (v >= Version("0.17"))


def test_unpatch_restores_exact_function_object():
    from trl import GRPOTrainer

    name = _method_name()
    original = vars(GRPOTrainer)[name]
    grpo_mel.patch_grpo(chunk_size=CHUNK)
    patched = vars(GRPOTrainer)[name]
    assert patched is not original and patched is _registry.installed("grpo").replacement
    assert inspect.signature(patched) == inspect.signature(original)  # same signature for every call site
    grpo_mel.unpatch_grpo()
    assert vars(GRPOTrainer)[name] is original
    grpo_mel.unpatch_grpo()  # no-op
    assert vars(GRPOTrainer)[name] is original


def test_patch_is_idempotent():
    from trl import GRPOTrainer

    name = _method_name()
    original = vars(GRPOTrainer)[name]
    grpo_mel.patch_grpo(chunk_size=CHUNK)
    first = vars(GRPOTrainer)[name]
    grpo_mel.patch_grpo(chunk_size=CHUNK)
    assert vars(GRPOTrainer)[name] is first
    grpo_mel.patch_grpo(chunk_size=16)  # options update: a new replacement, still over the original
    assert _registry.installed("grpo").original is original
    assert vars(GRPOTrainer)[name] is _registry.installed("grpo").replacement
    assert _registry.installed("grpo").options.chunk_size == 16
    grpo_mel.unpatch_grpo()
    assert vars(GRPOTrainer)[name] is original


def test_context_manager():
    from trl import GRPOTrainer

    name = _method_name()
    original = vars(GRPOTrainer)[name]
    with grpo_mel.grpo_patched(chunk_size=CHUNK):
        assert grpo_mel.is_patched()
        assert vars(GRPOTrainer)[name] is not original
    assert vars(GRPOTrainer)[name] is original
    grpo_mel.patch_grpo(chunk_size=3)
    with grpo_mel.grpo_patched(chunk_size=CHUNK):
        assert _registry.installed("grpo").options.chunk_size == CHUNK
    assert is_patched() and _registry.installed("grpo").options.chunk_size == 3


def test_bad_options():
    with pytest.raises((ValueError, TypeError)):
        grpo_mel.patch_grpo(chunk_size=0)
    assert not is_patched()


@pytest.mark.parametrize("old", ["0.14.0", "0.15.2"])
def test_unsupported_old_version(monkeypatch, old):
    monkeypatch.setattr(trl, "__version__", old)
    with pytest.raises(_trl_compat.UnsupportedTRLVersion, match=old.replace(".", r"\.")):
        grpo_mel.patch_grpo()
    assert not is_patched()


def test_unsupported_trainer_without_methods():
    class NotGRPO:
        pass

    with pytest.raises(_trl_compat.UnsupportedTRLVersion, match=trl.__version__.replace(".", r"\.")):
        grpo_mel.patch_grpo(trainer_cls=NotGRPO)
    assert not is_patched()


def test_multimodal_inputs_fall_back_with_one_warning(tmp_path):
    """pixel_values etc. go to TRL's own method (with one warning): a text model would ignore / reject them."""
    tr = make_trainer(tmp_path)
    name = _method_name()
    if name == "_get_per_token_logps":
        pytest.skip("TRL < 0.20 has no vision-language arguments")
    ids = torch.randint(5, 1000, (2, 12))
    am = torch.ones_like(ids)
    from trl import GRPOTrainer

    calls = {"n": 0}
    original = vars(GRPOTrainer)[name]

    grpo_mel.patch_grpo(chunk_size=CHUNK)
    reset_warnings()
    patched = vars(GRPOTrainer)[name]

    def fake_original(self, *a, **k):
        calls["n"] += 1
        return "trl"

    grpo_mel.unpatch_grpo()
    GRPOTrainer_attr = vars(GRPOTrainer)[name]
    assert GRPOTrainer_attr is original
    # rebuild the replacement around a stand-in "original" to observe the fallback without a real VLM
    repl = _logps.make_replacement(fake_original, _trl_compat.detect(), Options())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert repl(tr, tr.model, ids, am, 4, pixel_values=torch.zeros(2, 3, 4, 4)) == "trl"
        assert repl(tr, tr.model, ids, am, 4, pixel_values=torch.zeros(2, 3, 4, 4)) == "trl"
    assert calls["n"] == 2
    assert sum("falling back" in str(x.message) for x in w) == 1
    del patched


def test_lm_head_lora_falls_back(tmp_path):
    """A PEFT adapter on lm_head is not handled by the chunked path: TRL's method runs (one warning), same result."""
    peft = pytest.importorskip("peft")
    from packaging.version import Version

    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    try:
        tr = make_trainer(tmp_path, peft_config=cfg)
    except ValueError as e:  # some TRL versions refuse lm_head adapters outright
        pytest.skip(f"TRL {trl.__version__} refuses a lm_head adapter: {e}")
    batch = generation_batch(tr, 1)
    a = generate(tr, batch)
    reset_warnings()
    with grpo_mel.grpo_patched(chunk_size=CHUNK), count_calls(_logps, "chunked_linear") as spy:
        with pytest.warns(UserWarning, match="lm_head"):
            lb, gb = loss_and_grads(tr, a)
    assert spy["n"] == 0
    la, ga = loss_and_grads(tr, a)
    assert_grads_close(ga, gb, rtol=0, atol=0)
    del Version


def test_prompt_learning_peft_falls_back(tmp_path):
    peft = pytest.importorskip("peft")
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    try:
        tr = make_trainer(tmp_path, peft_config=cfg)
        batch = generation_batch(tr, 1)
        inputs = generate(tr, batch)
        loss_and_grads(tr, inputs)
    except Exception as e:  # TRL's own path may not support prompt tuning on this version
        pytest.skip(f"TRL {trl.__version__} does not run prompt tuning here: {type(e).__name__}: {e}")
    reset_warnings()
    with grpo_mel.grpo_patched(chunk_size=CHUNK), count_calls(_logps, "chunked_linear") as spy:
        with pytest.warns(UserWarning, match="prompt-learning"):
            loss_and_grads(tr, inputs)
    assert spy["n"] == 0


@pytest.mark.parametrize("broken", ["no-backbone", "no-head-weight"])
def test_unrecognised_model_falls_back_with_a_named_reason(tmp_path, broken):
    """A model without a backbone under base_model_prefix, or whose head has no plain weight, goes to TRL's own
    method with one warning naming the problem (never a silent wrong number)."""
    tr = make_trainer(tmp_path)
    ids = torch.randint(5, 1000, (2, 12))
    am = torch.ones_like(ids)
    calls = {"n": 0}

    def fake_original(self, *a, **k):
        calls["n"] += 1
        return "trl"

    model = tr.model
    if broken == "no-backbone":
        model.base_model_prefix = "no_such_backbone"
        expect = "exposes no backbone"
    else:
        model.lm_head = torch.nn.Identity()
        expect = "has no plain LM head weight"
    repl = _logps.make_replacement(fake_original, _trl_compat.detect(), Options())
    reset_warnings()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert repl(tr, model, ids, am, 4) == "trl"
        assert repl(tr, model, ids, am, 4) == "trl"
    assert calls["n"] == 2
    msgs = [str(x.message) for x in w if "falling back" in str(x.message)]
    assert len(msgs) == 1 and expect in msgs[0], msgs


def test_foreign_forward_hook_on_lm_head_falls_back(tmp_path):
    """A forward hook on lm_head (not an engine's) expects logits, which the chunked head never forms: TRL's own
    method runs, with one warning naming the hook, and the hook's effect on the numbers is kept."""
    tr = make_trainer(tmp_path)
    inputs = generate(tr, generation_batch(tr, 1))

    def scale_logits(module, args, out):
        return out * 0.5

    handle = tr.model.get_output_embeddings().register_forward_hook(scale_logits)
    try:
        la, ga = loss_and_grads(tr, inputs)
        reset_warnings()
        with grpo_mel.grpo_patched(chunk_size=CHUNK), count_calls(_logps, "chunked_linear") as spy:
            with pytest.warns(UserWarning, match="scale_logits"):
                lb, gb = loss_and_grads(tr, inputs)
        assert spy["n"] == 0
        torch.testing.assert_close(lb, la, rtol=0, atol=0)
        assert_grads_close(ga, gb, rtol=0, atol=0)
    finally:
        handle.remove()


@pytest.mark.parametrize("triton_device", [False, True], ids=["cpu-like", "faked-triton-device"])
@pytest.mark.parametrize("override", [None, True, False])
def test_fused_head_default_follows_trls_triton_path(tmp_path, monkeypatch, caplog, triton_device, override):
    """TRL >= 1.15: by default TRL's fused head is kept where TRL would run its Triton kernel (faked here: this
    machine has no GPU) and replaced elsewhere; override_fused_head=True/False forces either. The choice is logged
    once, naming why; the numbers are TRL's either way."""
    import logging

    if not _trl_compat.detect().fused_head:
        pytest.skip(f"TRL {trl.__version__} has no fused LM head")
    monkeypatch.setattr(_logps, "_trl_runs_triton", lambda device: triton_device)
    tr = make_trainer(tmp_path)
    inputs = generate(tr, generation_batch(tr, 1))
    la, ga = loss_and_grads(tr, inputs)
    reset_warnings()
    with caplog.at_level(logging.INFO, logger="grpo_mel"):
        with grpo_mel.grpo_patched(chunk_size=CHUNK, override_fused_head=override):
            with count_calls(_logps, "chunked_linear") as spy:
                lb, gb = loss_and_grads(tr, inputs)
                loss_and_grads(tr, inputs)
    ours = override if override is not None else not triton_device
    assert (spy["n"] > 0) == ours
    msgs = [r for r in caplog.records if "fused LM head" in r.getMessage()]
    if override is None:
        assert len(msgs) == 1, [r.getMessage() for r in msgs]
        if triton_device:
            assert msgs[0].levelno == logging.WARNING and "Triton" in msgs[0].getMessage()
            assert "keeping TRL's" in msgs[0].getMessage()
        else:
            assert "replacing TRL's" in msgs[0].getMessage()
    else:
        assert not msgs  # an explicit choice needs no explanation
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    assert_grads_close(ga, gb)


@pytest.mark.parametrize("entry", ["trained", "frozen"])
def test_fused_head_default_follows_the_measured_table(tmp_path, monkeypatch, caplog, entry):
    """Where TRL runs its Triton kernel, grpo_mel's head is used by default only for the kind of head (trained or
    frozen) that _logps.MEASURED_AHEAD has measured ahead of TRL's, and the log line names that measurement. The
    tiny trainer here trains its head, so only a "trained" entry routes it through grpo_mel."""
    import logging

    if not _trl_compat.detect().fused_head:
        pytest.skip(f"TRL {trl.__version__} has no fused LM head")
    monkeypatch.setattr(_logps, "_trl_runs_triton", lambda device: True)
    monkeypatch.setattr(_logps, "MEASURED_AHEAD", {("cpu", entry): "suite run X, 0.7x TRL's time"})
    tr = make_trainer(tmp_path)
    inputs = generate(tr, generation_batch(tr, 1))
    la, ga = loss_and_grads(tr, inputs)
    reset_warnings()
    with caplog.at_level(logging.INFO, logger="grpo_mel"):
        with grpo_mel.grpo_patched(chunk_size=CHUNK), count_calls(_logps, "chunked_linear") as spy:
            lb, gb = loss_and_grads(tr, inputs)
    ours = entry == "trained"
    assert (spy["n"] > 0) == ours
    msgs = [r.getMessage() for r in caplog.records if "fused LM head" in r.getMessage()]
    assert len(msgs) == 1, msgs
    assert ("suite run X" in msgs[0]) == ours and ("keeping TRL's" in msgs[0]) != ours
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    assert_grads_close(ga, gb)
