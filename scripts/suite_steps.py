"""The GPU suite's steps (``scripts/gpu_suite.py``): their sizes on the GPU and in the CPU smoke, how each is built,
run in its own process group with a time cap, and checked."""

from __future__ import annotations

import functools
import glob
import json
import os
import re
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Callable

from suite_child import PROBES

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SITE = "/tmp/grpo_mel_site"  # where the .whl/ wheels are installed (--target), put on the steps' PYTHONPATH
NEVER_INSTALL = re.compile(r"^(torch|triton|nvidia[-_])", re.I)  # the machine's own CUDA build stays

# sizes: GPU and the CPU smoke (tiny, seconds each). GPU: what issue 23 asks of the 1B head (bf16, log-probs with the
# logged entropy, as GRPO calls it, N=16384 and 65536; naive, TRL's fused head, Liger, cut-cross-entropy, grpo_mel at
# its planned chunk, eager and compiled, W trained and frozen) and a whole GRPO step where the head matters (1B, LoRA,
# bf16, 8 generations x 2048 completion tokens, patched vs TRL 1.16's own head). Caps: the first H200 run's step times
# (benchmarks/results/gpu_h200_suite_report.md) with the compile of f added; the suite fits one 600 s device call.
_HEAD_1 = ["--preset", "gpu", "--tasks", "logprobs_entropy", "--tokens", "16384", "65536", "--chunks", "4096",
           "--compile", "--repeats", "3"]
GPU = dict(
    budget_s=570,
    parity=["tests/core/test_parity.py"],
    heads={"head-1": _HEAD_1, "head-1-frozen": _HEAD_1 + ["--frozen-weight"]},
    grpo=["--model", "llama-1b-random", "--finetune", "lora", "--bf16", "--num-generations", "8",
          "--max-completion-length", "2048", "--steps", "2", "--compare", "--override-fused-head", "true"],
    sft=["--model", "llama-1b-random", "--steps", "4"],
    caps={"install": 45, "parity": 50, "head-1": 140, "head-1-frozen": 100, "grpo": 150, "sft": 80},
)
_TINY_HEAD = ["--device", "cpu", "--dtype", "float32", "--tokens", "96", "--chunks", "64", "--repeats", "1"]
SMOKE = dict(
    budget_s=600,  # the smoke's caps only catch a hang: a shared CI machine can be 2-3x slower than an idle one
    parity=["tests/core/test_parity.py", "-k", "bias_every_chunking or (bf16 and ce_mean)"],
    heads={"head-1": _TINY_HEAD + ["--hidden", "32", "--vocab", "500", "--compile", "--tasks", "logprobs_entropy"],
           "head-1-frozen": _TINY_HEAD + ["--hidden", "32", "--vocab", "500", "--compile", "--tasks",
                                          "logprobs_entropy", "--frozen-weight"]},
    grpo=["--compare", "--steps", "2", "--num-generations", "2", "--prompts-per-step", "2",
          "--max-completion-length", "8", "--num-prompts", "16", "--beta", "0.04", "--no-warmup",
          "--override-fused-head", "true"],
    sft=["--steps", "2", "--num-rows", "16", "--max-length", "64", "--no-warmup"],
    caps={"install": 30, "parity": 180, "head-1": 240, "head-1-frozen": 240, "grpo": 180, "sft": 180},
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
    skip: str = ""  # why the step is not run at all (known when the steps are built)
    after: Callable[["Step", dict, dict], None] | None = None  # (step, env, meta), once it ran or was passed over


def build_steps(sizes: dict, smoke: bool, out: str, work: str, py: str) -> list[Step]:
    steps = []
    wheels = sorted(glob.glob(os.path.join(ROOT, ".whl", "*.whl")))
    keep = [w for w in wheels if not NEVER_INSTALL.match(os.path.basename(w))]
    skip = ("cpu-smoke: the main venv's packages" if smoke
            else "" if keep else "no .whl/*.whl: the packages already importable")
    steps.append(Step("install", "wheels", [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                            "--no-compile", "--no-cache-dir", "--upgrade", "--target", SITE, *keep],
                      "install.log", check_install, data={"out": out, "wheels": keep,
                                                          "refused": sorted(set(wheels) - set(keep))},
                      skip=skip, after=functools.partial(after_install, steps=steps, py=py, work=work)))
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
    steps += list(heads.values())
    for name, example, title in (("grpo", "grpo_reward_task", "GRPO reward task"),
                                 ("sft", "sft_loss_match", "SFT loss match")):
        argv = list(sizes[name])
        js = os.path.join(work, f"{name}.json")
        steps.append(Step(name, title, [py, os.path.join(HERE, "suite_child.py"), "--run-example", example, js, "--",
                                        *argv],
                          f"{name}.log", check_example, data={"json": js, "argv": argv, "out": out}))
    return steps


def after_install(step: Step, env: dict, meta: dict, *, steps: list[Step], py: str, work: str) -> None:
    """After the install step (run or not): say what it installed and put it on the later steps' path, then probe
    what they will find importable (for the report) and choose the SFT's 4-bit mode from it."""
    if step.wall_s is not None:  # it ran
        refused = step.data["refused"]
        step.why = (f"{len(step.data['wheels'])} wheels into {SITE}" + (
            f"; not installed (the machine's own build stays): {', '.join(map(os.path.basename, refused))}"
            if refused else "") + (f"; {step.why}" if step.why else ""))
        if step.status == "ok":
            env["PYTHONPATH"] += os.pathsep + SITE
    meta["probe"] = _probe(py, env, work)
    sft = next(s for s in steps if s.name == "sft")
    if meta["probe"]["imports"].get("bitsandbytes") is None:
        sft.data["note"] = " (4-bit base + LoRA: bitsandbytes imports)"
    else:
        sft.cmd.append("--no-4bit")
        sft.data["argv"].append("--no-4bit")
        sft.data["note"] = " (bitsandbytes does not import: LoRA without 4-bit)"


def _probe(py: str, env: dict, work: str) -> dict:
    path = os.path.join(work, "probe.json")
    try:
        r = subprocess.run([py, os.path.join(HERE, "suite_child.py"), "--probe", path], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        why = None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["?"])[-1]
    except subprocess.TimeoutExpired:
        why = "timed out after 120 s"
    if why:  # then nothing counts as importable
        return {"versions": {}, "imports": {m: f"the probe failed: {why}" for m in PROBES}}
    with open(path) as f:
        return json.load(f)


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
    from lm_head_report import read_csv  # benchmarks/ is on sys.path (gpu_suite.main)

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
