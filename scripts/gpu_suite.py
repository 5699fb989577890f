"""The GPU suite: every measurement the project owes a CUDA machine, in one run, into one markdown report.

Run it through ``scripts/gpu_suite.sh`` (which picks the interpreter and sets ``PYTHONPATH``). Steps, each in
its own process with a time cap, in this order (a failing step is recorded and the next one runs):

1. ``install``: the wheels in ``.whl/`` (never torch, triton or nvidia-*), ``pip install --no-index --no-deps
   --target``; without a ``.whl/`` the packages already importable are used.
2. ``parity``: ``tests/core/test_parity.py`` on the device (``GRPO_MEL_TEST_DEVICE``): fp32, bf16, fp16, autocast.
3. ``head-1``: ``benchmarks/bench_lm_head.py --preset gpu`` (Llama-3.2-1B head, H=2048, V=128256, bf16:
   naive, TRL's fused head, grpo_mel, Liger-Kernel and cut-cross-entropy where they import).
3b. ``head-1-frozen``: the same head with W frozen (a LoRA policy's head: no dW; in bf16 grpo_mel still
   recomputes), log-probs at N=4096 and 16384, naive / TRL fused / grpo_mel; its rows go into head-1's CSV.
4. ``grpo``: ``examples/grpo_reward_task.py --model llama-1b-random --compare --override-fused-head true``
   (grpo_mel against unpatched TRL, whose Triton fused head runs on CUDA; peak VRAM per step).
5. ``sft``: ``examples/sft_loss_match.py --model llama-1b-random`` (4-bit when bitsandbytes imports).
6. ``head-2``: the head benchmark at H=4096, V=151936 (``--preset gpu-h4096``).

Outputs (``--out``, else ``$OUT``, else ``outputs/gpu_suite`` or ``outputs/gpu_suite_smoke``; at most 8 files):
``report.md`` (rewritten after every step, so a run cut short still leaves one), one CSV per head shape, one log
per step kind. Exit status 1 if any step failed or did not run.

``--cpu-smoke`` runs the same steps at tiny sizes on the CPU (no wheel install, a parity subset, a 32/48-wide
head, the tiny example models) in a minute or two; ``scripts/test.sh`` runs it so the suite cannot rot.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITE = "/tmp/grpo_mel_site"  # where the .whl/ wheels are installed (--target), put on the steps' PYTHONPATH
NEVER_INSTALL = re.compile(r"^(torch|triton|nvidia[-_])", re.I)  # the machine's own CUDA build stays
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "liger-kernel",
            "cut-cross-entropy", "triton")
# everything the suite writes under out (8 files at most)
OUTPUTS = ("report.md", "install.log", "parity.log", "head.log", "grpo.log", "sft.log", "head_h*_v*.csv")
PROBES = ("trl", "datasets", "bitsandbytes", "liger_kernel.ops.fused_linear_cross_entropy", "cut_cross_entropy.cce")

# sizes: GPU (one H200, 2026-11-26: install 1 s, parity 12 s, head-1 > 120 s, grpo 93 s, sft 80 s, head-2 > 150 s;
# the heads were cut at those caps, so they are raised here; the whole suite fits one 600 s device call) and
# the CPU smoke (tiny, seconds each)
GPU = dict(
    budget_s=570,
    parity=["tests/core/test_parity.py"],
    heads={"head-1": ["--preset", "gpu"],
           "head-1-frozen": ["--preset", "gpu", "--frozen-weight", "--tasks", "logprobs", "--tokens", "4096", "16384",
                             "--repeats", "3", "--skip", "liger", "cce"],
           "head-2": ["--preset", "gpu-h4096"]},
    grpo=["--model", "llama-1b-random", "--finetune", "lora", "--bf16", "--num-generations", "8",
          "--max-completion-length", "512", "--steps", "2", "--compare", "--override-fused-head", "true"],
    sft=["--model", "llama-1b-random", "--steps", "4"],
    caps={"install": 60, "parity": 60, "head-1": 170, "head-1-frozen": 60, "grpo": 150, "sft": 110, "head-2": 200},
)
_TINY_HEAD = ["--device", "cpu", "--dtype", "float32", "--tokens", "96", "--chunks", "64", "--repeats", "1"]
SMOKE = dict(
    budget_s=600,  # the smoke's caps only catch a hang: a shared CI machine can be 2-3x slower than an idle one
    parity=["tests/core/test_parity.py", "-k", "bias_every_chunking or (bf16 and ce_mean)"],
    heads={"head-1": _TINY_HEAD + ["--hidden", "32", "--vocab", "500"],
           "head-1-frozen": _TINY_HEAD + ["--hidden", "32", "--vocab", "500", "--frozen-weight", "--tasks", "logprobs"],
           "head-2": _TINY_HEAD + ["--hidden", "48", "--vocab", "700"]},
    grpo=["--compare", "--steps", "2", "--num-generations", "2", "--prompts-per-step", "2",
          "--max-completion-length", "8", "--num-prompts", "16", "--beta", "0.04", "--no-warmup",
          "--override-fused-head", "true"],
    sft=["--steps", "2", "--num-rows", "16", "--max-length", "64", "--no-warmup"],
    caps={"install": 30, "parity": 180, "head-1": 180, "head-1-frozen": 180, "grpo": 180, "sft": 180, "head-2": 180},
)


@dataclass
class Step:
    name: str
    title: str
    cmd: list[str]
    log: str  # file under out (steps of one kind share it)
    check: Callable[["Step", int], str | None]  # (step, exit status) -> why it failed, or None
    env: dict = field(default_factory=dict)
    status: str = "not run"
    wall_s: float | None = None
    why: str = ""
    data: dict = field(default_factory=dict)  # what the report shows for this step


# ----------------------------------------------------------------------------------------------- child modes
def probe(path: str) -> None:
    """(child) versions, device and which optional modules import, as JSON at ``path``."""
    import importlib.metadata as md
    import platform

    info: dict = {"python": platform.python_version(), "versions": {}, "imports": {}}
    for pkg in PACKAGES:
        try:
            info["versions"][pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info["versions"][pkg] = None
    import torch

    info["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{p.name}, {p.total_memory / 2**30:.0f} GiB"
    for mod in PROBES:
        try:
            importlib.import_module(mod)
            info["imports"][mod] = None
        except Exception as e:  # noqa: BLE001 - the reason is what we report
            info["imports"][mod] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    with open(path, "w") as f:
        json.dump(info, f)


def run_example(name: str, path: str, argv: list[str]) -> None:
    """(child) ``examples/<name>.py``'s ``main(argv)``; its runs (losses, per-step peaks) as JSON at ``path``.
    ``grpo_mel_calls``: how often the patched run computed through grpo_mel, counted here (the examples and the
    library keep no counters) on the function each patch computes with."""
    from grpo_mel.integrations import _logps, causal_lm

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    obj, attr = (causal_lm, "causal_lm_loss") if name == "sft_loss_match" else (_logps, "chunked_linear")
    real_fn, real_run, box, calls = getattr(obj, attr), mod.run_once, {"n": 0}, {}

    def counted(*a, **k):
        box["n"] += 1
        return real_fn(*a, **k)

    def run_once(src, args, patched, *rest, **kwargs):
        start = box["n"]
        res = real_run(src, args, patched, *rest, **kwargs)
        calls[res.label] = box["n"] - start
        return res

    setattr(obj, attr, counted)
    mod.run_once = run_once
    res = mod.main(argv)
    out = {k: v for k, v in res.items() if isinstance(v, (int, float, str))}
    out["runs"] = [dict(label=r.label, losses=r.losses, peaks=r.peaks, peak_key=r.peak_key, max_peak=r.max_peak,
                        runtime_s=r.runtime_s, metrics=r.metrics, grpo_mel_calls=calls.get(r.label))
                   for r in res["runs"]]
    with open(path, "w") as f:
        json.dump(out, f)


# ----------------------------------------------------------------------------------------------- running
def run_step(step: Step, out: str, env: dict, timeout: float) -> None:
    log = os.path.join(out, step.log)
    with open(log, "a") as f:
        f.write(f"\n===== {step.name}: {' '.join(step.cmd)}\n")
        f.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(step.cmd, cwd=ROOT, env={**env, **step.env}, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: a timeout kills all of it
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        step.wall_s = time.perf_counter() - t0
    if rc is None:
        step.status, step.why = "failed", f"timed out after {timeout:.0f} s"
        try:
            step.check(step, -1)  # for what it left (a head CSV is rewritten after every shape)
        except Exception:  # noqa: BLE001 - it left nothing readable; the timeout is the reason given
            pass
        return
    try:
        why = step.check(step, rc)
    except Exception as e:  # noqa: BLE001 - a broken result is this step's failure, not the suite's
        why = f"result unreadable: {type(e).__name__}: {e}"
    step.status, step.why = ("failed", why) if why else ("ok", step.why)


def _tail(path: str, n: int = 3) -> str:
    with open(path) as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("===== ")]
    return " / ".join(lines[-n:])[:300]


# ----------------------------------------------------------------------------------------------- checks
def check_install(step: Step, rc: int) -> str | None:
    return None if rc == 0 else f"pip exit status {rc}: {_tail(os.path.join(step.data['out'], step.log))}"


def check_parity(step: Step, rc: int) -> str | None:
    if not os.path.exists(step.data["junit"]):
        return f"pytest exit status {rc}, no results: {_tail(os.path.join(step.data['out'], step.log))}"
    groups: dict[str, dict[str, int]] = {}
    failed: list[str] = []
    for case in ET.parse(step.data["junit"]).getroot().iter("testcase"):
        name = case.get("name", "")
        group = "bf16" if ("bf16" in name or "autocast" in name) else "fp16" if "fp16" in name else "fp32"
        kind = ("failed" if case.find("failure") is not None or case.find("error") is not None
                else "skipped" if case.find("skipped") is not None else "passed")
        groups.setdefault(group, {"passed": 0, "failed": 0, "skipped": 0})[kind] += 1
        if kind == "failed":
            failed.append(name)
    step.data.update(groups=groups, failed=failed)
    passed = sum(g["passed"] for g in groups.values())
    if rc != 0 or failed:
        return f"pytest exit status {rc}, {len(failed)} failed" + (f": {', '.join(failed[:5])}" if failed else "")
    if passed == 0:
        return "no test ran"
    return None


def check_head(step: Step, rc: int) -> str | None:
    from bench_lm_head import read_csv  # benchmarks/ is on sys.path (main)

    csv_path = step.data["csv"]
    rows = [r for r in (read_csv(csv_path) if os.path.exists(csv_path) else []) if r["head"] == step.data["head"]]
    step.data["rows"] = rows
    if rc == -1:
        return None  # timed out: run_step has the reason; the finished shapes are reported
    if not rows:
        return f"exit status {rc}, no rows in {os.path.basename(csv_path)}"
    wrong = [f"{r['variant']} {r['task']} N={r['N']}" for r in rows if r.get("ok") == "WRONG"]
    broken = [f"{r['variant']} {r['task']} N={r['N']}: {r['note'][8:80]}" for r in rows
              if r["variant"].startswith("grpo_mel") and r["note"].startswith("failed")]
    if wrong or broken or rc != 0:
        return "; ".join([f"exit status {rc}"] + [f"WRONG {w}" for w in wrong] + broken)
    return None


def check_example(step: Step, rc: int) -> str | None:
    if rc != 0:
        return f"exit status {rc}: {_tail(os.path.join(step.data['out'], step.log))}"
    with open(step.data["json"]) as f:
        res = json.load(f)
    step.data["result"] = res
    if not res["runs"] or any(len(r["peaks"]) != len(r["losses"]) or not r["peaks"] for r in res["runs"]):
        return "a run logged no peak memory for some step"
    if any(r["label"] == "patched" and r["grpo_mel_calls"] == 0 for r in res["runs"]):
        return "the patched run never computed through grpo_mel (TRL's own method ran)"
    return None


# ----------------------------------------------------------------------------------------------- report
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


# ----------------------------------------------------------------------------------------------- main
def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "n/a"
    return (sha + (" + uncommitted changes" if dirty else "")) if sha else "n/a (no git checkout)"


def build_steps(sizes: dict, smoke: bool, out: str, work: str, py: str) -> list[Step]:
    steps = []
    wheels = sorted(glob.glob(os.path.join(ROOT, ".whl", "*.whl")))
    keep = [w for w in wheels if not NEVER_INSTALL.match(os.path.basename(w))]
    steps.append(Step("install", "wheels", [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                            "--no-compile", "--no-cache-dir", "--upgrade", "--target", SITE, *keep],
                      "install.log", check_install, data={"out": out, "wheels": keep,
                                                          "refused": sorted(set(wheels) - set(keep))}))
    device = "cpu" if smoke else "cuda"
    junit = os.path.join(work, "parity.xml")
    steps.append(Step("parity", f"Parity tests on {device}",
                      [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *sizes["parity"]],
                      "parity.log", check_parity, env={"GRPO_MEL_TEST_DEVICE": device},
                      data={"junit": junit, "args": sizes["parity"], "out": out}))
    from bench_lm_head import PRESETS

    heads = {}
    for name, argv in sizes["heads"].items():
        a = dict(zip(argv, argv[1:]))  # flag -> its value
        preset = PRESETS.get(a.get("--preset"), {})
        h, v = a.get("--hidden") or preset["hidden"], a.get("--vocab") or preset["runs"][0][2]
        csv_path = os.path.join(out, f"head_h{h}_v{v}.csv")
        frozen = "--frozen-weight" in argv  # its rows go into the same CSV as the trainable head's (8 files at most)
        title = f"LM head forward + backward, H={h}, V={v}" + (", W frozen (dX only)" if frozen else "")
        heads[name] = Step(name, title,
                           [py, os.path.join("benchmarks", "bench_lm_head.py"), *argv, "--csv", csv_path,
                            *(["--append"] if frozen else [])],
                           "head.log", check_head, data={"csv": csv_path, "head": "frozen" if frozen else "trainable"})
    steps += [heads["head-1"], heads["head-1-frozen"]]
    for name, example, title in (("grpo", "grpo_reward_task", "GRPO reward task"),
                                 ("sft", "sft_loss_match", "SFT loss match")):
        argv = list(sizes[name])
        js = os.path.join(work, f"{name}.json")
        steps.append(Step(name, title, [py, os.path.abspath(__file__), "--run-example", example, js, "--", *argv],
                          f"{name}.log", check_example, data={"json": js, "argv": argv, "out": out}))
    steps.append(heads["head-2"])
    return steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="the same steps at tiny sizes on the CPU")
    p.add_argument("--out", help="output folder (default: $OUT, else outputs/gpu_suite or outputs/gpu_suite_smoke)")
    p.add_argument("--budget-s", type=float, help="time for all steps (default: 570 on GPU, 600 for the smoke)")
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    sizes = SMOKE if smoke else GPU
    budget = args.budget_s or sizes["budget_s"]
    out = os.path.abspath(args.out or os.environ.get("OUT")
                          or os.path.join(ROOT, "outputs", "gpu_suite_smoke" if smoke else "gpu_suite"))
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="grpo_mel_gpu_suite_")  # JSON / junit the report is built from (not in out)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    py = sys.executable
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
               [ROOT] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x and x != ROOT])}
    if not smoke:
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA device (torch.cuda.is_available() is False); --cpu-smoke runs the steps on the CPU")
    for f in OUTPUTS:  # a fresh report: no file of an earlier run left beside it (the logs are appended to)
        for path in glob.glob(os.path.join(out, f)):
            os.remove(path)
    steps = build_steps(sizes, smoke, out, work, py)
    meta = {"smoke": smoke, "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "commit": _commit(),
            "command": os.environ.get("GRPO_MEL_SUITE_CMD") or "python scripts/gpu_suite.py " + " ".join(
                argv if argv is not None else sys.argv[1:])}
    report = os.path.join(out, "report.md")
    deadline = time.monotonic() + budget
    print(f"GPU suite{' (cpu smoke)' if smoke else ''}: {len(steps)} steps, budget {budget:.0f} s, out {out}",
          flush=True)
    for step in steps:
        left = deadline - time.monotonic()
        if step.name == "install" and (smoke or not step.data["wheels"]):
            step.status = "skipped"
            step.why = ("cpu-smoke: the main venv's packages" if smoke
                        else "no .whl/*.whl: the packages already importable")
        elif left < 15:
            step.why = f"the suite's {budget:.0f} s were spent"
        else:
            run_step(step, out, env, min(sizes["caps"][step.name], left))
            if step.name == "install":
                refused = step.data["refused"]
                step.why = (f"{len(step.data['wheels'])} wheels into {SITE}" + (
                    f"; not installed (the machine's own build stays): {', '.join(map(os.path.basename, refused))}"
                    if refused else "") + (f"; {step.why}" if step.why else ""))
                if step.status == "ok":
                    env["PYTHONPATH"] += os.pathsep + SITE
        if step.name == "install":  # what the later steps will find importable, and the SFT's 4-bit choice
            meta["probe"] = _probe(py, env, work)
            sft = next(s for s in steps if s.name == "sft")
            if meta["probe"]["imports"].get("bitsandbytes") is None:
                sft.data["note"] = " (4-bit base + LoRA: bitsandbytes imports)"
            else:
                sft.cmd.append("--no-4bit")
                sft.data["argv"].append("--no-4bit")
                sft.data["note"] = " (bitsandbytes does not import: LoRA without 4-bit)"
        print(f"  {step.name:12s} {step.status:8s} {_num(step.wall_s, '6.1f'):>6s} s  {step.why}", flush=True)
        write_report(report, steps, meta)
    bad = [s.name for s in steps if s.status not in ("ok", "skipped")]
    print(f"report: {report}" + (f"; failed or not run: {', '.join(bad)}" if bad else ""), flush=True)
    return 1 if bad else 0


def _probe(py: str, env: dict, work: str) -> dict:
    path = os.path.join(work, "probe.json")
    try:
        r = subprocess.run([py, os.path.abspath(__file__), "--probe", path], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
        why = None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["?"])[-1]
    except subprocess.TimeoutExpired:
        why = "timed out after 120 s"
    if why:  # then nothing counts as importable
        return {"versions": {}, "imports": {m: f"the probe failed: {why}" for m in PROBES}}
    with open(path) as f:
        return json.load(f)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--probe"]:
        probe(sys.argv[2])
    elif sys.argv[1:2] == ["--run-example"]:
        run_example(sys.argv[2], sys.argv[3], sys.argv[5:])
    else:
        sys.exit(main())
