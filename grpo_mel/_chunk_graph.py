"""One chunk's f graph for the backward: the logits as a non-leaf whose gradient dZ is caught on its way.

Used by :class:`grpo_mel.linear.MemoryEfficientLinear`'s backward (recompute), by its forward for the last
chunk (the graph is kept for the backward) and, with a frozen head, for every chunk (differentiated at once).
docs/design.md, "Why the recomputed logits are not a leaf". Also here: what ``output_needs_grad`` answers to f.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from ._checks import as_outputs
from ._linear_grads import chunk_logits


class _Live(threading.local):
    """Indices of f's outputs that receive a gradient, while the backward recomputes a chunk (or :data:`GUESS`,
    while the forward builds a graph: the kept last chunk's, or every chunk's of a frozen head); None otherwise.
    Thread-local, and a plain attribute so that ``torch.compile`` reads it and guards on it (a ``ContextVar``
    breaks its graph)."""

    outputs: frozenset[int] | None = None
    denied: set[int] | None = None  # where given, the indices output_needs_grad answered False for are added


_LIVE = _Live()

#: What ``output_needs_grad`` answers while the forward builds a graph, before anyone knows which outputs will get a
#: gradient: output 0 will, the others not (a logged entropy, GRPO's case). The outputs f asked about are recorded;
#: should one of them get a gradient after all, the graph does not serve it and the backward recomputes.
GUESS = frozenset({0})


@contextlib.contextmanager
def live_outputs(live: frozenset[int] | None, denied: set[int] | None = None):
    """Within the block, ``output_needs_grad(i)`` answers ``i in live`` and adds each ``i`` it answers False for to
    ``denied`` (``live`` None: as the caller had it)."""
    if live is None:
        yield
        return
    before = _LIVE.outputs, _LIVE.denied
    _LIVE.outputs, _LIVE.denied = frozenset(live), denied
    try:
        yield
    finally:
        _LIVE.outputs, _LIVE.denied = before


def output_needs_grad(index: int) -> bool:
    """For use inside a transformation function f: will f's output ``index`` be differentiated?

    While :class:`MemoryEfficientLinear`'s backward recomputes a chunk, True only for the outputs that
    received an upstream gradient (e.g. False for an entropy that is only logged). While the forward builds a
    graph (the last chunk's, kept for the backward; with a frozen head, every chunk's), True for output 0 and False
    for the others (should one of them get a gradient after all, the backward recomputes). Elsewhere (the
    forward's other chunks, or f called on its own) ``torch.is_grad_enabled()``: False in the chunked forward
    (``no_grad``). An f may compute an output that is not differentiated under ``torch.no_grad()``, so its graph
    (and the ``[c, V]`` tensors the graph would save) is never built. The value must be the same either way: only
    the graph may differ.
    """
    live = _LIVE.outputs
    if live is None:
        return torch.is_grad_enabled()
    if index in live:
        return True
    if _LIVE.denied is not None:
        _LIVE.denied.add(index)
    return False


class ChunkGraph:
    """f's graph on one chunk: the logits come out of :class:`LogitsKeepingGrad` (dZ lands in ``dz_box``), row
    arguments that need a gradient are fresh leaves, and ``anchor`` is what ``autograd.grad`` differentiates."""

    def __init__(self, fn, x_c, weight, bias, args_c, arg_needs, guess: bool = False):
        """``guess``: built in the forward, with ``output_needs_grad`` answering by :data:`GUESS`; the outputs it
        said no to are in ``denied`` (a graph built in the backward answers as the backward set it)."""
        self.arg_needs = arg_needs
        self.args = [a.detach().requires_grad_(True) if need else a for a, need in zip(args_c, arg_needs)]
        self.anchor = torch.empty((), device=x_c.device, requires_grad=True)  # never read: only a graph root
        self.dz_box = GradBox()
        self.denied: set[int] = set()
        with live_outputs(GUESS if guess else None, self.denied), torch.enable_grad():
            # z is not a leaf: only the graph of f holds it, so it is freed as soon as f is done with it
            # (e.g. log_softmax keeps its output, not its input) and dZ arrives in dz_box.grad
            z = LogitsKeepingGrad.apply(self.anchor, x_c.detach(), weight.detach(), _detached(bias), self.dz_box)
            self.res = as_outputs(fn(z, *self.args))

    def differentiate(self, outputs, grad_outputs, d_args, start: int, end: int) -> torch.Tensor | None:
        """Backpropagate ``grad_outputs`` from ``outputs`` (some of ``res``) through f, once: row arguments'
        gradients go into rows ``start:end`` of ``d_args`` (None where not needed); returns dZ ([c, V]; None where
        no output that depends on the logits got a gradient)."""
        if outputs:
            wrt = [self.anchor] + [a for a, need in zip(self.args, self.arg_needs) if need]
            got = torch.autograd.grad(outputs, wrt, grad_outputs, allow_unused=True)
            for d, g in zip([d for d in d_args if d is not None], got[1:]):
                if g is not None:
                    d[start:end].copy_(g)
        dz, self.dz_box.grad = self.dz_box.grad, None
        return dz


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


class GradBox:
    """Where :class:`LogitsKeepingGrad` leaves the gradient of the logits (dZ_c) for the backward loop."""

    grad: torch.Tensor | None = None


class LogitsKeepingGrad(torch.autograd.Function):
    """Recomputes a chunk's logits as a non-leaf and puts their gradient dZ in a :class:`GradBox`.

    A leaf ``z.requires_grad_()`` would be held by its AccumulateGrad node until the chunk's backward is
    over; this node holds nothing, so the [c, V] logits live only as long as f's graph needs them. Its
    input ``anchor`` (a 0-dim leaf that is never read) is what ``autograd.grad`` differentiates towards.
    """

    @staticmethod
    def forward(ctx, anchor, x_c, weight, bias, box):
        ctx.box = box
        return chunk_logits(x_c, weight, bias)

    @staticmethod
    def backward(ctx, dz):
        ctx.box.grad = dz
        return None, None, None, None, None
