"""The GPU suite: every measurement the project owes a CUDA machine, in one run, into one markdown report.

Run it through ``scripts/gpu_suite.sh`` (which picks the interpreter and sets ``PYTHONPATH``). Steps, each in
its own process with a time cap, in this order (a failing step is recorded and the next one runs):

1. ``install``: the wheels in ``.whl/`` (never torch, triton or nvidia-*), ``pip install --no-index --no-deps
   --target``; without a ``.whl/`` the packages already importable are used.
2. ``parity``: ``tests/core/test_parity.py`` on the device (``GRPO_MEL_TEST_DEVICE``): fp32, bf16, fp16, autocast.
3. ``head-1``: ``benchmarks/bench_lm_head.py --preset gpu --tasks logprobs_entropy --tokens 16384 65536 --compile``
   (Llama-3.2-1B head, H=2048, V=128256, bf16, log-probs with the logged entropy: naive, TRL's fused head,
   Liger-Kernel and cut-cross-entropy where they import, grpo_mel at 4096 rows and at its planned chunk, each
   eager and with f compiled).
3b. ``head-1-frozen``: the same with W frozen (a LoRA policy's head: dX only; grpo_mel forms it in the forward);
   its rows go into head-1's CSV.
4. ``grpo``: ``examples/grpo_reward_task.py --model llama-1b-random --finetune lora --bf16 --num-generations 8
   --max-completion-length 2048 --compare --override-fused-head true`` (grpo_mel against unpatched TRL, whose
   Triton fused head runs on CUDA; peak VRAM and time per step).
5. ``sft``: ``examples/sft_loss_match.py --model llama-1b-random`` (4-bit when bitsandbytes imports).

Outputs (``--out``, else ``$OUT``, else ``outputs/gpu_suite`` or ``outputs/gpu_suite_smoke``; at most 8 files):
``report.md`` (rewritten after every step, so a run cut short still leaves one), one CSV per head shape, one log
per step kind. Exit status 1 if any step failed or did not run.

``--cpu-smoke`` runs the same steps at tiny sizes on the CPU (no wheel install, a parity subset, a 32-wide
head, the tiny example models) in a minute or two; ``scripts/test.sh`` runs it so the suite cannot rot.

Beside this file: the steps, their sizes, running and checks (``suite_steps.py``), the child processes
(``suite_child.py``), the report (``suite_report.py``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import os
import subprocess
import sys
import tempfile
import time

from suite_report import _num, write_report
from suite_steps import GPU, ROOT, SMOKE, build_steps, run_step

# everything the suite writes under out (8 files at most)
OUTPUTS = ("report.md", "install.log", "parity.log", "head.log", "grpo.log", "sft.log", "head_h*_v*.csv")


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "n/a"
    return (sha + (" + uncommitted changes" if dirty else "")) if sha else "n/a (no git checkout)"


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
        if step.skip:
            step.status, step.why = "skipped", step.skip
        elif left < 15:
            step.why = f"the suite's {budget:.0f} s were spent"
        else:
            run_step(step, out, env, min(sizes["caps"][step.name], left))
        if step.after is not None:
            step.after(step, env, meta)
        print(f"  {step.name:12s} {step.status:8s} {_num(step.wall_s, '6.1f'):>6s} s  {step.why}", flush=True)
        write_report(report, steps, meta)
    bad = [s.name for s in steps if s.status not in ("ok", "skipped")]
    print(f"report: {report}" + (f"; failed or not run: {', '.join(bad)}" if bad else ""), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
