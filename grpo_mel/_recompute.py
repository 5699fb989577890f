"""The general strategy: each chunk's f runs without a graph in the forward and is recomputed in the backward.

``torch.utils.checkpoint`` per chunk (docs/design.md, "The algorithm"). Where a backward will follow, the forward
keeps the last chunk's f graph and the backward starts with it, so that chunk is not recomputed (docs/design.md,
"The kept last chunk").
"""

from __future__ import annotations

import torch

from ._checks import as_outputs
from ._chunk_graph import ChunkGraph, live_outputs
from ._linear_grads import LinearGrads, chunk_logits
from ._strategy import Call, Strategy


class Recompute(Strategy):
    """Forward under ``no_grad``; the backward rebuilds each chunk's logits and f with autograd on (the forward's
    RNG and autocast state replayed), differentiates f with the upstream gradients and applies the linear part's
    GEMMs (:class:`grpo_mel._linear_grads.LinearGrads`). ``keep_last``: the forward builds the last chunk's graph
    (``output_needs_grad`` answering by the guess) and the backward uses it instead of recomputing that chunk,
    unless an output f was told would get no gradient gets one."""

    def __init__(self, call: Call, keep_last: bool = False):
        super().__init__(call)
        self.keep_last = keep_last
        self.kept: ChunkGraph | None = None

    def forward_chunk(self, X, weight, bias, args_c, start, end):
        fn = self.call.opts.fn
        if self.keep_last and end >= self.call.n:
            self.kept = ChunkGraph(fn, X[start:end], weight, bias, args_c, self.call.needs.args, guess=True)
            return [r.detach() for r in self.kept.res]
        return as_outputs(fn(chunk_logits(X[start:end], weight, bias), *args_c))

    def covers(self, live):
        return self.kept is None or not self.kept.denied.intersection(live)

    def backward(self, X, weight, bias, row_args, grad_outs, live):
        call, needs = self.call, self.call.needs
        grads = LinearGrads(X, weight, bias, needs.x, needs.w, needs.b, call.gemm_dtype, call.opts.fp32_grad_input)
        d_args = [torch.zeros_like(a) if need else None for a, need in zip(row_args, needs.args)]
        bounds = call.bounds if call.n else []
        if self.kept is not None:
            # the kept graph first, so it is freed before any recompute; the recomputed chunks still run in the
            # forward's order (f's random draws replay in sequence)
            bounds = bounds[-1:] + bounds[:-1]
        with live_outputs(frozenset(live), denied=set()), call.rng_replay():  # (a set, as in the forward: one graph)
            for start, end in bounds:
                graph, self.kept = self.kept, None  # the kept graph is used once (a second backward recomputes)
                if graph is None:
                    with call.autocast_replay():
                        graph = ChunkGraph(call.opts.fn, X[start:end], grads.w_gemm, grads.b_gemm,
                                           [a[start:end] for a in row_args], needs.args)
                diff = [i for i in live if graph.res[i].requires_grad]
                dz = graph.differentiate([graph.res[i] for i in diff],
                                         [call.upstream(i, grad_outs[i], start, end).to(graph.res[i].dtype)
                                          for i in diff],
                                         d_args, start, end)
                del graph
                grads.add_chunk(start, end, X[start:end], dz)  # dz None: no output of the logits got a gradient
                del dz
        return (*grads.result(), *d_args)
