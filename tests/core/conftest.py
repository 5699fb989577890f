"""Naive, full-logits reference for the core tests.

Everything here is plain torch and deliberately independent of ``grpo_mel``: the logits are formed in
full (``z = X @ W.T + b``), upcast, handed to a reference ``f`` written here from the textbook
formulas (``log_softmax``, ``F.cross_entropy``, ``F.mse_loss`` ...), and autograd differentiates the
whole graph. The chunked path is compared against it.

The reference ``f``'s upcast with :func:`upcast` (float32 for half dtypes, unchanged for float64), so the
same reference runs in float64 as the "exact" answer for bf16/fp16 error comparisons.

Test modules import the helpers with ``from .conftest import ...`` (tests/core is a package). The seed
notebook's own functions (``transformation_function``, ``mse_loss_function``, ``NaiveLinear``) are ported at the
end: test_seed_convention.py and test_memory.py compare with them.

``GRPO_MEL_TEST_DEVICE`` (default ``cpu``) is the device the builders here put their tensors on, e.g.
``GRPO_MEL_TEST_DEVICE=cuda pytest tests/core/test_parity.py`` runs the parity tests on a GPU. Values are
drawn on the CPU first (seeded CPU generators) and then moved, so every device sees the same inputs. Only
``test_parity.py`` builds all its tensors through :data:`DEVICE`; on another device the other modules here
are skipped (with that reason), not run half on the CPU.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

DEVICE = torch.device(os.environ.get("GRPO_MEL_TEST_DEVICE", "cpu"))
#: the modules whose tensors all go through DEVICE; the others are CPU-only and skipped on another device
DEVICE_AWARE = {"test_parity.py"}


def pytest_configure(config):
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"GRPO_MEL_TEST_DEVICE={DEVICE}: torch.cuda.is_available() is False")


def pytest_collection_modifyitems(config, items):
    if DEVICE.type == "cpu":
        return
    skip = pytest.mark.skip(reason=f"GRPO_MEL_TEST_DEVICE={DEVICE}: this module builds CPU tensors; "
                                   f"only {sorted(DEVICE_AWARE)} run on another device")
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        path = str(item.path)
        if os.path.dirname(path) == here and os.path.basename(path) not in DEVICE_AWARE:
            item.add_marker(skip)


# --------------------------------------------------------------------------------------------------
# reference transformation functions (on the FULL logits)
# --------------------------------------------------------------------------------------------------

def upcast(z: torch.Tensor) -> torch.Tensor:
    """float32 for fp16/bf16/fp32, float64 stays float64 (for the exact reference)."""
    return z.to(torch.promote_types(z.dtype, torch.float32))


def ref_scaled(z, temperature=1.0, softcap=None, logit_scale=1.0):
    """Logits as the model/TRL see them: ``z*scale`` -> ``softcap*tanh(/softcap)`` -> ``/T``."""
    z = upcast(z) * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def ref_token_logprobs(z, labels, temperature=1.0, softcap=None, logit_scale=1.0, ignore_index=None):
    logp = torch.log_softmax(ref_scaled(z, temperature, softcap, logit_scale), dim=-1)
    labels = labels.long()
    if ignore_index is None:
        return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    valid = labels != ignore_index
    lp = logp.gather(-1, torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, lp, torch.zeros_like(lp))


def ref_entropy(z, temperature=1.0, softcap=None, logit_scale=1.0):
    logp = torch.log_softmax(ref_scaled(z, temperature, softcap, logit_scale), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def ref_logprobs_and_entropy(z, labels, temperature=1.0, softcap=None, logit_scale=1.0, ignore_index=None):
    return (
        ref_token_logprobs(z, labels, temperature, softcap, logit_scale, ignore_index),
        ref_entropy(z, temperature, softcap, logit_scale),
    )


def ref_cross_entropy(z, labels, ignore_index=-100, label_smoothing=0.0, softcap=None, logit_scale=1.0):
    return F.cross_entropy(ref_scaled(z, softcap=softcap, logit_scale=logit_scale), labels.long(),
                           ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)


def ref_mse_onehot(z, labels):
    zf = upcast(z)
    onehot = F.one_hot(labels.long(), zf.shape[-1]).to(zf.dtype)
    return F.mse_loss(zf, onehot, reduction="none").mean(-1)


def ref_kl(z, labels, ref_logprobs, temperature=1.0):
    lp = ref_token_logprobs(z, labels, temperature=temperature)
    d = ref_logprobs.to(lp.dtype) - lp
    return d.exp() - d - 1


def ref_z_loss(z):
    return torch.logsumexp(upcast(z), dim=-1) ** 2


# --------------------------------------------------------------------------------------------------
# the naive full-logits forward
# --------------------------------------------------------------------------------------------------

def naive_logits(X: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``X @ W.T + b`` over all rows at once, in X's dtype, any leading dims.

    Formed with ``F.linear`` (what an ``nn.Linear`` LM head runs): in bf16/fp16 the bias is added before
    the single rounding to the half dtype. ``X @ W.T + b`` would round twice, which is a different (and
    less accurate) naive baseline; with ``exp`` in f (kl_to_reference) that difference alone can be
    amplified beyond a 2x error budget.
    """
    return F.linear(X, W, b)


def naive_apply(X, W, f: Callable, *row_args, bias=None):
    """``f`` on the full logits ``[N, V]`` (leading dims flattened), outputs reshaped back like chunked_linear."""
    lead = X.shape[:-1]
    n = math.prod(lead)
    z = naive_logits(X.reshape(n, X.shape[-1]), W, bias)
    args = [a.reshape(n, *a.shape[len(lead):]) for a in row_args]
    out = f(z, *args)
    outs = out if isinstance(out, tuple) else (out,)
    outs = tuple(o if o.dim() == 0 else o.reshape(*lead, *o.shape[1:]) for o in outs)
    return outs if isinstance(out, tuple) else outs[0]


# --------------------------------------------------------------------------------------------------
# data and gradient helpers
# --------------------------------------------------------------------------------------------------

def make_inputs(lead=(13,), H=16, V=50, dtype=torch.float32, bias=False, seed=0, scale=1.0,
                requires_grad=True):
    """Random X [*lead, H], W [V, H], b [V] (leaves), labels [*lead], on :data:`DEVICE`."""
    g = torch.Generator().manual_seed(seed)
    X = (torch.randn(*lead, H, generator=g, dtype=torch.float64) * scale).to(DEVICE, dtype)
    W = (torch.randn(V, H, generator=g, dtype=torch.float64) / math.sqrt(H)).to(DEVICE, dtype)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.5).to(DEVICE, dtype) if bias else None
    labels = torch.randint(0, V, lead, generator=g).to(DEVICE)
    if requires_grad:
        X.requires_grad_(True)
        W.requires_grad_(True)
        if b is not None:
            b.requires_grad_(True)
    return X, W, b, labels


def leaf_clone(t: torch.Tensor | None, dtype=None) -> torch.Tensor | None:
    """A fresh leaf with the same values (and requires_grad) as ``t``, optionally cast."""
    if t is None:
        return None
    c = t.detach().clone()
    if dtype is not None:
        c = c.to(dtype)
    return c.requires_grad_(t.requires_grad)


def random_weights(shape, seed=1, dtype=torch.float32):
    """Upstream per-output weights (the gradient each output receives): random, not all ones, on :data:`DEVICE`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=g, dtype=torch.float64).to(DEVICE, dtype)


def weighted_loss(outs, weights: Sequence[torch.Tensor | None]):
    """``Σ_k (out_k · w_k).sum()``; a None weight leaves that output out of the loss (it gets no gradient)."""
    outs = outs if isinstance(outs, tuple) else (outs,)
    total = None
    for o, w in zip(outs, weights):
        if w is None:
            continue
        term = (o * w.to(o.dtype)).sum() if o.dim() > 0 else o * w.to(o.dtype)
        total = term if total is None else total + term
    return total


def grads(loss: torch.Tensor, inputs: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """``d loss / d input`` for each input that requires grad (None for the others)."""
    idx = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]
    got = torch.autograd.grad(loss, [inputs[i] for i in idx], allow_unused=True)
    res: list[torch.Tensor | None] = [None] * len(inputs)
    for i, gi in zip(idx, got):
        res[i] = gi
    return res


# --------------------------------------------------------------------------------------------------
# comparisons
# --------------------------------------------------------------------------------------------------

def assert_close_fp32(actual, expected, rtol=1e-5, atol=1e-6, what=""):
    """fp32 parity: rtol 1e-5, atol 1e-6 scaled by the reference's magnitude (sums over many rows)."""
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{what}: one gradient is None ({actual is None}, {expected is None})"
        return
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual.detach().to(expected.dtype), expected.detach(), rtol=rtol,
                               atol=atol * scale, equal_nan=True, msg=lambda m: f"{what}: {m}")


def rel_err(actual: torch.Tensor, exact: torch.Tensor) -> float:
    """max |actual - exact| / max |exact| (in float64)."""
    a, e = actual.detach().double(), exact.detach().double()
    if e.numel() == 0:
        return 0.0
    return float((a - e).abs().max()) / max(float(e.abs().max()), 1e-30)


#: bf16 has an 8-bit significand: half an ulp of the largest magnitude, relative.
BF16_EPS = 2.0 ** -8
FP16_EPS = 2.0 ** -11


def assert_low_precision(ours, naive_lp, exact, eps, factor=2.0, what=""):
    """Ours (half precision, chunked) is no less accurate than the naive half-precision path:
    ``err(ours) <= factor * err(naive) + eps`` with errors measured against an exact float64 reference."""
    if exact is None:
        assert ours is None and naive_lp is None, what
        return
    assert ours.shape == exact.shape, what
    e_ours, e_naive = rel_err(ours, exact), rel_err(naive_lp, exact)
    assert e_ours <= factor * e_naive + eps, f"{what}: err(ours)={e_ours:.3g} > {factor}*err(naive)={e_naive:.3g} + {eps:.3g}"


class ChunkRecorder:
    """Wraps an f and records the row count of every chunk it sees (forward and backward)."""

    def __init__(self, f):
        self.f = f
        self.rows: list[int] = []

    def __call__(self, z, *args):
        self.rows.append(z.shape[0])
        return self.f(z, *args)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# ----------------------------------------------------------------------------- ported from the seed

def transformation_function(batch, linear, labels):
    x = linear(batch).float()  # Up projection to large space
    down_projection_function = torch.nn.CrossEntropyLoss(reduction="mean")
    # Down projection to small space
    loss = down_projection_function(x.view(-1, x.shape[-1]), labels.view(-1))
    return loss


def mse_loss_function(batch, linear, labels):
    """Alternative loss function using MSE loss instead of cross-entropy."""
    x = linear(batch).float()
    one_hot_labels = torch.zeros((labels.view(-1).size(0), linear.weight.size(0)), device=labels.device)
    one_hot_labels.scatter_(1, labels.view(-1, 1), 1)
    loss_fn = torch.nn.MSELoss(reduction="mean")
    loss = loss_fn(x.view(-1, x.shape[-1]), one_hot_labels)
    return loss


class NaiveLinear(torch.autograd.Function):
    """The seed's NaiveLinear (full logits, recomputed in backward), with dX computed on a detached copy."""

    @staticmethod
    def forward(ctx, X, linear, labels, forward_function):
        with torch.no_grad():
            loss = forward_function(X, linear, labels)
        ctx.save_for_backward(X, labels)
        ctx.linear = linear
        ctx.forward_function = forward_function
        return loss

    @staticmethod
    def backward(ctx, dY):
        X, labels = ctx.saved_tensors
        linear = ctx.linear
        with torch.enable_grad():
            Xd = X.detach().requires_grad_(True)
            linear.weight.requires_grad = True
            loss = ctx.forward_function(Xd, linear, labels)
        loss.backward(dY)  # dW accumulates into linear.weight.grad, as in the seed
        return Xd.grad, None, None, None
