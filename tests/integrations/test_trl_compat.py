"""The TRL version table (_trl_compat) and how the patch binds TRL's calls: never a guessed flag, never silent.

* the installed TRL's row agrees with its method's signature and source (run on every pin);
* a method whose source cannot be read (a decorator without functools.wraps) uses the table: parity with
  unpatched TRL at temperature 0.7, padded completions included;
* a TRL newer than the table, or a method that disagrees with its row, gets one warning and TRL's own numbers;
* a call that does not bind, or that carries an argument grpo_mel does not handle, gets one warning and TRL's method.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import warnings

import pytest
import torch

import grpo_mel
from grpo_mel.integrations import Options, _logps, _trl_compat

from .conftest import CHUNK, assert_grads_close, check_parity, count_calls, generate, generation_batch, loss_and_grads
from .conftest import make_trainer, trl

pytestmark = pytest.mark.trl


def _grpo_trainer():
    from trl import GRPOTrainer

    return GRPOTrainer


@contextlib.contextmanager
def _replaced_method(wrap):
    """GRPOTrainer's log-prob method replaced by ``wrap(method)`` for the block (unpatched again before restoring,
    so unpatch_grpo can never put the stand-in back)."""
    cls = _grpo_trainer()
    name = _trl_compat.row_for(trl.__version__).method_name
    real = vars(cls)[name]
    setattr(cls, name, wrap(real))
    try:
        yield name
    finally:
        grpo_mel.unpatch_grpo()
        setattr(cls, name, real)


def _opaque(fn):
    def wrapper(self, *args, **kwargs):  # no functools.wraps: neither TRL's signature nor its source shows
        return fn(self, *args, **kwargs)

    return wrapper


def _padded_call(trainer, name):
    """The method's outputs on a left-padded prompt and right-padded completions, unpatched and patched."""
    torch.manual_seed(0)
    ids = torch.randint(5, 1000, (3, 14))
    am = torch.ones_like(ids)
    am[0, :2] = 0  # left-padded prompt
    am[1, -3:] = 0  # completion padding: zero log-probs where TRL masks them
    am[2, -1:] = 0
    kw = {} if name == "_get_per_token_logps" else {"compute_entropy": True}
    method = getattr(trainer, name)
    with torch.no_grad():
        want = method(trainer.model, ids, am, 6, **kw)
        with grpo_mel.grpo_patched(chunk_size=CHUNK), count_calls(_logps, "chunked_linear") as spy:
            got = getattr(trainer, name)(trainer.model, ids, am, 6, **kw)
    assert spy["n"] > 0, "the patched path did not run"
    return want, got, am[:, -6:].bool()


def _assert_same_outputs(want, got, real):
    """TRL's outputs at the ``real`` completion positions; at padding, 0: TRL's own there from 1.14, and what
    grpo_mel returns in place of the pad token's values on earlier TRLs (never read unmasked; test_trl_padding.py)."""
    want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
    assert len(want) == len(got)
    for a, b in zip(want, got):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b[real].float(), a[real].float(), rtol=1e-5, atol=2e-6)
            assert torch.all(b[~real] == 0)
            if _trl_compat.row_for(trl.__version__).masks_padding:
                assert torch.all(a[~real] == 0)


def test_table_agrees_with_installed_trl_source():
    """The row for the installed TRL matches its method's signature and source, column by column."""
    row = _trl_compat.row_for(trl.__version__)
    assert row is not None, f"TRL {trl.__version__} is outside the table: extend it (and the tested pins)"
    seen = _trl_compat.from_source(_grpo_trainer(), row.method_name, row)
    assert seen is not None, "the installed TRL's method cannot be read: the cross-check would not run"
    assert _trl_compat._disagreements(row, seen) == []
    f = _trl_compat.detect()
    assert f.unsettled is None
    for k in _trl_compat._FLAGS:
        assert getattr(f, k) == getattr(row, k), k


def test_unreadable_method_uses_the_table_at_temperature_07(tmp_path):
    """A decorator without functools.wraps hides TRL's signature and source: the table decides (no source guess,
    which would read no temperature and no padding mask) and the numbers match unpatched TRL at T = 0.7."""
    trainer = make_trainer(tmp_path, beta=0.04, temperature=0.7)
    with _replaced_method(_opaque) as name:
        assert _trl_compat.from_source(_grpo_trainer(), name, _trl_compat.row_for(trl.__version__)) is None
        f = _trl_compat.detect()
        row = _trl_compat.row_for(trl.__version__)
        assert f.unsettled is None and all(getattr(f, k) == getattr(row, k) for k in _trl_compat._FLAGS)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            _assert_same_outputs(*_padded_call(trainer, name))
            check_parity(trainer)
    assert not [x for x in w if "grpo_mel" in str(x.message)]  # the table settles it: no warning


def _trl_numbers_with_one_warning(trainer, name, match):
    """patch_grpo warns once (matching ``match``), then every call is TRL's own: bit-identical loss and grads."""
    inputs = generate(trainer, generation_batch(trainer, 1))
    ref_loss, ref_grads = loss_and_grads(trainer, inputs)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with grpo_mel.grpo_patched(chunk_size=CHUNK), count_calls(_logps, "chunked_linear") as spy:
            new_loss, new_grads = loss_and_grads(trainer, inputs)
            loss_and_grads(trainer, inputs)
    msgs = [str(x.message) for x in w if "grpo_mel" in str(x.message)]
    assert len(msgs) == 1, msgs
    assert match in msgs[0] and f"GRPOTrainer.{name} stays TRL's own" in msgs[0], msgs[0]
    assert spy["n"] == 0
    assert torch.equal(new_loss, ref_loss)
    assert_grads_close(ref_grads, new_grads, rtol=0, atol=0)


def test_newer_trl_warns_and_runs_trls_method(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, temperature=0.7)
    name = _trl_compat.detect().method_name
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    assert _trl_compat.row_for("1.17.0") is None
    _trl_numbers_with_one_warning(trainer, name, "newer than the newest release")


def test_source_disagreeing_with_table_warns_and_runs_trls_method(tmp_path, monkeypatch):
    """A row that says the opposite of the installed source about the padding mask: TRL's method, one warning."""
    trainer = make_trainer(tmp_path, temperature=0.7)
    row = _trl_compat.row_for(trl.__version__)
    wrong = dataclasses.replace(row, masks_padding=not row.masks_padding)
    monkeypatch.setattr(_trl_compat, "row_for", lambda version, table=None: wrong)
    f = _trl_compat.detect()
    assert f.unsettled is not None and f.masks_padding is None and f.fused_head is None  # no flag is guessed
    _trl_numbers_with_one_warning(trainer, row.method_name, "masks_padding")


def test_unbindable_call_warns_and_lets_trl_raise(tmp_path):
    trainer = make_trainer(tmp_path)
    name = _trl_compat.detect().method_name
    ids = torch.randint(5, 1000, (2, 12))
    am = torch.ones_like(ids)
    grpo_mel.patch_grpo(chunk_size=CHUNK)
    with pytest.warns(UserWarning, match=f"does not bind to TRL's GRPOTrainer.{name}"):
        with pytest.raises(TypeError):  # TRL's own error for its own signature
            getattr(trainer, name)(trainer.model, ids, am, 4, no_such_argument=1)


def test_argument_the_patch_does_not_handle_warns(tmp_path):
    """A TRL argument grpo_mel does not know goes to TRL's method with one warning, unless left at its default."""
    trainer = make_trainer(tmp_path)
    f = _trl_compat.detect()
    last = f.signatures[-1]
    P = inspect.Parameter
    new_sig = last.replace(parameters=[*last.parameters.values(), P("new_option", P.KEYWORD_ONLY, default=None)])
    calls = {"n": 0}

    def fake_original(self, *a, **k):
        calls["n"] += 1
        return "trl"

    fake_original.__signature__ = new_sig
    repl = _logps.make_replacement(fake_original, dataclasses.replace(f, signatures=(new_sig,)), Options())
    ids = torch.randint(5, 1000, (2, 12))
    am = torch.ones_like(ids)
    grpo_mel.patch_grpo(chunk_size=CHUNK)  # options for the replacement built above
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert repl(trainer, trainer.model, ids, am, 4, new_option=True) == "trl"
        assert repl(trainer, trainer.model, ids, am, 4, new_option=1) == "trl"
        out = repl(trainer, trainer.model, ids, am, 4, new_option=None)  # its default: grpo_mel computes
    assert calls["n"] == 2 and not isinstance(out, str)
    msgs = [str(x.message) for x in w if "grpo_mel" in str(x.message)]
    assert len(msgs) == 1 and "new_option" in msgs[0], msgs
