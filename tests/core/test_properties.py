"""Property tests: random shapes, dtypes, chunkings, built-in f's, bias, leading dims -> parity with the
naive full-logits reference (fp32: tight tolerance; bf16: no less accurate than naive bf16 against an
fp64 reference), or a clear error for invalid arguments.
"""

from __future__ import annotations

import functools
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grpo_mel import chunked_linear, linear_cross_entropy, linear_token_logprobs
from grpo_mel import functions as G

from .conftest import (
    BF16_EPS,
    assert_close_fp32,
    assert_low_precision,
    grads,
    leaf_clone,
    naive_apply,
    naive_logits,
    ref_cross_entropy,
    ref_entropy,
    ref_kl,
    ref_logprobs_and_entropy,
    ref_mse_onehot,
    ref_token_logprobs,
    ref_z_loss,
    upcast,
)

# Derandomized (reproducible, no example database) by default. For a longer random search set e.g.
# GRPO_MEL_HYPOTHESIS_EXAMPLES=2000: more examples, fresh randomness on every run.
_EXTRA = int(os.environ.get("GRPO_MEL_HYPOTHESIS_EXAMPLES", "0"))
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                derandomize=not _EXTRA, database=None)


def _examples(n: int) -> int:
    return max(n, _EXTRA)


@st.composite
def leading_dims(draw):
    """1 to 3 leading dims whose product N is in [0, 40]."""
    ndim = draw(st.integers(1, 3))
    dims, prod = [], 1
    for _ in range(ndim):
        d = draw(st.integers(0, 40 // prod if prod else 40))
        dims.append(d)
        prod = max(prod * d, 1) if d else 0
    return tuple(dims)


def _ce_front(reduction):
    def ours(X, W, b, labels, ref_lp, kw):
        return linear_cross_entropy(X, W, labels, bias=b, reduction=reduction, **kw)

    def ref(X, W, b, labels, ref_lp):
        z = upcast(naive_logits(X, W, b))
        out = torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), labels.reshape(-1),
                                                reduction=reduction)
        return out.reshape(labels.shape) if reduction == "none" else out
    return ours, ref, True


def _chunked(f_ours, f_ref, args=("labels",), ignore=False):
    def pick(labels, ref_lp):
        return [{"labels": labels, "ref_lp": ref_lp}[a] for a in args]

    def ours(X, W, b, labels, ref_lp, kw):
        return chunked_linear(X, W, f_ours, *pick(labels, ref_lp), bias=b, **kw)

    def ref(X, W, b, labels, ref_lp):
        return naive_apply(X, W, f_ref, *pick(labels, ref_lp), bias=b)
    return ours, ref, ignore


TS = dict(temperature=0.7, softcap=3.0, logit_scale=1.3)
FUNCS = {
    "logprobs": _chunked(G.token_logprobs, ref_token_logprobs),
    "logprobs_T_softcap": _chunked(functools.partial(G.token_logprobs, **TS),
                                   functools.partial(ref_token_logprobs, **TS)),
    "logprobs_ignore": _chunked(functools.partial(G.token_logprobs, ignore_index=-100),
                                functools.partial(ref_token_logprobs, ignore_index=-100), ignore=True),
    "entropy": _chunked(functools.partial(G.token_entropy, temperature=1.4),
                        functools.partial(ref_entropy, temperature=1.4), args=()),
    "lp_ent": _chunked(functools.partial(G.token_logprobs_and_entropy, ignore_index=-100),
                       functools.partial(ref_logprobs_and_entropy, ignore_index=-100), ignore=True),
    "ce_fn": _chunked(G.cross_entropy, ref_cross_entropy, ignore=True),
    "mse": _chunked(G.mse_onehot, ref_mse_onehot),
    "kl": _chunked(G.kl_to_reference, ref_kl, args=("labels", "ref_lp")),
    "z_loss": _chunked(G.z_loss, ref_z_loss, args=()),
    "ce_mean": _ce_front("mean"),
    "ce_sum": _ce_front("sum"),
    "ce_none": _ce_front("none"),
    "lp_front": (
        lambda X, W, b, labels, ref_lp, kw: linear_token_logprobs(X, W, labels, bias=b, temperature=0.9, **kw),
        lambda X, W, b, labels, ref_lp: naive_apply(X, W, functools.partial(ref_token_logprobs, temperature=0.9),
                                                    labels, bias=b),
        False),
}


@settings(max_examples=_examples(150), **SETTINGS)
@given(
    lead=leading_dims(),
    H=st.integers(1, 16),
    V=st.integers(2, 300),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    chunk=st.one_of(st.none(), st.integers(1, 50)),
    case=st.sampled_from(sorted(FUNCS)),
    bias=st.booleans(),
    x_requires_grad=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_parity_random(lead, H, V, dtype, chunk, case, bias, x_requires_grad, seed):
    ours_fn, ref_fn, ignore = FUNCS[case]
    g = torch.Generator().manual_seed(seed)
    X = (torch.randn(*lead, H, generator=g, dtype=torch.float64) * 1.5).to(dtype)
    W = (torch.randn(V, H, generator=g, dtype=torch.float64) / math.sqrt(H)).to(dtype)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.3).to(dtype) if bias else None
    labels = torch.randint(0, V, lead, generator=g)
    if ignore and labels.numel():
        labels[torch.rand(lead, generator=g) < 0.25] = -100
    ref_lp = -torch.rand(lead, generator=g, dtype=torch.float64).float() * 4
    X.requires_grad_(x_requires_grad)
    W.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)
    kw = {"chunk_size": chunk}

    sides = {"ours": dtype, "naive": dtype} if dtype == torch.float32 else \
        {"ours": dtype, "naive": dtype, "exact": torch.float64}
    res = {}
    for side, dt in sides.items():
        Xs, Ws, bs = leaf_clone(X, dt), leaf_clone(W, dt), leaf_clone(b, dt)
        out = ours_fn(Xs, Ws, bs, labels, ref_lp, kw) if side == "ours" else ref_fn(Xs, Ws, bs, labels, ref_lp)
        outs = out if isinstance(out, tuple) else (out,)
        gw = torch.Generator().manual_seed(seed + 1)
        ws = [torch.randn(tuple(o.shape), generator=gw, dtype=torch.float64) for o in outs]
        loss = sum((o * w.to(o.dtype)).sum() for o, w in zip(outs, ws))
        res[side] = (outs, grads(loss, [Xs, Ws, bs]))

    (o_outs, o_g), (n_outs, n_g) = res["ours"], res["naive"]
    assert len(o_outs) == len(n_outs)
    for o, n in zip(o_outs, n_outs):
        assert o.shape == n.shape
    if x_requires_grad:
        assert o_g[0] is not None and o_g[0].shape == X.shape and o_g[0].dtype == dtype
    else:
        assert o_g[0] is None
    assert o_g[1].shape == W.shape and o_g[1].dtype == dtype
    if dtype == torch.float32:
        for k, (o, n) in enumerate(zip(o_outs, n_outs)):
            assert_close_fp32(o, n, what=f"output {k}")
        for name, a, r in zip(("dX", "dW", "db"), o_g, n_g):
            assert_close_fp32(a, r, what=name)
    else:
        e_outs, e_g = res["exact"]
        for k, (o, n, e) in enumerate(zip(o_outs, n_outs, e_outs)):
            if case == "ce_mean" and torch.isnan(e):  # every label ignored or N == 0: 0/0 on all sides
                assert torch.isnan(o) and torch.isnan(n)
                continue
            assert_low_precision(o, n, e, BF16_EPS, what=f"output {k}")
        for name, a, n, e in zip(("dX", "dW", "db"), o_g, n_g, e_g):
            if e is not None and torch.isnan(e).any():
                assert torch.equal(a.isnan(), e.isnan()), name
                continue
            assert_low_precision(a, n, e, BF16_EPS, what=name)


@settings(max_examples=_examples(60), **SETTINGS)
@given(
    chunk=st.one_of(
        st.integers(max_value=0),
        st.floats(allow_nan=True, allow_infinity=True),
        st.booleans(),
        st.text(max_size=3),
    ),
)
def test_invalid_chunk_size_is_a_clear_error(chunk):
    X, W = torch.randn(3, 4), torch.randn(5, 4)
    labels = torch.zeros(3, dtype=torch.long)
    with pytest.raises((TypeError, ValueError), match=r"chunk_size must be"):
        chunked_linear(X, W, G.token_logprobs, labels, chunk_size=chunk)


@settings(max_examples=_examples(60), **SETTINGS)
@given(
    budget=st.one_of(
        st.floats(max_value=0, allow_nan=False),
        st.just(float("nan")),
        st.just(float("inf")),
        st.integers(max_value=0),
        st.booleans(),
        st.text(max_size=3),
    ),
)
def test_invalid_memory_budget_is_a_clear_error(budget):
    X, W = torch.randn(3, 4), torch.randn(5, 4)
    labels = torch.zeros(3, dtype=torch.long)
    with pytest.raises((TypeError, ValueError), match=r"memory_budget must be"):
        chunked_linear(X, W, G.token_logprobs, labels, memory_budget=budget)


@settings(max_examples=_examples(40), **SETTINGS)
@given(
    lead=leading_dims(),
    V=st.integers(2, 300),
    budget=st.floats(1, 2e5),
    seed=st.integers(0, 2**16),
)
def test_any_positive_budget_gives_parity(lead, V, budget, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(*lead, 8, generator=g, requires_grad=True)
    W = torch.randn(V, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, V, lead, generator=g)
    out = linear_token_logprobs(X, W, labels, memory_budget=budget)
    Xr, Wr = leaf_clone(X), leaf_clone(W)
    ref = naive_apply(Xr, Wr, ref_token_logprobs, labels)
    assert_close_fp32(out, ref)
    w = torch.randn(lead, generator=g)
    for a, r in zip(torch.autograd.grad((out * w).sum(), [X, W]), torch.autograd.grad((ref * w).sum(), [Xr, Wr])):
        assert_close_fp32(a, r)
