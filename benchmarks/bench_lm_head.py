"""LM-head forward + backward benchmark: peak memory and time of each variant, side by side.

Tasks (each one forward through X·Wᵀ and one backward to X and W):

* ``logprobs``          per-token log-probs of the labels, upstream gradient = a random [N] vector
                        (as GRPO's advantages weight them).
* ``logprobs_entropy``  the same plus the per-token entropy, which receives no gradient (GRPO only logs
                        it / uses it for masking; TRL ≤ 1.14 computes it under ``no_grad``).
* ``ce``                mean cross-entropy (10 % of labels ignored, ``-100``), scalar ``.backward()``.

Variants:

* ``naive``      full logits ``X·Wᵀ`` in X's dtype, float32 upcast, ``log_softmax`` + ``gather`` (TRL ≤ 1.14);
                 entropy with TRL's ``entropy_from_logits`` pattern under ``no_grad``; CE: ``F.cross_entropy``.
* ``trl_fused``  ``trl.kernels.ChunkedLogProbFunction`` with TRL's own vocab chunk (32768, as
                 ``add_fused_lm_head`` calls it); CE as TRL's fused head forms it: ``-Σ logp·mask / Σ mask``.
* ``liger``      ``liger_kernel.transformers.functional.liger_fused_linear_cross_entropy`` (log-probs as
                 ``-CE(reduction='none')``; no entropy). Triton: CUDA only.
* ``cce``        ``cut_cross_entropy.linear_cross_entropy`` (impl ``cce``, ``filter_eps=None`` for exact
                 gradients; no entropy). Triton: CUDA only.
* ``grpo_mel@C`` ``grpo_mel.linear_token_logprobs`` / ``linear_cross_entropy`` with ``chunk_size=C``;
  ``grpo_mel@auto`` with the default memory budget.

``--csv`` is rewritten after every shape, so a run cut short keeps the shapes it finished.

Peak memory comes from ``grpo_mel.memory.peak_memory`` (CUDA: ``max_memory_allocated``; CPU: torch's
allocator events via the profiler), measured in its own run; time is the median of ``--repeats`` separate
runs after a warm-up (``torch.cuda.synchronize`` around each on GPU). The warm-up's outputs and gradients are
compared with naive's (max abs diff), and a variant beyond tolerance is flagged ``WRONG``.

Examples::

    python benchmarks/bench_lm_head.py --preset cpu --csv benchmarks/results/cpu.csv \
        --md benchmarks/results/cpu.md --plot docs/img/cpu_
    python benchmarks/bench_lm_head.py --preset gpu --csv benchmarks/results/gpu.csv \
        --md benchmarks/results/gpu.md --plot docs/img/gpu_
    python benchmarks/bench_lm_head.py --preset gpu-h4096 --csv benchmarks/results/gpu_h4096.csv
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import grpo_mel  # noqa: E402
from grpo_mel.memory import peak_memory  # noqa: E402
from grpo_mel.planning import plan_chunk_size  # noqa: E402

TASKS = ("logprobs", "logprobs_entropy", "ce")
IGNORE = -100
TRL_VOCAB_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16
MIB = 2**20

PRESETS = {
    # H=256, V=32000: N sweep for every task, then a V sweep at N=2048 for log-probs
    "cpu": dict(device="cpu", dtype="float32", hidden=256,
                runs=[(task, n, 32000) for task in TASKS for n in (512, 1024, 2048, 4096)]
                + [("logprobs", 2048, v) for v in (8000, 64000)],
                chunks=(64, 256, 1024), repeats=3),
    # The two GPU shapes, bf16, every task at N in {4096, 16384, 65536} (naive runs out of memory at 65536 on an
    # 80 GB card; recorded as failed). One chunk size plus auto and 3 repeats keep each preset within ~2 minutes
    # on an H100, so both fit scripts/gpu_suite.sh's lease; --chunks / --repeats widen them.
    # Llama-3.2-1B head (H=2048, V=128256)
    "gpu": dict(device="cuda", dtype="bfloat16", hidden=2048,
                runs=[(task, n, 128256) for task in TASKS for n in (4096, 16384, 65536)],
                chunks=(4096,), repeats=3),
    # a 7B-class head with a Qwen2-size vocabulary (H=4096, V=151936)
    "gpu-h4096": dict(device="cuda", dtype="bfloat16", hidden=4096,
                      runs=[(task, n, 151936) for task in TASKS for n in (4096, 16384, 65536)],
                      chunks=(4096,), repeats=3),
}


# ----------------------------------------------------------------------------------------------- variants
@dataclass
class Variant:
    name: str
    fn: Callable | None  # fn(task, X, W, labels) -> tuple of outputs (first one gets the upstream gradient)
    chunk: str = ""
    unavailable: str | None = None  # reason it cannot run here
    tasks: tuple[str, ...] = TASKS


def _naive(task, X, W, labels):
    z = F.linear(X, W)  # [N, V] in X's dtype
    if task == "ce":
        return (F.cross_entropy(z.float(), labels, ignore_index=IGNORE),)
    logp = z.float().log_softmax(-1)  # [N, V] fp32
    lp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if task == "logprobs":
        return (lp,)
    with torch.no_grad():  # TRL ≤ 1.14: entropy_from_logits(logits) under no_grad, 128 rows at a time
        ent = torch.cat([-(c.exp() * c).sum(-1) for c in (r.float().log_softmax(-1) for r in z.detach().split(128))])
    return lp, ent


def _trl_fused(task, X, W, labels):
    from trl.kernels import ChunkedLogProbFunction

    outputs = ("entropy",) if task == "logprobs_entropy" else ()
    if task == "ce":
        mask = labels != IGNORE
        lp = ChunkedLogProbFunction.apply(X, W, None, labels.clamp(min=0), 1.0, TRL_VOCAB_CHUNK, None, 1.0, outputs)[0]
        return (-(lp.masked_fill(~mask, 0)).sum() / mask.sum().clamp(min=1),)
    lp, ent, *_ = ChunkedLogProbFunction.apply(X, W, None, labels, 1.0, TRL_VOCAB_CHUNK, None, 1.0, outputs)
    return (lp,) if task == "logprobs" else (lp, ent)


def _liger(task, X, W, labels):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    if task == "ce":
        return (liger_fused_linear_cross_entropy(X, W, labels, ignore_index=IGNORE),)
    return (-liger_fused_linear_cross_entropy(X, W, labels, reduction="none"),)


def _cce(task, X, W, labels):
    from cut_cross_entropy import linear_cross_entropy

    if task == "ce":
        return (linear_cross_entropy(X, W, labels, ignore_index=IGNORE, filter_eps=None),)
    return (-linear_cross_entropy(X, W, labels, reduction="none", filter_eps=None),)


def _grpo_mel(chunk_size):
    def fn(task, X, W, labels):
        if task == "ce":
            return (grpo_mel.linear_cross_entropy(X, W, labels, ignore_index=IGNORE, chunk_size=chunk_size),)
        out = grpo_mel.linear_token_logprobs(X, W, labels, with_entropy=task == "logprobs_entropy",
                                             chunk_size=chunk_size)
        return out if isinstance(out, tuple) else (out,)
    return fn


def _probe(module: str, device: torch.device) -> str | None:
    """None if ``module`` imports and can run on ``device``, else the exact reason it cannot."""
    if device.type != "cuda":
        reason = "Triton kernels, CUDA only"
        try:
            __import__(module)
        except Exception as e:  # noqa: BLE001 - the reason is what we report
            reason += f"; on this machine `import {module}` fails: {type(e).__name__}: {e}"
        return reason
    try:
        __import__(module)
    except Exception as e:  # noqa: BLE001
        return f"`import {module}` fails: {type(e).__name__}: {e}"
    return None


def build_variants(device: torch.device, chunks) -> list[Variant]:
    vs = [Variant("naive", _naive), Variant("trl_fused", _trl_fused, chunk=f"vocab {TRL_VOCAB_CHUNK}")]
    try:
        from trl.kernels import ChunkedLogProbFunction  # noqa: F401
    except Exception as e:  # noqa: BLE001
        vs[1].unavailable = f"`from trl.kernels import ChunkedLogProbFunction` fails: {type(e).__name__}: {e}"
    vs.append(Variant("liger", _liger, unavailable=_probe("liger_kernel.ops.fused_linear_cross_entropy", device),
                      tasks=("logprobs", "ce")))
    vs.append(Variant("cce", _cce, unavailable=_probe("cut_cross_entropy.cce", device), tasks=("logprobs", "ce")))
    for c in chunks:
        vs.append(Variant(f"grpo_mel@{c}", _grpo_mel(c), chunk=str(c)))
    vs.append(Variant("grpo_mel@auto", _grpo_mel(None), chunk="auto"))
    return vs


# ----------------------------------------------------------------------------------------------- running
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
    _clear(case)
    return chk, result


def _clear(case: Case) -> None:
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
    _clear(case)
    _, peak = peak_memory(lambda: step(variant, case), case.X.device)
    _clear(case)
    return peak


FIELDS = ["device", "dtype", "torch", "task", "N", "H", "V", "variant", "chunk", "head", "peak_MiB", "peak_vs_naive",
          "peak_vs_trl", "time_s", "time_vs_naive", "time_vs_trl", "times", "diff_out", "diff_ent", "diff_dX",
          "diff_dW", "max_rel_diff", "ok", "note", "cpu_s", "cpu_vs_naive"]
NUMERIC = set(FIELDS[10:22]) - {"times"} | {"cpu_s", "cpu_vs_naive"}


def run_all(args, on_shape: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Every shape of ``args.runs``; ``on_shape(rows so far)`` after each one."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    tol = 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2
    variants = build_variants(device, args.chunks)
    for var in variants:  # --skip: e.g. TRL's CPU fallback at a shape where it would not fit in memory
        if var.name in (args.skip or ()):
            var.unavailable = "skipped (--skip)"
    rows: list[dict] = []
    for task, n, v in args.runs:
        case = make_case(task, n, args.hidden, v, dtype, device, frozen_weight=args.frozen_weight)
        head = "frozen" if args.frozen_weight else "trainable"
        ref = None
        live: list[tuple[Variant, dict]] = []
        print(f"\n== {task}  N={n} H={args.hidden} V={v} {args.dtype} on {device} ==", flush=True)
        for var in variants:
            if task not in var.tasks:
                continue
            chunk = var.chunk
            if var.chunk == "auto":
                chunk = f"auto ({plan_chunk_size(n, v, dtype, device)})"
            row = dict(device=str(device), dtype=args.dtype, torch=torch.__version__, task=task, N=n, H=args.hidden,
                       V=v, variant=var.name, chunk=chunk, head=head, note="")
            if var.unavailable:
                row["note"] = f"skipped: {var.unavailable}"
                rows.append(row)
                print(f"  {var.name:16s} skipped: {var.unavailable}", flush=True)
                continue
            try:
                chk, result = check(var, case, ref, tol)
            except Exception as e:  # noqa: BLE001 - record and go on with the other variants
                row["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                rows.append(row)
                print(f"  {var.name:16s} FAILED {row['note']}", flush=True)
                _clear(case)
                continue
            if var.name == "naive":
                ref = result
            row.update(chk)
            rows.append(row)
            live.append((var, row))
        # time: round-robin over the variants, so that load from other processes hits them alike
        times: dict[str, list[tuple[float, float]]] = {var.name: [] for var, _ in live}

        def _failed(var, row, e):
            row["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print(f"  {var.name:16s} FAILED {row['note']}", flush=True)
            _clear(case)

        for _ in range(args.repeats):
            for var, row in list(live):
                try:
                    times[var.name].append(time_once(var, case))
                except Exception as e:  # noqa: BLE001 - e.g. out of memory at the largest N
                    _failed(var, row, e)
                    live.remove((var, row))
        for var, row in list(live):
            row["time_s"] = statistics.median(t for t, _ in times[var.name])
            row["times"] = ";".join(f"{t:.4f}" for t, _ in times[var.name])
            if device.type == "cpu":
                row["cpu_s"] = statistics.median(c for _, c in times[var.name])
            try:
                row["peak_MiB"] = peak_of(var, case) / MIB
            except Exception as e:  # noqa: BLE001
                _failed(var, row, e)
                live.remove((var, row))
        base = {row["variant"]: row for _, row in live}
        for var, row in live:
            for key, who in (("vs_naive", "naive"), ("vs_trl", "trl_fused")):
                b = base.get(who)
                if b is not None:
                    row[f"peak_{key}"] = row["peak_MiB"] / b["peak_MiB"] if b["peak_MiB"] else float("nan")
                    row[f"time_{key}"] = row["time_s"] / b["time_s"]
            if "cpu_s" in row and "cpu_s" in base.get("naive", {}):
                row["cpu_vs_naive"] = row["cpu_s"] / base["naive"]["cpu_s"]
            print(f"  {var.name:16s} chunk={row['chunk']:14s} peak={row['peak_MiB']:9.1f} MiB "
                  f"({row.get('peak_vs_naive', float('nan')):.3f}x naive)  time={row['time_s']:.3f} s "
                  f"[{min(t for t, _ in times[var.name]):.3f}-{max(t for t, _ in times[var.name]):.3f}] "
                  f"({row.get('time_vs_naive', float('nan')):.3f}x naive, CPU time "
                  f"{row.get('cpu_vs_naive', float('nan')):.3f}x)  "
                  f"maxdiff out={row.get('diff_out', float('nan')):.2e} dX={row.get('diff_dX', float('nan')):.2e} "
                  f"dW={row.get('diff_dW', float('nan')):.2e} ent={row.get('diff_ent', float('nan')):.2e} "
                  f"{row.get('ok', '')}", flush=True)
        del case, ref
        gc.collect()
        if on_shape is not None:
            on_shape(rows)
    return rows


# ----------------------------------------------------------------------------------------------- output
def read_csv(path) -> list[dict]:
    """Rows of an earlier run (numbers back to int/float), for ``--append``."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row = {}
            for k, val in r.items():
                if val == "":
                    continue
                if k in ("N", "H", "V"):
                    row[k] = int(val)
                elif k in NUMERIC:
                    row[k] = float(val)
                else:
                    row[k] = val
            row.setdefault("note", "")
            row.setdefault("chunk", "")
            row.setdefault("head", "trainable")  # rows written before the column existed
            rows.append(row)
    return rows


def write_csv(rows, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r.get(k), float) else r.get(k, "")) for k in FIELDS})


def _f(x, spec):
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(rows, header: str) -> str:
    out = [header, ""]
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["task"], r["N"], r["H"], r["V"], r["dtype"], r["device"], r.get("head", "trainable")),
                          []).append(r)
    order = sorted(groups, key=lambda k: (TASKS.index(k[0]) if k[0] in TASKS else 99, k[3], k[1], k[4], k[5], k[6]))
    for key in order:
        task, n, h, v, dt, dev, head = key
        rs = groups[key]
        frozen = ", W frozen (dX only)" if head == "frozen" else ""
        out += [f"### {task}, N={n}, H={h}, V={v}, {dt}, {dev}{frozen}", "",
                "| variant | chunk | peak MiB | peak / naive | peak / TRL | time s | time / naive | time / TRL "
                "| CPU time / naive | max abs diff out / dX / dW | check |",
                "|---|---|--:|--:|--:|--:|--:|--:|--:|---|---|"]
        for r in rs:
            if r.get("note"):
                out.append(f"| {r['variant']} | {r['chunk']} | {r['note'].split(';')[0]} (see CSV) | | | | | | | | |")
                continue
            diffs = "" if r["variant"] == "naive" else (
                f"{_f(r.get('diff_out'), '.1e')} / {_f(r.get('diff_dX'), '.1e')} / {_f(r.get('diff_dW'), '.1e')}")
            out.append(
                f"| {r['variant']} | {r['chunk']} | {r['peak_MiB']:.1f} | {_f(r.get('peak_vs_naive'), '.3f')} | "
                f"{_f(r.get('peak_vs_trl'), '.3f')} | {r['time_s']:.3f} | {_f(r.get('time_vs_naive'), '.2f')} | "
                f"{_f(r.get('time_vs_trl'), '.2f')} | {_f(r.get('cpu_vs_naive'), '.2f')} | {diffs} | {r.get('ok', '')} |")
        out.append("")
    return "\n".join(out)


def plot(rows, prefix):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    written = []
    for task in TASKS:
        rs = [r for r in rows if r["task"] == task and "peak_MiB" in r and not r.get("note")]
        vs = sorted({r["V"] for r in rs}, key=lambda v: -sum(1 for r in rs if r["V"] == v))
        if not vs:
            continue
        v0 = vs[0]  # the N sweep is the V with the most rows
        rs = [r for r in rs if r["V"] == v0]
        for metric, ylabel, fname in (("peak_MiB", "peak memory (MiB)", "peak"), ("time_s", "time (s)", "time")):
            fig, ax = plt.subplots(figsize=(6, 4))
            for name in dict.fromkeys(r["variant"] for r in rs):
                pts = sorted((r["N"], r[metric]) for r in rs if r["variant"] == name)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name,
                        linestyle="--" if name in ("naive", "trl_fused") else "-")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens N")
            ax.set_ylabel(ylabel)
            r0 = rs[0]
            ax.set_title(f"{task}: fwd+bwd, H={r0['H']}, V={v0}, {r0['dtype']}, {r0['device']}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = f"{prefix}{task}_{fname}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--device")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--tokens", type=int, nargs="+", help="N values (overrides the preset's runs)")
    p.add_argument("--vocab", type=int, nargs="+", help="V values (with --tokens: every N x V)")
    p.add_argument("--hidden", type=int)
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=None)
    p.add_argument("--chunks", type=int, nargs="+", help="grpo_mel chunk sizes (plus auto)")
    p.add_argument("--repeats", type=int)
    p.add_argument("--threads", type=int, help="torch.set_num_threads on the CPU")
    p.add_argument("--frozen-weight", action="store_true",
                   help="W without gradient (a LoRA policy's LM head): every variant computes outputs and dX only")
    p.add_argument("--skip", nargs="+", metavar="VARIANT", help="variants not to run (e.g. trl_fused), reported as skipped")
    p.add_argument("--csv")
    p.add_argument("--append", action="store_true",
                   help="add to the rows already in --csv (same shape+variant rows are replaced); "
                        "--md and --plot then cover all rows")
    p.add_argument("--md")
    p.add_argument("--plot", metavar="PREFIX")
    p.add_argument("--render-only", nargs="*", metavar="CSV",
                   help="run nothing: merge these CSVs (default: --csv) into --csv and write --md / --plot")
    args = p.parse_args(argv)

    preset = PRESETS.get(args.preset or ("gpu" if args.device == "cuda" else "cpu"))
    args.device = args.device or preset["device"]
    args.dtype = args.dtype or preset["dtype"]
    args.hidden = args.hidden or preset["hidden"]
    args.repeats = args.repeats or preset["repeats"]
    args.chunks = args.chunks or preset["chunks"]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tokens or args.vocab:
        ns = args.tokens or sorted({n for _, n, _ in preset["runs"]})
        vocab = args.vocab or [preset["runs"][0][2]]
        tasks = args.tasks or TASKS
        args.runs = [(t, n, v) for t in tasks for v in vocab for n in ns]
    else:
        args.runs = [r for r in preset["runs"] if args.tasks is None or r[0] in args.tasks]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")

    cmd = "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))
    cpu = f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}"
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    header = (f"Command: `{cmd}`  \nDate: {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}  \n"
              f"Machine: {platform.machine()}, {cpu}{', ' + gpu if gpu else ''}; torch {torch.__version__}, "
              f"Python {platform.python_version()}")
    if args.render_only is not None:
        rows = [r for path in (args.render_only or [args.csv]) for r in read_csv(path)]
        if args.csv:
            write_csv(rows, args.csv)
        if args.md:
            with open(args.md, "w") as f:
                f.write(markdown(rows, f"Rendered from {', '.join(args.render_only or [args.csv])}; machine and "
                                       "commands: docs/benchmarks.md") + "\n")
        if args.plot:
            for path in plot(rows, args.plot):
                print(f"wrote {path}")
        return 0
    print(header, flush=True)
    old = read_csv(args.csv) if args.append and args.csv and os.path.exists(args.csv) else []

    def merged(rows):
        def key(r):
            return r["device"], r["dtype"], r["task"], r["N"], r["H"], r["V"], r["head"], r["variant"]

        new = {key(r) for r in rows}
        return [r for r in old if key(r) not in new] + rows

    rows = merged(run_all(args, on_shape=(lambda rows: write_csv(merged(rows), args.csv)) if args.csv else None))
    if old:
        header += "  \n(--append: earlier rows in the CSV kept; each row's command is in docs/benchmarks.md)"
    if args.csv:
        write_csv(rows, args.csv)
        print(f"wrote {args.csv}")
    md = markdown(rows, header)
    if args.md:
        os.makedirs(os.path.dirname(args.md) or ".", exist_ok=True)
        with open(args.md, "w") as f:
            f.write(md + "\n")
        print(f"wrote {args.md}")
    if args.plot:
        for path in plot(rows, args.plot):
            print(f"wrote {path}")
    wrong = [r for r in rows if r.get("ok") == "WRONG"]
    for r in wrong:
        print(f"WRONG: {r['variant']} on {r['task']} N={r['N']} V={r['V']}: max rel diff {r['max_rel_diff']:.2e}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
