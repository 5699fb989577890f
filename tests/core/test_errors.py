"""Bad inputs fail early with the right error type and a useful message (issue #6); edge cases behave like
the naive path: NaN/inf propagate, empty input gives empty outputs and zero gradients, runs are deterministic.
"""

from __future__ import annotations

import functools

import pytest
import torch

from grpo_mel import MemoryEfficientLinear, chunked_linear, linear_cross_entropy, linear_token_logprobs
from grpo_mel import functions as G

from .conftest import (
    assert_close_fp32,
    grads,
    leaf_clone,
    make_inputs,
    naive_apply,
    random_weights,
    ref_cross_entropy,
    ref_entropy,
    ref_logprobs_and_entropy,
    ref_mse_onehot,
    ref_token_logprobs,
    ref_z_loss,
)

H, V = 8, 11


@pytest.fixture
def xwl():
    X, W, b, labels = make_inputs((2, 3), H, V, bias=True)
    return X, W, b, labels


# --------------------------------------------------------------------------------------------------
# shapes and dtypes of X, W, b, labels
# --------------------------------------------------------------------------------------------------

def test_hidden_size_mismatch(xwl):
    X, W, _, labels = xwl
    with pytest.raises(ValueError, match=r"hidden size mismatch.*H=8.*H=7"):
        chunked_linear(X, W[:, :7], G.token_logprobs, labels)
    with pytest.raises(ValueError, match=r"hidden size mismatch"):
        linear_cross_entropy(X[..., :5], W, labels)
    with pytest.raises(ValueError, match=r"hidden size mismatch"):
        linear_token_logprobs(X, W[:, :3], labels)


def test_weight_and_x_rank(xwl):
    X, W, _, labels = xwl
    with pytest.raises(ValueError, match=r"weight must be \[V, H\]"):
        chunked_linear(X, W[0], G.token_logprobs, labels)
    with pytest.raises(ValueError, match=r"X must have at least 2 dimensions .* got shape \(\)"):
        chunked_linear(torch.tensor(1.0), W, G.z_loss)


def test_one_dimensional_x_is_named_at_every_entry_point(xwl):
    """A 1-D X (one hidden vector, no row axis) is refused naming X and its shape, not with torch's view() error."""
    _, W, _, _ = xwl
    x = torch.randn(H, requires_grad=True)
    label = torch.tensor(3)
    msg = r"X must have at least 2 dimensions \[N, H\] .* got shape \(8,\); for a single row use X\[None\]"
    with pytest.raises(ValueError, match=msg):
        chunked_linear(x, W, G.token_logprobs, label)
    with pytest.raises(ValueError, match=msg):
        linear_token_logprobs(x, W, label)
    with pytest.raises(ValueError, match=msg):
        linear_cross_entropy(x, W, label)
    with pytest.raises(TypeError, match=r"X must be a tensor \[\.\.\., H\], got list"):
        linear_token_logprobs([1.0] * H, W, label)
    # one row is X[None]
    lp = linear_token_logprobs(x[None], W, label[None])
    assert lp.shape == (1,)


@pytest.mark.parametrize("temperature,exc,msg", [
    (0, ValueError, r"temperature must be finite and > 0, got 0"),
    (0.0, ValueError, r"temperature must be finite and > 0, got 0.0"),
    (-1.0, ValueError, r"temperature must be finite and > 0, got -1.0"),
    (float("nan"), ValueError, r"temperature must be finite and > 0, got nan"),
    (float("inf"), ValueError, r"temperature must be finite and > 0, got inf"),
    ("1.0", TypeError, r"temperature must be a number, got str '1.0'"),
    (None, TypeError, r"temperature must be a number, got NoneType None"),
    (True, TypeError, r"temperature must be a number, got bool True"),
])
def test_bad_temperature(xwl, temperature, exc, msg):
    X, W, _, labels = xwl
    with pytest.raises(exc, match=msg):
        linear_token_logprobs(X, W, labels, temperature=temperature)
    with pytest.raises(exc, match=msg):
        linear_token_logprobs(X, W, labels, temperature=temperature, with_entropy=True)


def test_good_temperatures_are_accepted(xwl):
    import numpy as np

    X, W, _, labels = xwl
    ref = linear_token_logprobs(X, W, labels, temperature=0.5)
    for t in (1, 2.0, np.float32(0.5), np.float64(0.5)):
        out = linear_token_logprobs(X, W, labels, temperature=t)
        assert out.shape == labels.shape and bool(torch.isfinite(out).all())
    torch.testing.assert_close(linear_token_logprobs(X, W, labels, temperature=np.float64(0.5)), ref)


@pytest.mark.parametrize("bad_shape", [(2,), (3, 2), (2, 3, 1), (6,)])
def test_labels_shape_mismatch(xwl, bad_shape):
    X, W, _, _ = xwl
    labels = torch.zeros(bad_shape, dtype=torch.long)
    with pytest.raises(ValueError, match=r"labels has shape .* but X has shape \(2, 3, 8\)"):
        linear_cross_entropy(X, W, labels)
    with pytest.raises(ValueError, match=r"labels has shape"):
        linear_token_logprobs(X, W, labels)
    if bad_shape != (2, 3, 1):  # a trailing dim is legal for a generic row argument
        with pytest.raises(ValueError, match=r"row argument 0 has shape .* X's leading shape \(2, 3\)"):
            chunked_linear(X, W, G.token_logprobs, labels)


def test_labels_not_a_tensor(xwl):
    X, W, _, _ = xwl
    with pytest.raises(TypeError, match=r"labels must be a tensor, got list"):
        linear_cross_entropy(X, W, [[1, 2, 3], [4, 5, 6]])
    with pytest.raises(TypeError, match=r"row argument 0 must be a tensor"):
        chunked_linear(X, W, G.token_logprobs, [[1, 2, 3], [4, 5, 6]])


@pytest.mark.parametrize("bad", [V, V + 5, -1, -101])
def test_labels_out_of_range(xwl, bad):
    X, W, _, labels = xwl
    labels = labels.clone()
    labels[1, 2] = bad
    with pytest.raises(ValueError, match=rf"labels must be in \[0, {V}\) or ignore_index=-100; found {bad}"):
        linear_cross_entropy(X, W, labels)
    with pytest.raises(ValueError, match=rf"labels must be in \[0, {V}\); found {bad}"):
        linear_token_logprobs(X, W, labels)


def test_ignore_index_is_not_out_of_range(xwl):
    X, W, _, labels = xwl
    labels = labels.clone()
    labels[0, 0] = -100
    linear_cross_entropy(X, W, labels)  # default ignore_index=-100: fine
    linear_token_logprobs(X, W, labels, ignore_index=-100)
    with pytest.raises(ValueError, match=r"found -100"):  # no ignore_index: -100 is out of range
        linear_token_logprobs(X, W, labels)
    labels[0, 1] = 7
    with pytest.raises(ValueError, match=r"or ignore_index=7; found -100"):
        linear_cross_entropy(X, W, labels, ignore_index=7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_float_labels(xwl, dtype):
    X, W, _, labels = xwl
    with pytest.raises(TypeError, match=rf"labels must be an integer tensor, got {dtype}"):
        linear_cross_entropy(X, W, labels.to(dtype))
    with pytest.raises(TypeError, match=r"labels must be an integer tensor"):
        linear_token_logprobs(X, W, labels.to(dtype))


@pytest.mark.parametrize("wdtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtype_mismatch_x_w(xwl, wdtype):
    X, W, _, labels = xwl
    with pytest.raises(TypeError, match=rf"dtype mismatch: X is torch.float32 but weight is {wdtype}"):
        chunked_linear(X, W.detach().to(wdtype), G.token_logprobs, labels)
    with pytest.raises(TypeError, match=r"dtype mismatch"):
        linear_cross_entropy(X, W.detach().to(wdtype), labels)


def test_integer_x_and_w(xwl):
    X, W, _, labels = xwl
    with pytest.raises(TypeError, match=r"must be floating point"):
        chunked_linear(X.detach().long(), W.detach().long(), G.token_logprobs, labels)


@pytest.mark.parametrize("shape", [(V - 1,), (V + 1,), (1, V), (V, 1), ()])
def test_bias_wrong_shape(xwl, shape):
    X, W, _, labels = xwl
    with pytest.raises(ValueError, match=rf"bias must be a tensor of shape \({V},\), got"):
        chunked_linear(X, W, G.token_logprobs, labels, bias=torch.zeros(shape))
    with pytest.raises(ValueError, match=r"bias must be a tensor of shape"):
        linear_cross_entropy(X, W, labels, bias=torch.zeros(shape))


def test_bias_not_a_tensor(xwl):
    X, W, _, labels = xwl
    with pytest.raises(ValueError, match=r"bias must be a tensor of shape \(11,\), got list"):
        chunked_linear(X, W, G.token_logprobs, labels, bias=[0.0] * V)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.long])
def test_bias_wrong_dtype(xwl, dtype):
    X, W, _, labels = xwl
    with pytest.raises(TypeError, match=rf"bias must match weight's dtype .*got \({dtype}"):
        chunked_linear(X, W, G.token_logprobs, labels, bias=torch.zeros(V, dtype=dtype))
    with pytest.raises(TypeError, match=r"bias must match weight's dtype"):
        linear_token_logprobs(X, W, labels, bias=torch.zeros(V, dtype=dtype))


# --------------------------------------------------------------------------------------------------
# chunk size and memory budget
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size,exc,msg", [
    (0, ValueError, r"chunk_size must be >= 1, got 0"),
    (-1, ValueError, r"chunk_size must be >= 1, got -1"),
    (2.5, TypeError, r"chunk_size must be an int >= 1 or None \(automatic\), got 2.5"),
    (True, TypeError, r"chunk_size must be an int >= 1 or None \(automatic\), got True"),
    (False, TypeError, r"chunk_size must be an int >= 1 or None \(automatic\), got False"),
    (3.0, TypeError, r"chunk_size must be an int .* got 3.0"),
    ("4", TypeError, r"chunk_size must be an int .* got '4'"),
])
def test_bad_chunk_size(xwl, chunk_size, exc, msg):
    X, W, _, labels = xwl
    with pytest.raises(exc, match=msg):
        chunked_linear(X, W, G.token_logprobs, labels, chunk_size=chunk_size)
    with pytest.raises(exc, match=msg):
        linear_cross_entropy(X, W, labels, chunk_size=chunk_size)
    with pytest.raises(exc, match=msg):
        linear_token_logprobs(X, W, labels, chunk_size=chunk_size)


def test_bad_chunk_size_seed_convention(xwl):
    X, W, _, labels = xwl
    linear = torch.nn.Linear(H, V, bias=False)

    def f(batch, linear, labels):
        return torch.nn.functional.cross_entropy(linear(batch).float(), labels)

    with pytest.raises(ValueError, match=r"chunk_size must be >= 1, got 0"):
        MemoryEfficientLinear.apply(X, linear, labels, f, 0)
    with pytest.raises(TypeError, match=r"chunk_size must be an int"):
        MemoryEfficientLinear.apply(X, linear, labels, f, 2.5)
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        MemoryEfficientLinear.apply(X, linear, labels, f, 2, "avg")
    with pytest.raises(TypeError, match=r"takes at most 6 arguments"):
        MemoryEfficientLinear.apply(X, linear, labels, f, 2, "mean", 3)


@pytest.mark.parametrize("budget,exc,msg", [
    (float("nan"), ValueError, r"memory_budget must be a finite number of bytes > 0, got nan"),
    (float("inf"), ValueError, r"memory_budget must be a finite number of bytes > 0, got inf"),
    (float("-inf"), ValueError, r"memory_budget must be a finite number of bytes > 0, got -inf"),
    (0, ValueError, r"memory_budget must be a finite number of bytes > 0, got 0"),
    (-1e6, ValueError, r"memory_budget must be a finite number of bytes > 0, got -1000000.0"),
    (True, TypeError, r"memory_budget must be a number of bytes or None, got True"),
    ("1e6", TypeError, r"memory_budget must be a number of bytes or None, got '1e6'"),
])
def test_bad_memory_budget(xwl, budget, exc, msg):
    X, W, _, labels = xwl
    with pytest.raises(exc, match=msg):
        chunked_linear(X, W, G.token_logprobs, labels, memory_budget=budget)
    with pytest.raises(exc, match=msg):
        linear_cross_entropy(X, W, labels, memory_budget=budget)


# --------------------------------------------------------------------------------------------------
# transformation functions that return the wrong thing
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("f", [
    lambda z, y: z[:-1, 0],                 # one row short
    lambda z, y: torch.cat([z[:, 0], z[:1, 0]]),  # one row too many
    lambda z, y: z.sum(0),                  # reduced over rows: [V]
    lambda z, y: z.t(),                     # [V, c]
], ids=["short", "long", "sum_rows", "transposed"])
def test_f_rows_do_not_match_chunk(xwl, f):
    X, W, _, labels = xwl
    with pytest.raises(ValueError, match=r"output 0 of the transformation function has shape .* for a chunk of 2 rows"):
        chunked_linear(X, W, f, labels, chunk_size=4)  # 6 rows: chunks of 2 (the short one first) and 4


def test_f_rows_mismatch_on_the_short_chunk_only(xwl):
    X, W, _, labels = xwl
    with pytest.raises(ValueError, match=r"for a chunk of 2 rows; per-row outputs must have the chunk's rows"):
        chunked_linear(X, W, lambda z, y: z.new_zeros(4), labels, chunk_size=4)  # chunks 2, 4


def test_f_second_output_rows_mismatch(xwl):
    X, W, _, labels = xwl
    with pytest.raises(ValueError, match=r"output 1 of the transformation function has shape \(3,\)"):
        chunked_linear(X, W, lambda z, y: (z[:, 0], z[:3, 1]), labels, chunk_size=4)


def test_f_scalar_on_one_chunk_rows_on_another(xwl):
    X, W, _, labels = xwl
    with pytest.raises(ValueError, match=r"output 0 .* is a scalar on one chunk but has shape"):
        chunked_linear(X, W, lambda z, y: z.sum() if z.shape[0] == 2 else z[:, 0], labels, chunk_size=4)  # 2, 4
    with pytest.raises(ValueError, match=r"returned 2 outputs on one chunk and 1 on another"):
        chunked_linear(X, W, lambda z, y: z[:, 0] if z.shape[0] == 2 else (z[:, 0], z[:, 1]), labels, chunk_size=4)


@pytest.mark.parametrize("ret,name", [(3.0, "float"), (None, "NoneType"), ([], "list"), ((), "tuple"),
                                      ("x", "str")])
def test_f_returns_non_tensor(xwl, ret, name):
    X, W, _, labels = xwl
    with pytest.raises(TypeError, match=rf"must return a tensor or a non-empty tuple of tensors, got {name}"):
        chunked_linear(X, W, lambda z, y: ret, labels)


def test_f_returns_tuple_with_non_tensor(xwl):
    X, W, _, labels = xwl
    with pytest.raises(TypeError, match=r"must return a tensor or a non-empty tuple of tensors, got tuple"):
        chunked_linear(X, W, lambda z, y: (z[:, 0], 1.0), labels)


@pytest.mark.parametrize("reduction", ["avg", "none", "MEAN", None, ""])
def test_unknown_reduction(xwl, reduction):
    X, W, _, labels = xwl
    with pytest.raises(ValueError, match=rf"reduction must be one of \('mean', 'sum'\), got {reduction!r}"):
        chunked_linear(X, W, G.token_logprobs, labels, reduction=reduction)


@pytest.mark.parametrize("reduction", ["avg", "MEAN", None, "batchmean"])
def test_unknown_reduction_cross_entropy(xwl, reduction):
    X, W, _, labels = xwl
    with pytest.raises(ValueError, match=rf"reduction must be 'mean', 'sum' or 'none', got {reduction!r}"):
        linear_cross_entropy(X, W, labels, reduction=reduction)


def test_errors_raised_before_any_work(xwl):
    """Validation happens before f is called (no partial work, no half-filled outputs)."""
    X, W, _, labels = xwl
    calls = []

    def f(z, y):
        calls.append(1)
        return z[:, 0]

    for kw in ({"chunk_size": 0}, {"memory_budget": -1}, {"reduction": "avg"}, {"bias": torch.zeros(3)}):
        with pytest.raises((ValueError, TypeError)):
            chunked_linear(X, W, f, labels, **kw)
    assert calls == []


# --------------------------------------------------------------------------------------------------
# NaN / inf, empty input, determinism
# --------------------------------------------------------------------------------------------------

NAN_CASES = {
    "logprobs": (functools.partial(G.token_logprobs), ref_token_logprobs, True),
    "ce": (G.cross_entropy, ref_cross_entropy, True),
    "lp_ent": (G.token_logprobs_and_entropy, ref_logprobs_and_entropy, True),
    "z_loss": (G.z_loss, ref_z_loss, False),
}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("case", list(NAN_CASES))
def test_nonfinite_x_propagates_like_naive(case, bad):
    f_ours, f_ref, with_labels = NAN_CASES[case]
    X, W, b, labels = make_inputs((10,), H, V, bias=True)
    X = X.detach().clone()
    X[3, 2] = bad
    X[7, 0] = bad
    X.requires_grad_(True)
    args = (labels,) if with_labels else ()
    sides = {}
    for side in ("ours", "ref"):
        Xs, Ws, bs = leaf_clone(X), leaf_clone(W), leaf_clone(b)
        out = (chunked_linear(Xs, Ws, f_ours, *args, bias=bs, chunk_size=3) if side == "ours"
               else naive_apply(Xs, Ws, f_ref, *args, bias=bs))
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum((o * random_weights(o.shape, seed=k)).sum() for k, o in enumerate(outs))
        sides[side] = (outs, grads(loss, [Xs, Ws, bs]))
    (o_outs, o_g), (r_outs, r_g) = sides["ours"], sides["ref"]
    for o, r in zip(o_outs, r_outs):
        assert torch.equal(o.isnan(), r.isnan()) and torch.equal(o.isinf(), r.isinf())
        assert not o[[0, 1, 2, 4, 5, 6, 8, 9]].isnan().any(), "a bad row contaminated other rows' outputs"
        assert_close_fp32(o, r)
    for name, go, gr in zip(("dX", "dW", "db"), o_g, r_g):
        assert torch.equal(go.isnan(), gr.isnan()), f"{name}: NaN pattern differs"
        assert_close_fp32(go, gr, what=name)
    assert not o_g[0][[0, 1, 2, 4, 5, 6, 8, 9]].isnan().any(), "dX of good rows must stay finite"


EMPTY_CASES = {
    "logprobs": (G.token_logprobs, ref_token_logprobs, True),
    "entropy": (G.token_entropy, ref_entropy, False),
    "lp_ent": (G.token_logprobs_and_entropy, ref_logprobs_and_entropy, True),
    "ce": (G.cross_entropy, ref_cross_entropy, True),
    "mse": (G.mse_onehot, ref_mse_onehot, True),
    "z_loss": (G.z_loss, ref_z_loss, False),
}


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)], ids=["0", "2x0", "0x3"])
@pytest.mark.parametrize("case", list(EMPTY_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_input(case, lead, dtype):
    f_ours, f_ref, with_labels = EMPTY_CASES[case]
    X, W, b, labels = make_inputs(lead, H, V, bias=True, dtype=dtype)
    args = (labels,) if with_labels else ()
    out = chunked_linear(X, W, f_ours, *args, bias=b, chunk_size=4)
    ref = naive_apply(X.detach(), W.detach(), f_ref, *args, bias=b.detach())
    outs, refs = (out if isinstance(out, tuple) else (out,)), (ref if isinstance(ref, tuple) else (ref,))
    for o, r in zip(outs, refs):
        assert o.shape == r.shape == lead
    dX, dW, db = torch.autograd.grad(sum(o.sum() for o in outs), [X, W, b])
    assert dX.shape == X.shape and dX.dtype == dtype
    assert dW.shape == (V, H) and dW.dtype == dtype and torch.count_nonzero(dW) == 0
    assert db.shape == (V,) and torch.count_nonzero(db) == 0


def test_empty_input_front_doors():
    X, W, b, labels = make_inputs((0,), H, V, bias=True)
    assert linear_cross_entropy(X, W, labels, bias=b, reduction="none").shape == (0,)
    s = linear_cross_entropy(X, W, labels, bias=b, reduction="sum")
    assert s.shape == () and float(s.detach()) == 0.0
    m = linear_cross_entropy(X, W, labels, bias=b, reduction="mean")
    ref_m = torch.nn.functional.cross_entropy(X.detach() @ W.detach().t() + b.detach(), labels)
    assert m.shape == () and bool(torch.isnan(m.detach())) == bool(torch.isnan(ref_m))  # 0/0, as in torch
    dW, = torch.autograd.grad(s, [W])
    assert dW.shape == W.shape and torch.count_nonzero(dW) == 0
    lp, ent = linear_token_logprobs(X, W, labels, bias=b, with_entropy=True)
    assert lp.shape == ent.shape == (0,)


def test_empty_input_scalar_output():
    """A scalar-returning f on N=0: a finite 0-dim output and zero gradients (no crash)."""
    X, W, _, labels = make_inputs((0,), H, V)
    for reduction in ("mean", "sum"):
        out = chunked_linear(X, W, lambda z, y: torch.nn.functional.cross_entropy(z, y, reduction="sum"),
                             labels, reduction=reduction)
        assert out.shape == () and float(out.detach()) == 0.0
        dX, dW = torch.autograd.grad(out, [X, W])
        assert dX.shape == (0, H) and torch.count_nonzero(dW) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 7, None])
def test_determinism_bitwise(dtype, chunk):
    X, W, b, labels = make_inputs((4, 10), 32, 301, bias=True, dtype=dtype)
    w = random_weights((4, 10))
    runs = []
    for _ in range(2):
        Xs, Ws, bs = leaf_clone(X), leaf_clone(W), leaf_clone(b)
        lp, ent = linear_token_logprobs(Xs, Ws, labels, bias=bs, with_entropy=True, temperature=0.8,
                                        chunk_size=chunk)
        g = torch.autograd.grad((lp * w).sum() + ent.mean(), [Xs, Ws, bs])
        runs.append((lp.detach(), ent.detach(), *g))
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_), "two identical runs differ"


def test_empty_input_scalar_output_dtype_matches_nonempty():
    W = torch.randn(5, 4, dtype=torch.bfloat16)
    f = lambda z: z.sum()  # noqa: E731 - a bf16 scalar
    empty = chunked_linear(torch.randn(0, 4, dtype=torch.bfloat16), W, f)
    full = chunked_linear(torch.randn(3, 4, dtype=torch.bfloat16), W, f)
    assert empty.dtype == full.dtype


# ----------------------------------------------------------------------------- dW accumulation: what is caught

def _half_operands():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 3, generator=g).bfloat16()
    b = torch.randn(3, 4, generator=g).bfloat16()
    return torch.zeros(5, 4), a, b


def _raising_addmm(monkeypatch, exc):
    def addmm(*args, **kwargs):
        raise exc

    monkeypatch.setattr(torch, "addmm", addmm)


@pytest.mark.parametrize("exc", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: an illegal memory access was encountered"),
], ids=["oom", "cuda-error"])
def test_addmm_out_fp32_lets_real_errors_through(monkeypatch, exc):
    """Out-of-memory (and any other failure) in the fp32-output GEMM is raised, not hidden by the fallback."""
    from grpo_mel._linear_grads import _addmm_out_fp32

    acc, a, b = _half_operands()
    _raising_addmm(monkeypatch, exc)
    with pytest.raises(type(exc), match=str(exc)[:20]):
        _addmm_out_fp32(acc, a, b)


@pytest.mark.parametrize("exc", [
    TypeError("addmm() received an invalid combination of arguments - got (Tensor, Tensor, Tensor, "
              "out_dtype=torch.dtype, out=Tensor)"),  # a torch without the keyword
    NotImplementedError("Could not run 'aten::addmm.dtype_out' with arguments from the 'CUDA' backend"),
    RuntimeError("self and mat2 must have the same dtype, but got Float and BFloat16"),
], ids=["no-keyword", "no-kernel", "dtype-combination"])
def test_addmm_out_fp32_reports_no_out_dtype_support(monkeypatch, exc):
    from grpo_mel._linear_grads import _addmm_out_fp32

    acc, a, b = _half_operands()
    _raising_addmm(monkeypatch, exc)
    assert _addmm_out_fp32(acc, a, b) is False
    assert not acc.any()


def test_addmm_out_fp32_on_this_torch_cpu_falls_back():
    """This torch has no CPU kernel for addmm's out_dtype (its real error is the "no support" case); the
    fallback accumulates the fp32 product."""
    from grpo_mel._linear_grads import _addmm_fp32, _addmm_out_fp32

    acc, a, b = _half_operands()
    if _addmm_out_fp32(acc, a, b):
        pytest.skip("this torch has an out_dtype addmm on the CPU")
    _addmm_fp32(acc, a, b)
    _addmm_fp32(acc, a, b)
    torch.testing.assert_close(acc, 2 * (a.double() @ b.double()).float())
