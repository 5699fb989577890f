"""One chunk's f graph for the backward: the logits as a non-leaf whose gradient dZ is caught on its way.

Used by :class:`grpo_mel.linear.MemoryEfficientLinear`'s backward (recompute), by its forward for the last
chunk (the graph is kept for the backward) and, with a frozen head, for every chunk (differentiated at once).
docs/design.md, "Why the recomputed logits are not a leaf". Also here: what ``output_needs_grad`` answers to f.
"""

from __future__ import annotations

import contextvars

import torch

from ._checks import as_outputs
from ._linear_grads import chunk_logits


#: Indices of f's outputs that receive a gradient, while the backward recomputes a chunk (or a Guess, while the
#: forward builds a graph: the kept last chunk's, or every chunk's of a frozen head); None otherwise.
LIVE_OUTPUTS: contextvars.ContextVar = contextvars.ContextVar("grpo_mel_live_outputs", default=None)


class Guess:
    """``output_needs_grad`` while the forward builds a graph (the kept last chunk, a frozen head's chunks), before
    anyone knows which outputs will get a gradient: the first output is assumed to, any other output f asks about is
    assumed not to (a logged entropy, GRPO's case) and remembered; if one of those does get a gradient, the backward
    recomputes."""

    def __init__(self):
        self.assumed_without_grad: set[int] = set()

    def __contains__(self, index: int) -> bool:
        if index == 0:
            return True
        self.assumed_without_grad.add(index)
        return False


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
    live = LIVE_OUTPUTS.get()
    if live is None:
        return torch.is_grad_enabled()
    return index in live


class ChunkGraph:
    """f's graph on one chunk: the logits come out of :class:`LogitsKeepingGrad` (dZ lands in ``dz_box``), row
    arguments that need a gradient are fresh leaves, and ``anchor`` is what ``autograd.grad`` differentiates."""

    def __init__(self, fn, x_c, weight, bias, args_c, arg_needs, live=None):
        """``live``: what ``output_needs_grad`` answers inside f (a :class:`Guess` in the forward); None: as set
        by the caller."""
        self.args = [a.detach().requires_grad_(True) if need else a for a, need in zip(args_c, arg_needs)]
        self.anchor = torch.empty((), device=x_c.device, requires_grad=True)  # never read: only a graph root
        self.dz_box = GradBox()
        token = LIVE_OUTPUTS.set(live) if live is not None else None
        try:
            with torch.enable_grad():
                # z is not a leaf: only the graph of f holds it, so it is freed as soon as f is done with it
                # (e.g. log_softmax keeps its output, not its input) and dZ arrives in dz_box.grad
                z = LogitsKeepingGrad.apply(self.anchor, x_c.detach(), weight.detach(), _detached(bias), self.dz_box)
                self.res = as_outputs(fn(z, *self.args))
        finally:
            if token is not None:
                LIVE_OUTPUTS.reset(token)


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
