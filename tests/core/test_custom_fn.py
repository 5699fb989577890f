"""Transformation functions the library has never seen: autograd differentiates them, nothing is hand-written.

Each f here is written in the test only; the chunked path has to get outputs and gradients right for it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from grpo_mel import chunked_linear

from .conftest import ChunkRecorder, assert_close_fp32, grads, leaf_clone, make_inputs, naive_apply, random_weights

H, V = 12, 37


def squared_weighted_logprob(z, w):
    """``(log_softmax(z.float()) · w).sum(-1)²`` with a per-row weight vector w [c, V]."""
    return ((F.log_softmax(z.float(), -1) * w).sum(-1)) ** 2


def tuple_row_and_scalar(z, labels):
    """(per-row max-margin [c], a 0-dim scalar: mean CE over the chunk)."""
    zf = z.float()
    top = zf.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    margin = torch.logsumexp(zf, -1) - top
    return margin, F.cross_entropy(zf, labels, reduction="mean")


def _compare(f, X, W, row_args, *, b=None, chunk_size=4, reduction="mean", weights=None, ref_f=None,
             frozen_head=False):
    """ours vs naive for f with random upstream weights; gradients w.r.t. X, W, b and every float row arg.

    ``frozen_head``: W and b get no gradient (a LoRA policy's LM head), on both sides."""
    ref_f = ref_f or f
    sides = {}
    for side in ("ours", "ref"):
        Xs, Ws, bs = leaf_clone(X), leaf_clone(W), leaf_clone(b)
        if frozen_head:
            Ws.requires_grad_(False)
            if bs is not None:
                bs.requires_grad_(False)
        args = [leaf_clone(a) if a.is_floating_point() else a for a in row_args]
        if side == "ours":
            out = chunked_linear(Xs, Ws, f, *args, bias=bs, chunk_size=chunk_size, reduction=reduction)
        else:
            out = naive_apply(Xs, Ws, ref_f, *args, bias=bs)
        outs = out if isinstance(out, tuple) else (out,)
        ws = weights or [random_weights(o.shape, seed=20 + k) for k, o in enumerate(outs)]
        loss = sum((o * w).sum() for o, w in zip(outs, ws))
        sides[side] = (outs, grads(loss, [Xs, Ws, bs, *args]))
    (o_outs, o_g), (r_outs, r_g) = sides["ours"], sides["ref"]
    assert len(o_outs) == len(r_outs)
    for k, (o, r) in enumerate(zip(o_outs, r_outs)):
        assert o.shape == r.shape, f"output {k}"
        assert_close_fp32(o, r, what=f"output {k}")
    for k, (go, gr) in enumerate(zip(o_g, r_g)):
        assert_close_fp32(go, gr, what=f"grad of input {k}")
    return sides


@pytest.mark.parametrize("chunk_size", [1, 4, 11, 100])
@pytest.mark.parametrize("lead", [(11,), (2, 3, 4)], ids=["2d", "4d"])
def test_squared_weighted_logprob(lead, chunk_size):
    X, W, b, _ = make_inputs(lead, H, V, bias=True)
    w = torch.randn(*lead, V)  # per-row argument with a trailing dim, not requiring grad
    _compare(squared_weighted_logprob, X, W, [w], b=b, chunk_size=chunk_size)


@pytest.mark.parametrize("chunk_size", [1, 3, 5, 100])
def test_row_arg_requiring_grad(chunk_size):
    """The per-row weights require grad: their gradient comes back through the chunked Function too."""
    X, W, _, _ = make_inputs((3, 5), H, V)
    w = torch.randn(3, 5, V, requires_grad=True)
    sides = _compare(squared_weighted_logprob, X, W, [w], chunk_size=chunk_size)
    dw = sides["ours"][1][3]
    assert dw is not None and dw.shape == w.shape and dw.abs().sum() > 0


def test_row_arg_requiring_grad_via_backward():
    """Same through .backward(): w.grad is populated (and equals the naive one)."""
    X, W, _, _ = make_inputs((9,), H, V)
    w = torch.randn(9, V, requires_grad=True)
    scale = torch.randn(9, requires_grad=True)

    def f(z, w, s):
        return (F.log_softmax(z.float(), -1) * w).sum(-1) * s.exp()

    chunked_linear(X, W, f, w, scale, chunk_size=2).sum().backward()
    Xr, Wr, wr, sr = leaf_clone(X), leaf_clone(W), leaf_clone(w), leaf_clone(scale)
    naive_apply(Xr, Wr, f, wr, sr).sum().backward()
    for a, r, n in ((X.grad, Xr.grad, "dX"), (W.grad, Wr.grad, "dW"), (w.grad, wr.grad, "dw"),
                    (scale.grad, sr.grad, "dscale")):
        assert_close_fp32(a, r, what=n)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 30])
def test_tuple_of_row_and_scalar_mean(chunk_size):
    """A per-row tensor and a chunk-mean scalar; reduction='mean' must weight the uneven last chunk (N=13)."""
    X, W, b, labels = make_inputs((13,), H, V, bias=True)
    sides = _compare(tuple_row_and_scalar, X, W, [labels], b=b, chunk_size=chunk_size, reduction="mean")
    assert sides["ours"][0][1].dim() == 0


def test_scalar_sum_vs_mean_uneven_chunks():
    """Chunk sums with reduction='sum' give the total; chunk means with 'mean' give the global mean (N=13, c=5)."""
    X, W, _, labels = make_inputs((13,), H, V)

    def ce_sum(z, y):
        return F.cross_entropy(z.float(), y, reduction="sum")

    def ce_mean(z, y):
        return F.cross_entropy(z.float(), y, reduction="mean")

    total = torch.randn(())  # a non-trivial upstream gradient for the scalar
    s = _compare(ce_sum, X, W, [labels], chunk_size=5, reduction="sum", weights=[total])
    m = _compare(ce_mean, X, W, [labels], chunk_size=5, reduction="mean", weights=[total])
    # and the two agree with each other: sum = N * mean, d(sum) = N * d(mean)
    torch.testing.assert_close(s["ours"][0][0], 13 * m["ours"][0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s["ours"][1][1], 13 * m["ours"][1][1], rtol=1e-5, atol=1e-6)
    # a naive equal-weight average of chunk means (the seed's shortcut) would differ here
    chunk_means = [F.cross_entropy(z.float(), y) for z, y in zip((X.detach() @ W.detach().t()).split(5),
                                                                  labels.split(5))]
    assert abs(float(sum(chunk_means) / len(chunk_means)) - float(m["ours"][0][0].detach())) > 1e-4


def test_multi_dim_per_row_output():
    """A per-row output with trailing dims ([c, 2, 3]) keeps them, reshaped to X's leading dims."""
    X, W, _, _ = make_inputs((2, 5), H, V)

    def f(z):
        top = z.float().topk(6, dim=-1).values  # [c, 6]
        return top.view(-1, 2, 3).softmax(-1)

    sides = _compare(f, X, W, [], chunk_size=3)
    assert sides["ours"][0][0].shape == (2, 5, 2, 3)


def test_f_using_integer_row_arg_and_constant_output():
    """An output that does not depend on z (a count) gets no gradient and does not break backward."""
    X, W, _, labels = make_inputs((10,), H, V)
    mask = (labels % 2 == 0)

    def f(z, y, m):
        lp = F.log_softmax(z.float(), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
        return lp * m, m.float()

    _compare(f, X, W, [labels, mask], chunk_size=3)


def test_f_called_once_per_chunk_and_recomputed_in_backward():
    """Recompute-in-backward: f runs on each chunk in forward (the short chunk first) and once more in backward for
    every chunk but the last (whose graph the forward kept: a full chunk, so the recompute is the smaller share)."""
    X, W, _, labels = make_inputs((10,), H, V)
    rec = ChunkRecorder(lambda z, y: F.cross_entropy(z.float(), y, reduction="none"))
    out = chunked_linear(X, W, rec, labels, chunk_size=4)
    assert rec.rows == [2, 4, 4]
    out.sum().backward()
    assert rec.rows == [2, 4, 4, 2, 4]


def test_f_sees_input_dtype_logits():
    """f receives the chunk's logits in X's dtype (the float32 upcast is f's job)."""
    X, W, _, labels = make_inputs((6,), H, V, dtype=torch.bfloat16)
    dtypes = []

    def f(z, y):
        dtypes.append(z.dtype)
        return F.cross_entropy(z.float(), y, reduction="none")

    chunked_linear(X, W, f, labels, chunk_size=4).sum().backward()
    assert set(dtypes) == {torch.bfloat16}


@pytest.mark.parametrize("frozen_head", [False, True], ids=["trained", "frozen_head"])
@pytest.mark.parametrize("chunk_size", [2, 100])
def test_output_not_depending_on_logits(chunk_size, frozen_head):
    """An f whose (differentiable) output depends on a row arg only: dZ is None, dX/dW must be zeros (W frozen: the
    forward's path, dX zeros and no dW)."""
    X, W, _, _ = make_inputs((7,), H, V)
    W.requires_grad_(not frozen_head)
    w = torch.randn(7, 3, requires_grad=True)
    out = chunked_linear(X, W, lambda z, w: (w ** 2).sum(-1), w, chunk_size=chunk_size)
    dX, *dW, dw = torch.autograd.grad((out * torch.arange(7.0)).sum(), [X, *([] if frozen_head else [W]), w])
    assert torch.count_nonzero(dX) == 0 and dX.shape == X.shape
    for d in dW:
        assert torch.count_nonzero(d) == 0 and d.shape == W.shape
    assert_close_fp32(dw, 2 * w.detach() * torch.arange(7.0)[:, None])


def test_output_depending_on_logits_in_some_chunks_only():
    """Chunks where f's output does not require grad (here: rows with label 0 mask everything) get dX = 0."""
    X, W, _, labels = make_inputs((9,), H, V)
    labels = labels.clone()
    labels[:3] = 0

    def f(z, y):
        if bool((y == 0).all()):
            return torch.zeros(z.shape[0])  # a constant for this chunk: no graph to z at all
        return F.cross_entropy(z.float(), y, reduction="none")

    out = chunked_linear(X, W, f, labels, chunk_size=3)
    dX, dW = torch.autograd.grad(out.sum(), [X, W])
    Xr, Wr = leaf_clone(X), leaf_clone(W)
    ref = torch.cat([F.cross_entropy(Xr[3:] @ Wr.t(), labels[3:], reduction="none")])
    dXr, dWr = torch.autograd.grad(ref.sum(), [Xr, Wr])
    assert torch.count_nonzero(dX[:3]) == 0
    assert_close_fp32(dX[3:], dXr[3:], what="dX")
    assert_close_fp32(dW, dWr, what="dW")


# The backward hands f its chunk's recomputed logits as a non-leaf that only f's graph holds (so they are freed
# as soon as f is done with them). The f's below keep the logits alive themselves, in different ways: they
# must still get exact gradients.


def keeps_logits(z):
    """``Σ z²`` per row: mul saves z itself (for fp32 input ``z.float()`` is z) for its backward."""
    zf = z.float()
    return (zf * zf).sum(-1)


def returns_view_of_logits(z, labels):
    """(a view of the logits [c], z's last column [c]): outputs that alias the logits buffer."""
    return z.float()[:, 0], z[:, -1] * 2.0


def logits_through_two_paths(z, labels):
    """The logits reach the output through log_softmax, a gather of z itself and a softcap-like tanh."""
    zf = z.float()
    top = zf.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return top * F.log_softmax(zf, -1).mean(-1) + torch.tanh(zf / 3).sum(-1)


@pytest.mark.parametrize("chunk_size", [1, 4, 100])
@pytest.mark.parametrize(
    "f,with_labels",
    [(keeps_logits, False), (returns_view_of_logits, True), (logits_through_two_paths, True)],
    ids=["keeps_logits", "view_of_logits", "two_paths"],
)
def test_f_that_holds_on_to_the_logits(f, with_labels, chunk_size):
    X, W, b, labels = make_inputs((3, 4), H, V, bias=True)
    _compare(f, X, W, [labels] if with_labels else [], b=b, chunk_size=chunk_size)


def test_output_needs_grad_tells_f_which_outputs_are_differentiated():
    """f sees, per call, whether each of its outputs will be differentiated; the values are the same either way."""
    from grpo_mel import output_needs_grad

    seen = []

    def f(z, labels):
        seen.append((torch.is_grad_enabled(), output_needs_grad(0), output_needs_grad(1)))
        logp = F.log_softmax(z.float(), -1)
        return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1), (logp.exp() * logp).sum(-1)

    X, W, _, labels = make_inputs((6,), H, V)
    lp, ent = chunked_linear(X, W, f, labels, chunk_size=3)
    # forward: the first chunk under no_grad; the last chunk's graph is kept, assuming only output 0 gets a gradient
    assert seen == [(False, False, False), (True, True, False)]
    seen.clear()
    torch.autograd.grad(lp.sum(), [X, W], retain_graph=True)  # only output 0 gets a gradient: the kept graph serves
    assert seen == [(True, True, False)]
    seen.clear()
    torch.autograd.grad((lp + ent).sum(), [X, W])  # the kept graph is used up: both chunks recomputed
    assert seen == [(True, True, True)] * 2

    # the kept graph assumed the entropy gets no gradient; it gets one: that chunk is recomputed, with its graph
    seen.clear()
    Xa, Wa = leaf_clone(X), leaf_clone(W)
    lp, ent = chunked_linear(Xa, Wa, f, labels, chunk_size=3)
    got = grads((lp + ent).sum(), [Xa, Wa])
    assert seen[2:] == [(True, True, True)] * 2
    Xr, Wr = leaf_clone(X), leaf_clone(W)
    lp_r, ent_r = naive_apply(Xr, Wr, f, labels)
    for g, r in zip(got, grads((lp_r + ent_r).sum(), [Xr, Wr])):
        assert_close_fp32(g, r)
    assert output_needs_grad(0) is torch.is_grad_enabled()  # outside the Function
    with torch.no_grad():
        assert output_needs_grad(0) is False


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropy_with_and_without_entropy_grad(temperature):
    """The built-in joint f skips the entropy's graph when it gets no gradient: same values, same gradients."""
    import functools

    from grpo_mel.functions import token_logprobs_and_entropy

    f = functools.partial(token_logprobs_and_entropy, temperature=temperature)
    X, W, b, labels = make_inputs((3, 5), H, V, bias=True)
    _compare(f, X, W, [labels], b=b, chunk_size=4)  # both outputs weighted
    lp_w = random_weights((3, 5), seed=3)
    _compare(f, X, W, [labels], b=b, chunk_size=4, weights=[lp_w, torch.zeros(3, 5)])
    for side in ("ours", "ref"):  # entropy not in the loss at all: it receives no gradient
        Xs, Ws = leaf_clone(X), leaf_clone(W)
        out = chunked_linear(Xs, Ws, f, labels, chunk_size=4) if side == "ours" else naive_apply(Xs, Ws, f, labels)
        g = torch.autograd.grad((out[0] * lp_w).sum(), [Xs, Ws])
        if side == "ours":
            ours = (out, g)
    for a, r in zip(ours[0] + ours[1], out + g):
        assert_close_fp32(a, r)


@pytest.mark.parametrize("frozen_head", [False, True], ids=["trained", "frozen_head"])
def test_f_with_random_draws_sees_the_same_draws_in_backward(frozen_head):
    """An f with dropout: the backward's recompute replays the forward's draws (the gradient is the one of the
    masks the forward used), and the caller's RNG is where it was before the backward. W and b frozen: f runs once
    per chunk, in the forward, so the gradient is the one of its masks too."""
    X, W, b, _ = make_inputs((10,), H, V, bias=True)
    W.requires_grad_(not frozen_head)
    b.requires_grad_(not frozen_head)
    p, chunk = 0.5, 4

    def dropout_sq(z):
        return F.dropout(z.float(), p=p, training=True).pow(2).sum(-1)

    torch.manual_seed(123)
    Xo, Wo, bo = leaf_clone(X), leaf_clone(W), leaf_clone(b)
    out = chunked_linear(Xo, Wo, dropout_sq, bias=bo, chunk_size=chunk)
    before_backward = torch.get_rng_state()
    got = grads(out.sum(), [Xo, Wo, bo])
    assert torch.equal(torch.get_rng_state(), before_backward)

    # reference: the same masks, drawn chunk by chunk from the same seed, applied to the full logits
    torch.manual_seed(123)
    masks = [F.dropout(torch.ones(min(chunk, 10 - s), V), p=p, training=True) for s in range(0, 10, chunk)]
    mask = torch.cat(masks)
    Xr, Wr, br = leaf_clone(X), leaf_clone(W), leaf_clone(b)
    ref = (naive_apply(Xr, Wr, lambda z: z.float(), bias=br) * mask).pow(2).sum(-1)
    assert_close_fp32(out, ref)
    for go, gr in zip(got, grads(ref.sum(), [Xr, Wr, br])):
        assert_close_fp32(go, gr)


# --------------------------------------------------------------------------------------------------
# a frozen head (W and b without gradient): the forward differentiates f, the backward recomputes nothing
# --------------------------------------------------------------------------------------------------

def _ce_sum(z, y):
    return F.cross_entropy(z.float(), y, reduction="sum")


def _ce_mean(z, y):
    return F.cross_entropy(z.float(), y, reduction="mean")


def _scaled_logprob(z, w, s):
    return (F.log_softmax(z.float(), -1) * w).sum(-1) * s.exp()


def _multi_dim(z):
    return z.float().topk(6, dim=-1).values.view(-1, 2, 3).softmax(-1)


def _frozen_cases():
    """(name, f, row-arg builder(labels) -> list, chunk sizes, reduction)"""
    return [
        ("scalar_sum", _ce_sum, lambda y: [y], "sum"),
        ("scalar_mean_uneven", _ce_mean, lambda y: [y], "mean"),
        ("row_and_scalar", tuple_row_and_scalar, lambda y: [y], "mean"),  # both get gradients: the general path
        ("row_arg_with_trailing_dim_needs_grad", squared_weighted_logprob,
         lambda y: [torch.randn(*y.shape, V, requires_grad=True)], "mean"),
        ("two_row_args_need_grad", _scaled_logprob,
         lambda y: [torch.randn(*y.shape, V, requires_grad=True), torch.randn(*y.shape, requires_grad=True)], "mean"),
        ("per_row_vector_output", _multi_dim, lambda y: [], "mean"),  # not one value per row: the general path
        ("keeps_logits", keeps_logits, lambda y: [], "mean"),
        ("two_paths", logits_through_two_paths, lambda y: [y], "mean"),
    ]


@pytest.mark.parametrize("chunk_size", [1, 4, 13, 100])
@pytest.mark.parametrize("name,f,args,reduction", _frozen_cases(), ids=[c[0] for c in _frozen_cases()])
def test_frozen_head(name, f, args, reduction, chunk_size):
    X, W, b, labels = make_inputs((13,), H, V, bias=True)
    sides = _compare(f, X, W, args(labels), b=b, chunk_size=chunk_size, reduction=reduction, frozen_head=True)
    assert sides["ours"][1][1] is None and sides["ours"][1][2] is None  # no dW, no db


def test_frozen_head_runs_f_once_per_chunk():
    """With W frozen, f runs on each chunk in the forward only; a second backward (retain_graph) multiplies the
    same stored products in again, without recomputing."""
    X, W, _, labels = make_inputs((10,), H, V)
    W.requires_grad_(False)
    rec = ChunkRecorder(lambda z, y: F.cross_entropy(z.float(), y, reduction="none"))
    out = chunked_linear(X, W, rec, labels, chunk_size=4)
    w = torch.randn(10)
    (dX,) = torch.autograd.grad((out * w).sum(), [X], retain_graph=True)
    (dX2,) = torch.autograd.grad((out * 2 * w).sum(), [X])
    assert rec.rows == [2, 4, 4]
    assert_close_fp32(dX2, 2 * dX)
    Xr = leaf_clone(X)
    (dXr,) = torch.autograd.grad((naive_apply(Xr, W, rec.f, labels) * w).sum(), [Xr])
    assert_close_fp32(dX, dXr)


def test_frozen_head_output_assumed_without_gradient_gets_one():
    """The forward differentiates f's first output only (a logged second output builds no graph); when the second
    one gets a gradient after all, the backward recomputes every chunk and the gradients are still exact."""
    from grpo_mel import functions as G

    X, W, _, labels = make_inputs((10,), H, V)
    W.requires_grad_(False)
    rec = ChunkRecorder(G.token_logprobs_and_entropy)
    lp, ent = chunked_linear(X, W, rec, labels, chunk_size=4)
    assert rec.rows == [2, 4, 4]
    w = torch.randn(10)
    (dX,) = torch.autograd.grad((lp * w).sum() + ent.sum(), [X])
    assert rec.rows == [2, 4, 4, 2, 4, 4]
    Xr = leaf_clone(X)
    lp_r, ent_r = naive_apply(Xr, W, G.token_logprobs_and_entropy, labels)
    (dXr,) = torch.autograd.grad((lp_r * w).sum() + ent_r.sum(), [Xr])
    assert_close_fp32(dX, dXr)

