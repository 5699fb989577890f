"""Chunk planning: how many rows of X go through the LM head at once.

Memory. The Function's working set per chunk is a handful of ``[rows, V]`` tensors: the logits in the
input dtype (freed once f has used them), their float32 upcast, the log-softmax f keeps for its
backward, and in backward the gradients flowing through f. :func:`plan_chunk_size` turns a memory
budget in bytes into a row count with the model

    bytes(rows) = rows * V * (itemsize(input dtype) + k * 4),   k = LIVE_FP32_BUFFERS (eager f) or
                                                                     COMPILED_LIVE_FP32_BUFFERS (compiled f)

and clamps it to ``[1, n_rows]``. The model is deliberately pessimistic (f's own temporaries vary);
``docs/design.md`` compares it with measured peaks.

Time (given the :class:`Head`). Every chunk also pays a fixed cost: the GEMMs stream all of W (the forward's,
the recompute's and dX's; two with a frozen head), a trained head reads and writes the float32 ``[V, H]`` dW
accumulator, and each chunk has its kernel launches and Python. :func:`rows_for_time` prices it with a
device's :class:`DeviceModel` against a row's own cost (its GEMM FLOPs and its passes over ``[V]``) and asks
for the rows that make the fixed cost at most :data:`FIXED_COST_SHARE` of a chunk's time. The planner takes
the fewer of those rows and the rows the memory budget allows, where the default budget counts what the call
holds anyway: what the call adds (the chunk term and the ``[N, H]`` dX it fills) may reach :data:`WEIGHT_SHARE` of
W's own size (the call cannot run without W; a trained head holds a float32 ``[V, H]`` accumulator besides), so a
large head gets chunks large enough for its fixed cost while the peak keeps its order. docs/design.md, "Planning a
chunk", has the model, its constants and how they were measured.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

#: float32 ``[rows, V]`` buffers alive at once in a chunk of a typical f, measured with grpo_mel.memory
#: (docs/benchmarks.md, "Buffers per chunk"): in backward, log-probs and cross-entropy keep 3 (the
#: log-softmax saved for backward, the gather's gradient, dZ; the recomputed logits are freed as soon as f
#: has used them), also with an entropy that is only logged; log-probs + an entropy that receives a gradient
#: keep more (its graph saves the softmax).
LIVE_FP32_BUFFERS = 3
#: The same for f compiled per chunk (grpo_mel._compiled): the built-in log-probs / cross-entropy keep the logits
#: and dZ, fused forward and backward (measured with grpo_mel.memory, docs/benchmarks.md,
#: "Buffers per chunk"; asserted in tests/core/test_memory.py); the model counts the logits in their dtype plus one float32 buffer.
COMPILED_LIVE_FP32_BUFFERS = 1
#: Budget used on the CPU, and on CUDA when free memory cannot be read: 196 rows at V=32000 fp32, a small
#: fraction of the full-logits path's peak at N=2048, H=256 (docs/benchmarks.md, "CPU results"). It also keeps
#: each float32 [rows, V] buffer at ~24 MiB, under glibc's largest mmap threshold (32 MiB): larger buffers can
#: be fresh mmaps, page-faulted in on every chunk (benchmarks/results/chunk_anatomy.md). Much smaller chunks
#: make the CPU GEMMs lose efficiency and time grows.
DEFAULT_CPU_BUDGET_BYTES = 96 * 2**20
#: On CUDA with no explicit budget, this share of the currently free memory is used ...
CUDA_FREE_FRACTION = 0.25
#: ... but never more than this: 512 MiB is ~298 rows at V=128256 in bf16, so a 1-4K-token batch still
#: splits into several chunks (a chunk as large as N costs more than full logits), and it is the size of one
#: float32 tile of TRL's own fused head (4096 tokens x 32768 vocab). On an H200 its chunk term stays under the
#: float32 dW floor at V=128256, and larger chunks ran faster but peaked higher (docs/benchmarks.md, "GPU
#: results", the chunk sweep).
CUDA_MAX_BUDGET_BYTES = 512 * 2**20


def validate_chunk_size(chunk_size) -> None:
    """Raise unless ``chunk_size`` is None (automatic) or an int >= 1."""
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size must be an int >= 1 or None (automatic), got {chunk_size!r}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def validate_memory_budget(memory_budget) -> None:
    """Raise unless ``memory_budget`` is None or a finite number of bytes > 0."""
    if memory_budget is None:
        return
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, numbers.Real):
        raise TypeError(f"memory_budget must be a number of bytes or None, got {memory_budget!r}")
    if not math.isfinite(memory_budget) or memory_budget <= 0:
        raise ValueError(f"memory_budget must be a finite number of bytes > 0, got {memory_budget!r}")


def validate_compile(compile) -> None:
    """Raise unless ``compile`` is None (the device's default) or a bool."""
    if compile is not None and not isinstance(compile, bool):
        raise TypeError(f"compile must be True, False or None (the measured default), got {compile!r}")


#: On the CPU, a call whose logits would hold at least this many elements (N·V) and that will be differentiated runs
#: f compiled by default: measured at the 1B head (H=2048, V=128256, fp32, log-probs, the planner's chunk), compile
#: saved 0.8 s (frozen) per call at N=2048 and 2.5 s (frozen) to 5.1 s (trained) at N=4096, so its one-off 5–20 s
#: is paid back within tens of calls; at N·V ≤ 1024 × 128256 and at the reference shape (2048 × 32000) the gain was
#: within the spread or ~0.06 s, hundreds of calls. The threshold lies between those shapes (docs/benchmarks.md,
#: "Compiled chunks").
COMPILE_MIN_LOGITS = 2 * 10**8


def default_compile(device: torch.device | str, n_rows: int = 0, vocab_size: int = 0,
                    grad_follows: bool = True) -> bool:
    """Whether f runs compiled per chunk when the caller does not say (docs/benchmarks.md, "Compiled chunks").

    On the CPU: where a backward will follow and the call's logits would hold at least :data:`COMPILE_MIN_LOGITS`
    elements (what was measured to pay back the compile). On CUDA: False (compiled chunks are unmeasured there;
    the GPU suite times them).
    """
    if torch.device(device).type != "cpu" or not grad_follows:
        return False
    return n_rows * vocab_size >= COMPILE_MIN_LOGITS


def default_memory_budget(device: torch.device) -> int:
    """Bytes the chunk working set may use when the caller gives neither chunk_size nor budget."""
    if device.type == "cuda" and torch.cuda.is_available():
        try:
            free, _total = torch.cuda.mem_get_info(device)
        except RuntimeError:  # pragma: no cover - e.g. a device that refuses the query
            return DEFAULT_CPU_BUDGET_BYTES
        return int(max(DEFAULT_CPU_BUDGET_BYTES, min(free * CUDA_FREE_FRACTION, CUDA_MAX_BUDGET_BYTES)))
    return DEFAULT_CPU_BUDGET_BYTES


def bytes_per_row(vocab_size: int, dtype: torch.dtype, compiled: bool = False) -> int:
    """Modelled bytes one row of the chunk costs: the logits in ``dtype`` plus the fp32 buffers."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    k = COMPILED_LIVE_FP32_BUFFERS if compiled else LIVE_FP32_BUFFERS
    return vocab_size * (itemsize + k * 4)


#: The share of a chunk's time its fixed cost may take (docs/design.md, "Planning a chunk").
FIXED_COST_SHARE = 0.04
#: With the head known, what the call adds (the chunk term and the [N, H] dX) may reach this share of W's own size:
#: the call holds W anyway (and a trained head its float32 accumulator as well), so half of it leaves the peak's
#: order as it was.
WEIGHT_SHARE = 0.5


@dataclass(frozen=True)
class DeviceModel:
    """What the head's work costs on a kind of device: sustained GEMM throughput, memory bandwidth and a fixed
    overhead per chunk (launches, allocation, Python). Fitted from chunk-size sweeps (docs/design.md)."""

    gemm_flops: float  # FLOP/s of the head's GEMMs in the dtype the device runs them in
    bandwidth: float  # bytes/s streamed from memory (W, the dW accumulator, f's passes over [V])
    overhead: float  # seconds per chunk besides streaming


#: Per device type, fitted to chunk-size sweeps (docs/benchmarks.md, "A chunk's fixed cost"). CPU: this project's
#: 2-core x86_64 machine in float32 (benchmarks/bench_chunk_cost.py at the 1B head and at H=256, V=32000). CUDA: the
#: H200 chunk sweep in bf16 (~1 ms per extra chunk at the 1B head, a trained W), the only GPU measured.
DEVICE_MODELS = {
    "cpu": DeviceModel(gemm_flops=225e9, bandwidth=25e9, overhead=2e-3),
    "cuda": DeviceModel(gemm_flops=700e12, bandwidth=4.0e12, overhead=2.5e-4),
}

#: Passes over a row's [V] float32 values that f makes, forward and backward together (eager: the upcast,
#: log-softmax, the gather and its scatter, log-softmax's backward; compiled: read the logits twice, write dZ).
F_PASSES = {False: 12, True: 4}


@dataclass(frozen=True)
class Head:
    """What the planner prices beyond the working set: the head's width, its dtypes, whether W (or b) is trained,
    whether f runs compiled."""

    hidden: int
    weight_dtype: torch.dtype
    gemm_dtype: torch.dtype
    trained: bool
    compiled: bool = False

    def weight_bytes(self, vocab_size: int) -> int:
        """W's own size, ``V·H·itemsize``: what every call of the head holds already."""
        return vocab_size * self.hidden * _itemsize(self.weight_dtype)


def rows_for_time(vocab_size: int, head: Head, device: torch.device | str) -> int:
    """The rows that make a chunk's fixed cost :data:`FIXED_COST_SHARE` of its time, on ``device``'s model."""
    model = DEVICE_MODELS.get(torch.device(device).type, DEVICE_MODELS["cpu"])
    vh, g = vocab_size * head.hidden, _itemsize(head.gemm_dtype)
    # per chunk: W streamed by each GEMM that reads it (forward, recompute, dX; a frozen head: forward and dX), and
    # a trained head's float32 accumulator read and written by dW's GEMM
    streamed = (3 * vh * g + 2 * vh * 4) if head.trained else 2 * vh * g
    fixed = model.overhead + streamed / model.bandwidth
    # per row: 2·H·V FLOPs per GEMM (trained: forward, recompute, dX, dW; frozen: forward, dX) and f's passes
    per_row = (8 if head.trained else 4) * vh / model.gemm_flops + F_PASSES[head.compiled] * vocab_size * 4 / (
        model.bandwidth)
    share = FIXED_COST_SHARE
    return max(1, math.ceil(fixed * (1 - share) / (share * per_row)))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def plan_chunk_size(
    n_rows: int,
    vocab_size: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    chunk_size: int | None = None,
    memory_budget: float | None = None,
    head: Head | None = None,
) -> int:
    """Rows per chunk.

    Args:
        n_rows: rows of X (tokens), N.
        vocab_size: columns of the logits, V.
        dtype: dtype of the logits X·Wᵀ (X's dtype).
        device: where the logits live; sets the default budget.
        chunk_size: a fixed row count (>= 1); wins over ``memory_budget``. May exceed ``n_rows``.
        memory_budget: bytes the per-chunk working set may use; None picks
            :func:`default_memory_budget`, or with ``head`` the larger of that and :data:`WEIGHT_SHARE` of W's
            size less the ``[N, H]`` dX the call fills (counted at 4 bytes an element).
        head: the head's shape and training state: the rows are then also at most :func:`rows_for_time`'s
            (none are spent beyond what makes the fixed cost a small share), and the memory model counts a
            compiled f's buffers. None: the memory budget alone (eager f).

    Returns:
        An int in ``[1, max(n_rows, 1)]``.
    """
    validate_chunk_size(chunk_size)
    validate_memory_budget(memory_budget)
    upper = max(int(n_rows), 1)
    if chunk_size is not None:
        return min(int(chunk_size), upper)
    if memory_budget is None:
        memory_budget = default_memory_budget(torch.device(device))
        if head is not None:
            # what the call adds beyond what it holds anyway (W; a trained head's float32 accumulator): the chunk
            # term and the [N, H] dX it fills (float32 at most), half of W's size in all
            own = int(WEIGHT_SHARE * head.weight_bytes(vocab_size)) - int(n_rows) * head.hidden * 4
            memory_budget = max(memory_budget, own)
    compiled = head is not None and head.compiled
    rows = int(memory_budget // max(bytes_per_row(vocab_size, dtype, compiled), 1))
    if head is not None:
        rows = min(rows, rows_for_time(vocab_size, head, device))
    return max(1, min(rows, upper))
