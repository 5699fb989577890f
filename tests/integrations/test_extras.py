"""The core installs and imports with torch alone; the integrations name the extra they need."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXTRA = ("trl", "transformers", "peft", "accelerate", "datasets")

_WITHOUT_EXTRA = f"""
import sys

class NotInstalled:  # as if only torch were installed: the trl extra's packages cannot be imported
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {EXTRA!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, NotInstalled())
import torch
import grpo_mel

x, w = torch.randn(5, 4, requires_grad=True), torch.randn(7, 4, requires_grad=True)
y = torch.randint(0, 7, (5,))
lp = grpo_mel.linear_token_logprobs(x, w, y, chunk_size=2)
ref = torch.log_softmax(x @ w.T, -1).gather(-1, y[:, None])[:, 0]
torch.testing.assert_close(lp, ref)
lp.sum().backward()
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {EXTRA!r})
assert not loaded, loaded
for name in ("patch_grpo", "patch_causal_lm", "PeakMemoryCallback"):
    try:
        getattr(grpo_mel, name)
    except ModuleNotFoundError as e:
        print(name, "->", e)
    else:
        raise AssertionError(name + " imported without the trl extra")
"""


def test_core_imports_and_computes_without_the_trl_extra():
    out = subprocess.run([sys.executable, "-c", _WITHOUT_EXTRA], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 3, out.stdout
    for line in lines:
        assert "pip install 'grpo_mel[trl]'" in line, line


def test_core_dependencies_are_torch_alone():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert [d.split(">")[0] for d in project["dependencies"]] == ["torch"]
    trl_extra = {d.split(">")[0] for d in project["optional-dependencies"]["trl"]}
    assert trl_extra == set(EXTRA)


_CLI_WITHOUT_EXTRA = _WITHOUT_EXTRA.split("import torch")[0] + """
from grpo_mel.integrations.trl_cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_grpo_mel_command_without_trl_names_the_install_line():
    """A core-only install still has the `grpo-mel` command: every use of it says how to get TRL, exit status 2."""
    for argv in (["grpo", "--config", "recipe.yaml"], ["--help"], ["--version"]):
        out = subprocess.run([sys.executable, "-c", _CLI_WITHOUT_EXTRA, *argv], capture_output=True, text=True,
                             timeout=120, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
        assert out.returncode == 2, (argv, out.stdout, out.stderr)
        assert out.stdout == ""
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, (argv, out.stderr)
        assert lines[0].startswith("grpo-mel: error: grpo-mel is TRL's command line with grpo_mel's patch and needs "
                                   "TRL") and lines[0].endswith("pip install 'grpo_mel[trl]'"), lines[0]
