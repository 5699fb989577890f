"""One chunk strategy per call (grpo_mel/linear.py ``choose_strategy``, grpo_mel/_recompute.py, _grads_ahead.py):
which one a call runs, and the fall-back to the recompute where it cannot serve the call, each checked against the
full-logits reference (the numbers) and by what ran (the strategy the Function kept, f's calls)."""

from __future__ import annotations

import functools

import pytest
import torch

import grpo_mel.linear as linear
from grpo_mel import chunked_linear, token_logprobs, token_logprobs_and_entropy
from grpo_mel._grads_ahead import GradsAhead
from grpo_mel._recompute import Recompute

from .conftest import make_inputs, ref_token_logprobs


@pytest.fixture
def strategies(monkeypatch):
    """The strategy each call ends its backward with (what ``ctx.strategy`` holds), in call order."""
    seen = []
    original = linear.ChunkedLinear.backward

    def spy(ctx, *grad_outs):
        out = original(ctx, *grad_outs)
        seen.append(ctx.strategy)
        return out

    monkeypatch.setattr(linear.ChunkedLinear, "backward", staticmethod(spy))
    return seen


def _inputs(n, h, v, seed, frozen=False):
    X, W, _b, y = make_inputs(lead=(n,), H=h, V=v, seed=seed)
    return X.detach().requires_grad_(True), W.detach().requires_grad_(not frozen), y


def _naive_logprobs(X, W, y, g):
    """Full logits and autograd: the log-probs and dX for the upstream gradient ``g``."""
    Xr = X.detach().requires_grad_(True)
    out = ref_token_logprobs(Xr @ W.detach().T, y)
    (out * g).sum().backward()
    return out.detach(), Xr.grad


@pytest.mark.parametrize("frozen", [False, True])
def test_trained_head_keeps_the_last_chunk_and_frozen_head_forms_grads_ahead(strategies, frozen):
    X, W, y = _inputs(30, 8, 50, seed=1, frozen=frozen)
    g = torch.randn(30)
    out = chunked_linear(X, W, token_logprobs, y, chunk_size=7)
    (out * g).sum().backward()
    (strategy,) = strategies
    if frozen:
        assert isinstance(strategy, GradsAhead)
    else:
        assert isinstance(strategy, Recompute) and strategy.keep_last
    ref_out, ref_dX = _naive_logprobs(X, W, y, g)
    torch.testing.assert_close(out.detach(), ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(X.grad, ref_dX, rtol=1e-5, atol=1e-6)


def test_no_backward_to_follow_runs_each_chunk_once_without_a_graph():
    X, W, y = _inputs(30, 8, 50, seed=2)
    calls = []

    def f(z, labels):
        calls.append(torch.is_grad_enabled())
        return token_logprobs(z, labels)

    with torch.no_grad():
        out = chunked_linear(X, W, f, y, chunk_size=7)
    assert calls == [False] * 5  # 30 rows: 2 + 4 x 7, no graph built anywhere
    torch.testing.assert_close(out, ref_token_logprobs(X.detach() @ W.detach().T, y), rtol=1e-5, atol=1e-6)


def test_frozen_head_falls_back_in_the_forward_when_f_is_not_per_row(strategies):
    """GradsAhead refuses an f whose first output is [c, 2]: the rest of the call is the recompute (last chunk
    kept), so f runs once per chunk in the forward plus once per recomputed chunk in the backward."""
    X, W, y = _inputs(20, 8, 40, seed=3, frozen=True)
    calls = []

    def f(z, labels):
        calls.append(z.shape[0])
        lp = torch.log_softmax(z.float(), -1)
        return torch.stack([lp.gather(-1, labels[:, None])[:, 0], lp.max(-1).values], -1)

    out = chunked_linear(X, W, f, y, chunk_size=6)
    g = torch.randn(20, 2)
    (out * g).sum().backward()
    (strategy,) = strategies
    assert isinstance(strategy, Recompute) and strategy.keep_last
    assert calls == [2, 6, 6, 6] + [2, 6, 6]  # the backward recomputes all but the kept last chunk
    Xr = X.detach().requires_grad_(True)
    logp = torch.log_softmax(Xr @ W.T, -1)
    ref = torch.stack([logp.gather(-1, y[:, None])[:, 0], logp.max(-1).values], -1)
    (ref * g).sum().backward()
    torch.testing.assert_close(out.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(X.grad, Xr.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("frozen", [False, True])
def test_an_output_assumed_without_gradient_that_gets_one_recomputes_every_chunk(strategies, frozen):
    """The entropy is computed without a graph on the forward's guess; given a gradient, the Function falls back to
    a recompute without a kept graph, which builds the entropy's graph in every chunk (the numbers: naive's)."""
    X, W, y = _inputs(30, 8, 50, seed=4, frozen=frozen)
    lp, ent = chunked_linear(X, W, token_logprobs_and_entropy, y, chunk_size=7)
    (lp.sum() + ent.sum()).backward()
    (strategy,) = strategies
    assert isinstance(strategy, Recompute) and not strategy.keep_last
    Xr = X.detach().requires_grad_(True)
    logp = torch.log_softmax(Xr @ W.detach().T, -1)
    (logp.gather(-1, y[:, None]).sum() - (logp.exp() * logp).sum()).backward()
    torch.testing.assert_close(X.grad, Xr.grad, rtol=1e-5, atol=1e-6)


def test_strategy_is_the_only_per_call_state_on_ctx():
    """No per-call flags on ctx besides the strategy (issue 24): the backward reads ``ctx.strategy`` alone."""
    X, W, y = _inputs(10, 4, 20, seed=5)
    out = chunked_linear(X, W, functools.partial(token_logprobs), y, chunk_size=3)
    ctx = out.grad_fn
    own = {k for k in vars(ctx) if not k.startswith("_")} if hasattr(ctx, "__dict__") else set()
    assert own <= {"strategy"}, own
