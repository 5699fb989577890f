"""grpo_mel.saved_lse (the front doors' closed-form backward) and the kept graph of a single chunk.

The saved-log-sum-exp path writes one derivative by hand (that of log p(label)), so it is compared three
ways: with the generic path (``saved_lse=False``: autograd differentiates grpo_mel.functions on recomputed
logits) and with the naive full-logits reference (an independent f, autograd on all logits); in fp32 and bf16,
uneven chunks, ignored labels, temperature and logit scale, a bias, random upstream gradients.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from grpo_mel import chunked_linear, linear_cross_entropy, linear_token_logprobs
from grpo_mel import fused
from grpo_mel import functions as G
from grpo_mel.saved_lse import LabelLogprob

from .conftest import (
    BF16_EPS,
    ChunkRecorder,
    assert_close_fp32,
    assert_low_precision,
    grads,
    leaf_clone,
    make_inputs,
    naive_apply,
    random_weights,
    ref_logprobs_and_entropy,
    ref_scaled,
    ref_token_logprobs,
    upcast,
)

H, V = 16, 50
LEAD = (3, 7)  # 21 rows: chunks of 4 leave an uneven last chunk of 1


def _ignored(labels):
    labels = labels.clone()
    labels.view(-1)[::3] = -100
    return labels


def _ours(kind, saved_lse, **kw):
    def run(X, W, b, labels, chunk):
        if kind == "ce":
            return (linear_cross_entropy(X, W, labels, bias=b, reduction="none", chunk_size=chunk,
                                         saved_lse=saved_lse),)
        out = linear_token_logprobs(X, W, labels, bias=b, chunk_size=chunk, saved_lse=saved_lse,
                                    with_entropy=kind == "lp_ent", **kw)
        return out if isinstance(out, tuple) else (out,)
    return run


def _ref(kind, **kw):
    def run(X, W, b, labels):
        if kind == "ce":
            z = upcast(F.linear(X, W, b))
            return (F.cross_entropy(z.reshape(-1, V), labels.reshape(-1), ignore_index=-100,
                                    reduction="none").reshape(labels.shape),)
        f = ref_logprobs_and_entropy if kind == "lp_ent" else ref_token_logprobs
        out = naive_apply(X, W, functools.partial(f, ignore_index=-100, **kw), labels, bias=b)
        return out if isinstance(out, tuple) else (out,)
    return run


def _side(fn, X, W, b, labels, weights, *args):
    Xs, Ws, bs = leaf_clone(X), leaf_clone(W), leaf_clone(b)
    outs = fn(Xs, Ws, bs, labels, *args)
    loss = sum((o * w).sum() for o, w in zip(outs, weights) if w is not None)
    return outs, grads(loss, [Xs, Ws, bs])


KINDS = {
    "logprobs": ("lp", dict(temperature=0.7, logit_scale=1.3)),
    "logprobs_plain": ("lp", {}),
    "ce": ("ce", {}),
    "logprobs_logged_entropy": ("lp_ent", dict(temperature=1.2)),
}


@pytest.mark.parametrize("chunk", [4, 7, 21])
@pytest.mark.parametrize("kind", list(KINDS))
def test_fp32_matches_generic_and_naive(kind, chunk):
    what, kw = KINDS[kind]
    X, W, b, labels = make_inputs(LEAD, H, V, bias=True, scale=2.0)
    labels = _ignored(labels)
    if what != "ce":  # ignore_index is opt-in for log-probs
        kw = dict(kw, ignore_index=-100)
    n_out = 2 if what == "lp_ent" else 1
    weights = [random_weights(LEAD, seed=3)] + [None] * (n_out - 1)  # the entropy is only logged
    ours_kw = {k: v for k, v in kw.items() if what != "ce"}
    fast = _side(_ours(what, True, **ours_kw), X, W, b, labels, weights, chunk)
    generic = _side(_ours(what, False, **ours_kw), X, W, b, labels, weights, chunk)
    ref_kw = {k: v for k, v in kw.items() if k != "ignore_index"}
    ref = _side(_ref(what, **ref_kw), X, W, b, labels, weights)
    for other, name in ((generic, "generic"), (ref, "naive")):
        for k, (o, r) in enumerate(zip(fast[0], other[0])):
            assert_close_fp32(o, r, what=f"{name} output {k}")
        for gname, go, gr in zip(("dX", "dW", "db"), fast[1], other[1]):
            assert_close_fp32(go, gr, what=f"{name} {gname}")


@pytest.mark.parametrize("chunk", [4, 21])
@pytest.mark.parametrize("what", ["lp", "ce"])
def test_bf16_no_less_accurate_than_naive_bf16(what, chunk):
    X, W, b, labels = make_inputs(LEAD, H, V, bias=True, scale=2.0, dtype=torch.float64)
    labels = _ignored(labels)
    kw = dict(temperature=0.8, ignore_index=-100) if what == "lp" else {}
    ref_kw = dict(temperature=0.8) if what == "lp" else {}
    weights = [random_weights(LEAD, seed=4, dtype=torch.float64)]
    exact = _side(_ref(what, **ref_kw), X, W, b, labels, weights)
    half = [t.detach().bfloat16().requires_grad_(True) for t in (X, W, b)]
    naive = _side(_ref(what, **ref_kw), *half, labels, weights)
    ours = _side(_ours(what, True, **kw), *half, labels, weights, chunk)
    generic = _side(_ours(what, False, **kw), *half, labels, weights, chunk)
    for name, o, g, n, e in zip(("out", "dX", "dW", "db"), [ours[0][0], *ours[1]], [generic[0][0], *generic[1]],
                                [naive[0][0], *naive[1]], [exact[0][0], *exact[1]]):
        assert_low_precision(o, n, e, BF16_EPS, what=name)
        assert_low_precision(o, g, e, BF16_EPS, what=f"{name} vs generic")


def test_entropy_with_a_gradient_takes_the_generic_path():
    """An entropy bonus (both outputs get gradients): the closed form does not cover it; the generic path does."""
    X, W, b, labels = make_inputs(LEAD, H, V, bias=True)
    weights = [random_weights(LEAD, seed=5), random_weights(LEAD, seed=6)]
    ours = _side(_ours("lp_ent", True, temperature=0.9), X, W, b, labels, weights, 4)
    ref = _side(_ref("lp_ent", temperature=0.9), X, W, b, labels, weights)
    for o, r in zip(ours[0] + tuple(ours[1]), ref[0] + tuple(ref[1])):
        assert_close_fp32(o, r)


def test_the_closed_form_is_what_runs(monkeypatch):
    """With several chunks the front door never calls its f's plain form (the generic path would, in backward);
    with saved_lse=False it does, in forward and backward."""
    X, W, b, labels = make_inputs(LEAD, H, V, bias=True)
    calls = []
    plain = LabelLogprob.__call__
    monkeypatch.setattr(LabelLogprob, "__call__", lambda self, z, y: calls.append(z.shape[0]) or plain(self, z, y))
    linear_token_logprobs(X, W, labels, bias=b, chunk_size=4).sum().backward()
    assert calls == []
    rec = ChunkRecorder(G.token_logprobs)
    monkeypatch.setattr(fused, "token_logprobs", rec)
    Xg = leaf_clone(X)
    linear_token_logprobs(Xg, W, labels, bias=b, chunk_size=4, saved_lse=False).sum().backward()
    assert rec.rows == [4, 4, 4, 4, 4, 1] * 2


def test_logits_grad_is_the_autograd_gradient():
    """LabelLogprob.logits_grad against autograd of log_softmax on the same logits, row by row, with a scale,
    ignored labels and negation (cross-entropy)."""
    g = torch.Generator().manual_seed(9)
    z = torch.randn(6, V, generator=g) * 3
    labels = torch.randint(0, V, (6,), generator=g)
    labels[2] = -100
    up = torch.randn(6, generator=g)
    for f in (LabelLogprob(0.7, 1.3, -100), LabelLogprob(ignore_index=-100, negate=True)):
        zr = z.clone().requires_grad_(True)
        out = f(zr, labels)
        (dz_ref,) = torch.autograd.grad((out * up).sum(), [zr])
        (vals,), lse = f.forward_with_stat(z.clone(), labels)
        torch.testing.assert_close(vals, out.detach())
        torch.testing.assert_close(lse, torch.logsumexp(ref_scaled(z, f.temperature, None, f.logit_scale), -1))
        torch.testing.assert_close(f.logits_grad(z.clone(), lse, [up], labels), dz_ref)


# --------------------------------------------------------------------------------------------------
# one chunk for all rows: the forward keeps f's graph
# --------------------------------------------------------------------------------------------------

def test_kept_graph_matches_recompute_and_survives_a_second_backward():
    X, W, b, labels = make_inputs(LEAD, H, V, bias=True)
    w = random_weights(LEAD, seed=7)
    f = functools.partial(G.token_logprobs_and_entropy, temperature=0.8)
    outs, got = {}, {}
    for chunk in (21, 4):
        Xs, Ws, bs = leaf_clone(X), leaf_clone(W), leaf_clone(b)
        lp, ent = chunked_linear(Xs, Ws, f, labels, bias=bs, chunk_size=chunk)
        loss = (lp * w).sum() + ent.sum()
        got[chunk] = grads(loss, [Xs, Ws, bs])
        outs[chunk] = (lp, ent)
        if chunk == 21:  # the kept graph is used once; a second backward recomputes
            Xs.grad = None
            lp2, _ = chunked_linear(Xs, Ws, f, labels, bias=bs, chunk_size=chunk)
            (lp2 * w).sum().backward(retain_graph=True)
            first = Xs.grad.clone()
            (lp2 * w).sum().backward()
            assert_close_fp32(Xs.grad, 2 * first)
    for a, r in zip(outs[21] + tuple(got[21]), outs[4] + tuple(got[4])):
        assert_close_fp32(a, r)


def test_last_chunk_logits_kept_once_then_recomputed():
    """The forward keeps its last chunk's logits for the backward (used once, since dZ is formed in their buffer):
    a second backward through the same output recomputes them and gets the same gradient."""
    X, W, b, labels = make_inputs(LEAD, H, V, bias=True)
    w = random_weights(LEAD, seed=8)
    lp = linear_token_logprobs(X, W, labels, bias=b, chunk_size=4, temperature=0.6)
    (lp * w).sum().backward(retain_graph=True)
    first = [t.grad.clone() for t in (X, W, b)]
    Xr, Wr, br = leaf_clone(X), leaf_clone(W), leaf_clone(b)
    ref = naive_apply(Xr, Wr, functools.partial(ref_token_logprobs, temperature=0.6), labels, bias=br)
    for got, r in zip(first, grads((ref * w).sum(), [Xr, Wr, br])):
        assert_close_fp32(got, r)
    (lp * w).sum().backward()
    for t, f in zip((X, W, b), first):
        assert_close_fp32(t.grad, 2 * f)
