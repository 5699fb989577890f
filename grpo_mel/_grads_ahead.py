"""A frozen head's strategy (no dW or db to form): the forward differentiates f, the backward recomputes nothing.

Chosen when neither W nor b needs a gradient (a LoRA policy's LM head). docs/design.md, "The frozen head:
gradients in the forward".
"""

from __future__ import annotations

import torch

from ._chunk_graph import ChunkGraph
from ._linear_grads import LinearGrads
from ._strategy import Call, Strategy


class GradsAhead(Strategy):
    """dX of a frozen head, formed in the forward chunk by chunk, before its upstream gradient is known.

    Autograd differentiates f's first output with a unit upstream gradient per row (a 0-dim output: its chunk's
    weight in the total), and the chunk's ``dZ·W`` is written into an ``[N, H]`` tensor. A row's output depends on
    that row alone (what chunking assumes), so the backward's dX is that tensor with each row multiplied by its
    upstream gradient; row arguments that need a gradient likewise. It serves a backward where only f's first
    output gets a gradient, and an f whose first output is per-row or 0-dim (else the Function recomputes).
    GEMMs: 4·N·H·V, as autograd of the full logits with a frozen W. In half precision the unit-gradient dX is kept in
    float32 and rounded once, after the multiply: as accurate as autograd, not its roundings bit for bit.
    """

    def __init__(self, call: Call, X, weight, bias, row_args):
        super().__init__(call)
        # the unit-gradient dX is kept in float32 (half GEMMs write float32 on CUDA): the upstream gradient is multiplied
        # in later, and only the product is rounded to X's dtype (docs/design.md, "The frozen head")
        self.lin = LinearGrads(X, weight, bias, call.needs.x, False, False, call.gemm_dtype, call.opts.fp32_grad_input,
                               dx_fp32=True)
        self.d_args = [torch.zeros_like(a) if need else None for a, need in zip(row_args, call.needs.args)]

    def forward_chunk(self, X, weight, bias, args_c, start, end):
        graph = ChunkGraph(self.call.opts.fn, X[start:end], weight, bias, args_c, self.call.needs.args, guess=True)
        out = graph.res[0]
        values = [r.detach() for r in graph.res]
        if not self.accepts(values):
            return values
        dz = None
        if out.requires_grad:
            unit = torch.full_like(out, self.call.scalar_weight(end - start)) if out.dim() == 0 else torch.ones_like(out)
            dz = graph.differentiate([out], [unit], self.d_args, start, end)
        del graph, out
        self.lin.add_chunk(start, end, X[start:end], dz)
        return values

    def accepts(self, res):
        return res[0].is_floating_point() and res[0].dim() <= 1

    def covers(self, live):
        return list(live) == [0]

    def backward(self, X, weight, bias, row_args, grad_outs, live):
        grad = grad_outs[0]

        def times_grad(t, dtype):
            if t is None:
                return None
            g = grad if grad.dim() == 0 else grad.reshape(-1, *[1] * (t.dim() - 1))
            return torch.mul(t, g.to(t.dtype)).to(dtype)  # rounded to the input's dtype once

        dX = times_grad(self.lin.dX, X.dtype)
        return (dX, None, None, *[times_grad(d, a.dtype) for d, a in zip(self.d_args, row_args)])
