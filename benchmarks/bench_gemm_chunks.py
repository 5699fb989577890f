"""The LM head's two GEMMs, full-N against chunked: what chunking alone costs the GEMMs on this machine.

At the 1B head (H=2048, V=128256), fp32: ``X·Wᵀ`` (the logits) and ``G·W`` (dX from dZ) over N rows at once and in
chunks of each ``--chunks`` size, timed round-robin, median of ``--repeats``. docs/benchmarks.md, "The 1B head
against the targets (CPU, issue 23)". With ``--naive`` the frozen head's naive path (``F.linear``, float32
log-softmax, gather, backward to X: the same two GEMMs plus its passes over ``[N, V]``) runs in the same round-robin,
and each row's two GEMMs are also given as a share of its time: the floor any chunked frozen head starts from.

    python benchmarks/bench_gemm_chunks.py --tokens 2048 --chunks 256 512 1024 --repeats 3
    python benchmarks/bench_gemm_chunks.py --tokens 4096 --chunks 512 1024 --repeats 5 --naive
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--chunks", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--naive", action="store_true", help="also time the naive frozen head (log-probs) in each round")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    X = torch.randn(a.tokens, a.hidden) * 0.02
    W = torch.randn(a.vocab, a.hidden) * 0.02
    G = torch.randn(max(a.chunks + [a.tokens]), a.vocab) * 0.01  # dZ rows, reused (its values do not matter)

    def run(chunk: int) -> tuple[float, float]:
        fwd = dx = 0.0
        for start in range(0, a.tokens, chunk):
            end = min(start + chunk, a.tokens)
            t0 = time.perf_counter()
            X[start:end] @ W.T
            t1 = time.perf_counter()
            G[: end - start] @ W
            t2 = time.perf_counter()
            fwd, dx = fwd + t1 - t0, dx + t2 - t1
        return fwd, dx

    labels = torch.randint(0, a.vocab, (a.tokens,))

    def naive() -> float:
        x = X.detach().requires_grad_(True)
        t0 = time.perf_counter()
        lp = torch.nn.functional.linear(x, W).float().log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)
        lp.backward(torch.ones_like(lp))
        return time.perf_counter() - t0

    sizes = [a.tokens] + [c for c in a.chunks if c < a.tokens]
    run(sizes[-1])  # warm-up
    times = {c: [] for c in sizes}
    naive_times = []
    for _ in range(a.repeats):
        if a.naive:
            naive_times.append(naive())
        for c in sizes:
            times[c].append(run(c))
    print(f"N={a.tokens} H={a.hidden} V={a.vocab} float32, torch threads {torch.get_num_threads()}, "
          f"median of {a.repeats}")
    full_f = statistics.median(t[0] for t in times[a.tokens])
    full_d = statistics.median(t[1] for t in times[a.tokens])
    if a.naive:
        print(f"naive frozen head (log-probs, dX): {statistics.median(naive_times):.2f} s "
              f"[{min(naive_times):.2f}, {max(naive_times):.2f}]")
    for c in sizes:
        f = statistics.median(t[0] for t in times[c])
        d = statistics.median(t[1] for t in times[c])
        line = (f"rows {c:6d}: X·Wᵀ {f:.2f} s ({f / full_f:.2f}x full), G·W {d:.2f} s ({d / full_d:.2f}x full), "
                f"both {(f + d) / (full_f + full_d):.2f}x full")
        if a.naive:  # per round, both GEMMs over that round's naive head: median [range]
            shares = [(tf + td) / n for (tf, td), n in zip(times[c], naive_times)]
            line += (f", both / naive head {statistics.median(shares):.2f}x "
                     f"[{min(shares):.2f}, {max(shares):.2f}]")
        print(line)


if __name__ == "__main__":
    main()
