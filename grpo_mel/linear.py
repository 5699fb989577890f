"""ChunkedLinear (``grpo_mel.MemoryEfficientLinear``): f(X·Wᵀ + b) computed chunk by chunk, never holding the
[N, V] logits.

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
the forward differentiates each chunk's f with a unit upstream gradient per row and keeps
``dZ_c·W`` ([N, H]); the backward multiplies the upstream gradients in and recomputes nothing (docs/design.md,
"The frozen head").

Each call runs one chunk strategy, chosen by :func:`choose_strategy`: :class:`grpo_mel._recompute.Recompute`
(with or without the kept last chunk) or :class:`grpo_mel._grads_ahead.GradsAhead`; a strategy that cannot serve
what a call turns out to need falls back to the recompute in one place (``_recompute_instead``).

Two front doors share one Function: :func:`chunked_linear` ``(X, weight, fn, *row_args, bias=None,
chunk_size=None, ...)`` where ``fn(z_c, *row_args_c)`` receives the chunk's logits ([c, V], X's dtype) and
the matching rows of each ``row_args`` tensor; and ``MemoryEfficientLinear.apply(X, linear, labels,
forward_function)``, the seed notebook's convention (:mod:`grpo_mel.seed`, a thin layer above this module).
"""

from __future__ import annotations

from typing import Callable

import torch

from ._checks import check_chunk_outputs, validate_inputs
from ._chunk_graph import output_needs_grad
from ._grads_ahead import GradsAhead
from ._recompute import Recompute
from ._strategy import Call, Needs, Options, Strategy, gemm_dtype_of
from ._compiled import compiled
from .planning import (Head, default_compile, plan_chunk_size, validate_chunk_size, validate_compile,
                       validate_memory_budget)

__all__ = ["ChunkedLinear", "chunked_linear", "choose_strategy", "output_needs_grad"]


def choose_strategy(call: Call, X, weight, bias, row_args) -> Strategy:
    """The call's one chunk strategy (docs/design.md, "Chunk strategies"):

    * no backward can follow (grad mode off, or nothing requires grad): :class:`Recompute` without a kept graph
      (each chunk's f runs once, under ``no_grad``);
    * a frozen head (neither W nor b needs a gradient): :class:`GradsAhead`;
    * otherwise :class:`Recompute` keeping the last chunk's graph.
    """
    if not call.opts.grad_follows or call.n == 0:
        return Recompute(call)
    if not call.needs.w and not call.needs.b:
        return GradsAhead(call, X, weight, bias, row_args)
    return Recompute(call, keep_last=True)


def _recompute_instead(call: Call, in_forward: bool) -> Strategy:
    """The fall-back when a strategy cannot serve a call (f's outputs in the forward, the outputs that got a gradient
    in the backward): the plain recompute, keeping the last chunk's graph if the forward is still running."""
    return Recompute(call, keep_last=in_forward and call.opts.grad_follows)


class ChunkedLinear(torch.autograd.Function):
    """Chunked ``f(X·Wᵀ + b)``: one :class:`grpo_mel._strategy.Strategy` per call runs the chunks. See the module
    docstring; use :func:`chunked_linear` (``grpo_mel.MemoryEfficientLinear`` is this Function with the seed
    notebook's calling convention on top)."""

    @staticmethod
    def forward(ctx, opts: Options, X, weight, bias, *row_args):
        # X: [N, H]; weight: [V, H]; bias: [V] or None; row_args: tensors with leading dim N
        call = Call.begin(opts, X, weight, bias, Needs.of(ctx.needs_input_grad))
        strategy = choose_strategy(call, X, weight, bias, row_args)
        outs = _Outputs(call)
        for start, end in call.bounds:
            res = strategy.forward_chunk(X, weight, bias, [a[start:end] for a in row_args], start, end)
            if not strategy.accepts(res):
                strategy = _recompute_instead(call, in_forward=True)
            outs.add(res, start, end)
        ctx.strategy = strategy
        ctx.save_for_backward(X, weight, bias, *row_args)
        ctx.set_materialize_grads(False)
        non_diff = [o for o in outs.values if not o.is_floating_point()]
        if non_diff:
            ctx.mark_non_differentiable(*non_diff)
        return tuple(outs.values)

    @staticmethod
    def backward(ctx, *grad_outs):
        X, weight, bias, *row_args = ctx.saved_tensors
        live = [i for i, g in enumerate(grad_outs) if g is not None]
        if not live:
            return (None,) * len(ctx.needs_input_grad)
        if not ctx.strategy.covers(live):
            ctx.strategy = _recompute_instead(ctx.strategy.call, in_forward=False)
        return (None, *ctx.strategy.backward(X, weight, bias, row_args, grad_outs, live))


class _Outputs:
    """The call's outputs, filled chunk by chunk: per-row ones by rows, 0-dim ones summed (weighted for "mean") in at
    least float32. The first chunk sets which are 0-dim (``call.scalar``); every chunk is checked against it."""

    def __init__(self, call: Call):
        self.call = call
        self.values: list[torch.Tensor] = []

    def add(self, res, start: int, end: int) -> None:
        call = self.call
        if not self.values:
            call.scalar = [r.dim() == 0 for r in res]
            self.values = [torch.zeros((), dtype=_acc_dtype(r), device=r.device) if s
                           else r.new_empty((call.n, *r.shape[1:])) for r, s in zip(res, call.scalar)]
        check_chunk_outputs(res, call.scalar, end - start)
        for o, r, s in zip(self.values, res, call.scalar):
            if s and call.n:
                o.add_(r.to(o.dtype), alpha=call.scalar_weight(end - start))
            elif not s:
                o[start:end].copy_(r)


def _acc_dtype(r: torch.Tensor) -> torch.dtype:
    # scalar outputs are summed over chunks in at least float32
    if r.is_floating_point() and r.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return r.dtype


@torch.compiler.disable
def _apply(opts: Options, *tensors):
    """The Function, never traced by a caller's ``torch.compile`` (a user who compiles the model around the head):
    that compile stops here, the chunks run as written (each f compiled by grpo_mel itself where ``compile`` says so),
    and it resumes after."""
    return ChunkedLinear.apply(opts, *tensors)


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
    compile: bool | None = None,
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
        compile: run ``fn`` and its autograd backward through ``torch.compile`` (Inductor) per chunk, fused
            kernels with fewer ``[c, V]`` buffers (docs/design.md, "Compiled chunks"); a compile failure runs
            ``fn`` eagerly with one warning. None: the measured default for X's device and the call's size
            (:func:`grpo_mel.planning.default_compile`: on the CPU, compiled where a backward follows and N·V
            reaches 2·10⁸; an ``fn`` that cannot be compiled then runs eagerly without a warning).

    Returns:
        A tensor (or tuple) with per-row outputs shaped ``X.shape[:-1] + trailing``, scalars 0-dim.
    """
    validate_inputs(X, weight, bias, row_args, reduction)
    validate_chunk_size(chunk_size)
    validate_memory_budget(memory_budget)
    validate_compile(compile)
    lead = X.shape[:-1]
    X2 = X.reshape(-1, X.shape[-1])
    n = X2.shape[0]
    flat_args = tuple(a.reshape(n, *a.shape[len(lead):]) for a in row_args)
    grad_follows = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (X2, weight, bias, *flat_args))
    use_compile = default_compile(X.device, n, weight.shape[0], grad_follows) if compile is None else compile
    run_fn = compiled(fn, requested=compile is not None) if use_compile else fn
    trained = grad_follows and (weight.requires_grad or (bias is not None and bias.requires_grad))
    # the chunk is planned for the f that will run: an f that cannot be compiled runs (and is planned) eagerly
    head = Head(X.shape[-1], weight.dtype, gemm_dtype_of(X2, weight, bias), trained, run_fn is not fn)
    chunk = plan_chunk_size(n, weight.shape[0], X.dtype, X.device, chunk_size, memory_budget, head=head)
    opts = Options(fn=run_fn, chunk_size=chunk, reduction=reduction, fp32_grad_input=bool(fp32_grad_input),
                   grad_follows=grad_follows)
    outs = _apply(opts, X2, weight, bias, *flat_args)
    outs = tuple(o if o.dim() == 0 else o.view(*lead, *o.shape[1:]) for o in outs)
    return outs[0] if len(outs) == 1 else outs
