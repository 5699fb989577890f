"""Optional fast path for the built-in log-probs and cross-entropy: a backward from a saved log-sum-exp.

The generic path (:mod:`grpo_mel.linear`) recomputes each chunk's logits in backward and lets autograd run
f's forward and backward again. For the front doors' own f the derivative is known in closed form:
with ``s = logit_scale / temperature`` and ``y = s·z``,

    log p(label) = y[label] - lse(y)        ∂ log p(label) / ∂z = s · (onehot(label) - exp(y - lse(y)))

so the forward saves ``lse(y)`` ([N] float32, 4 bytes a row) and the backward forms ``dZ`` from the
recomputed logits in place: one ``[c, V]`` buffer instead of the log-softmax, the gather's gradient and
dZ, and no second softmax. The GEMM is still recomputed. Cross-entropy is ``-log p`` (its upstream
gradient enters negated). An entropy output is computed in forward; if it receives a gradient (an entropy
bonus), the backward takes the generic path for that call (``covers``), so only the log-prob derivative
is written by hand. ``LabelLogprob`` is also a plain f (``__call__``): the generic path and the kept-graph
(one-chunk) path run it as any f. Used by :mod:`grpo_mel.fused` when there is no softcap and no label
smoothing; tested against the generic path and a full-logits reference (tests/core/test_saved_lse.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .functions import cross_entropy, token_logprobs, token_logprobs_and_entropy


@dataclass(frozen=True)
class LabelLogprob:
    """f(z, labels) = log p(label) ([c]; 0 at ignored rows), or ``-log p`` (``negate``: cross-entropy), with
    the entropy as a second output when ``with_entropy``."""

    temperature: float = 1.0
    logit_scale: float = 1.0
    ignore_index: int | None = None
    negate: bool = False
    with_entropy: bool = False
    #: float32 [c, V] buffers a chunk keeps (the planner's k): the logits' own buffer, plus one more at worst (the
    #: softmax numerator in forward with the entropy, the last chunk's logits kept for the backward, or with bf16
    #: input dZ's bf16 rounding and its float32 upcast for dW on the CPU)
    fp32_buffers = 2

    def __call__(self, z: torch.Tensor, labels: torch.Tensor):
        """The same values through the plain functions (autograd differentiates them)."""
        if self.negate:
            return cross_entropy(z, labels, ignore_index=self.ignore_index, logit_scale=self.logit_scale)
        f = token_logprobs_and_entropy if self.with_entropy else token_logprobs
        return f(z, labels, temperature=self.temperature, logit_scale=self.logit_scale, ignore_index=self.ignore_index)

    def covers(self, live: list[int]) -> bool:
        """Whether :meth:`logits_grad` gives the whole gradient: only the log-prob output (0) receives one."""
        return live == [0]

    def forward_with_stat(self, z: torch.Tensor, labels: torch.Tensor):
        """``(outputs, lse)`` for one chunk, under ``no_grad``: outputs as ``__call__``'s, lse [c] float32.

        Overwrites a float32 ``z`` (the Function's own chunk logits) to keep one [c, V] buffer.
        """
        y = self._scaled_in_place(z)  # [c, V] float32
        safe, valid = self._labels(labels)
        label_y = y.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        m = y.amax(-1, keepdim=True)
        if self.with_entropy:  # H = lse - Σ p·y with p = e / Σe, e = exp(y - m): one more buffer, e
            e = (y - m).exp_()
            total = e.sum(-1)
            lse = total.log().add_(m.squeeze(-1))
            entropy = lse - e.mul_(y).sum(-1).div_(total)
        else:
            lse = y.sub_(m).exp_().sum(-1).log_().add_(m.squeeze(-1))
        lp = label_y - lse
        if valid is not None:
            lp = lp.masked_fill(~valid, 0.0)
        outs = (-lp if self.negate else lp,)
        return (outs + (entropy,) if self.with_entropy else outs), lse

    def logits_grad(self, z: torch.Tensor, lse: torch.Tensor, grads, labels: torch.Tensor) -> torch.Tensor:
        """dZ ([c, V], float32) for the upstream gradient ``grads[0]`` ([c]) of the log-prob output.

        Forms it in a float32 ``z``'s own buffer (the Function's recomputed chunk logits).
        """
        g = grads[0].float()
        safe, valid = self._labels(labels)
        if valid is not None:  # an ignored row's output is the constant 0
            g = g.masked_fill(~valid, 0.0)
        gs = g * (self.logit_scale / self.temperature)
        if self.negate:
            gs = -gs
        dz = self._scaled_in_place(z).sub_(lse.unsqueeze(-1)).exp_().mul_(-gs.unsqueeze(-1))  # -gs·softmax(y)
        return dz.scatter_add_(-1, safe.unsqueeze(-1), gs.unsqueeze(-1))  # + gs at the label

    def _scaled_in_place(self, z: torch.Tensor) -> torch.Tensor:
        """:func:`~grpo_mel.functions.prepare_logits` without softcap (same ops, same values), in place."""
        y = z.float()
        if self.logit_scale != 1.0:
            y.mul_(self.logit_scale)
        if self.temperature != 1.0:
            y.div_(self.temperature)
        return y

    def _labels(self, labels: torch.Tensor):
        if self.ignore_index is None:
            return labels.long(), None
        valid = labels != self.ignore_index
        return labels.masked_fill(~valid, 0).long(), valid
