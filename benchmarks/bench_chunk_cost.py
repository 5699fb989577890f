"""A chunk's fixed and per-row cost, fitted from a chunk-size sweep: the constants of grpo_mel.planning's model.

For each head (trained W or frozen W) and each f mode (eager, compiled), one log-probs forward + backward of
``linear_token_logprobs`` is timed at several chunk sizes, round-robin (median of ``--repeats``), and

    time(k chunks) = N · per_row + k · fixed

is fitted by least squares on k = ceil(N / chunk). ``fixed`` is what one more chunk costs (W streamed by its
GEMMs, a trained head's float32 dW accumulator read and written, launches); ``per_row`` what one more row costs.
docs/design.md, "Planning a chunk", turns the fits into grpo_mel.planning.DEVICE_MODELS.

    python benchmarks/bench_chunk_cost.py --hidden 2048 --vocab 128256 --tokens 1024 --chunks 64 128 256 512 \\
        --repeats 3 --csv benchmarks/results/cpu_chunk_cost.csv
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import math
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from grpo_mel import linear_token_logprobs  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(X, W, labels, grad, chunk, compile_f, device):
    Xs = X.detach().requires_grad_(True)
    _sync(device)
    t0 = time.perf_counter()
    out = linear_token_logprobs(Xs, W, labels, chunk_size=chunk, compile=compile_f)
    torch.autograd.grad((out * grad).sum(), [Xs, W] if W.requires_grad else [Xs])
    _sync(device)
    return time.perf_counter() - t0


def _fit(n, points):
    """Least squares of t = n·per_row + k·fixed over (k, t) points; returns (per_row, fixed)."""
    ks = [k for k, _ in points]
    ts = [t for _, t in points]
    km, tm = statistics.fmean(ks), statistics.fmean(ts)
    fixed = sum((k - km) * (t - tm) for k, t in points) / max(sum((k - km) ** 2 for k in ks), 1e-30)
    return (tm - fixed * km) / n, fixed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--chunks", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--heads", nargs="+", default=["trained", "frozen"], choices=["trained", "frozen"])
    p.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(args.tokens, args.hidden, generator=g).to(device, dtype)
    W0 = (torch.randn(args.vocab, args.hidden, generator=g) / math.sqrt(args.hidden)).to(device, dtype)
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=g).to(device)
    grad = torch.randn(args.tokens, generator=g).to(device)
    configs = [(h, m, c) for h in args.heads for m in args.modes for c in args.chunks]
    times = {cfg: [] for cfg in configs}
    for cfg in configs:  # warm-up (and compile) each once
        h, m, c = cfg
        _step(X, W0.requires_grad_(h == "trained"), labels, grad, c, m == "compiled", device)
    for _ in range(args.repeats):
        for cfg in configs:
            h, m, c = cfg
            times[cfg].append(_step(X, W0.requires_grad_(h == "trained"), labels, grad, c, m == "compiled", device))
    rows = []
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    print(f"# {platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}, {device}, {dtype}, "
          f"N={args.tokens} H={args.hidden} V={args.vocab}, median of {args.repeats}, {stamp}")
    for h in args.heads:
        for m in args.modes:
            pts = [(math.ceil(args.tokens / c), statistics.median(times[(h, m, c)])) for c in args.chunks]
            per_row, fixed = _fit(args.tokens, pts)
            print(f"{h:8s} {m:9s} " + "  ".join(f"@{c}: {t:.3f}s" for c, (_, t) in zip(args.chunks, pts))
                  + f"  -> fixed {fixed * 1e3:.2f} ms/chunk, per row {per_row * 1e3:.4f} ms")
            for c, (k, t) in zip(args.chunks, pts):
                rows.append(dict(date=stamp, device=str(device), dtype=args.dtype, tokens=args.tokens,
                                 hidden=args.hidden, vocab=args.vocab, head=h, mode=m, chunk=c, chunks=k,
                                 median_s=f"{t:.4f}", runs=" ".join(f"{x:.4f}" for x in times[(h, m, c)]),
                                 fit_fixed_ms=f"{fixed * 1e3:.3f}", fit_per_row_ms=f"{per_row * 1e3:.5f}"))
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
