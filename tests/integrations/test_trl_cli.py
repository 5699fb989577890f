"""End to end: ``grpo-mel grpo --config recipe.yaml`` (and ``accelerate launch -m grpo_mel.integrations.trl_run rloo
...``) run TRL's own scripts through ``accelerate launch`` with grpo_mel's head in the worker process.

Everything is local: a tiny model and tokenizer saved to disk, a JSONL dataset, and a reward module in the run's
directory that TRL's script loads by name (``--reward_funcs rewards.length_reward``). That module also installs
this test's counter around the function grpo_mel's patch computes with (``trl_grpo.chunked_linear``), appending
one line per call to a file, so the test sees that the patched head ran inside the worker (the library keeps no
counter). One optimizer step each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from packaging.version import Version

from grpo_mel.integrations import _trl_compat

from .conftest import TRL_VERSION, tokenizer
from grpo_mel import testing as gt

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = [pytest.mark.trl, pytest.mark.slow]

REWARDS = '''
import os

from grpo_mel.integrations import trl_grpo

_real = trl_grpo.chunked_linear


def _counted(*args, **kwargs):  # this test's counter, installed in the worker when TRL imports this module
    with open(os.environ["GRPO_MEL_TEST_CALLS"], "a") as f:
        f.write(f"{os.getpid()}\\n")
    return _real(*args, **kwargs)


trl_grpo.chunked_linear = _counted


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]
'''


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    tok = tokenizer()
    gt.tiny_llama(vocab_size=len(tok), tokenizer=tok).save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    (d / "data").mkdir()
    with open(d / "data" / "train.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"{i}+{i + 1}="}) + "\n")
    (d / "rewards.py").write_text(REWARDS)
    return d


def _recipe(d, name: str) -> str:
    path = d / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        model_name_or_path: {d / 'model'}
        dataset_name: {d / 'data'}
        reward_funcs: [rewards.length_reward]
        output_dir: {d / ('out-' + name)}
        per_device_train_batch_size: 2
        num_generations: 2
        max_completion_length: 4
        max_steps: 5
        learning_rate: 1.0e-3
        use_cpu: true
        report_to: none
        save_strategy: "no"
        logging_steps: 1
        disable_tqdm: true
        dataloader_num_workers: 0
        """))
    return str(path)


def _run(d, argv, name):
    calls = d / f"calls-{name}.txt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, str(d)]), GRPO_MEL_TEST_CALLS=str(calls),
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    out = subprocess.run(argv, cwd=d, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    pids = calls.read_text().split() if calls.exists() else []
    return out, pids


def _logged_steps(out) -> int:
    """The Trainer's console log: one ``{'loss': ...}`` line per logged step (logging_steps=1)."""
    return sum(line.startswith("{'loss'") for line in out.stdout.splitlines())


@pytest.mark.skipif(TRL_VERSION < Version("1.14"), reason="grpo-mel hands over to trl.cli (TRL >= 1.14)")
def test_grpo_mel_grpo_is_trl_grpo_with_the_patched_head(run_dir):
    # a TRL flag on the command line overrides the recipe, as with `trl grpo`: one step
    cli = [sys.executable, "-c", "import sys; from grpo_mel.integrations.trl_cli import main; sys.exit(main())"]
    out, pids = _run(run_dir, cli + ["grpo", "--config", _recipe(run_dir, "grpo"), "--max_steps", "1"], "grpo")
    assert pids, "the patched head never ran in the training process"
    assert str(os.getpid()) not in pids  # it ran in the worker accelerate launched, not in this process
    assert _logged_steps(out) == 1  # the recipe says 5: the command line's --max_steps won, as with `trl grpo`
    assert os.path.exists(run_dir / "out-grpo" / "model.safetensors")  # TRL's script ran to its end


@pytest.mark.skipif(TRL_VERSION < Version(_trl_compat.MIN_TRL_RLOO), reason="this TRL's RLOOTrainer is not patched")
def test_accelerate_launch_module_runs_trl_rloo_with_the_patched_head(run_dir):
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    argv = [accelerate, "launch", "--num_processes", "1", "-m", "grpo_mel.integrations.trl_run", "rloo",
            "--config", _recipe(run_dir, "rloo"), "--max_steps", "1"]
    out, pids = _run(run_dir, argv, "rloo")
    assert pids, "the patched head never ran in the training process"
    assert _logged_steps(out) == 1
    assert os.path.exists(run_dir / "out-rloo" / "model.safetensors")


def test_the_console_script_is_declared():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts["grpo-mel"] == "grpo_mel.integrations.trl_cli:main"
