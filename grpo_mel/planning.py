"""Chunk planning: how many rows of X go through the LM head at once.

The Function's working set per chunk is a handful of ``[rows, V]`` tensors: the logits in the
input dtype (freed once f has used them), their float32 upcast, the log-softmax f keeps for its
backward, and in backward the gradients flowing through f. :func:`plan_chunk_size` turns a memory
budget in bytes into a row count with the model

    bytes(rows) = rows * V * (itemsize(input dtype) + LIVE_FP32_BUFFERS * 4)

and clamps it to ``[1, n_rows]``. The model is deliberately pessimistic (f's own temporaries vary);
``docs/design.md`` compares it with measured peaks.
"""

from __future__ import annotations

import math
import numbers

import torch

#: float32 ``[rows, V]`` buffers alive at once in a chunk of a typical f, measured with grpo_mel.memory
#: (docs/benchmarks.md, "Buffers per chunk"): in backward, log-probs and cross-entropy keep 3 (the
#: log-softmax saved for backward, the gather's gradient, dZ; the recomputed logits are freed as soon as f
#: has used them), also with an entropy that is only logged; log-probs + an entropy that receives a gradient
#: keep more (its graph saves the softmax).
LIVE_FP32_BUFFERS = 3
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


def default_memory_budget(device: torch.device) -> int:
    """Bytes the chunk working set may use when the caller gives neither chunk_size nor budget."""
    if device.type == "cuda" and torch.cuda.is_available():
        try:
            free, _total = torch.cuda.mem_get_info(device)
        except RuntimeError:  # pragma: no cover - e.g. a device that refuses the query
            return DEFAULT_CPU_BUDGET_BYTES
        return int(max(DEFAULT_CPU_BUDGET_BYTES, min(free * CUDA_FREE_FRACTION, CUDA_MAX_BUDGET_BYTES)))
    return DEFAULT_CPU_BUDGET_BYTES


def bytes_per_row(vocab_size: int, dtype: torch.dtype) -> int:
    """Modelled bytes one row of the chunk costs: the logits in ``dtype`` plus the fp32 buffers."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return vocab_size * (itemsize + LIVE_FP32_BUFFERS * 4)


def plan_chunk_size(
    n_rows: int,
    vocab_size: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    chunk_size: int | None = None,
    memory_budget: float | None = None,
) -> int:
    """Rows per chunk.

    Args:
        n_rows: rows of X (tokens), N.
        vocab_size: columns of the logits, V.
        dtype: dtype of the logits X·Wᵀ (X's dtype).
        device: where the logits live; sets the default budget.
        chunk_size: a fixed row count (>= 1); wins over ``memory_budget``. May exceed ``n_rows``.
        memory_budget: bytes the per-chunk working set may use; None picks
            :func:`default_memory_budget`.

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
    rows = int(memory_budget // max(bytes_per_row(vocab_size, dtype), 1))
    return max(1, min(rows, upper))
