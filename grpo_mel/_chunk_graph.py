"""One chunk's f graph for the backward: the logits as a non-leaf whose gradient dZ is caught on its way.

Used by :class:`grpo_mel.linear.MemoryEfficientLinear`'s backward (recompute) and by its forward for the last
chunk (the graph is kept for the backward). docs/design.md, "Why the recomputed logits are not a leaf".
"""

from __future__ import annotations

import torch

from ._checks import as_outputs
from ._linear_grads import chunk_logits


class ChunkGraph:
    """f's graph on one chunk: the logits come out of :class:`LogitsKeepingGrad` (dZ lands in ``dz_box``), row
    arguments that need a gradient are fresh leaves, and ``anchor`` is what ``autograd.grad`` differentiates."""

    def __init__(self, fn, x_c, weight, bias, args_c, arg_needs):
        self.args = [a.detach().requires_grad_(True) if need else a for a, need in zip(args_c, arg_needs)]
        self.anchor = torch.empty((), device=x_c.device, requires_grad=True)  # never read: only a graph root
        self.dz_box = GradBox()
        with torch.enable_grad():
            # z is not a leaf: only the graph of f holds it, so it is freed as soon as f is done with it
            # (e.g. log_softmax keeps its output, not its input) and dZ arrives in dz_box.grad
            z = LogitsKeepingGrad.apply(self.anchor, x_c.detach(), weight.detach(), _detached(bias), self.dz_box)
            self.res = as_outputs(fn(z, *self.args))


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
