"""Parity of the chunked path with the naive full-logits reference: outputs and dX, dW, db.

The reference (tests/core/conftest.py) forms all logits, applies an independently written f and lets
autograd do the rest. Every output gets a random upstream gradient (per-token weights), so a wrong
chunk offset, a missing upstream-gradient multiplication or a wrong mean weighting shows up.

Every tensor here lives on conftest's ``DEVICE`` (``GRPO_MEL_TEST_DEVICE``, default cpu), so the whole module
also runs on a GPU (scripts/gpu_suite.sh does).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from grpo_mel import chunked_linear, linear_cross_entropy, linear_token_logprobs
from grpo_mel import functions as G
from grpo_mel.planning import bytes_per_row

from .conftest import (
    BF16_EPS,
    DEVICE,
    FP16_EPS,
    ChunkRecorder,
    assert_close_fp32,
    assert_low_precision,
    grads,
    leaf_clone,
    make_inputs,
    naive_apply,
    random_weights,
    rel_err,
    ref_cross_entropy,
    ref_entropy,
    ref_kl,
    ref_logprobs_and_entropy,
    ref_mse_onehot,
    ref_token_logprobs,
    ref_z_loss,
    upcast,
    weighted_loss,
    naive_logits,
)

V = 50
H = 16


# --------------------------------------------------------------------------------------------------
# cases: (ours(X, W, b, labels, extra, chunk_kw) -> outputs, ref(X, W, b, labels, extra) -> outputs)
# --------------------------------------------------------------------------------------------------

def _with_ignored(labels: torch.Tensor) -> torch.Tensor:
    """Every third label (and the first) set to -100."""
    labels = labels.clone()
    flat = labels.view(-1)
    flat[::3] = -100
    return labels


def _ce_ref(reduction):
    def ref(X, W, b, labels, extra):
        z = upcast(naive_logits(X, W, b))
        return F.cross_entropy(z.reshape(-1, z.shape[-1]), labels.reshape(-1), ignore_index=-100,
                               reduction=reduction).reshape(labels.shape if reduction == "none" else ())
    return ref


def _ce_ours(reduction):
    def ours(X, W, b, labels, extra, kw):
        return linear_cross_entropy(X, W, labels, bias=b, reduction=reduction, **kw)
    return ours


def _chunked(fn, *, extra_args=False):
    def ours(X, W, b, labels, extra, kw):
        args = (labels, *extra) if extra_args else (labels,)
        return chunked_linear(X, W, fn, *args, bias=b, **kw)
    return ours


def _naive(fn, *, extra_args=False, labels_arg=True):
    def ref(X, W, b, labels, extra):
        args = ((labels,) if labels_arg else ()) + (tuple(extra) if extra_args else ())
        return naive_apply(X, W, fn, *args, bias=b)
    return ref


def _entropy_ours(**kw_f):
    def ours(X, W, b, labels, extra, kw):
        return chunked_linear(X, W, functools.partial(G.token_entropy, **kw_f), bias=b, **kw)
    return ours


def _kl_extra(lead):
    g = torch.Generator().manual_seed(7)
    return [-(torch.rand(*lead, generator=g) * 5).to(DEVICE)]  # plausible reference log-probs (<= 0)


SCALE = dict(temperature=0.7, softcap=5.0, logit_scale=1.7)

CASES = {
    "ce_mean": (_ce_ours("mean"), _ce_ref("mean"), True),
    "ce_sum": (_ce_ours("sum"), _ce_ref("sum"), True),
    "ce_none": (_ce_ours("none"), _ce_ref("none"), True),
    "ce_fn_label_smoothing": (
        _chunked(functools.partial(G.cross_entropy, label_smoothing=0.1)),
        _naive(functools.partial(ref_cross_entropy, label_smoothing=0.1)), True),
    "ce_fn_softcap_scale": (  # a model's own logit transform (Gemma-2 softcapping, Cohere's scale)
        _chunked(functools.partial(G.cross_entropy, softcap=5.0, logit_scale=1.7)),
        _naive(functools.partial(ref_cross_entropy, softcap=5.0, logit_scale=1.7)), True),
    "ce_front_door_softcap_scale_mean": (  # the same through linear_cross_entropy (patch_causal_lm's path)
        lambda X, W, b, labels, extra, kw: linear_cross_entropy(
            X, W, labels, bias=b, reduction="mean", softcap=5.0, logit_scale=1.7, **kw),
        lambda X, W, b, labels, extra: _naive(functools.partial(ref_cross_entropy, softcap=5.0, logit_scale=1.7))(
            X, W, b, labels, extra).sum() / (labels != -100).sum(), True),
    "logprobs": (_chunked(G.token_logprobs), _naive(ref_token_logprobs), False),
    "logprobs_T_softcap_scale": (
        _chunked(functools.partial(G.token_logprobs, **SCALE)),
        _naive(functools.partial(ref_token_logprobs, **SCALE)), False),
    "logprobs_front_door_ignore": (
        lambda X, W, b, labels, extra, kw: linear_token_logprobs(
            X, W, labels, bias=b, temperature=0.9, ignore_index=-100, **kw),
        _naive(functools.partial(ref_token_logprobs, temperature=0.9, ignore_index=-100)), True),
    "entropy": (_entropy_ours(), _naive(ref_entropy, labels_arg=False), False),
    "entropy_T_softcap_scale": (
        _entropy_ours(**SCALE), _naive(functools.partial(ref_entropy, **SCALE), labels_arg=False), False),
    "logprobs_and_entropy": (
        lambda X, W, b, labels, extra, kw: linear_token_logprobs(
            X, W, labels, bias=b, with_entropy=True, temperature=1.3, ignore_index=-100, **kw),
        _naive(functools.partial(ref_logprobs_and_entropy, temperature=1.3, ignore_index=-100)), True),
    "mse_onehot": (_chunked(G.mse_onehot), _naive(ref_mse_onehot), False),
    "kl_to_reference": (
        _chunked(functools.partial(G.kl_to_reference, temperature=0.8), extra_args=True),
        _naive(functools.partial(ref_kl, temperature=0.8), extra_args=True), False),
    "z_loss": (
        lambda X, W, b, labels, extra, kw: chunked_linear(X, W, G.z_loss, bias=b, **kw),
        _naive(ref_z_loss, labels_arg=False), False),
}

LEADS = {"2d": (13,), "3d": (3, 5)}


def _chunk_kw(spec, n, dtype=torch.float32, vocab=V):
    if spec == "budget3":
        return {"memory_budget": 3 * bytes_per_row(vocab, dtype)}
    if spec == "N":
        return {"chunk_size": n}
    if spec == "N+5":
        return {"chunk_size": n + 5}
    return {"chunk_size": spec}


CHUNKS = [1, 7, "N", "N+5", None, "budget3"]


def run_pair(case, lead, chunk_spec, bias, dtype=torch.float32, seed=0, x_scale=1.0, vocab=V, frozen_head=False):
    """Run ours and the reference on fresh leaves; return (ours_outs, ours_grads, ref_outs, ref_grads, inputs).

    ``frozen_head``: W and b do not require grad (a LoRA policy's LM head), on both sides."""
    ours_fn, ref_fn, ignore = CASES[case]
    X, W, b, labels = make_inputs(lead, H, vocab, dtype=dtype, bias=bias, seed=seed, scale=x_scale)
    if frozen_head:
        W.requires_grad_(False)
        if b is not None:
            b.requires_grad_(False)
    if ignore:
        labels = _with_ignored(labels)
    extra = _kl_extra(lead) if case == "kl_to_reference" else []
    n = X[..., 0].numel()
    kw = _chunk_kw(chunk_spec, n, dtype, vocab)

    res = {}
    for side in ("ours", "ref"):
        Xs, Ws, bs = leaf_clone(X), leaf_clone(W), leaf_clone(b)
        out = ours_fn(Xs, Ws, bs, labels, extra, kw) if side == "ours" else ref_fn(Xs, Ws, bs, labels, extra)
        outs = out if isinstance(out, tuple) else (out,)
        weights = [random_weights(o.shape, seed=11 + k) for k, o in enumerate(outs)]
        loss = weighted_loss(outs, weights)
        res[side] = (outs, grads(loss, [Xs, Ws, bs]))
    return res["ours"], res["ref"], (X, W, b, labels, extra)


@pytest.mark.parametrize("chunk_spec", CHUNKS, ids=lambda c: f"chunk={c}")
@pytest.mark.parametrize("lead", list(LEADS.values()), ids=list(LEADS))
@pytest.mark.parametrize("case", list(CASES))
def test_parity_fp32(case, lead, chunk_spec):
    bias = chunk_spec in (7, None)  # bias on a subset of chunkings keeps the matrix small
    (o_outs, o_grads), (r_outs, r_grads), _ = run_pair(case, lead, chunk_spec, bias)
    assert len(o_outs) == len(r_outs)
    for k, (o, r) in enumerate(zip(o_outs, r_outs)):
        assert o.dtype == torch.float32, f"output {k} dtype {o.dtype}"
        assert_close_fp32(o, r, what=f"output {k}")
    for name, go, gr in zip(("dX", "dW", "db"), o_grads, r_grads):
        assert_close_fp32(go, gr, what=name)


@pytest.mark.parametrize("chunk_spec", [1, 7, "N", None], ids=lambda c: f"chunk={c}")
@pytest.mark.parametrize("case", list(CASES))
def test_parity_fp32_frozen_head(case, chunk_spec):
    """W and b frozen: the forward differentiates f and the backward only multiplies the upstream gradients in;
    outputs and dX as the full-logits reference's, no gradient for W or b."""
    (o_outs, o_grads), (r_outs, r_grads), _ = run_pair(case, (3, 5), chunk_spec, bias=True, frozen_head=True)
    for k, (o, r) in enumerate(zip(o_outs, r_outs)):
        assert_close_fp32(o, r, what=f"output {k}")
    assert o_grads[1] is None and o_grads[2] is None
    assert_close_fp32(o_grads[0], r_grads[0], what="dX")


@pytest.mark.parametrize("case", ["ce_mean", "logprobs_T_softcap_scale", "logprobs_and_entropy", "z_loss"])
def test_parity_fp32_bias_every_chunking(case):
    for chunk_spec in CHUNKS:
        (o_outs, o_grads), (r_outs, r_grads), _ = run_pair(case, (3, 5), chunk_spec, bias=True, seed=3)
        for o, r in zip(o_outs, r_outs):
            assert_close_fp32(o, r, what=f"{case} chunk={chunk_spec} out")
        for name, go, gr in zip(("dX", "dW", "db"), o_grads, r_grads):
            assert go is not None
            assert_close_fp32(go, gr, what=f"{case} chunk={chunk_spec} {name}")


@pytest.mark.parametrize("case", ["ce_mean", "logprobs", "logprobs_and_entropy", "mse_onehot"])
def test_parity_larger_vocab_and_values(case):
    """Bigger V and larger-magnitude X (peaked softmax) at an uneven chunking."""
    (o_outs, o_grads), (r_outs, r_grads), _ = run_pair(case, (4, 9), 5, bias=True, seed=5, x_scale=3.0,
                                                       vocab=777)
    for o, r in zip(o_outs, r_outs):
        assert_close_fp32(o, r, what="out")
    for name, go, gr in zip(("dX", "dW", "db"), o_grads, r_grads):
        assert_close_fp32(go, gr, what=name)


@pytest.mark.parametrize("chunk_size,expected", [(1, [1] * (13 + 12)), (7, [6, 7, 6]), (13, [13]), (18, [13])])
def test_chunk_sizes_seen_by_f(chunk_size, expected):
    """The forward sees every chunk, the short one first; the backward recomputes all but the last (its graph is
    kept from the forward), so with one chunk for all rows f runs once."""
    X, W, _, labels = make_inputs((13,), H, V)
    rec = ChunkRecorder(G.token_logprobs)
    chunked_linear(X, W, rec, labels, chunk_size=chunk_size).sum().backward()
    assert rec.rows == expected


def test_kept_graph_matches_recompute_and_survives_a_second_backward():
    """One chunk for all rows (the forward keeps f's graph) gives what several chunks (the last kept, the others
    recomputed) give; the kept graph is used once, so a second backward through the same output recomputes every
    chunk and gets the same gradient."""
    lead = (3, 7)
    X, W, b, labels = make_inputs(lead, H, V, bias=True)
    w = random_weights(lead, seed=7)
    f = functools.partial(G.token_logprobs_and_entropy, temperature=0.8)
    outs, got = {}, {}
    for chunk in (21, 4):
        Xs, Ws, bs = leaf_clone(X), leaf_clone(W), leaf_clone(b)
        lp, ent = chunked_linear(Xs, Ws, f, labels, bias=bs, chunk_size=chunk)
        got[chunk] = grads((lp * w).sum() + ent.sum(), [Xs, Ws, bs])
        outs[chunk] = (lp, ent)
    for a, r in zip(outs[21] + tuple(got[21]), outs[4] + tuple(got[4])):
        assert_close_fp32(a, r)
    for chunk in (21, 4):
        Xs = leaf_clone(X)
        lp, _ = chunked_linear(Xs, W, f, labels, bias=b, chunk_size=chunk)
        (lp * w).sum().backward(retain_graph=True)
        first = Xs.grad.clone()
        (lp * w).sum().backward()
        assert_close_fp32(Xs.grad, 2 * first)


# --------------------------------------------------------------------------------------------------
# which inputs require grad
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lead", [(13,), (3, 5)])
def test_frozen_weight(lead):
    X, W, b, labels = make_inputs(lead, H, V, bias=True)
    W.requires_grad_(False)
    b.requires_grad_(False)
    w = random_weights(lead)
    out = linear_token_logprobs(X, W, labels, bias=b, chunk_size=4)
    (out * w).sum().backward()
    assert W.grad is None and b.grad is None
    Xr = leaf_clone(X)
    (naive_apply(Xr, W, ref_token_logprobs, labels, bias=b) * w).sum().backward()
    assert_close_fp32(X.grad, Xr.grad, what="dX")


def test_x_not_requiring_grad():
    X, W, b, labels = make_inputs((3, 5), H, V, bias=True)
    X.requires_grad_(False)
    w = random_weights((3, 5))
    out = linear_cross_entropy(X, W, labels, bias=b, reduction="none", chunk_size=4)
    (out * w).sum().backward()
    assert X.grad is None
    Wr, br = leaf_clone(W), leaf_clone(b)
    (naive_apply(X, Wr, ref_cross_entropy, labels, bias=br) * w).sum().backward()
    assert_close_fp32(W.grad, Wr.grad, what="dW")
    assert_close_fp32(b.grad, br.grad, what="db")


def test_nothing_requires_grad():
    X, W, b, labels = make_inputs((13,), H, V, bias=True, requires_grad=False)
    out = linear_token_logprobs(X, W, labels, bias=b, chunk_size=4)
    assert not out.requires_grad
    assert_close_fp32(out, naive_apply(X, W, ref_token_logprobs, labels, bias=b))


def test_tied_weight_embedding_and_head():
    """W is also the input embedding (as in tied LMs): the total dW is the sum of both uses."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (3, 6), generator=g).to(DEVICE)
    proj = (torch.randn(H, H, generator=g) / 4).to(DEVICE)
    _, W, _, _ = make_inputs((1,), H, V, seed=4)
    labels = torch.randint(0, V, (3, 6), generator=g).to(DEVICE)
    w = random_weights((3, 6))

    def loss_fn(W, head):
        emb = F.embedding(ids, W)            # [3, 6, H]: W's first use
        hidden = torch.tanh(emb @ proj)       # X depends on W too
        lp = head(hidden, W)                  # W's second use
        return (lp * w).sum() + 0.1 * emb.pow(2).sum()

    Wo, Wr = leaf_clone(W), leaf_clone(W)
    loss_o = loss_fn(Wo, lambda Xh, Wt: linear_token_logprobs(Xh, Wt, labels, chunk_size=5))
    loss_r = loss_fn(Wr, lambda Xh, Wt: naive_apply(Xh, Wt, ref_token_logprobs, labels))
    loss_o.backward()
    loss_r.backward()
    assert_close_fp32(loss_o, loss_r, what="loss")
    assert_close_fp32(Wo.grad, Wr.grad, what="tied dW")


def test_gradient_accumulation_into_grad():
    """Two backward passes accumulate into .grad exactly like the naive path (dW is an ordinary gradient)."""
    X, W, b, labels = make_inputs((13,), H, V, bias=True)
    Xr, Wr, br = leaf_clone(X), leaf_clone(W), leaf_clone(b)
    for seed in (1, 2):
        w = random_weights((13,), seed=seed)
        (linear_token_logprobs(X, W, labels, bias=b, chunk_size=3) * w).sum().backward()
        (naive_apply(Xr, Wr, ref_token_logprobs, labels, bias=br) * w).sum().backward()
    for a, r, n in ((X.grad, Xr.grad, "dX"), (W.grad, Wr.grad, "dW"), (b.grad, br.grad, "db")):
        assert_close_fp32(a, r, what=n)


def test_weight_grad_hook_sees_one_gradient():
    X, W, _, labels = make_inputs((13,), H, V)
    seen = []
    W.register_hook(lambda g: seen.append(g.clone()))
    linear_token_logprobs(X, W, labels, chunk_size=4).sum().backward()
    assert len(seen) == 1 and seen[0].shape == W.shape
    assert torch.equal(seen[0], W.grad)


# --------------------------------------------------------------------------------------------------
# outputs that receive no gradient
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("used", ["logprobs", "entropy"])
def test_output_without_gradient(used):
    """(lp, ent) with only one of them in the loss (the other only logged): grads of that one only."""
    X, W, b, labels = make_inputs((3, 5), H, V, bias=True)
    labels = _with_ignored(labels)
    w = random_weights((3, 5))
    Xr, Wr, br = leaf_clone(X), leaf_clone(W), leaf_clone(b)
    lp, ent = linear_token_logprobs(X, W, labels, bias=b, with_entropy=True, ignore_index=-100, chunk_size=4)
    lp_r, ent_r = naive_apply(Xr, Wr, functools.partial(ref_logprobs_and_entropy, ignore_index=-100), labels,
                              bias=br)
    logged = float((ent if used == "logprobs" else lp).detach().mean())  # used outside the loss
    assert logged == pytest.approx(float((ent_r if used == "logprobs" else lp_r).detach().mean()), rel=1e-5)
    ((lp if used == "logprobs" else ent) * w).sum().backward()
    ((lp_r if used == "logprobs" else ent_r) * w).sum().backward()
    for a, r, n in ((X.grad, Xr.grad, "dX"), (W.grad, Wr.grad, "dW"), (b.grad, br.grad, "db")):
        assert_close_fp32(a, r, what=n)


def test_grad_wrt_only_one_output_via_autograd_grad():
    X, W, _, labels = make_inputs((13,), H, V)
    lp, ent = linear_token_logprobs(X, W, labels, with_entropy=True, chunk_size=6)
    dX, dW = torch.autograd.grad(ent.sum(), [X, W])
    Xr, Wr = leaf_clone(X), leaf_clone(W)
    ent_r = naive_apply(Xr, Wr, ref_entropy)
    dXr, dWr = torch.autograd.grad(ent_r.sum(), [Xr, Wr])
    assert_close_fp32(dX, dXr, what="dX")
    assert_close_fp32(dW, dWr, what="dW")


def test_upstream_gradient_scales_linearly():
    """A pure check of the upstream-gradient multiplication: weights 3·w give 3× the gradients of w."""
    X, W, _, labels = make_inputs((13,), H, V)
    w = random_weights((13,))
    g1 = torch.autograd.grad((linear_token_logprobs(X, W, labels, chunk_size=4) * w).sum(), [X, W])
    g3 = torch.autograd.grad((linear_token_logprobs(X, W, labels, chunk_size=4) * (3 * w)).sum(), [X, W])
    for a, b in zip(g1, g3):
        assert_close_fp32(3 * a, b)


# --------------------------------------------------------------------------------------------------
# low precision: ours is as accurate as the naive half-precision path (vs a float64 reference)
# --------------------------------------------------------------------------------------------------

LOWP_CASES = ["ce_mean", "ce_none", "logprobs_T_softcap_scale", "logprobs_and_entropy", "mse_onehot",
              "kl_to_reference", "z_loss", "entropy"]


def _lowp_check(case, dtype, eps, lead, chunk, vocab=V, frozen_head=False, spread=False):
    """``spread``: upstream gradients whose sizes span six orders of magnitude from row to row, and the errors are
    measured row by row (each row's error relative to that row's largest exact value)."""
    ours_fn, ref_fn, ignore = CASES[case]
    X, W, b, labels = make_inputs(lead, H, vocab, dtype=dtype, bias=True, seed=2, scale=2.0)
    if frozen_head:
        W.requires_grad_(False)
        b.requires_grad_(False)
    if ignore:
        labels = _with_ignored(labels)
    extra = _kl_extra(lead) if case == "kl_to_reference" else []
    results = {}
    for side, dt in (("ours", dtype), ("naive", dtype), ("exact", torch.float64)):
        Xs, Ws, bs = leaf_clone(X, dt), leaf_clone(W, dt), leaf_clone(b, dt)
        if side == "ours":
            out = ours_fn(Xs, Ws, bs, labels, extra, {"chunk_size": chunk})
        else:
            out = ref_fn(Xs, Ws, bs, labels, extra)
        outs = out if isinstance(out, tuple) else (out,)
        if side == "ours":
            for o in outs:
                assert o.dtype == torch.float32, "built-in f's upcast: outputs are float32"
        weights = [random_weights(o.shape, seed=11 + k, dtype=torch.float64) for k, o in enumerate(outs)]
        if spread:
            weights = [w * 10.0 ** torch.linspace(-3, 3, w.numel(), dtype=torch.float64, device=w.device)
                       .view(w.shape) for w in weights]
        g = grads(weighted_loss(outs, weights), [Xs, Ws, bs])
        if side == "ours":
            assert all(t is None if frozen_head and i else t.dtype == dtype for i, t in enumerate(g))
        results[side] = (outs, g)
    for k in range(len(results["ours"][0])):
        assert_low_precision(results["ours"][0][k], results["naive"][0][k], results["exact"][0][k], eps,
                             what=f"{case} output {k}")
    for i, name in enumerate(("dX", "dW", "db")):
        assert_low_precision(results["ours"][1][i], results["naive"][1][i], results["exact"][1][i], eps,
                             what=f"{case} {name}")
    if spread:  # row by row: a row with a tiny upstream gradient is as accurate as one with a large one
        rows = [t.reshape(-1, t.shape[-1]) for t in (results[k][1][0] for k in ("ours", "naive", "exact"))]
        for r, (o, nv, ex) in enumerate(zip(*rows)):
            assert_low_precision(o, nv, ex, eps, what=f"{case} dX row {r}")


@pytest.mark.parametrize("chunk", [1, None])
@pytest.mark.parametrize("lead", [(13,), (3, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("case", LOWP_CASES)
def test_parity_bf16(case, lead, chunk):
    _lowp_check(case, torch.bfloat16, BF16_EPS, lead, chunk)


@pytest.mark.parametrize("chunk", [1, None])
@pytest.mark.parametrize("case", LOWP_CASES)
def test_parity_bf16_frozen_head(case, chunk):
    """A frozen head with bf16 GEMMs: gradients formed in the forward (the upstream gradient multiplied in after the
    GEMM), as accurate as autograd against float64."""
    _lowp_check(case, torch.bfloat16, BF16_EPS, (3, 5), chunk, frozen_head=True)


@pytest.mark.parametrize("case", LOWP_CASES)
def test_parity_fp16_frozen_head(case):
    _lowp_check(case, torch.float16, FP16_EPS, (3, 5), 4, frozen_head=True)


@pytest.mark.parametrize("dtype, eps", [(torch.bfloat16, BF16_EPS), (torch.float16, FP16_EPS)], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", ["logprobs_T_softcap_scale", "ce_none"])
def test_frozen_head_half_precision_upstream_gradients_of_every_size(case, dtype, eps):
    """Per-row upstream gradients from 1e-3 to 1e3 (GRPO's advantages times the loss weights): each row's dX is as
    accurate as autograd's for that row, so multiplying the gradient in after the GEMM loses nothing on small rows."""
    _lowp_check(case, dtype, eps, (24,), 5, frozen_head=True, spread=True)


@pytest.mark.parametrize("case", LOWP_CASES)
def test_parity_fp16(case):
    _lowp_check(case, torch.float16, FP16_EPS, (3, 5), 4)


def test_bf16_large_vocab_dw_accumulation():
    """Many chunks (N=48 rows, chunk 1): dW summed over 48 chunk contributions stays as accurate as naive."""
    _lowp_check("logprobs_T_softcap_scale", torch.bfloat16, BF16_EPS, (48,), 1, vocab=256)


def test_bf16_dw_accumulated_in_fp32_across_chunks():
    """dW sums one contribution per chunk; they must be accumulated in float32, not rounded to bf16 each.

    Built to cancel: 64 rows share one x, and the per-row dZ rows come in pairs (u, -u ± 2^-7), so
    dW = (Σ_r dZ_r) ⊗ x is small while every term is ~1. Rounding each chunk's term to bf16 (error ~2^-9 per
    term) would leave an error of tens of percent; an fp32 sum rounded once is within half a bf16 ulp.
    """
    n, h, v = 64, 8, 16
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(h, generator=g) + 1).to(DEVICE, torch.bfloat16)
    X = x.expand(n, h).clone().requires_grad_(True)
    W = torch.randn(v, h, generator=g).to(DEVICE, torch.bfloat16).requires_grad_(True)
    u = (torch.rand(n // 2, v, generator=g) * 0.9 + 1).to(torch.bfloat16).float()  # bf16 values in [1, 2)
    delta = torch.where(torch.rand(n // 2, v, generator=g) < 0.5, -1.0, 1.0) * 2.0 ** -7
    c = torch.stack([u, -u + delta], 1).reshape(n, v).to(DEVICE)               # exactly representable
    assert torch.equal(c.to(torch.bfloat16).float(), c)

    def f(z, c):  # dZ = c exactly (upstream gradient 1)
        return (z.float() * c).sum(-1)

    out = chunked_linear(X, W, f, c, chunk_size=1)
    dX, dW = torch.autograd.grad(out.sum(), [X, W])
    exact = c.double().sum(0)[:, None] * x.double()[None, :]                   # [V, H]
    # within half an ulp of bf16, element by element
    assert ((dW.double() - exact).abs() <= exact.abs() * 2.0 ** -8 + 1e-12).all(), (dW, exact)
    Xn, Wn = leaf_clone(X), leaf_clone(W)
    dXn, dWn = torch.autograd.grad(naive_apply(Xn, Wn, f, c).sum(), [Xn, Wn])
    assert rel_err(dW, exact) <= 2 * rel_err(dWn, exact) + 2.0 ** -9
    assert torch.equal(dX, dXn)


# --------------------------------------------------------------------------------------------------
# autocast: float32 X and W, bf16 GEMMs (as a model's lm_head under mixed precision)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 4, None])
def test_autocast_gemm_dtype_and_gradients(chunk):
    """Under bf16 autocast on DEVICE f receives bf16 logits (the GEMM ran in bf16, as ``F.linear`` does there),
    outputs equal the naive autocast path's, dX is formed as autograd of ``F.linear`` forms it (bf16, then float32),
    and with ``fp32_grad_input`` from the same bf16 operands into float32. dW: float32 accumulation of the bf16
    products."""
    X, W, _, labels = make_inputs((13,), H, V, seed=3, scale=2.0)
    w_out = random_weights((13,), seed=5)
    seen = []

    def f(z, lab):
        seen.append(z.dtype)
        return G.token_logprobs(z, lab, temperature=0.7)

    res = {}
    for side in ("naive", "ours", "ours_fp32_dx"):
        Xs, Ws = leaf_clone(X), leaf_clone(W)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            if side == "naive":
                z = F.linear(Xs, Ws)
                z.retain_grad()
                out = ref_token_logprobs(z, labels, temperature=0.7)
            else:
                out = chunked_linear(Xs, Ws, f, labels, chunk_size=chunk, fp32_grad_input=side == "ours_fp32_dx")
        dX, dW = torch.autograd.grad((out * w_out).sum(), [Xs, Ws]) if side != "naive" else (None, None)
        if side == "naive":
            (out * w_out).sum().backward()
            dX, dW, dz = Xs.grad, Ws.grad, z.grad
            assert z.dtype == torch.bfloat16 and dz.dtype == torch.bfloat16
        assert dX.dtype == torch.float32 and dW.dtype == torch.float32
        res[side] = (out, dX, dW)
    assert seen and set(seen) == {torch.bfloat16}
    out_n, dX_n, dW_n = res["naive"]
    for side in ("ours", "ours_fp32_dx"):
        torch.testing.assert_close(res[side][0], out_n, rtol=1e-6, atol=1e-6)
    # dX as autograd of F.linear forms it: a bf16 GEMM (here one per chunk), then float32. The reference is the same
    # per-chunk bf16 GEMMs of the naive dZ: on CUDA cuBLAS picks its kernel (and may reduce in bf16) by the GEMM's
    # shape, so 1- or 4-row GEMMs round differently from the 13-row one (seen on an H200: 1 bf16 ulp, up to 4e-3).
    step = chunk or X.shape[0]
    W_bf16 = W.to(torch.bfloat16)
    want_dx16 = torch.cat([dz[s:s + step].clone() @ W_bf16 for s in range(0, X.shape[0], step)]).float()
    torch.testing.assert_close(res["ours"][1], want_dx16, rtol=1e-6, atol=1e-7)
    if DEVICE.type == "cpu" or step == X.shape[0]:  # one GEMM shape: the naive dX itself, bit for bit
        torch.testing.assert_close(res["ours"][1], dX_n, rtol=1e-6, atol=1e-7)
    else:  # within bf16 GEMM rounding of it
        torch.testing.assert_close(res["ours"][1], dX_n, rtol=2e-2, atol=1e-2)
    W16 = W.to(torch.bfloat16).float()
    X16 = X.to(torch.bfloat16).float()
    want_dx = dz.float() @ W16  # bf16 operands, float32 result
    torch.testing.assert_close(res["ours_fp32_dx"][1], want_dx, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(res["ours_fp32_dx"][1], dX_n, rtol=1e-6, atol=0)  # the two modes do differ
    want_dw = dz.float().t() @ X16
    for side in ("ours", "ours_fp32_dx"):
        torch.testing.assert_close(res[side][2], want_dw, rtol=1e-5, atol=1e-6)
    assert rel_err(dW_n, want_dw) > 0  # the naive path rounds dW to bf16; ours does not


@pytest.mark.parametrize("fp32_dx", [False, True], ids=["bf16_dx", "fp32_dx"])
@pytest.mark.parametrize("chunk", [1, 4, None])
def test_autocast_frozen_head(chunk, fp32_dx):
    """Under bf16 autocast with W frozen (a LoRA policy's head under mixed precision): f sees bf16 logits, outputs
    equal the naive autocast path's, dX is the naive dX within bf16 rounding, in float32."""
    X, W, _, labels = make_inputs((13,), H, V, seed=3, scale=2.0)
    W.requires_grad_(False)
    w_out = random_weights((13,), seed=5)
    seen = []

    def f(z, lab):
        seen.append(z.dtype)
        return G.token_logprobs(z, lab, temperature=0.7)

    Xn, Xo = leaf_clone(X), leaf_clone(X)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out_n = ref_token_logprobs(F.linear(Xn, W), labels, temperature=0.7)
        out_o = chunked_linear(Xo, W, f, labels, chunk_size=chunk, fp32_grad_input=fp32_dx)
    (dX_n,) = torch.autograd.grad((out_n * w_out).sum(), [Xn])
    (dX_o,) = torch.autograd.grad((out_o * w_out).sum(), [Xo])
    assert seen and set(seen) == {torch.bfloat16}
    assert dX_o.dtype == torch.float32
    torch.testing.assert_close(out_o, out_n, rtol=1e-6, atol=1e-6)
    assert rel_err(dX_o, dX_n) <= 2.0 ** -7, rel_err(dX_o, dX_n)


def _rms(a: torch.Tensor, e: torch.Tensor) -> float:
    return float(((a.double() - e) ** 2).mean().sqrt() / (e ** 2).mean().sqrt().clamp_min(1e-300))


@pytest.mark.parametrize("mode", ["bf16", "fp16", "autocast_bf16"])
@pytest.mark.parametrize("case", ["logprobs_T_softcap", "ce_ignored"])
def test_frozen_head_half_precision_dx_at_most_twice_autograds_error(case, mode):
    """The frozen head's gradients-in-the-forward path in half precision (or under bf16 autocast), at a size where a
    few lucky roundings do not decide (96 rows, H=256, V=4096, uneven chunks, upstream gradients from 1e-3 to 1e3):
    against a float64 reference its dX error is at most 2x that of unpatched autograd in the same precision, over
    the whole dX (largest error) and row by row (RMS), with no slack term."""
    n, h, v = 96, 256, 4096
    gen = torch.Generator().manual_seed(7)
    X = (torch.randn(n, h, generator=gen, dtype=torch.float64) * 2).to(DEVICE)
    W = (torch.randn(v, h, generator=gen, dtype=torch.float64) / 16).to(DEVICE)
    labels = torch.randint(0, v, (n,), generator=gen).to(DEVICE)
    g = (torch.randn(n, generator=gen, dtype=torch.float64) * 10.0 ** torch.linspace(-3, 3, n, dtype=torch.float64)
         ).to(DEVICE)
    if case == "ce_ignored":
        labels[::3] = -100
        ours_f, ref_f = functools.partial(G.cross_entropy, ignore_index=-100), functools.partial(
            ref_cross_entropy, ignore_index=-100)
    else:
        ours_f = functools.partial(G.token_logprobs, temperature=0.7, softcap=30.0)
        ref_f = functools.partial(ref_token_logprobs, temperature=0.7, softcap=30.0)
    half = torch.float16 if mode == "fp16" else torch.bfloat16
    store = torch.float32 if mode.startswith("autocast") else half
    dx = {}
    for side in ("ours", "naive", "exact"):
        dt = torch.float64 if side == "exact" else store
        Xs = X.to(dt).requires_grad_(True)
        Ws = W.to(dt)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=mode.startswith("autocast") and side != "exact"):
            out = chunked_linear(Xs, Ws, ours_f, labels, chunk_size=40) if side == "ours" else ref_f(F.linear(Xs, Ws),
                                                                                                     labels)
        (out * g.to(out.dtype)).sum().backward()
        dx[side] = Xs.grad.double()
    exact = dx["exact"]
    assert rel_err(dx["ours"], exact) <= 2 * rel_err(dx["naive"], exact)
    for r in range(n):
        if exact[r].abs().max() > 0:
            assert _rms(dx["ours"][r], exact[r]) <= 2 * _rms(dx["naive"][r], exact[r]), f"row {r}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_frozen_head_recomputes_no_chunk_in_any_dtype(dtype):
    """A frozen head differentiates f in the forward in every dtype: f runs once per chunk (no recompute in the
    backward); dX equals autograd's in float32 and is as accurate as autograd's against float64 in half precision."""
    X, W, _, labels = make_inputs((10,), H, V, dtype=dtype, seed=4, scale=2.0)
    W.requires_grad_(False)
    w = random_weights((10,), seed=6)
    rec = ChunkRecorder(G.token_logprobs)
    (dX,) = torch.autograd.grad((chunked_linear(X, W, rec, labels, chunk_size=4) * w).sum(), [X])
    assert rec.rows == [2, 4, 4]
    assert dX.dtype == dtype
    Xr = leaf_clone(X)
    (dXr,) = torch.autograd.grad((naive_apply(Xr, W, ref_token_logprobs, labels) * w).sum(), [Xr])
    if dtype == torch.float32:
        assert_close_fp32(dX, dXr, what="dX")
    else:
        Xe = leaf_clone(X, torch.float64)
        (dXe,) = torch.autograd.grad((naive_apply(Xe, W.double(), ref_token_logprobs, labels) * w.double()).sum(), [Xe])
        assert_low_precision(dX, dXr, dXe, BF16_EPS if dtype == torch.bfloat16 else FP16_EPS, what="dX")
