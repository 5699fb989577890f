"""Experiment: torch.compile of the per-chunk f, as a user-level wrapper around ``chunked_linear``.

grpo_mel/linear.py is not touched: the transformation function handed to :func:`grpo_mel.chunked_linear`
is compiled instead. The Function calls f twice per chunk (forward under ``no_grad``, backward under
``enable_grad`` where autograd differentiates it), so Dynamo builds one inference graph and one training
graph (AOTAutograd forward + backward). Two ways to keep the uneven last chunk from compiling a third/fourth
graph are compared:

* ``compile(dynamic=True)``: every size symbolic from the first call;
* ``compile(dynamic=False)`` + ``torch._dynamo.mark_dynamic(z, 0)`` on each call: only the row dim symbolic;
* ``compile(dynamic=False)`` alone (for reference: recompiles for the last chunk, if any).

Reported per mode: first call (compile included), steady-state median time (modes timed
round-robin after all are compiled), peak memory, graph counts,
and the max abs difference from eager. N is chosen with an uneven last chunk on purpose.

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python benchmarks/bench_compile.py --tokens 2000 --hidden 256 \
        --vocab 32000 --chunks 256 --tasks logprobs ce --repeats 5 --md benchmarks/results/compile_cpu.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import gc
import os
import platform
import statistics
import sys
import time
import types

# cold compiles: without this, Inductor's on-disk caches make a repeated run's "compile time" a cache hit
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from grpo_mel import chunked_linear, cross_entropy, token_logprobs, token_logprobs_and_entropy  # noqa: E402
from grpo_mel.memory import peak_memory  # noqa: E402
from grpo_mel.planning import plan_chunk_size  # noqa: E402

MIB = 2**20
FNS = {
    "logprobs": token_logprobs,
    "logprobs_entropy": token_logprobs_and_entropy,
    "ce": functools.partial(cross_entropy, ignore_index=-100),
}


def _fresh(fn):
    """A copy of ``fn`` with its own code object, so each mode gets its own Dynamo cache entries."""
    if isinstance(fn, functools.partial):
        return functools.partial(_fresh(fn.func), *fn.args, **fn.keywords)
    new = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    return new


def compiled_fn(fn, mode: str):
    """The user-level wrapper: returns a callable to pass as ``fn`` to ``chunked_linear``."""
    fn = _fresh(fn)
    if mode == "eager":
        return fn
    if mode == "dynamic":
        return torch.compile(fn, dynamic=True)
    c = torch.compile(fn, dynamic=False)
    if mode == "static":
        return c

    def marked(z, *row_args):  # mode == "mark_dynamic"
        torch._dynamo.mark_dynamic(z, 0)
        for a in row_args:
            torch._dynamo.mark_dynamic(a, 0)
        return c(z, *row_args)

    return marked


def step(task, fn, X, W, labels, g, chunk):
    X.grad = W.grad = None
    out = chunked_linear(X, W, fn, labels, chunk_size=chunk)
    lp = out[0] if isinstance(out, tuple) else out
    torch.autograd.backward([lp], [g])
    return (lp.detach(), X.grad, W.grad)


def prepare(task, mode, X, W, labels, g, chunk):
    """Build the wrapper and make its first call (compilation included); returns (fn, first-call s, outputs)."""
    fn = compiled_fn(FNS[task], mode)
    before = torch._dynamo.utils.counters["stats"].get("unique_graphs", 0)
    t0 = time.perf_counter()
    first = step(task, fn, X, W, labels, g, chunk)
    t_first = time.perf_counter() - t0
    step(task, fn, X, W, labels, g, chunk)  # a second call: any recompilation for a new grad mode / shape
    graphs = torch._dynamo.utils.counters["stats"].get("unique_graphs", 0) - before
    out = tuple(t.detach().clone() for t in first)
    X.grad = W.grad = None
    return fn, t_first, graphs, out


def run_modes(task, modes, X, W, labels, g, chunk, repeats):
    """All modes compiled first, then timed round-robin (load from other processes hits them alike)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    prepared = {}
    for mode in modes:
        try:
            prepared[mode] = prepare(task, mode, X, W, labels, g, chunk)
        except Exception as e:  # noqa: BLE001 - a failed mode is a result
            prepared[mode] = e
    times = {m: [] for m, p in prepared.items() if not isinstance(p, Exception)}
    for _ in range(repeats):
        for mode in times:
            fn = prepared[mode][0]
            t0 = time.perf_counter()
            step(task, fn, X, W, labels, g, chunk)
            times[mode].append(time.perf_counter() - t0)
            X.grad = W.grad = None
    results = {}
    for mode, p in prepared.items():
        if isinstance(p, Exception):
            results[mode] = p
            continue
        fn, t_first, graphs, out = p
        gc.collect()
        _, peak = peak_memory(lambda: step(task, fn, X, W, labels, g, chunk), "cpu")
        X.grad = W.grad = None
        results[mode] = (dict(first=t_first, median=statistics.median(times[mode]), peak=peak, graphs=graphs), out)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--chunks", type=int, nargs="+", default=[256])
    p.add_argument("--tasks", nargs="+", choices=sorted(FNS), default=["logprobs", "logprobs_entropy", "ce"])
    p.add_argument("--modes", nargs="+", default=["eager", "dynamic", "mark_dynamic", "static"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--md")
    args = p.parse_args(argv)

    gen = torch.Generator().manual_seed(0)
    n, h, v = args.tokens, args.hidden, args.vocab
    X = torch.randn(n, h, generator=gen).requires_grad_(True)
    W = (torch.randn(v, h, generator=gen) * (2.0 / h**0.5)).requires_grad_(True)
    labels = torch.randint(0, v, (n,), generator=gen)
    g = torch.randn(n, generator=gen)

    cmd = "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))
    lines = [f"Command: `{cmd}`  ",
             f"Date: {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}; "
             f"N={n}, H={h}, V={v}, float32, cpu", "",
             "| task | chunk | mode | first call s (incl. compile) | steady median s | vs eager | peak MiB "
             "| vs eager | graphs compiled | max abs diff vs eager (out / dX / dW) |",
             "|---|--:|---|--:|--:|--:|--:|--:|--:|---|"]
    print("\n".join(lines[:3]), flush=True)
    for task in args.tasks:
        for chunk in args.chunks:
            chunk = chunk or plan_chunk_size(n, v)
            ref = base = None
            results = run_modes(task, args.modes, X, W, labels, g, chunk, args.repeats)
            for mode in args.modes:
                res = results[mode]
                if isinstance(res, Exception):
                    msg = f"failed: {type(res).__name__}: {str(res).splitlines()[0][:160]}"
                    print(f"{task} chunk={chunk} {mode}: {msg}", flush=True)
                    lines.append(f"| {task} | {chunk} | {mode} | {msg} | | | | | | |")
                    continue
                r, out = res
                if mode == "eager":
                    ref, base = out, r
                diff = " / ".join(f"{(a - b).abs().max().item():.1e}" for a, b in zip(out, ref)) if ref else ""
                tv = r["median"] / base["median"] if base else float("nan")
                pv = r["peak"] / base["peak"] if base else float("nan")
                line = (f"| {task} | {chunk} | {mode} | {r['first']:.2f} | {r['median']:.3f} | {tv:.2f} | "
                        f"{r['peak'] / MIB:.1f} | {pv:.2f} | {r['graphs']} | {diff} |")
                print(line, flush=True)
                lines.append(line)
    if args.md:
        os.makedirs(os.path.dirname(args.md) or ".", exist_ok=True)
        with open(args.md, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {args.md}")


if __name__ == "__main__":
    main()
