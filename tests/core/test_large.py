"""N·V above 2³¹ elements: 17,000 rows × a 128,256-way head (2.18e9 logits), at H=8 so it runs on the CPU.

The [N, V] logits are never formed (by grpo_mel, and not by the reference either: 8.7 GB in float32). The float64
reference is exact and cheap because X has only ``P`` distinct rows (``X = base[idx]``, ``idx`` random): every row
of one class shares its softmax ``p_r``, so with per-row labels ``y_i`` and upstream gradients ``g_i``

    log-prob_i = log p_{idx_i}[y_i]
    dX_i       = g_i · (W[y_i] − p_{idx_i}·W)
    dW         = Σ_i g_i · e_{y_i} x_iᵀ − Σ_r (Σ_{i in r} g_i) · p_r x_rᵀ

need ``P`` softmaxes only. Labels and upstream gradients differ on every row, so a row written to the wrong place, a
chunk skipped or counted twice, or an offset that wrapped at 2³¹ changes outputs, dX or dW. Outputs and dX are
compared on every row, dW whole.

Paths: a trained head with the planner's chunk (49 rows at the CPU default budget): the forward under ``no_grad``,
the kept last chunk (its rows sit past 2³¹ elements) and the recompute of the other 346 chunks in the backward, with
an entropy that is only logged (GRPO's case); a frozen head (LoRA), whose forward forms dX ahead and whose backward
recomputes nothing (60-row chunks, a short first one). The TRL patch's row handling at this size is
tests/integrations/test_trl_large.py.

Tolerance: 3x the error of full float32 logits on 256 sampled rows, i.e. as accurate as a naive fp32 head (sums over
128,256 terms round; measured for grpo_mel over all rows: entropy 4.2e-6, dX 1.4e-5, dW 1.2e-5 of the largest
magnitude), dW 5e-5. A misplaced row is an O(1) error. 23 s on this 2-core CPU at a load of 1 (34 + 12 s of CPU).

Read for 32-bit sizes (grpo_mel/linear.py, _linear_grads.py, _grads_ahead.py, _chunk_graph.py, planning.py,
functions.py, integrations/trl_grpo.py): row bounds and chunk sizes are Python ints, labels are widened with
``.long()`` before ``gather``, buffers are allocated by shape; no ``int32`` / ``.int()`` anywhere.
"""

from __future__ import annotations

import math

import pytest
import torch

from grpo_mel import chunked_linear, plan_chunk_size
from grpo_mel import functions as G
from grpo_mel.planning import DEFAULT_CPU_BUDGET_BYTES, bytes_per_row

from .conftest import ChunkRecorder

pytestmark = pytest.mark.slow

N, V, H, P = 17_000, 128_256, 8, 61
assert N * V > 2**31


@pytest.fixture(scope="module")
def case():
    """X (float32, rows from ``P`` classes), W, labels, upstream gradients, and the exact float64 answers."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(P, H, generator=g, dtype=torch.float64)
    idx = torch.randint(0, P, (N,), generator=g)
    W = torch.randn(V, H, generator=g, dtype=torch.float64) * (3.0 / math.sqrt(H))  # a few nats of spread
    labels = torch.randint(0, V, (N,), generator=g)
    labels[-1], labels[0] = V - 1, 0  # the vocabulary's last and first rows of dW get a one-hot term
    up = torch.randn(N, generator=g, dtype=torch.float64)

    logp = torch.log_softmax(base @ W.T, -1)  # [P, V]
    p = logp.exp()
    X = base[idx]
    ref = dict(
        logp=logp[idx, labels],
        entropy=(-(p * logp).sum(-1))[idx],
        dX=up[:, None] * (W[labels] - (p @ W)[idx]),
        dW=torch.zeros(V, H, dtype=torch.float64).index_add_(0, labels, up[:, None] * X)
        - p.T @ (torch.zeros(P, dtype=torch.float64).index_add_(0, idx, up)[:, None] * base),
    )
    # full float32 logits on a sample of rows: the error a naive fp32 head makes (sums over V terms round)
    rows = torch.randperm(N, generator=g)[:256]
    x = X[rows].float().requires_grad_(True)
    logp32 = torch.log_softmax(x @ W.float().T, -1)
    lp32 = logp32.gather(-1, labels[rows, None]).squeeze(-1)
    lp32.backward(up[rows].float())
    naive = dict(logp=_rel(lp32.detach(), ref["logp"][rows]), dX=_rel(x.grad, ref["dX"][rows]),
                 entropy=_rel((-(logp32.exp() * logp32).sum(-1)).detach(), ref["entropy"][rows]))
    del logp, p, logp32
    return dict(X=X.float(), W=W.float(), labels=labels, up=up.float(), ref=ref, naive=naive)


def _rel(actual, exact):
    return float((actual.double() - exact).abs().max() / exact.abs().max())


def _check(name, actual, case, tol=None):
    """Every element within ``tol`` of the largest exact magnitude; by default 3x the naive float32 head's error on
    the sampled rows (+1e-7), i.e. as accurate as full fp32 logits."""
    exact = case["ref"][name]
    assert actual.shape == exact.shape, name
    tol = 3 * case["naive"][name] + 1e-7 if tol is None else tol
    err = _rel(actual, exact)
    assert err <= tol, f"{name}: max error {err:.3g} of the largest magnitude > {tol:.3g}"


def test_planner_at_this_size():
    rows = plan_chunk_size(N, V, torch.float32, "cpu")
    assert rows == DEFAULT_CPU_BUDGET_BYTES // (V * (4 + 3 * 4)) == 49
    # budgets that allow a chunk past 2**31 elements: the count is exact, clamped to N, never wrapped or negative
    for budget, dtype in ((2**40, torch.float32), (64 * 2**30, torch.bfloat16), (2.0**45, torch.float64)):
        want = min(N, int(budget // bytes_per_row(V, dtype)))
        assert plan_chunk_size(N, V, dtype, "cpu", memory_budget=budget) == want == N
    assert plan_chunk_size(2**40, 262_144, torch.bfloat16, "cpu", memory_budget=2**44) == 2**44 // (262_144 * 14)


def test_trained_head_planner_kept_chunk_and_recompute(case):
    X = case["X"].clone().requires_grad_(True)
    W = case["W"].clone().requires_grad_(True)
    rec = ChunkRecorder(G.token_logprobs_and_entropy)
    logp, ent = chunked_linear(X, W, rec, case["labels"])  # chunk from the planner: 49 rows
    fwd_rows = list(rec.rows)
    assert sum(fwd_rows) == N and fwd_rows[-1] == 49 and len(fwd_rows) == math.ceil(N / 49)
    logp.backward(case["up"])  # the entropy gets no gradient (only logged, as in GRPO)
    # the backward recomputed every chunk but the kept last one
    assert sum(rec.rows[len(fwd_rows):]) == N - 49
    _check("logp", logp.detach(), case)
    _check("entropy", ent.detach(), case)
    _check("dX", X.grad, case)
    _check("dW", W.grad, case, tol=5e-5)  # fp32 sums over 17,000 rows; measured 1.2e-5


def test_frozen_head_gradients_ahead(case):
    X = case["X"].clone().requires_grad_(True)
    rec = ChunkRecorder(G.token_logprobs)
    logp = chunked_linear(X, case["W"], rec, case["labels"], chunk_size=60)
    assert rec.rows[0] == N % 60 and sum(rec.rows) == N
    n_fwd = len(rec.rows)
    logp.backward(case["up"])
    assert len(rec.rows) == n_fwd, "the frozen head's backward recomputed a chunk"
    _check("logp", logp.detach(), case)
    _check("dX", X.grad, case)
