"""MemoryEfficientLinear: f(X·Wᵀ + b) computed chunk by chunk, never holding the [N, V] logits.

The idea is ``torch.utils.checkpoint`` specialised to the LM head:

* **forward** (under ``no_grad``): for each chunk of rows ``X_c`` ([c, H]) form the chunk's logits
  ``z_c = X_c·Wᵀ + b`` ([c, V]), apply ``f`` and keep only its small outputs (per-row values, or a
  scalar that is reduced across chunks). Nothing of size ``V`` outlives the chunk.
* **backward**: for each chunk, recompute ``z_c`` with autograd on, let autograd differentiate ``f``
  with the upstream gradients as ``grad_outputs``, which yields ``dZ_c = ∂L/∂z_c``. ``z_c`` comes out
  of a small catch node (:class:`_CatchGrad`) rather than being a leaf, so nothing but ``f``'s own
  graph holds it: an ``f`` that saves only its own intermediates (log-softmax saves its output) lets
  the logits go right after its forward, one ``[c, V]`` buffer fewer at the chunk's peak. The linear
  part then is two GEMMs (the seed's equations):
  ``dX_c = dZ_c·W`` and ``dW += dZ_cᵀ·X_c`` (``db += Σ dZ_c``), the latter accumulated in float32
  in one ``[V, H]`` buffer. No derivative of ``f`` is written by hand: any plain-torch ``f`` works.

dW is returned through autograd (not written to ``.grad`` as a side effect), so tied weights,
gradient hooks, DDP and gradient accumulation see an ordinary gradient. Work is skipped where it is
not needed: no dW for a frozen W, no dX for an X that does not require grad, and outputs that
received no gradient (e.g. an entropy that is only logged) are not differentiated.

Two front doors share one Function:

* :func:`chunked_linear` ``(X, weight, fn, *row_args, bias=None, chunk_size=None, ...)`` where
  ``fn(z_c, *row_args_c)`` receives the chunk's logits ([c, V], X's dtype) and the matching rows
  of each ``row_args`` tensor.
* ``MemoryEfficientLinear.apply(X, linear, labels, forward_function)``, the seed notebook's
  convention: ``forward_function(batch, linear, labels)`` calls ``linear(batch)`` itself; it gets a
  stand-in module whose call returns the chunk's (recomputed) logits.
"""

from __future__ import annotations

import contextvars
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from .planning import plan_chunk_size, validate_chunk_size, validate_memory_budget

__all__ = ["MemoryEfficientLinear", "chunked_linear", "output_needs_grad"]

_REDUCTIONS = ("mean", "sum")
_IGNORE_INDEX = -100  # torch's cross_entropy default, the seed convention's labels


#: Indices of f's outputs that receive a gradient, while the backward recomputes a chunk; None otherwise.
_LIVE_OUTPUTS: contextvars.ContextVar[frozenset[int] | None] = contextvars.ContextVar("grpo_mel_live_outputs",
                                                                                     default=None)


def output_needs_grad(index: int) -> bool:
    """For use inside a transformation function f: will f's output ``index`` be differentiated?

    While :class:`MemoryEfficientLinear`'s backward recomputes a chunk, True only for the outputs that
    received an upstream gradient (e.g. False for an entropy that is only logged); elsewhere (the forward,
    which runs under ``no_grad``, or f called on its own) ``torch.is_grad_enabled()``. An f may compute an
    output that is not differentiated under ``torch.no_grad()``, so its graph (and the ``[c, V]`` tensors the
    graph would save) is never built. The value must be the same either way: only the graph may differ.
    """
    live = _LIVE_OUTPUTS.get()
    if live is None:
        return torch.is_grad_enabled()
    return index in live


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out) and len(out) > 0:
        return tuple(out)
    raise TypeError(
        "the transformation function must return a tensor or a non-empty tuple of tensors, "
        f"got {type(out).__name__}"
    )


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` into a float32 ``acc`` without rounding ``a @ b`` to a half dtype first.

    Rounding each chunk's dW contribution to bf16 before summing would add one rounding error per
    chunk; accumulating in fp32 keeps dW at least as accurate as the full-logits GEMM.
    """
    if acc.device.type == "cuda" and a.dtype in (torch.float16, torch.bfloat16) and _addmm_out_fp32(acc, a, b):
        return
    acc.addmm_(a.float(), b.float())


def _addmm_out_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """``torch.addmm(acc, a, b, out_dtype=float32, out=acc)``; False where this torch cannot do it.

    Only "no ``out_dtype`` support" is caught: a torch whose ``addmm`` has no such keyword (TypeError), no
    kernel for the device (NotImplementedError, "addmm.dtype_out"), or one that rejects this combination of
    dtypes (a RuntimeError naming the dtypes). Anything else, out-of-memory included, propagates.
    """
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    except (TypeError, RuntimeError) as e:
        if isinstance(e, torch.cuda.OutOfMemoryError) or "dtype" not in str(e):
            raise
        return False
    return True


class _LogitsStandIn(nn.Module):
    """Handed to a seed-convention ``forward_function`` in place of the real ``linear``.

    Calling it returns the chunk's logits, which the Function computed (once, in forward under
    ``no_grad``; again in backward with autograd on), so ``f``'s ``linear(batch)`` costs nothing and
    its gradient arrives at the logits as dZ_c.
    """

    def __init__(self, logits: torch.Tensor, linear: nn.Module):
        super().__init__()
        self._logits = logits
        self.weight = linear.weight  # for f that reads e.g. ``linear.weight.size(0)``
        self.bias = getattr(linear, "bias", None)
        self.in_features = getattr(linear, "in_features", linear.weight.shape[1])
        self.out_features = getattr(linear, "out_features", linear.weight.shape[0])

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        rows = self._logits.shape[0]
        if batch.shape[-1] != self.in_features or batch.numel() // max(batch.shape[-1], 1) != rows:
            raise ValueError(
                f"forward_function called linear() on a tensor of shape {tuple(batch.shape)}, but the chunk "
                f"it was given has {rows} rows of width {self.in_features}; call linear() on the batch it received"
            )
        return self._logits.view(*batch.shape[:-1], self._logits.shape[-1])


class _SeedFunction:
    """Adapts ``forward_function(batch, linear, labels)`` to the ``fn(z, x_c, labels_c)`` form."""

    def __init__(self, forward_function: Callable, linear: nn.Module):
        self.forward_function = forward_function
        self.linear = linear

    def __call__(self, z: torch.Tensor, x_c: torch.Tensor, *rest: torch.Tensor):
        return self.forward_function(x_c, _LogitsStandIn(z, self.linear), *rest)


@dataclass(frozen=True)
class _Options:
    chunk_size: int  # rows per chunk
    reduction: str  # how 0-dim outputs combine over chunks: "mean" | "sum"
    fp32_grad_input: bool  # see chunked_linear


def _warn_mean_over_ignored_labels(out, labels: torch.Tensor, reduction: str) -> None:
    """The seed convention weights a scalar f's chunks by their share of rows: exact for a mean over all rows,
    not for a mean over the labels that are not ignored (cross-entropy's default), so say so when it applies."""
    scalar = any(o.dim() == 0 for o in _as_tuple(out))
    if reduction == "mean" and scalar and bool((labels == _IGNORE_INDEX).any()):
        warnings.warn(
            "MemoryEfficientLinear.apply: forward_function returned a scalar, which reduction='mean' combines over "
            f"chunks by their share of rows, and labels contain {_IGNORE_INDEX} (ignored). A mean over the "
            "labels that are not ignored (e.g. cross_entropy's default) then differs from the full-batch value "
            "(NaN if a chunk has only ignored labels). For cross-entropy use grpo_mel.linear_cross_entropy(X, "
            "linear.weight, labels, bias=linear.bias); otherwise return a sum per chunk, pass reduction='sum' and "
            f"divide by (labels != {_IGNORE_INDEX}).sum().",
            UserWarning, stacklevel=3,
        )


def _chunk_logits(x_c: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # [c, H] @ [H, V] -> [c, V], in X's dtype (the float32 upcast is f's first step)
    return torch.nn.functional.linear(x_c, weight, bias)


class MemoryEfficientLinear(torch.autograd.Function):
    """Chunked ``f(X·Wᵀ + b)`` with recompute-in-backward. See the module docstring.

    Prefer :func:`chunked_linear`. ``apply`` also accepts the seed notebook's convention
    ``MemoryEfficientLinear.apply(X, linear, labels, forward_function[, chunk_size[, reduction]])``.
    """

    @classmethod
    def apply(cls, *args, **kwargs):  # noqa: D102 - documented on the class
        if len(args) >= 4 and isinstance(args[1], nn.Module) and callable(args[3]) and not kwargs:
            X, linear, labels, forward_function, *extra = args
            if len(extra) > 2:
                raise TypeError("MemoryEfficientLinear.apply(X, linear, labels, forward_function, "
                                "[chunk_size, [reduction]]) takes at most 6 arguments")
            chunk_size = extra[0] if len(extra) > 0 else None
            reduction = extra[1] if len(extra) > 1 else "mean"
            fn = _SeedFunction(forward_function, linear)
            # X rides along as a row argument only so f can be handed its chunk's rows; detached, it gets no
            # gradient of its own (the stand-in linear ignores it: dX comes through the logits)
            out = chunked_linear(
                X, linear.weight, fn, X.detach(), labels, bias=getattr(linear, "bias", None),
                chunk_size=chunk_size, reduction=reduction,
            )
            _warn_mean_over_ignored_labels(out, labels, reduction)
            return out
        return super().apply(*args, **kwargs)

    @staticmethod
    def forward(ctx, X, weight, bias, fn, opts: _Options, *row_args):
        # X: [N, H]; weight: [V, H]; bias: [V] or None; row_args: tensors with leading dim N
        n, chunk_size, reduction = X.shape[0], opts.chunk_size, opts.reduction
        # backward replays f's random draws and the autocast state (as torch.utils.checkpoint does), so the
        # recomputed chunk is the one forward computed (e.g. a bf16 matmul under autocast, not an fp32 one)
        rng = _get_rng_state(X.device)
        autocast = _autocast_state(X.device)
        outs: list[torch.Tensor] | None = None
        scalar: list[bool] = []
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            z = _chunk_logits(X[start:end], weight, bias)
            res = _as_tuple(fn(z, *(a[start:end] for a in row_args)))
            del z
            if outs is None:
                scalar = [r.dim() == 0 for r in res]
                outs = [
                    torch.zeros((), dtype=_acc_dtype(r), device=r.device) if s
                    else r.new_empty((n, *r.shape[1:]))
                    for r, s in zip(res, scalar)
                ]
            _check_chunk_outputs(res, scalar, end - start)
            for o, r, s in zip(outs, res, scalar):
                if s:
                    w = (end - start) / n if reduction == "mean" else 1.0
                    o.add_(r.to(o.dtype), alpha=w)
                else:
                    o[start:end].copy_(r)
        if outs is None:  # N == 0: f never ran; run it on an empty chunk for the output shapes
            z = _chunk_logits(X[:0], weight, bias)
            res = _as_tuple(fn(z, *(a[:0] for a in row_args)))
            scalar = [r.dim() == 0 for r in res]
            outs = [torch.zeros((), dtype=_acc_dtype(r), device=r.device) if s else r.clone() for r, s in zip(res, scalar)]

        ctx.fn, ctx.opts, ctx.scalar = fn, opts, scalar
        ctx.rng, ctx.autocast = rng, autocast
        # the dtype the forward's GEMM produced (the autocast dtype under autocast): the backward's GEMMs run in it too
        ctx.gemm_dtype = _gemm_dtype(X, weight, bias)
        ctx.n_row_args = len(row_args)
        ctx.save_for_backward(X, weight, bias, *row_args)
        ctx.set_materialize_grads(False)
        non_diff = [o for o in outs if not o.is_floating_point()]
        if non_diff:
            ctx.mark_non_differentiable(*non_diff)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outs):
        X, weight, bias, *row_args = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        arg_needs = ctx.needs_input_grad[5:]
        live = [i for i, g in enumerate(grad_outs) if g is not None]
        n_in = 5 + ctx.n_row_args
        if not live:
            return (None,) * n_in

        dX = torch.empty(X.shape, dtype=X.dtype, device=X.device) if need_x else None
        dW = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        db = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if (need_b and bias is not None) else None
        d_args = [torch.zeros_like(a) if need else None for a, need in zip(row_args, arg_needs)]
        if X.shape[0] == 0:
            return _pack_grads(dX, dW, db, weight, bias, d_args)

        token = _LIVE_OUTPUTS.set(frozenset(live))  # what output_needs_grad answers inside f
        try:
            with _replayed_rng(X.device, ctx.rng):
                _backward_chunks(ctx, X, weight, bias, row_args, arg_needs, grad_outs, live, dX, dW, db, d_args)
        finally:
            _LIVE_OUTPUTS.reset(token)
        return _pack_grads(dX, dW, db, weight, bias, d_args)


def _backward_chunks(ctx, X, weight, bias, row_args, arg_needs, grad_outs, live, dX, dW, db, d_args) -> None:
    """Recompute each chunk with autograd on, differentiate f with the upstream gradients, apply the GEMMs."""
    n, chunk = X.shape[0], ctx.opts.chunk_size
    # Under autocast (fp32 weights, bf16 GEMMs) cast W once for every chunk's recompute and dX GEMM, as the model's
    # own lm_head under autocast keeps a bf16 copy of W for its backward; dW still accumulates in float32.
    w_nograd = weight.detach().to(ctx.gemm_dtype)
    b_nograd = bias.detach().to(ctx.gemm_dtype) if bias is not None else None
    # fp32_grad_input with half operands: CUDA's addmm reads them as they are (out_dtype); elsewhere W is upcast
    # here once, not as a [V, H] float32 temporary in every chunk
    fp32_dx = (dX is not None and ctx.opts.fp32_grad_input and dX.dtype == torch.float32
               and w_nograd.dtype != torch.float32)
    w_dx = w_nograd.float() if fp32_dx and X.device.type != "cuda" else w_nograd
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        x_c = X[start:end]
        args_c = [
            a[start:end].detach().requires_grad_(True) if need else a[start:end]
            for a, need in zip(row_args, arg_needs)
        ]
        anchor = torch.empty((), device=X.device, requires_grad=True)  # never read: only a graph root
        catch = _Catch()
        with torch.enable_grad(), torch.autocast(**ctx.autocast):
            # z is not a leaf: only the graph of f holds it, so it is freed as soon as f is done with it
            # (e.g. log_softmax keeps its output, not its input) and dZ arrives in catch.grad
            res = _as_tuple(ctx.fn(_CatchGrad.apply(anchor, x_c, w_nograd, b_nograd, catch), *args_c))
        outputs, grads = [], []
        for i in live:
            r = res[i]
            if not r.requires_grad:
                continue
            g = grad_outs[i]
            if ctx.scalar[i]:
                w = (end - start) / n if ctx.opts.reduction == "mean" else 1.0
                g = g * w
            else:
                g = g[start:end]
            outputs.append(r)
            grads.append(g.to(r.dtype))
        if not outputs:
            if dX is not None:
                dX[start:end].zero_()
            continue
        wrt = [anchor] + [a for a, need in zip(args_c, arg_needs) if need]
        got = torch.autograd.grad(outputs, wrt, grads, allow_unused=True)
        del res, outputs
        dz, catch.grad = catch.grad, None
        for d_acc, g_a in zip([d for d in d_args if d is not None], got[1:]):
            if g_a is not None:
                d_acc[start:end].copy_(g_a)
        if dz is None:
            if dX is not None:
                dX[start:end].zero_()
            continue
        dz = dz.to(w_nograd.dtype)  # [c, V]
        if dX is not None:
            if dX.dtype == dz.dtype:
                torch.mm(dz, w_nograd, out=dX[start:end])  # [c, V] @ [V, H]
            elif fp32_dx:  # half operands, float32 result
                if w_dx.dtype == torch.float32:
                    torch.mm(dz.float(), w_dx, out=dX[start:end])
                else:
                    _addmm_fp32(dX[start:end].zero_(), dz, w_dx)
            else:  # as autograd of F.linear under autocast: dX in the GEMM's dtype, then cast to X's
                dX[start:end].copy_(torch.mm(dz, w_nograd))
        if dW is not None:
            _addmm_fp32(dW, dz.t(), x_c.to(dz.dtype))
        if db is not None:
            db.add_(dz.sum(0, dtype=torch.float32))
        del dz, got


class _Catch:
    grad: torch.Tensor | None = None


class _CatchGrad(torch.autograd.Function):
    """Recomputes a chunk's logits as a non-leaf and hands their gradient dZ to a :class:`_Catch`.

    A leaf ``z.requires_grad_()`` would be held by its AccumulateGrad node until the chunk's backward is
    over; this node holds nothing, so the [c, V] logits live only as long as f's graph needs them.
    """

    @staticmethod
    def forward(ctx, anchor, x_c, weight, bias, catch):
        ctx.catch = catch
        return _chunk_logits(x_c, weight, bias)

    @staticmethod
    def backward(ctx, dz):
        ctx.catch.grad = dz
        return None, None, None, None, None


def _gemm_dtype(X: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.dtype:
    """The dtype ``F.linear(X, weight, bias)`` computes in here: the autocast dtype where autocast applies."""
    probe = _chunk_logits(X[:0], weight[:0], None if bias is None else bias[:0])  # [0, 0]: no work, autocast's rule
    return probe.dtype


def _autocast_state(device: torch.device) -> dict:
    kind = device.type if device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"
    return {
        "device_type": kind,
        "enabled": torch.is_autocast_enabled(kind),
        "dtype": torch.get_autocast_dtype(kind),
        "cache_enabled": torch.is_autocast_cache_enabled(),
    }


def _get_rng_state(device: torch.device):
    cpu = torch.get_rng_state()
    dev = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return cpu, dev


class _replayed_rng:
    """Run the backward's recomputation from the RNG state the forward started with, then restore."""

    def __init__(self, device: torch.device, state):
        self.device, self.state = device, state

    def __enter__(self):
        self.saved = _get_rng_state(self.device)
        torch.set_rng_state(self.state[0])
        if self.state[1] is not None:
            torch.cuda.set_rng_state(self.state[1], self.device)

    def __exit__(self, *exc):
        torch.set_rng_state(self.saved[0])
        if self.saved[1] is not None:
            torch.cuda.set_rng_state(self.saved[1], self.device)


def _pack_grads(dX, dW, db, weight, bias, d_args):
    dW = dW.to(weight.dtype) if dW is not None else None
    db = db.to(bias.dtype) if db is not None else None
    return (dX, dW, db, None, None, *d_args)


def _acc_dtype(r: torch.Tensor) -> torch.dtype:
    # scalar outputs are summed over chunks in at least float32
    if r.is_floating_point() and r.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return r.dtype


def _check_chunk_outputs(res: Sequence[torch.Tensor], scalar: Sequence[bool], rows: int) -> None:
    if len(res) != len(scalar):
        raise ValueError(f"the transformation function returned {len(res)} outputs on one chunk "
                         f"and {len(scalar)} on another")
    for k, (r, s) in enumerate(zip(res, scalar)):
        if s and r.dim() != 0:
            raise ValueError(f"output {k} of the transformation function is a scalar on one chunk but has shape "
                             f"{tuple(r.shape)} on another")
        if not s and (r.dim() == 0 or r.shape[0] != rows):
            raise ValueError(
                f"output {k} of the transformation function has shape {tuple(r.shape)} for a chunk of {rows} rows; "
                "per-row outputs must have the chunk's rows as their first dimension (or be 0-dim scalars)"
            )


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
            (first dim ``c``) or a 0-dim scalar. Plain torch; autograd differentiates it.
        *row_args: tensors with X's leading shape (e.g. labels ``[...]``, per-row weights ``[..., k]``)
            sliced per chunk. Floating ones that require grad get gradients.
        bias: ``[V]`` or None.
        chunk_size: rows per chunk (>= 1; the last chunk may be smaller). None: from ``memory_budget``.
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
    _validate(X, weight, bias, row_args, reduction)
    validate_chunk_size(chunk_size)
    validate_memory_budget(memory_budget)
    lead = X.shape[:-1]
    X2 = X.reshape(-1, X.shape[-1])
    n = X2.shape[0]
    flat_args = tuple(a.reshape(n, *a.shape[len(lead):]) for a in row_args)
    chunk = plan_chunk_size(n, weight.shape[0], X.dtype, X.device, chunk_size, memory_budget)
    opts = _Options(chunk_size=chunk, reduction=reduction, fp32_grad_input=bool(fp32_grad_input))
    outs = MemoryEfficientLinear.apply(X2, weight, bias, fn, opts, *flat_args)
    outs = tuple(o if o.dim() == 0 else o.view(*lead, *o.shape[1:]) for o in outs)
    return outs[0] if len(outs) == 1 else outs


def _validate(X, weight, bias, row_args, reduction) -> None:
    if not isinstance(X, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("X and weight must be tensors")
    if X.dim() < 1:
        raise ValueError(f"X must have at least 1 dimension [..., H], got shape {tuple(X.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got shape {tuple(weight.shape)}")
    if X.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden size mismatch: X has shape {tuple(X.shape)} (H={X.shape[-1]}) but weight has shape "
            f"{tuple(weight.shape)} (H={weight.shape[1]})"
        )
    if not X.is_floating_point() or not weight.is_floating_point():
        raise TypeError(f"X and weight must be floating point, got X {X.dtype} and weight {weight.dtype}")
    if X.dtype != weight.dtype:
        raise TypeError(
            f"dtype mismatch: X is {X.dtype} but weight is {weight.dtype}; cast one (under autocast, cast X "
            "to the weight's dtype, as the LM head's own matmul would)"
        )
    if X.device != weight.device:
        raise ValueError(f"device mismatch: X is on {X.device} but weight is on {weight.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be a tensor of shape ({weight.shape[0]},), got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        if bias.device != weight.device or bias.dtype != weight.dtype:
            raise TypeError(f"bias must match weight's dtype and device ({weight.dtype}, {weight.device}), "
                            f"got ({bias.dtype}, {bias.device})")
    lead = tuple(X.shape[:-1])
    for k, a in enumerate(row_args):
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"row argument {k} must be a tensor, got {type(a).__name__}; "
                            "pass constants through functools.partial")
        if tuple(a.shape[: len(lead)]) != lead:
            raise ValueError(
                f"row argument {k} has shape {tuple(a.shape)} but must start with X's leading shape {lead} "
                f"(X is {tuple(X.shape)})"
            )
        if a.device != X.device:
            raise ValueError(f"device mismatch: row argument {k} is on {a.device} but X is on {X.device}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
