"""A frozen head's chunks (no dW or db to form): the forward differentiates f, the backward recomputes nothing.

Used by :class:`grpo_mel.linear.MemoryEfficientLinear` when neither W nor b needs a gradient (a LoRA policy's LM
head) and its GEMMs run in float32 or float64. docs/design.md, "The frozen head: gradients in the forward".
"""

from __future__ import annotations

import torch

from ._chunk_graph import ChunkGraph
from ._linear_grads import LinearGrads


class GradsAhead:
    """dX of a frozen head, formed in the forward chunk by chunk, before its upstream gradient is known.

    Autograd differentiates f's first output with a unit upstream gradient per row (a 0-dim output: its chunk's
    weight in the total), and the chunk's ``dZ·W`` is written into an ``[N, H]`` tensor. A row's output depends on
    that row alone (what chunking assumes), so the backward's dX is that tensor with each row multiplied by its
    upstream gradient; row arguments that need a gradient likewise. f's other outputs are assumed to get no gradient
    (``output_needs_grad`` answers as for the kept chunk); if one does, the caller recomputes every chunk instead.
    GEMMs: 4·N·H·V, as autograd of the full logits with a frozen W.
    """

    def __init__(self, ctx, X, weight, bias, row_args, fp32_grad_input: bool):
        self.guess, self.arg_needs = ctx.guess, ctx.needs_input_grad[4:]
        self.weight, self.bias = weight, bias
        self.lin = LinearGrads(X, weight, bias, ctx.needs_input_grad[1], False, False, ctx.gemm_dtype, fp32_grad_input)
        self.d_args = [torch.zeros_like(a) if need else None for a, need in zip(row_args, self.arg_needs)]
        self.applies = True

    def chunk(self, fn, X, args_c, start: int, end: int, scalar_weight: float) -> list[torch.Tensor]:
        """f's outputs on rows ``start:end`` (detached); their dZ·W and row-argument gradients are stored.
        ``scalar_weight``: the chunk's weight in a 0-dim output's total (its share of rows for "mean")."""
        graph = ChunkGraph(fn, X[start:end], self.weight, self.bias, args_c, self.arg_needs, live=self.guess)
        out = graph.res[0]
        values = [r.detach() for r in graph.res]
        self.applies = out.is_floating_point() and out.dim() <= 1
        if not self.applies:
            return values
        dz = None
        if out.requires_grad:
            unit = torch.full_like(out, scalar_weight) if out.dim() == 0 else torch.ones_like(out)
            wrt = [graph.anchor] + [a for a, need in zip(graph.args, self.arg_needs) if need]
            got = torch.autograd.grad([out], wrt, [unit], allow_unused=True)
            for d, g in zip([d for d in self.d_args if d is not None], got[1:]):
                if g is not None:
                    d[start:end].copy_(g)
            dz = graph.dz_box.grad
        del graph, out
        self.lin.add_chunk(start, end, X[start:end], dz)
        return values

    def result(self, grad: torch.Tensor) -> tuple:
        """The backward's ``(dX, dW, db, *d_args)`` for the upstream gradient ``grad`` of f's first output."""
        def times_grad(t):
            if t is None:
                return None
            g = grad if grad.dim() == 0 else grad.reshape(-1, *[1] * (t.dim() - 1))
            return torch.mul(t, g, out=torch.empty_like(t))  # one rounding, in t's dtype
        return (times_grad(self.lin.dX), None, None, *[times_grad(d) for d in self.d_args])
