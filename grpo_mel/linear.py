"""MemoryEfficientLinear: f(X·Wᵀ + b) computed chunk by chunk, never holding the [N, V] logits.

The idea is ``torch.utils.checkpoint`` specialised to the LM head:

* **forward** (under ``no_grad``): for each chunk of rows ``X_c`` ([c, H]) form the chunk's logits
  ``z_c = X_c·Wᵀ + b`` ([c, V]), apply ``f`` and keep only its small outputs (per-row values, or a
  scalar that is reduced across chunks). Nothing of size ``V`` outlives the chunk.
* **backward**: for each chunk, recompute ``z_c`` with autograd on, let autograd differentiate ``f``
  with the upstream gradients as ``grad_outputs``, which yields ``dZ_c = ∂L/∂z_c``. ``z_c`` comes out
  of a small node (``_chunk_graph.LogitsKeepingGrad``) rather than being a leaf, so nothing but ``f``'s own
  graph holds it: an ``f`` that saves only its own intermediates (log-softmax saves its output) lets
  the logits go right after its forward, one ``[c, V]`` buffer fewer at the chunk's peak. The linear
  part then is two GEMMs (the seed's equations):
  ``dX_c = dZ_c·W`` and ``dW += dZ_cᵀ·X_c`` (``db += Σ dZ_c``), the latter accumulated in float32
  in one ``[V, H]`` buffer. No derivative of ``f`` is written by hand: any plain-torch ``f`` works.

dW is returned through autograd (not written to ``.grad`` as a side effect), so tied weights,
gradient hooks, DDP and gradient accumulation see an ordinary gradient. Work is skipped where it is
not needed: no dW for a frozen W, no dX for an X that does not require grad, and outputs that
received no gradient (e.g. an entropy that is only logged) are not differentiated. Where a backward will
follow, the forward keeps the last chunk's f graph, so that chunk is not recomputed (all rows when one chunk
holds them; docs/design.md, "The kept last chunk"). With a frozen head (no dW or db: a LoRA policy's LM head)
and float32 GEMMs the forward differentiates each chunk's f with a unit upstream gradient per row and keeps
``dZ_c·W`` ([N, H]); the backward multiplies the upstream gradients in and recomputes nothing (docs/design.md,
"The frozen head").

Two front doors share one Function: :func:`chunked_linear` ``(X, weight, fn, *row_args, bias=None,
chunk_size=None, ...)`` where ``fn(z_c, *row_args_c)`` receives the chunk's logits ([c, V], X's dtype) and
the matching rows of each ``row_args`` tensor; and ``MemoryEfficientLinear.apply(X, linear, labels,
forward_function)``, the seed notebook's convention (:mod:`grpo_mel.seed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ._checks import as_outputs, check_chunk_outputs, validate_inputs
from ._chunk_graph import LIVE_OUTPUTS, ChunkGraph, Guess, output_needs_grad
from ._grads_ahead import GradsAhead
from ._linear_grads import LinearGrads, chunk_logits
from .planning import plan_chunk_size, validate_chunk_size, validate_memory_budget

__all__ = ["MemoryEfficientLinear", "chunked_linear", "output_needs_grad"]

@dataclass(frozen=True)
class _Options:
    """Everything the Function takes besides the tensors it differentiates."""

    fn: Callable  # f(z_c, *row_args_c)
    chunk_size: int  # rows per chunk
    reduction: str  # how 0-dim outputs combine over chunks: "mean" | "sum"
    fp32_grad_input: bool  # see chunked_linear
    keep_graph: bool = False  # the forward builds the last chunk's f graph and the backward uses it (no recompute)
    grad_in_forward: bool = False  # frozen head: the forward differentiates f per chunk (float32 GEMMs only)

    def scalar_weight(self, rows: int, n: int) -> float:
        """The weight of one chunk's 0-dim output in the total: its share of rows for "mean"."""
        return rows / n if self.reduction == "mean" else 1.0

    def bounds(self, n: int) -> list[tuple[int, int]]:
        """The chunks' ``(start, end)`` rows, in the forward's order: the short chunk (``n % chunk_size`` rows)
        first, so the last chunk, whose graph the forward keeps, is a full one and the backward recomputes fewer
        rows. ``n == 0``: one empty chunk (f still runs once, for the output shapes)."""
        c = self.chunk_size
        first = n % c or min(c, n)
        return [(0, first)] + [(s, s + c) for s in range(first, n, c)]


class MemoryEfficientLinear(torch.autograd.Function):
    """Chunked ``f(X·Wᵀ + b)`` with recompute-in-backward. See the module docstring.

    Prefer :func:`chunked_linear`. ``apply`` also accepts the seed notebook's convention
    ``MemoryEfficientLinear.apply(X, linear, labels, forward_function[, chunk_size[, reduction]])``.
    """

    @classmethod
    def apply(cls, *args, **kwargs):  # noqa: D102 - documented on the class
        from .seed import is_seed_call, seed_apply  # seed builds on chunked_linear, below

        if is_seed_call(args, kwargs):
            return seed_apply(*args)
        return super().apply(*args, **kwargs)

    @staticmethod
    def forward(ctx, opts: _Options, X, weight, bias, *row_args):
        # X: [N, H]; weight: [V, H]; bias: [V] or None; row_args: tensors with leading dim N
        n = X.shape[0]
        # backward replays f's random draws and the autocast state (as torch.utils.checkpoint does), so the
        # recomputed chunk is the one forward computed (e.g. a bf16 matmul under autocast, not an fp32 one)
        ctx.rng = _rng_state(X.device)
        ctx.autocast = _autocast_state(X.device)
        # the dtype the forward's GEMM produces (the autocast dtype under autocast): the backward's GEMMs run in it too
        ctx.gemm_dtype = _gemm_dtype(X, weight, bias)
        outs: list[torch.Tensor] | None = None
        scalar: list[bool] = []
        ctx.kept, ctx.ahead = None, None
        ctx.guess = Guess()
        # a frozen head differentiates f here only with float32 (or float64) GEMMs: with half-precision ones, dZ·W
        # formed before the upstream gradient is known rounds dZ to the half dtype without it, and dX would differ
        # from autograd's by up to a half-precision ulp (docs/design.md, "The frozen head"); the recompute keeps
        # autograd's roundings there
        if opts.grad_in_forward and ctx.gemm_dtype in (torch.float32, torch.float64):
            ctx.ahead = GradsAhead(ctx, X, weight, bias, row_args, opts.fp32_grad_input)
        for start, end in opts.bounds(n):
            args_c = [a[start:end] for a in row_args]
            if ctx.ahead is not None:  # frozen head: this chunk's f is differentiated now, nothing is recomputed
                res = ctx.ahead.chunk(opts.fn, X, args_c, start, end, opts.scalar_weight(end - start, n))
                if not ctx.ahead.applies:  # f's first output is not one value per row or a scalar: the general path
                    ctx.ahead = None
            elif opts.keep_graph and end >= n:  # the last chunk: its f graph is kept, the backward starts with it
                ctx.kept = ChunkGraph(opts.fn, X[start:end], weight, bias, args_c, ctx.needs_input_grad[4:],
                                      live=ctx.guess)
                res = [r.detach() for r in ctx.kept.res]
            else:
                res = as_outputs(opts.fn(chunk_logits(X[start:end], weight, bias), *args_c))
            if outs is None:
                scalar = [r.dim() == 0 for r in res]
                outs = [torch.zeros((), dtype=_acc_dtype(r), device=r.device) if s else r.new_empty((n, *r.shape[1:]))
                        for r, s in zip(res, scalar)]
            check_chunk_outputs(res, scalar, end - start)
            for o, r, s in zip(outs, res, scalar):
                if s and n:
                    o.add_(r.to(o.dtype), alpha=opts.scalar_weight(end - start, n))
                elif not s:
                    o[start:end].copy_(r)

        ctx.opts, ctx.scalar = opts, scalar
        ctx.save_for_backward(X, weight, bias, *row_args)
        ctx.set_materialize_grads(False)
        non_diff = [o for o in outs if not o.is_floating_point()]
        if non_diff:
            ctx.mark_non_differentiable(*non_diff)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outs):
        X, weight, bias, *row_args = ctx.saved_tensors
        need_x, need_w, need_b, *arg_needs = ctx.needs_input_grad[1:]
        live = [i for i, g in enumerate(grad_outs) if g is not None]
        if not live:
            return (None,) * len(ctx.needs_input_grad)

        if ctx.ahead is not None:
            if live == [0]:  # the outputs the forward differentiated for: multiply the upstream gradients in
                return (None, *ctx.ahead.result(grad_outs[0]))
            ctx.ahead = None  # another output got a gradient: recompute every chunk (the forward's RNG replays)
        if ctx.kept is not None and ctx.guess.assumed_without_grad.intersection(live):
            ctx.kept = None  # f built the kept graph assuming an output would get no gradient, and it got one
        grads = LinearGrads(X, weight, bias, need_x, need_w, need_b, ctx.gemm_dtype, ctx.opts.fp32_grad_input)
        d_args = [torch.zeros_like(a) if need else None for a, need in zip(row_args, arg_needs)]
        if X.shape[0] > 0:
            token = LIVE_OUTPUTS.set(frozenset(live))  # what output_needs_grad answers inside f
            devices = [X.device] if X.device.type == "cuda" else []
            try:
                with torch.random.fork_rng(devices=devices, device_type=X.device.type):
                    _restore_rng(X.device, ctx.rng)
                    _backward_chunks(ctx, X, row_args, arg_needs, grad_outs, live, grads, d_args)
            finally:
                LIVE_OUTPUTS.reset(token)
        return (None, *grads.result(), *d_args)


def _backward_chunks(ctx, X, row_args, arg_needs, grad_outs, live, grads: LinearGrads, d_args) -> None:
    """Recompute each chunk with autograd on, differentiate f with the upstream gradients, apply the GEMMs."""
    n, opts = X.shape[0], ctx.opts
    bounds = opts.bounds(n)
    if ctx.kept is not None:
        # the forward kept the last chunk's graph: differentiate it first, so it is freed before any recompute; the
        # recomputed chunks still run in the forward's order (f's random draws replay in sequence)
        bounds = bounds[-1:] + bounds[:-1]
    for start, end in bounds:
        x_c = X[start:end]
        if ctx.kept is not None:  # the forward's graph, used once (a second backward recomputes)
            graph, ctx.kept = ctx.kept, None
        else:
            with torch.autocast(**ctx.autocast):
                graph = ChunkGraph(opts.fn, x_c, grads.w_gemm, grads.b_gemm, [a[start:end] for a in row_args],
                                    arg_needs)
        res, anchor, args_c, dz_box = graph.res, graph.anchor, graph.args, graph.dz_box
        del graph
        outputs, grad_outputs = [], []
        for i in live:
            if res[i].requires_grad:
                g = grad_outs[i] * opts.scalar_weight(end - start, n) if ctx.scalar[i] else grad_outs[i][start:end]
                outputs.append(res[i])
                grad_outputs.append(g.to(res[i].dtype))
        if outputs:
            wrt = [anchor] + [a for a, need in zip(args_c, arg_needs) if need]
            got = torch.autograd.grad(outputs, wrt, grad_outputs, allow_unused=True)
            del res, outputs
            for d_acc, g_a in zip([d for d in d_args if d is not None], got[1:]):
                if g_a is not None:
                    d_acc[start:end].copy_(g_a)
            del got
        dz, dz_box.grad = dz_box.grad, None
        grads.add_chunk(start, end, x_c, dz)  # dz None: no output that depends on the logits got a gradient
        del dz


def _gemm_dtype(X: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.dtype:
    """The dtype ``F.linear(X, weight, bias)`` computes in here: the autocast dtype where autocast applies."""
    probe = chunk_logits(X[:0], weight[:0], None if bias is None else bias[:0])  # [0, 0]: no work, autocast's rule
    return probe.dtype


def _autocast_state(device: torch.device) -> dict:
    kind = device.type if device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"
    return {
        "device_type": kind,
        "enabled": torch.is_autocast_enabled(kind),
        "dtype": torch.get_autocast_dtype(kind),
        "cache_enabled": torch.is_autocast_cache_enabled(),
    }


def _rng_state(device: torch.device) -> tuple:
    """The CPU (and X's CUDA device's) RNG state, for the backward to replay inside ``fork_rng``."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _restore_rng(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _acc_dtype(r: torch.Tensor) -> torch.dtype:
    # scalar outputs are summed over chunks in at least float32
    if r.is_floating_point() and r.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return r.dtype


def chunked_linear(
    X: torch.Tensor,
    weight: torch.Tensor,
    fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    *row_args: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    memory_budget: float | None = None,
    reduction: str = "mean",
    fp32_grad_input: bool = False,
):
    """Compute ``fn(X·Wᵀ + b, *row_args)`` in row chunks, differentiably, without the [N, V] logits.

    Args:
        X: ``[..., H]`` hidden states (any number of leading dims; they are flattened to N rows).
        weight: ``[V, H]`` projection (the LM head weight); may be frozen, tied or shared.
        fn: ``fn(z_c, *row_args_c)`` with ``z_c`` the chunk's logits ``[c, V]`` in X's dtype (``fn`` does
            its own float32 upcast). Returns a tensor or a tuple of tensors, each either per-row
            (first dim ``c``) or a 0-dim scalar. Plain torch; autograd differentiates it. Row ``i`` of a
            per-row output must depend on row ``i`` of the logits and of ``row_args`` only (so that it does not
            change with the chunking; the frozen-head path relies on it for the gradient too).
        *row_args: tensors with X's leading shape (e.g. labels ``[...]``, per-row weights ``[..., k]``)
            sliced per chunk. Floating ones that require grad get gradients.
        bias: ``[V]`` or None.
        chunk_size: rows per chunk (>= 1; the first chunk may be smaller). None: from ``memory_budget``.
        memory_budget: bytes for the per-chunk working set when ``chunk_size`` is None; None uses the
            default (a share of free memory on CUDA, 96 MiB on CPU). See :mod:`grpo_mel.planning`.
        reduction: how 0-dim outputs combine across chunks: ``"mean"`` (weighted by each chunk's share
            of rows, exact for uneven chunks) or ``"sum"``. Per-row outputs are concatenated.
        fp32_grad_input: where the GEMM runs in a half dtype under autocast while X is float32, compute dX from
            the half operands into float32 (as TRL >= 1.15's fused head does) instead of rounding it to the half
            dtype first (as autograd of ``F.linear`` under autocast does, the default). dW always accumulates in
            float32.

    Returns:
        A tensor (or tuple) with per-row outputs shaped ``X.shape[:-1] + trailing``, scalars 0-dim.
    """
    validate_inputs(X, weight, bias, row_args, reduction)
    validate_chunk_size(chunk_size)
    validate_memory_budget(memory_budget)
    lead = X.shape[:-1]
    X2 = X.reshape(-1, X.shape[-1])
    n = X2.shape[0]
    flat_args = tuple(a.reshape(n, *a.shape[len(lead):]) for a in row_args)
    chunk = plan_chunk_size(n, weight.shape[0], X.dtype, X.device, chunk_size, memory_budget)
    # where a backward will follow, the forward keeps the last chunk's f graph instead of the backward recomputing
    # it (all of it when one chunk holds every row)
    keep = n > 0 and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (X2, weight, bias, *flat_args))
    # a frozen head (no dW, no db): the forward differentiates f, and the backward recomputes nothing (float32 GEMMs)
    frozen_head = not weight.requires_grad and (bias is None or not bias.requires_grad)
    opts = _Options(fn=fn, chunk_size=chunk, reduction=reduction, fp32_grad_input=bool(fp32_grad_input),
                    keep_graph=keep, grad_in_forward=keep and frozen_head)
    outs = MemoryEfficientLinear.apply(opts, X2, weight, bias, *flat_args)
    outs = tuple(o if o.dim() == 0 else o.view(*lead, *o.shape[1:]) for o in outs)
    return outs[0] if len(outs) == 1 else outs
