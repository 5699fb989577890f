"""One variant on one case of the LM-head benchmark (``benchmarks/bench_lm_head.py``): a forward + backward, the
warm-up's check against naive, one timed run, the allocator peak."""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass

import torch

from grpo_mel.memory import peak_memory
from lm_head_variants import IGNORE, Variant


@dataclass
class Case:
    task: str
    X: torch.Tensor
    W: torch.Tensor
    labels: torch.Tensor
    g: torch.Tensor  # upstream gradient for per-row outputs


def make_case(task, n, h, v, dtype, device, seed=0, frozen_weight=False) -> Case:
    """``frozen_weight``: W without gradient (the LM head of a LoRA policy): the step computes dX only."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, h, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    W = (torch.randn(v, h, generator=gen) * (2.0 / math.sqrt(h))).to(device=device, dtype=dtype)
    W.requires_grad_(not frozen_weight)
    labels = torch.randint(0, v, (n,), generator=gen)
    if task == "ce":
        labels[torch.rand(n, generator=gen) < 0.1] = IGNORE
    g = torch.randn(n, generator=gen)
    return Case(task, X, W, labels.to(device), g.to(device))


def step(variant: Variant, case: Case):
    """One forward + backward; returns (detached outputs, dX, dW)."""
    case.X.grad = None
    case.W.grad = None
    outs = variant.fn(case.task, case.X, case.W, case.labels)
    head = outs[0]
    if head.dim() == 0:
        head.backward()
    else:
        torch.autograd.backward([head], [case.g.to(head.dtype)])
    return tuple(o.detach() for o in outs), case.X.grad, case.W.grad


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_diff(a, b) -> float:
    if a is None or b is None:
        return float("nan")
    return (a.float() - b.float()).abs().max().item()


def _rel(a, b) -> float:
    d = _max_diff(a, b)
    return d / max(b.float().abs().max().item(), 1e-30)


def check(variant: Variant, case: Case, ref, tol: float) -> tuple[dict, tuple | None]:
    """Warm-up run; its outputs and gradients are compared with naive's (``ref``)."""
    outs, dX, dW = step(variant, case)
    _sync(case.X.device)
    chk = {}
    if ref is not None:
        r_outs, r_dX, r_dW = ref
        chk["diff_out"] = _max_diff(outs[0], r_outs[0])
        chk["diff_ent"] = _max_diff(outs[1], r_outs[1]) if len(outs) > 1 and len(r_outs) > 1 else float("nan")
        chk["diff_dX"] = _max_diff(dX, r_dX)
        chk["diff_dW"] = _max_diff(dW, r_dW)
        rels = [_rel(outs[0], r_outs[0]), _rel(dX, r_dX)] + ([_rel(dW, r_dW)] if r_dW is not None else [])
        if (dW is None) != (r_dW is None):
            rels.append(float("inf"))  # one side computed dW and the other did not
        if len(outs) > 1 and len(r_outs) > 1:
            rels.append(_rel(outs[1], r_outs[1]))
        chk["max_rel_diff"] = max(rels)
        chk["ok"] = "ok" if chk["max_rel_diff"] <= tol else "WRONG"
    result = ((outs, dX.detach().clone(), None if dW is None else dW.detach().clone()) if variant.name == "naive"
              else None)
    del outs, dX, dW
    clear(case)
    return chk, result


def clear(case: Case) -> None:
    case.X.grad = case.W.grad = None
    gc.collect()
    if case.X.device.type == "cuda":
        torch.cuda.empty_cache()


def time_once(variant: Variant, case: Case) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one step. On a shared or virtual CPU machine the CPU
    time is the steadier number (it does not count time the process waited for a core); on CUDA only
    the wall time means anything."""
    case.X.grad = case.W.grad = None
    _sync(case.X.device)
    c0, t0 = time.process_time(), time.perf_counter()
    step(variant, case)
    _sync(case.X.device)
    t, c = time.perf_counter() - t0, time.process_time() - c0
    case.X.grad = case.W.grad = None
    return t, c


def peak_of(variant: Variant, case: Case) -> int:
    clear(case)
    _, peak = peak_memory(lambda: step(variant, case), case.X.device)
    clear(case)
    return peak
