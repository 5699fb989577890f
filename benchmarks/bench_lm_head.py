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

``--csv`` is rewritten after every shape, so a run cut short keeps the shapes it finished. Beside this file: the
tasks and variants (``lm_head_variants.py``), one variant's step, check, timing and peak (``lm_head_measure.py``),
the CSV, markdown and plots (``lm_head_report.py``).

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
import datetime as _dt
import gc
import os
import platform
import statistics
import sys
from typing import Callable

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(_HERE, ".."), _HERE]  # this checkout's grpo_mel, and the modules beside this one

from grpo_mel.planning import Head, plan_chunk_size  # noqa: E402
from lm_head_measure import check, clear, make_case, peak_of, time_once  # noqa: E402
from lm_head_report import markdown, plot, read_csv, write_csv  # noqa: E402
from lm_head_variants import TASKS, Variant, build_variants  # noqa: E402

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


def run_all(args, on_shape: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Every shape of ``args.runs``; ``on_shape(rows so far)`` after each one."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    tol = 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2
    variants = build_variants(device, args.chunks, compiled=args.compile)
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
            if var.chunk == "auto":  # the rows the planner gives this call (grpo_mel.chunked_linear's Head)
                plan = Head(args.hidden, dtype, dtype, not args.frozen_weight, var.name.endswith("+compile"))
                chunk = f"auto ({plan_chunk_size(n, v, dtype, device, head=plan)})"
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
                clear(case)
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
            clear(case)

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
    p.add_argument("--compile", action="store_true",
                   help="every grpo_mel variant also with f compiled per chunk (compile=True), named ...+compile")
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
