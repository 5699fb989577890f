"""What one call of :class:`grpo_mel.linear.ChunkedLinear` shares between its forward and backward, and the base
of its chunk strategies.

A call runs with exactly one strategy (docs/design.md, "Chunk strategies"): it owns each chunk's forward and the
whole backward. The Function picks it (:func:`grpo_mel.linear.choose_strategy`) and falls back to the plain
recompute in one place when a strategy cannot serve what it is asked.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import torch
from torch.utils.checkpoint import get_device_states, set_device_states

from ._linear_grads import chunk_logits


@dataclass(frozen=True)
class Options:
    """Everything the Function takes besides the tensors it differentiates."""

    fn: Callable  # f(z_c, *row_args_c)
    chunk_size: int  # rows per chunk
    reduction: str  # how 0-dim outputs combine over chunks: "mean" | "sum"
    fp32_grad_input: bool  # see chunked_linear
    grad_follows: bool = False  # grad mode was on and an input requires grad: a backward may follow

    def bounds(self, n: int) -> list[tuple[int, int]]:
        """The chunks' ``(start, end)`` rows, in the forward's order: the short chunk (``n % chunk_size`` rows)
        first, so the last chunk, whose graph the forward keeps, is a full one and the backward recomputes fewer
        rows. ``n == 0``: one empty chunk (f still runs once, for the output shapes)."""
        c = self.chunk_size
        first = n % c or min(c, n)
        return [(0, first)] + [(s, s + c) for s in range(first, n, c)]


class Needs(NamedTuple):
    """Which inputs want a gradient: X, W, b and each row argument (``ctx.needs_input_grad`` without ``opts``)."""

    x: bool
    w: bool
    b: bool
    args: tuple[bool, ...]

    @classmethod
    def of(cls, needs_input_grad: Sequence[bool]) -> "Needs":
        _opts, x, w, b, *args = needs_input_grad  # the Function's inputs: (opts, X, weight, bias, *row_args)
        return cls(x, w, b, tuple(args))


@dataclass
class Call:
    """One call's shared state: its options, what needs a gradient, the forward's GEMM dtype, autocast and RNG
    state (the backward replays both, as ``torch.utils.checkpoint`` does), and which outputs are 0-dim."""

    opts: Options
    n: int
    needs: Needs
    gemm_dtype: torch.dtype
    autocast: dict
    rng: tuple
    scalar: list[bool] = field(default_factory=list)  # set by the first chunk's outputs

    @classmethod
    def begin(cls, opts: Options, X, weight, bias, needs: Needs) -> "Call":
        return cls(opts, X.shape[0], needs, gemm_dtype_of(X, weight, bias), _autocast_state(X.device),
                   (torch.get_rng_state(), *get_device_states(X)))

    @property
    def bounds(self) -> list[tuple[int, int]]:
        return self.opts.bounds(self.n)

    def scalar_weight(self, rows: int) -> float:
        """The weight of one chunk's 0-dim output in the total: its share of rows for "mean"."""
        return rows / self.n if self.opts.reduction == "mean" and self.n else 1.0

    def upstream(self, i: int, grad: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Output ``i``'s upstream gradient for rows ``start:end`` (a 0-dim output's, times the chunk's weight)."""
        return grad * self.scalar_weight(end - start) if self.scalar[i] else grad[start:end]

    @contextlib.contextmanager
    def rng_replay(self):
        """Run the block with the RNG state the forward started with (restored afterwards), so f's random draws
        repeat; the helpers are ``torch.utils.checkpoint``'s."""
        cpu, devices, states = self.rng
        kind = self.autocast["device_type"]
        with torch.random.fork_rng(devices=devices, device_type=kind):
            torch.set_rng_state(cpu)
            set_device_states(devices, states, device_type=kind)
            yield

    def autocast_replay(self) -> torch.autocast:
        """The forward's autocast state, for rebuilding a chunk's logits and f (the backward's own GEMMs run
        outside it, in the dtypes they name)."""
        return torch.autocast(**self.autocast)


class Strategy:
    """How one call's chunks run: :meth:`forward_chunk` per chunk, then :meth:`backward` once for the call."""

    def __init__(self, call: Call):
        self.call = call

    def forward_chunk(self, X, weight, bias, args_c, start: int, end: int) -> Sequence[torch.Tensor]:
        """f's outputs on rows ``start:end``, detached (what the forward returns)."""
        raise NotImplementedError

    def accepts(self, res: Sequence[torch.Tensor]) -> bool:
        """Whether this strategy can go on after a chunk gave ``res`` (else the Function recomputes instead)."""
        return True

    def covers(self, live: Sequence[int]) -> bool:
        """Whether :meth:`backward` can serve gradients for the outputs ``live`` (else the Function recomputes)."""
        return True

    def backward(self, X, weight, bias, row_args, grad_outs, live) -> tuple:
        """``(dX, dW, db, *d_row_args)``, each None where not needed."""
        raise NotImplementedError


def gemm_dtype_of(X: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.dtype:
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
