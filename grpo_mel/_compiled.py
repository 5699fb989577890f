"""f under ``torch.compile`` (Inductor): each chunk's f and its autograd backward as fused kernels.

:func:`compiled` wraps a transformation function so every chunk runs it compiled: Dynamo traces f, AOTAutograd
derives its backward from f's graph (no derivative is written by hand) and Inductor fuses the elementwise passes
over the ``[c, V]`` logits (the float32 upcast, log-softmax, gather, entropy) into a few kernels, forward and
backward, which also keeps fewer ``[c, V]`` buffers alive (docs/design.md, "Compiled chunks").

* One compile per function for all chunk sizes: the row dimension of the logits and of every row argument is
  marked unbacked-dynamic, so neither the short chunk nor a call with another N compiles again (nor does a
  one-row chunk, which a backed dynamic size would specialise). A forward under ``no_grad`` and one that builds a
  graph are two graphs; ``output_needs_grad`` is read as a guarded value (one graph per answer).
* Compiled functions are cached by the underlying Python function (``functools.partial`` arguments and keywords
  are passed through, so a front door's fresh partial per call finds the same cache entry).
* The backward is compiled with the forward (``force_non_lazy_backward_lowering``, set only while a graph
  compiles), so a compile failure surfaces at the first call: f then runs eagerly, for good, with one warning
  naming the function and the error. Never a different number, only a slower one.
* Inside a region that is itself being compiled (a user's ``torch.compile`` of code that calls the head), f runs
  as written: the outer compile traces it.
"""

from __future__ import annotations

import functools
import types
import warnings
from typing import Callable

import torch

_COMPILED: dict[Callable, Callable] = {}  # underlying function -> torch.compile of it
_FAILED: dict[Callable, str] = {}  # underlying function -> why its compile failed (runs eagerly from then on)


def compiled(fn: Callable, requested: bool = True) -> Callable:
    """``fn`` to run compiled per chunk; ``fn`` itself where it cannot be (a callable that is neither a Python
    function nor a ``functools.partial`` of one), with one warning where the caller asked for compile
    (``requested``; without it, compile is only the device's default and the eager ``fn`` is its tested
    alternative)."""
    base, args, kwargs = _unwrap(fn)
    if not isinstance(base, types.FunctionType):
        if requested:
            _warn_once(base, f"{type(fn).__name__} is not a Python function or a functools.partial of one")
        return fn
    return _CompiledCall(fn, base, args, kwargs)


def _unwrap(fn) -> tuple[Callable, tuple, dict]:
    args, kwargs = (), {}
    while isinstance(fn, functools.partial):
        args, kwargs = fn.args + args, {**fn.keywords, **kwargs}
        fn = fn.func
    return fn, args, kwargs


class _CompiledCall:
    """Calls the cached compiled ``base(*args, z, *row_args, **kwargs)``; ``fn`` eagerly where that is not
    possible or failed."""

    def __init__(self, fn, base, args, kwargs):
        self.fn, self.base, self.args, self.kwargs = fn, base, args, kwargs

    def __call__(self, z: torch.Tensor, *row_args: torch.Tensor):
        if self.base in _FAILED or torch.compiler.is_compiling() or z.shape[0] == 0:
            return self.fn(z, *row_args)
        # a chunk's rows of a row argument are a view at another storage offset in every chunk, and Dynamo guards
        # on offsets 0 and 1: a copy (c elements) starts at 0 in all of them
        row_args = tuple(a.clone() for a in row_args)
        for t in (z, *row_args):
            if t.dim() > 0:
                torch._dynamo.decorators.mark_unbacked(t, 0)
        c = _COMPILED.get(self.base)
        if c is None:
            c = _COMPILED[self.base] = torch.compile(self.base, backend=_inductor_with_backward, dynamic=False)
        try:
            with warnings.catch_warnings():
                # Dynamo reads the chunk's logits' .grad while tracing: not a user's mistake, so not a warning to them
                # (and not an error under -W error, which would make the compile fail)
                warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
                return c(*self.args, z, *row_args, **self.kwargs)
        except torch._dynamo.exc.TorchDynamoException as e:
            _FAILED[self.base] = _why(e)
            _warn_once(self.base, _FAILED[self.base])
            return self.fn(z, *row_args)


def _inductor_with_backward(gm, example_inputs):
    """Inductor, with the backward compiled together with the forward (where AOTAutograd would defer it to the first
    backward), so that a failure to compile either surfaces at the forward call; the setting is on only while
    this graph compiles."""
    from torch._inductor.compile_fx import compile_fx

    with torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
        return compile_fx(gm, example_inputs)


def _why(e: BaseException) -> str:
    """The error and, where it wraps one, the error inside it that caused it (first lines)."""
    root = e
    while getattr(root, "inner_exception", None) or root.__cause__:
        root = getattr(root, "inner_exception", None) or root.__cause__
    first = (str(root).strip().splitlines() or [""])[0]
    return type(e).__name__ + (f" ({type(root).__name__}: {first})" if root is not e else f": {first}")


_WARNED: set = set()


def _warn_once(base, why: str) -> None:
    key = getattr(base, "__qualname__", type(base).__qualname__)
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(f"grpo_mel: the transformation function {key} runs eagerly, not compiled: {why}", stacklevel=3)
