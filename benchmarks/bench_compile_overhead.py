"""What one more chunk costs in Python and wrappers, eager and compiled: a tiny head (no GEMM or f time to speak of),
one log-probs forward + backward with a frozen W (the gradients-in-the-forward path), 64 rows in 1 chunk and in 8,
timed round-robin (median of ``--repeats`` batches of ``--calls`` calls). docs/benchmarks.md, "Compiled chunks".

    python benchmarks/bench_compile_overhead.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from grpo_mel import linear_token_logprobs  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--chunks", type=int, default=8, help="the many-chunk case: rows split into this many chunks")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calls", type=int, default=50)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    X = torch.randn(a.rows, 16).requires_grad_()
    W = torch.randn(64, 16)
    labels = torch.randint(0, 64, (a.rows,))
    small = -(-a.rows // a.chunks)

    def call(compiled: bool, chunk: int) -> None:
        linear_token_logprobs(X, W, labels, chunk_size=chunk, compile=compiled).sum().backward()
        X.grad = None

    cases = [(c, chunk) for c in (False, True) for chunk in (a.rows, small)]
    for case in cases:  # warm-up: compiles the graphs
        call(*case)
        call(*case)
    times = {case: [] for case in cases}
    for _ in range(a.repeats):
        for case in cases:
            start = time.perf_counter()
            for _ in range(a.calls):
                call(*case)
            times[case].append((time.perf_counter() - start) / a.calls)
    med = {case: statistics.median(v) for case, v in times.items()}
    n_chunks = -(-a.rows // small)
    for compiled in (False, True):
        one, many = med[(compiled, a.rows)], med[(compiled, small)]
        print(f"{'compiled' if compiled else 'eager   '}: {1e3 * one:.3f} ms per call in 1 chunk, {1e3 * many:.3f} ms "
              f"in {n_chunks}; per extra chunk {1e3 * (many - one) / (n_chunks - 1):.3f} ms")


if __name__ == "__main__":
    main()
