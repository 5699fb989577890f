"""Anatomy of one chunk: how many float32 [c, V] buffers it holds, and how its size meets the CPU allocator.

Part 1, time (CPU, run first): the forward pass alone (``no_grad``) at N=2048, H=256, V=32000 for several
chunk sizes, median wall time and the minor page faults per pass (``getrusage``). Chunks whose float32 [c, V]
buffers exceed glibc's largest mmap threshold (32 MiB) can be fresh mmaps, page-faulted in on every chunk
(whether they are depends on what the process allocated before, hence run first).

Part 2, memory (deterministic; grpo_mel.memory.peak_memory): for each f and dtype, one forward + backward
(or forward only, under ``no_grad``) through ``chunked_linear`` with a fixed chunk, and
``k = (peak - fixed) / (c * V * 4)`` with ``fixed`` = the float32 dW accumulator + dX for forward + backward,
0 for forward only. k is what ``grpo_mel.planning.LIVE_FP32_BUFFERS`` models.

Example::

    python benchmarks/bench_chunk_anatomy.py --md benchmarks/results/chunk_anatomy.md
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from grpo_mel import chunked_linear  # noqa: E402
from grpo_mel.functions import cross_entropy, token_logprobs, token_logprobs_and_entropy  # noqa: E402
from grpo_mel.memory import peak_memory  # noqa: E402


def _grad_of(outs, which):
    """The scalar to differentiate: the sum of the outputs named in ``which`` (indices)."""
    outs = outs if isinstance(outs, tuple) else (outs,)
    return sum(outs[i].float().sum() for i in which)


CASES = {
    # name: (f, indices of outputs that get a gradient; None = forward only under no_grad)
    "log-probs": (token_logprobs, (0,)),
    "log-probs + logged entropy": (token_logprobs_and_entropy, (0,)),
    "log-probs + entropy with gradient": (token_logprobs_and_entropy, (0, 1)),
    "cross-entropy (per row)": (functools.partial(cross_entropy, ignore_index=-100), (0,)),
    "log-probs, forward only": (token_logprobs, None),
    "log-probs + entropy, forward only": (token_logprobs_and_entropy, None),
}


def buffer_counts(n, h, v, chunk, dtypes) -> list[tuple[str, str, float, float]]:
    rows = []
    for dtype in dtypes:
        torch.manual_seed(0)
        X = torch.randn(n, h, dtype=dtype, requires_grad=True)
        W = (torch.randn(v, h) / 8).to(dtype).requires_grad_(True)
        labels = torch.randint(0, v, (n,))
        for name, (f, which) in CASES.items():
            if which is None:
                def step():
                    with torch.no_grad():
                        return chunked_linear(X, W, f, labels, chunk_size=chunk)
                fixed = 0
            else:
                def step():
                    return torch.autograd.grad(_grad_of(chunked_linear(X, W, f, labels, chunk_size=chunk), which),
                                               [X, W])
                fixed = v * h * 4 + n * h * X.element_size()  # float32 dW accumulator + dX
            _, peak = peak_memory(step, device="cpu")
            rows.append((name, str(dtype).replace("torch.", ""), peak / 2**20, (peak - fixed) / (chunk * v * 4)))
    return rows


def forward_times(n, h, v, chunks, repeats) -> list[tuple[int, float, float, float]]:
    torch.manual_seed(0)
    X, W = torch.randn(n, h), torch.randn(v, h) / 16
    labels = torch.randint(0, v, (n,))
    out = []
    for c in chunks:
        def fwd():
            with torch.no_grad():
                chunked_linear(X, W, token_logprobs, labels, chunk_size=c)
        fwd()
        times, faults = [], []
        for _ in range(repeats):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            fwd()
            times.append(time.perf_counter() - t0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        out.append((c, c * v * 4 / 2**20, statistics.median(times), statistics.median(faults)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--md", help="also write the tables here")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--chunks", type=int, nargs="+", default=[128, 196, 256, 262, 320, 430, 512])
    args = p.parse_args(argv)
    cmd = "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))
    lines = [f"Command: `{cmd}`  ", f"torch {torch.__version__}, {os.cpu_count()} CPU cores, "
             f"torch threads {torch.get_num_threads()}", "",
             "### Forward pass alone vs chunk rows (N=2048, H=256, V=32000, fp32, log-probs)", "",
             "Timed first, in a fresh process: what glibc does with a large block depends on what the process "
             "allocated and freed before (after part 2 the same sweep showed no page faults at any size).", "",
             "| rows | one fp32 [c, V] buffer MiB | median s | minor page faults per pass |",
             "|--:|--:|--:|--:|"]
    for c, mib, t, fl in forward_times(2048, 256, 32000, args.chunks, args.repeats):
        lines.append(f"| {c} | {mib:.1f} | {t:.3f} | {fl:.0f} |")
    lines += ["", "### Float32 [c, V] buffers per chunk (N=512, H=64, V=32000, c=128)", "",
              "| f | dtype | peak MiB | k |", "|---|---|--:|--:|"]
    for name, dt, mib, k in buffer_counts(512, 64, 32000, 128, (torch.float32, torch.bfloat16)):
        lines.append(f"| {name} | {dt} | {mib:.1f} | {k:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.md:
        with open(args.md, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
