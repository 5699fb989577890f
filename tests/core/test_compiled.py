"""Compiled chunks (grpo_mel/_compiled.py, ``compile=True``): f and its autograd backward through torch.compile
(Inductor's C++ backend on the CPU), checked against the full-logits reference written in conftest (outputs and every
gradient), in float32 and bf16, trained and frozen heads, uneven chunks; graph counts; the eager fall-back.

Compiling costs seconds per graph on this machine, so the cases are few and each covers several traits at once.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F

import grpo_mel._compiled as compiled_mod
import grpo_mel.planning as planning
from grpo_mel import chunked_linear, linear_cross_entropy, linear_token_logprobs, token_logprobs_and_entropy
from grpo_mel import functions as G

from .conftest import (
    BF16_EPS,
    assert_close_fp32,
    assert_low_precision,
    leaf_clone,
    make_inputs,
    random_weights,
    ref_cross_entropy,
    ref_logprobs_and_entropy,
    ref_token_logprobs,
    upcast,
)

H, V = 16, 96


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _compare(ours, ref, X, W, b, weights, dtype):
    """Run ``ours(X, W, b)`` compiled and ``ref(X, W, b)`` on the full logits; outputs and dX, dW, db agree (fp32:
    tightly; bf16: as accurately as the naive bf16 path against a float64 one)."""
    got = {}
    for side, dt in (("ours", dtype), ("naive", dtype), ("exact", torch.float64)):
        if dtype == torch.float32 and side == "exact":
            continue
        Xs, Ws, bs = leaf_clone(X, dt), leaf_clone(W, dt), leaf_clone(b, dt)
        out = ours(Xs, Ws, bs) if side == "ours" else ref(Xs, Ws, bs)
        outs = out if isinstance(out, tuple) else (out,)
        inputs = [t for t in (Xs, Ws, bs) if t is not None and t.requires_grad]
        g = torch.autograd.grad(sum((o * w.to(o.dtype)).sum() for o, w in zip(outs, weights) if w is not None),
                                inputs)
        got[side] = ([o.detach() for o in outs], list(g))
    pairs = list(zip(got["ours"][0] + got["ours"][1], got["naive"][0] + got["naive"][1]))
    if dtype == torch.float32:
        for k, (a, e) in enumerate(pairs):
            assert_close_fp32(a, e, rtol=2e-5, atol=2e-6, what=f"item {k}")
    else:
        exact = got["exact"][0] + got["exact"][1]
        for k, ((a, e), x) in enumerate(zip(pairs, exact)):
            assert_low_precision(a, e, x, BF16_EPS, what=f"item {k}")


@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logprobs_with_logged_entropy_ignore_temperature_softcap(dtype, frozen):
    """GRPO's call: log-probs (temperature, softcap, scale, ignored labels) and an entropy that is only logged."""
    X, W, b, labels = make_inputs((37,), H, V, dtype=torch.float64, bias=not frozen, seed=1, scale=2.0)
    labels[::4] = -100
    W.requires_grad_(not frozen)
    kw = dict(temperature=0.7, softcap=5.0, logit_scale=1.3, ignore_index=-100)

    def ours(X, W, b):
        return linear_token_logprobs(X, W, labels, bias=b, with_entropy=True, chunk_size=8, compile=True, **kw)

    def ref(X, W, b):
        lp, ent = ref_logprobs_and_entropy(F.linear(X, W, b), labels, **kw)
        return lp, ent.detach()

    _compare(ours, ref, X, W, b, [random_weights((37,), seed=3, dtype=torch.float64), None], dtype)


def test_cross_entropy_label_smoothing_and_an_entropy_that_gets_a_gradient():
    """Cross-entropy (ignored labels, label smoothing) compiled; and log-probs plus an entropy that receives a
    gradient, so the backward recomputes every chunk with the entropy's compiled graph."""
    X, W, b, labels = make_inputs((29,), H, V, dtype=torch.float64, bias=True, seed=2)
    labels[::3] = -100

    def ours(X, W, b):
        return linear_cross_entropy(X, W, labels, bias=b, reduction="none", label_smoothing=0.1, chunk_size=6,
                                    compile=True)

    def ref(X, W, b):
        return ref_cross_entropy(F.linear(X, W, b), labels, label_smoothing=0.1)

    _compare(ours, ref, X, W, b, [random_weights((29,), seed=4, dtype=torch.float64)], torch.float32)

    def ours2(X, W, b):
        return chunked_linear(X, W, token_logprobs_and_entropy, labels.clamp_min(0), bias=b, chunk_size=6,
                              compile=True)

    def ref2(X, W, b):
        return ref_logprobs_and_entropy(F.linear(X, W, b), labels.clamp_min(0))

    w = [random_weights((29,), seed=5 + k, dtype=torch.float64) for k in range(2)]
    _compare(ours2, ref2, X, W, b, w, torch.float32)


def _own_f(z, weights, labels):
    """A user's own f with a row argument that needs a gradient: (log p(label) · w)²."""
    lp = torch.log_softmax(z.float(), -1).gather(-1, labels[:, None])[:, 0]
    return (lp * weights) ** 2


def test_users_own_f_with_a_row_argument_gradient():
    X, W, _b, labels = make_inputs((23,), H, V, dtype=torch.float64, seed=6)
    rw = torch.rand(23, dtype=torch.float64, requires_grad=True)
    got = {}
    for side in ("ours", "naive"):
        Xs, Ws, rws = leaf_clone(X, torch.float32), leaf_clone(W, torch.float32), leaf_clone(rw, torch.float32)
        if side == "ours":
            out = chunked_linear(Xs, Ws, _own_f, rws, labels, chunk_size=5, compile=True)
        else:
            out = _own_f(Xs @ Ws.T, rws, labels)
        got[side] = (out.detach(), *torch.autograd.grad(out.sum(), [Xs, Ws, rws]))
    for k, (a, e) in enumerate(zip(got["ours"], got["naive"])):
        assert_close_fp32(a, e, what=f"item {k}")


def test_one_graph_pair_for_every_chunk_size_and_call():
    """Uneven chunks, a one-row chunk, other N on later calls: after the first call no graph is compiled again (the
    row dimension is unbacked-dynamic); a forward without grad and one with grad are the two graphs of f."""
    X, W, _b, labels = make_inputs((200,), H, V, seed=7)
    W.requires_grad_(False)
    f = functools.partial(G.token_logprobs, temperature=0.9)
    torch._dynamo.reset()
    before = _graphs()
    for n, chunk in [(50, 16), (17, 16), (33, 16), (200, 16), (1, 16), (64, 64)]:
        out = chunked_linear(X[:n], W, f, labels[:n], chunk_size=chunk, compile=True)
        out.sum().backward()
        with torch.no_grad():
            chunked_linear(X[:n], W, f, labels[:n], chunk_size=chunk, compile=True)
        if n == 50:
            first = _graphs() - before
    assert first == 2 and _graphs() - before == 2, (first, _graphs() - before)
    ref = ref_token_logprobs(upcast(X.detach()[:64] @ W.T), labels[:64], temperature=0.9)
    torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-5)


def _failing_backend(gm, example_inputs):
    raise RuntimeError("no compiler here")


def test_a_compile_failure_runs_f_eagerly_with_one_warning(monkeypatch):
    """Compiling fails (a backend that raises): f runs eagerly, from the first call on, with one warning naming the
    function and the error; the numbers are eager's, bit for bit."""
    monkeypatch.setattr(compiled_mod, "_COMPILED", {G.token_logprobs: torch.compile(
        G.token_logprobs, backend=_failing_backend, dynamic=False)})
    monkeypatch.setattr(compiled_mod, "_FAILED", {})
    monkeypatch.setattr(compiled_mod, "_WARNED", set())
    X, W, _b, labels = make_inputs((20,), H, V, seed=8)
    results = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for comp in (True, True, False):
            Xs, Ws = leaf_clone(X), leaf_clone(W)
            out = linear_token_logprobs(Xs, Ws, labels, chunk_size=6, compile=comp)
            results.setdefault(comp, []).append((out.detach(), *torch.autograd.grad(out.sum(), [Xs, Ws])))
    msgs = [str(w.message) for w in caught if "runs eagerly" in str(w.message)]
    assert len(msgs) == 1 and "token_logprobs" in msgs[0] and "no compiler here" in msgs[0], msgs
    for got in results[True]:
        for a, e in zip(got, results[False][0]):
            assert torch.equal(a, e)


def test_a_callable_that_is_not_a_function_runs_eagerly_with_one_warning(monkeypatch):
    monkeypatch.setattr(compiled_mod, "_WARNED", set())

    class Callable:
        def __call__(self, z, labels):
            return G.token_logprobs(z, labels)

    X, W, _b, labels = make_inputs((12,), H, V, seed=9)
    with pytest.warns(UserWarning, match="runs eagerly"):
        out = chunked_linear(X, W, Callable(), labels, chunk_size=5, compile=True)
    torch.testing.assert_close(out, ref_token_logprobs(upcast(X @ W.T), labels), rtol=1e-5, atol=1e-6)


def test_inside_a_callers_torch_compile():
    """A caller compiles code around the head (a user's compiled model): that compile stops at the head, the chunks
    run with grpo_mel's own compiled f, and the numbers are the eager call's."""
    X, W, _b, labels = make_inputs((30,), H, V, seed=10)

    def step(X, W):
        return linear_token_logprobs(torch.tanh(X) * 2, W, labels, chunk_size=8, compile=True).sum()

    got = {}
    for side, fn in (("compiled", torch.compile(step, backend="eager")), ("eager", step)):
        Xs, Ws = leaf_clone(X), leaf_clone(W)
        out = fn(Xs, Ws)
        got[side] = (out.detach(), *torch.autograd.grad(out, [Xs, Ws]))
    for a, e in zip(got["compiled"], got["eager"]):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def _spy_compiled_calls(monkeypatch) -> list:
    """Record every call of a compiled f (grpo_mel._compiled._CompiledCall)."""
    calls = []
    real = compiled_mod._CompiledCall.__call__

    def spy(self, z, *row_args):
        calls.append(z.shape[0])
        return real(self, z, *row_args)

    monkeypatch.setattr(compiled_mod._CompiledCall, "__call__", spy)
    return calls


def test_the_default_compiles_differentiated_calls_from_the_measured_size_on(monkeypatch):
    """``compile=None`` on the CPU: f runs compiled where a backward follows and N·V reaches
    ``COMPILE_MIN_LOGITS`` (lowered here to this test's size), eagerly below it and under ``no_grad``; the planner
    plans the chunk for the f that runs; the numbers are the eager call's."""
    X, W, _b, labels = make_inputs((40,), H, V, seed=11)
    W.requires_grad_(False)
    monkeypatch.setattr(planning, "COMPILE_MIN_LOGITS", 40 * V)
    calls = _spy_compiled_calls(monkeypatch)
    got = {}
    for comp in (None, False):
        Xs = leaf_clone(X)
        out = linear_token_logprobs(Xs, W, labels, compile=comp)
        got[comp] = (out.detach(), torch.autograd.grad(out.sum(), Xs)[0])
    assert calls, "the default did not compile at the threshold"
    for a, e in zip(got[None], got[False]):
        assert_close_fp32(a, e, rtol=1e-5, atol=1e-6, what="default vs eager")
    calls.clear()
    linear_token_logprobs(leaf_clone(X)[:39], W, labels[:39])  # one row under the threshold
    with torch.no_grad():
        linear_token_logprobs(X, W, labels)  # no backward follows
    assert calls == []


def test_the_default_runs_a_callable_object_eagerly_without_a_warning(monkeypatch):
    """A default compile (not asked for) of an f that cannot be compiled: eager, planned as eager, no warning (asked
    for with ``compile=True`` it warns: the test above)."""
    monkeypatch.setattr(compiled_mod, "_WARNED", set())
    monkeypatch.setattr(planning, "COMPILE_MIN_LOGITS", 1)

    class Recorder:
        def __init__(self):
            self.rows = []

        def __call__(self, z, labels):
            self.rows.append(z.shape[0])
            return G.token_logprobs(z, labels)

    X, W, _b, labels = make_inputs((64,), H, V, seed=12)
    f = Recorder()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = chunked_linear(leaf_clone(X), leaf_clone(W), f, labels, memory_budget=20 * V * 16)
    assert f.rows[-1] == 20  # the eager model: 4 + 3·4 bytes per logit of a row, not the compiled 4 + 4
    torch.testing.assert_close(out.detach(), ref_token_logprobs(upcast(X @ W.T), labels), rtol=1e-5, atol=1e-6)
