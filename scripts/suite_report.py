"""The GPU suite's ``report.md`` (``scripts/gpu_suite.py``): the steps' table, then one section per step that
left results (parity counts per dtype, the LM-head tables, the examples' runs). Rewritten after every step."""

from __future__ import annotations

import os

from suite_child import PACKAGES
from suite_steps import Step


def _num(x, spec: str) -> str:
    return "" if x is None or x != x else format(x, spec)


def _head_cell(r: dict | None) -> str:
    if r is None:
        return "n/a"  # a task the variant does not compute (entropy for liger / cce)
    if r.get("note"):
        kind, _, rest = r["note"].partition(": ")
        return f"{kind} ({rest.split(':')[0]})" if kind == "failed" else kind
    cell = f"{r['peak_MiB']:.1f} MiB, {r['time_s'] * 1e3:.1f} ms"
    if r["variant"] != "naive" and r.get("peak_vs_naive") is not None:
        cell += f" ({r['peak_vs_naive']:.3f}× / {r['time_vs_naive']:.2f}×)"
    return cell + (" WRONG" if r.get("ok") == "WRONG" else "")


def head_section(step: Step) -> list[str]:
    from bench_lm_head import TASKS, markdown

    rows = step.data.get("rows") or []
    if not rows:
        return []
    r0 = rows[0]
    names = list(dict.fromkeys(r["variant"] for r in rows))
    out = [f"Each cell: peak above the inputs, median time of one forward + backward, and (peak / time) relative "
           f"to naive. {r0['dtype']}, {r0['device']}, H={r0['H']}, V={r0['V']}; all columns, diffs and the "
           f"reasons for skipped variants in `{os.path.basename(step.data['csv'])}`.", "",
           "| task | N | " + " | ".join(names) + " |", "|---|--:|" + "---|" * len(names)]
    cases = sorted({(r["task"], r["N"]) for r in rows}, key=lambda k: (TASKS.index(k[0]), k[1]))
    for task, n in cases:
        by = {r["variant"]: r for r in rows if (r["task"], r["N"]) == (task, n)}
        out.append(f"| {task} | {n} | " + " | ".join(_head_cell(by.get(v)) for v in names) + " |")
    full = markdown(rows, "").replace("\n### ", "\n#### ").strip()
    return out + ["", "<details><summary>all rows (peak and time against naive and TRL fused, max diffs)"
                      "</summary>", "", full, "", "</details>"]


def example_section(step: Step) -> list[str]:
    res = step.data.get("result")
    if not res:
        return []
    runs = res["runs"]
    key = runs[0]["peak_key"]
    out = [f"{res.get('model', '')}; `{' '.join(step.data['argv'])}`{step.data.get('note', '')}", "",
           f"| run | max {key} (GiB) | {key} per step (GiB) | runtime s | loss per step | calls through grpo_mel |",
           "|---|--:|---|--:|---|--:|"]
    for r in runs:
        out.append(f"| {r['label']} | {r['max_peak']:.3f} | {', '.join(f'{p:.3f}' for p in r['peaks'])} | "
                   f"{r['runtime_s']:.1f} | {', '.join(f'{x:.4g}' for x in r['losses'])} | "
                   f"{'n/a' if r['grpo_mel_calls'] is None else r['grpo_mel_calls']} |")
    if len(runs) == 2 and runs[0]["max_peak"]:
        out += ["", f"{runs[1]['label']} / {runs[0]['label']} max peak: "
                    f"**{runs[1]['max_peak'] / runs[0]['max_peak']:.3f}**"]
    diffs = [f"{k[len('max_abs_diff'):].lstrip('_') or 'loss'} {v:.2e}" for k, v in res.items()
             if k.startswith("max_abs_diff")]
    if diffs:
        out += ["", f"Max |Δ| per step, unpatched vs patched: {', '.join(diffs)}."]
    return out


def parity_section(step: Step) -> list[str]:
    groups = step.data.get("groups")
    if not groups:
        return []
    out = [f"`GRPO_MEL_TEST_DEVICE={step.env['GRPO_MEL_TEST_DEVICE']} pytest {' '.join(step.data['args'])}`", "",
           "| dtype | passed | failed | skipped |", "|---|--:|--:|--:|"]
    for g in ("fp32", "bf16", "fp16"):
        if g in groups:
            c = groups[g]
            out.append(f"| {g} | {c['passed']} | {c['failed']} | {c['skipped']} |")
    if step.data["failed"]:
        out += ["", "Failed: " + ", ".join(f"`{n}`" for n in step.data["failed"][:20])]
    return out


def write_report(path: str, steps: list[Step], meta: dict) -> None:
    info = meta.get("probe") or {}
    v = info.get("versions", {})
    smoke = meta["smoke"]
    lines = [f"## GPU suite{' (CPU smoke: tiny sizes, not benchmark figures)' if smoke else ''}: "
             f"{info.get('gpu') or 'CPU'}, {meta['date']}", "",
             f"Command: `{meta['command']}`; commit {meta['commit']}.  ",
             "Versions: " + ", ".join(f"{k} {v.get(k) or 'not installed'}" for k in PACKAGES)
             + f"; CUDA {info.get('cuda')}; Python {info.get('python')}.  ",
             "Not importable: " + (", ".join(f"`{m}` ({e})" for m, e in info.get("imports", {}).items() if e)
                                   or "none") + ".", "",
             "| step | status | wall s | notes |", "|---|---|--:|---|"]
    for s in steps:
        lines.append(f"| {s.name} | {s.status} | {_num(s.wall_s, '.0f')} | {s.why.replace('|', '/')} |")
    sections = {"parity": parity_section, "head": head_section, "grpo": example_section, "sft": example_section}
    for s in steps:
        body = sections.get(s.name.split("-")[0], lambda _: [])(s)
        if body:
            lines += ["", f"### {s.title}", ""] + body
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
