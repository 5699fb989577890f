"""The main job (``scripts/run_grpo.sh`` = ``examples/grpo_reward_task.py`` with :data:`MAIN_JOB` first): its
arguments go on top of its defaults, it says what it runs, ends with one verdict line and exits with status 1 when
patched and unpatched differ; the plot starts at 0 and says what it shows."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import EXAMPLES, ROOT, load_example

GRPO = "grpo_reward_task"


def _script_defaults() -> list[str]:
    """The arguments scripts/run_grpo.sh passes before its own "$@"."""
    text = open(os.path.join(ROOT, "scripts", "run_grpo.sh")).read()
    m = re.search(r'examples/grpo_reward_task\.py \\\n(.*?)"\$@"', text, re.S)
    assert m, "run_grpo.sh no longer passes its defaults before \"$@\""
    return shlex.split(m.group(1).replace("\\\n", " "))


def test_run_grpo_sh_defaults_are_the_examples_main_job():
    assert _script_defaults() == load_example(GRPO).MAIN_JOB


@pytest.mark.parametrize("extra,expected", [
    ([], dict(runs="both", plot="outputs/grpo_peak_memory.png", cpu_measure="torch", tiny_vocab=32000)),
    (["--plot", "out.png"], dict(runs="both", plot="out.png", cpu_measure="torch", tiny_vocab=32000)),
    (["--no-patch"], dict(runs="unpatched", plot="outputs/grpo_peak_memory.png", tiny_vocab=32000)),
    (["--no-compare", "--cpu-measure", "rss"], dict(runs="patched", cpu_measure="rss", tiny_vocab=32000)),
    (["--tiny-vocab", "2048", "--steps", "3"], dict(runs="both", tiny_vocab=2048, steps=3, cpu_measure="torch")),
], ids=["none", "plot", "no-patch", "patched-only", "vocab"])
def test_arguments_go_on_top_of_the_main_jobs_defaults(extra, expected):
    """What `bash scripts/run_grpo.sh ARGS` parses to: the defaults, with each explicit flag winning."""
    args = load_example(GRPO).parse_args(_script_defaults() + extra)
    assert {k: getattr(args, k) for k in expected} == expected


def test_default_tolerances_follow_the_dtype():
    mod = load_example(GRPO)
    assert mod.parse_args([]).tolerances == mod.TOLERANCES[mod.torch.float32]
    args = mod.parse_args(["--bf16", "--tolerance", "0", "--entropy-tolerance", "0.5"])
    assert args.tolerances == {"loss": 0.0, "grad_norm": mod.TOLERANCES[mod.torch.bfloat16]["grad_norm"],
                               "entropy": 0.5}


def _run(label, losses, **metrics):
    C = load_example(GRPO).C
    return C.RunResult(label=label, losses=losses, metrics=metrics, peaks=[2.0 if label == "unpatched" else 0.5])


def test_verdict_line():
    mod = load_example(GRPO)
    tol = {"loss": 1e-5, "grad_norm": 1e-4, "entropy": 1e-4}
    base = _run("unpatched", [0.0, 0.0], grad_norm=[0.3, 0.3], entropy=[10.0, 10.0])
    ok, line = mod.verdict([base, _run("patched", [0.0, 1e-6], grad_norm=[0.3, 0.3], entropy=[10.0, 10.0])], tol)
    assert ok and line == ("verdict: patched matches unpatched over 2 steps (max |Δ|: loss 1.0e-06 <= 1e-05, "
                           "grad_norm 0.0e+00 <= 1e-04, entropy 0.0e+00 <= 1e-04); peak memory 0.250x unpatched "
                           "(0.5000 vs 2.0000 GiB)")
    ok, line = mod.verdict([base, _run("patched", [0.0, 0.0], grad_norm=[0.3, 0.31], entropy=[10.0, 10.0])], tol)
    assert not ok and line.startswith("verdict: MISMATCH: patched differs from unpatched")
    assert "grad_norm 1.0e-02 > 1e-04" in line
    # a TRL that logs no entropy (0.16): said so, not counted; a run that logged fewer steps does not match
    ok, line = mod.verdict([_run("unpatched", [0.0], grad_norm=[0.3]), _run("patched", [0.0], grad_norm=[0.3])], tol)
    assert ok and "entropy not logged by this TRL" in line
    ok, line = mod.verdict([_run("unpatched", [0.0, 0.0]), _run("patched", [0.0])], tol)
    assert not ok and "loss inf > 1e-05" in line


_PERTURBED = """
import runpy, sys
import grpo_mel.linear

real = grpo_mel.linear.chunked_linear


def off_by_one_percent(*args, **kwargs):  # a patched head that is 1% off: the verdict must catch it
    out = real(*args, **kwargs)
    return tuple(o * 1.01 for o in out) if isinstance(out, tuple) else out * 1.01


# the patch binds grpo_mel.linear.chunked_linear when the example first imports it; nothing of TRL is imported here,
# so the example's own logging set-up comes first, as in a plain run
grpo_mel.linear.chunked_linear = off_by_one_percent
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_main_job_output_and_exit_status_on_a_mismatch(tmp_path):
    """As run from the shell, with the main job's defaults at a tiny size and a patched head that is 1% off: what it
    runs first, one verdict line last, exit status 1; no profiler, bitsandbytes or DeepSpeed lines."""
    mod = load_example(GRPO)
    argv = [*mod.MAIN_JOB, "--plot", str(tmp_path / "peak.png"), "--steps", "2", "--num-generations", "2",
            "--prompts-per-step", "1", "--max-completion-length", "4", "--tiny-vocab", "1024", "--num-prompts", "8",
            "--no-warmup", "--output-dir", str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", _PERTURBED, os.path.join(EXAMPLES, f"{GRPO}.py"), *argv],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 1, (out.stdout[-3000:], out.stderr[-3000:])
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("GRPO reward task: tiny Llama (random, vocab 1024"), lines[:4]
    assert lines[2].startswith("  runs: unpatched (TRL ") and "then patched" in lines[2]
    assert lines[3].startswith("  memory: peak_cpu_alloc_gb: torch CPU allocator")
    assert lines[-1].startswith("verdict: MISMATCH: patched differs from unpatched over 2 steps"), lines[-1]
    assert "entropy" in lines[-1] and "x unpatched" in lines[-1]
    assert sum(line.startswith("verdict:") for line in lines) == 1
    assert os.path.exists(tmp_path / "peak.png")
    noise = ("USDT", "profiler_start", "gemm_4bit_forward", "Setting accelerator to CPU")
    assert not [line for line in (out.stdout + out.stderr).splitlines() if any(n in line for n in noise)]


def test_plot_starts_at_zero_and_says_what_it_shows(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    mod = load_example(GRPO)
    C = mod.C
    runs = [C.RunResult(label=lab, peaks=p, peak_key="peak_rss_gb") for lab, p in
            (("unpatched", [0.5455, 0.5495, 0.5460]), ("patched", [0.5450, 0.5470, 0.5452]))]
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)
    C.plot_peaks(runs, str(tmp_path / "p.png"), "GRPO peak memory per step, unpatched vs patched\ntiny Llama")
    ax = figs[0].axes[0]
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= 0.5495  # 4 MB of RSS noise does not look like a spike
    assert ax.get_ylabel() == "peak memory per step, GiB"
    assert ax.get_title() == "GRPO peak memory per step, unpatched vs patched\ntiny Llama"
    assert any("process peak RSS" in t.get_text() for t in figs[0].texts)
    plt.close(figs[0])
