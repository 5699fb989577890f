"""The LM-head benchmark's output (``benchmarks/bench_lm_head.py``): its CSV (written and read back for
``--append`` / ``--render-only`` and by the GPU suite), the markdown tables and the plots."""

from __future__ import annotations

import csv
import math
import os

from lm_head_variants import TASKS

FIELDS = ["device", "dtype", "torch", "task", "N", "H", "V", "variant", "chunk", "head", "peak_MiB", "peak_vs_naive",
          "peak_vs_trl", "time_s", "time_vs_naive", "time_vs_trl", "times", "diff_out", "diff_ent", "diff_dX",
          "diff_dW", "max_rel_diff", "ok", "note", "cpu_s", "cpu_vs_naive"]
# the columns read back as numbers (the rest are text; N, H, V are ints)
NUMERIC = {"peak_MiB", "peak_vs_naive", "peak_vs_trl", "time_s", "time_vs_naive", "time_vs_trl", "diff_out",
           "diff_ent", "diff_dX", "diff_dW", "max_rel_diff", "cpu_s", "cpu_vs_naive"}


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
