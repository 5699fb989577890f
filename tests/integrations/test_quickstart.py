"""docs/usage.md's quick start and its ``grpo-mel`` recipe, extracted from the page and run as written (so the page
cannot rot): each in a fresh process, in an empty directory, with nothing downloaded.

The quick start runs on every TRL pin. The patched head's calls are counted by this test's own wrapper around the
function the patch computes with (``_logps.chunked_linear``), installed before the page's code runs; the library
keeps no counter.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
from packaging.version import Version

from .conftest import TRL_VERSION

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
USAGE = os.path.join(ROOT, "docs", "usage.md")
pytestmark = [pytest.mark.trl, pytest.mark.slow]


def block(heading: str, lang: str) -> str:
    """The first ```lang block after the ``## heading`` line of usage.md (the heading's text up to its first
    colon or backquote is enough)."""
    text = open(USAGE, encoding="utf-8").read()
    start = next((m.end() for m in re.finditer(r"^## (.*)$", text, re.M) if m.group(1).startswith(heading)), None)
    assert start is not None, f"usage.md has no '## {heading}' section"
    m = re.compile(rf"^```{lang}\n(.*?)^```$", re.M | re.S).search(text, start)
    assert m is not None, f"no ```{lang} block after '## {heading}'"
    return m.group(1)


COUNTED = textwrap.dedent("""\
    import runpy, sys
    from grpo_mel.integrations import _logps

    real, calls = _logps.chunked_linear, []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    _logps.chunked_linear = counted
    runpy.run_path(sys.argv[1], run_name="__main__")
    print(f"grpo_mel head calls: {len(calls)}")
    """)


def _env(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=ROOT, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                HF_DATASETS_OFFLINE="1", **extra)


def test_quick_start_runs_as_written(tmp_path):
    code = block("Quick start", "python")
    assert "patch_grpo()" in code and "tiny_tokenizer" in code and "bf16=False" in code
    (tmp_path / "quickstart.py").write_text(code)
    out = subprocess.run([sys.executable, "-c", COUNTED, "quickstart.py"], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    lines = out.stdout.splitlines()
    # the page's `print(patch_grpo())`: what patch_grpo returns, printed before the trainer's logs
    import grpo_mel

    assert lines[0] == str(grpo_mel.patch_grpo()), lines[:3]
    # two optimizer steps, each through grpo_mel's head
    assert int(lines[-1].split(": ")[1]) > 0, lines[-1]
    logged = [line for line in out.stdout.splitlines() + out.stderr.splitlines() if "'grad_norm'" in line]
    assert len(logged) == 2, logged


@pytest.mark.skipif(TRL_VERSION < Version("1.14"), reason="grpo-mel hands over to trl.cli, which TRL has from 1.14")
def test_grpo_mel_recipe_runs_as_written(tmp_path):
    script = block("TRL's command line with the patch", "bash")
    assert "grpo-mel grpo --config recipe.yaml" in script
    # what a shell with grpo_mel installed has on PATH: `python` and the console script, both this interpreter
    # (with this checkout on PYTHONPATH); the install line itself is not run
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "grpo-mel").write_text(f'#!/bin/sh\nexec "{sys.executable}" -c "import sys; from '
                                      f'grpo_mel.integrations.trl_cli import main; sys.exit(main())" "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    run = tmp_path / "run"
    run.mkdir()
    script = "\n".join(line for line in script.splitlines() if not line.startswith("pip install"))
    path = os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=run, capture_output=True, text=True,
                         timeout=600, env=_env(PATH=path, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    assert out.stderr.count("grpo_mel: patched GRPOTrainer") == 2, out.stderr[-3000:]  # one worker per command
    assert (run / "out" / "config.json").exists()  # TRL's script ran to its end and saved the model
