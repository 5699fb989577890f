"""End to end: ``grpo-mel grpo --config recipe.yaml`` (and ``accelerate launch -m grpo_mel.integrations.trl_run rloo
...``) run TRL's own scripts through ``accelerate launch`` with grpo_mel's head in the worker process.

Everything is local: a tiny model and tokenizer saved to disk, a JSONL dataset, and a reward module in the run's
directory that TRL's script loads by name (``--reward_funcs rewards.length_reward``). That module also installs
this test's counter around the function grpo_mel's patch computes with (``_logps.chunked_linear``), appending
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

from grpo_mel.integrations import _logps

_real = _logps.chunked_linear


def _counted(*args, **kwargs):  # this test's counter, installed in the worker when TRL imports this module
    with open(os.environ["GRPO_MEL_TEST_CALLS"], "a") as f:
        f.write(f"{os.getpid()}:{kwargs.get('chunk_size')}:{kwargs.get('compile')}\\n")
    return _real(*args, **kwargs)


_logps.chunked_linear = _counted


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
    calls = [line.split(":") for line in calls.read_text().split()] if calls.exists() else []
    return out, calls


def _logged_steps(out) -> int:
    """The Trainer's console log: one ``{'loss': ...}`` line per logged step (logging_steps=1)."""
    return sum(line.startswith("{'loss'") for line in out.stdout.splitlines())


@pytest.mark.skipif(TRL_VERSION < Version("1.14"), reason="grpo-mel hands over to trl.cli (TRL >= 1.14)")
def test_grpo_mel_grpo_is_trl_grpo_with_the_patched_head(run_dir):
    # a TRL flag on the command line overrides the recipe, as with `trl grpo`: one step
    # grpo_mel's own option, anywhere on the line, reaches the worker (TRL never sees it: it would reject it)
    cli = [sys.executable, "-c", "import sys; from grpo_mel.integrations.trl_cli import main; sys.exit(main())"]
    argv = ["grpo", "--grpo_mel_chunk_size", "3", "--config", _recipe(run_dir, "grpo"), "--max_steps", "1",
            "--grpo_mel_compile", "false"]
    out, calls = _run(run_dir, cli + argv, "grpo")
    assert calls, "the patched head never ran in the training process"
    assert str(os.getpid()) not in {pid for pid, _, _ in calls}  # it ran in the worker accelerate launched
    assert {(chunk, comp) for _, chunk, comp in calls} == {("3", "False")}, calls  # with the command line's options
    assert "grpo_mel: patched GRPOTrainer" in out.stderr and "chunk_size=3" in out.stderr
    assert "compile=False" in out.stderr
    assert _logged_steps(out) == 1  # the recipe says 5: the command line's --max_steps won, as with `trl grpo`
    assert os.path.exists(run_dir / "out-grpo" / "model.safetensors")  # TRL's script ran to its end


@pytest.mark.skipif(TRL_VERSION < Version(_trl_compat.MIN_TRL_RLOO), reason="this TRL's RLOOTrainer is not patched")
def test_accelerate_launch_module_runs_trl_rloo_with_the_patched_head(run_dir):
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    argv = [accelerate, "launch", "--num_processes", "1", "-m", "grpo_mel.integrations.trl_run", "rloo",
            "--config", _recipe(run_dir, "rloo"), "--max_steps", "1"]
    out, calls = _run(run_dir, argv, "rloo")
    assert calls, "the patched head never ran in the training process"
    assert {(chunk, comp) for _, chunk, comp in calls} == {("None", "None")}  # no option given: the defaults
    assert _logged_steps(out) == 1
    assert os.path.exists(run_dir / "out-rloo" / "model.safetensors")


def test_the_console_script_is_declared():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts["grpo-mel"] == "grpo_mel.integrations.trl_cli:main"


def test_options_come_out_of_the_command_line_and_the_environment():
    from grpo_mel.integrations.trl_run import options_from

    env = {"GRPO_MEL_CHUNK_SIZE": "3", "GRPO_MEL_MEMORY_BUDGET": "1e8", "GRPO_MEL_COMPILE": "true"}
    argv = ["--config", "r.yaml", "--grpo_mel_chunk_size", "64", "--max_steps", "1",
            "--grpo_mel_override_fused_head=False"]
    opts, rest = options_from(argv, env)
    assert opts == {"chunk_size": 64, "memory_budget": 1e8, "override_fused_head": False, "compile": True}
    assert options_from(["--grpo_mel_compile", "AUTO"], env)[0]["compile"] is None  # the flag wins
    assert rest == ["--config", "r.yaml", "--max_steps", "1"]  # what TRL's parser gets
    assert options_from(["--config", "r.yaml"], {}) == ({}, ["--config", "r.yaml"])


@pytest.mark.parametrize("argv,env,match", [
    (["--grpo_mel_chunk_size", "0"], {}, r"--grpo_mel_chunk_size \(or GRPO_MEL_CHUNK_SIZE\): bad value '0'"),
    (["--grpo_mel_chunk_size", "1.5"], {}, r"bad value '1.5'"),
    ([], {"GRPO_MEL_MEMORY_BUDGET": "-1"}, r"--grpo_mel_memory_budget \(or GRPO_MEL_MEMORY_BUDGET\): bad value '-1'"),
    (["--grpo_mel_override_fused_head", "maybe"], {}, r"must be one of auto, true, false"),
    ([], {"GRPO_MEL_COMPILE": "1"}, r"--grpo_mel_compile \(or GRPO_MEL_COMPILE\): bad value '1': must be one of auto, "
                                    r"true, false"),
    (["--max_steps", "1", "--grpo_mel_chunk_size"], {}, r"--grpo_mel_chunk_size needs a value"),
])
def test_bad_options_stop_with_the_option_named(argv, env, match):
    from grpo_mel.integrations.trl_run import OptionError, options_from

    with pytest.raises(OptionError, match=match):
        options_from(argv, env)


def test_a_flag_overrides_a_bad_variable():
    from grpo_mel.integrations.trl_run import options_from

    assert options_from(["--grpo_mel_chunk_size", "8"], {"GRPO_MEL_CHUNK_SIZE": "-5"})[0] == {"chunk_size": 8}


def _one_line_status_2(capsys, call, *expected) -> str:
    with pytest.raises(SystemExit) as exc:
        call()
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and out == "", (out, err)
    for e in expected:
        assert e in lines[0], (e, lines[0])
    return lines[0]


@pytest.mark.parametrize("argv,env,expected", [
    (["grpo", "--grpo_mel_chunk_size", "x", "--config", "r.yaml"], {}, "bad value 'x'"),
    (["grpo", "--config", "r.yaml"], {"GRPO_MEL_CHUNK_SIZE": "-5"},
     "--grpo_mel_chunk_size (or GRPO_MEL_CHUNK_SIZE): bad value '-5': chunk_size must be >= 1, got -5"),
    (["rloo", "--config", "r.yaml"], {"GRPO_MEL_OVERRIDE_FUSED_HEAD": "yes"}, "GRPO_MEL_OVERRIDE_FUSED_HEAD"),
    (["grpo", "--config", "r.yaml"], {"GRPO_MEL_COMPILE": "on"}, "--grpo_mel_compile (or GRPO_MEL_COMPILE): bad "
                                                                 "value 'on'"),
    (["grpo", "--config", "r.yaml", "--grpo_mel_memory_budget"], {}, "--grpo_mel_memory_budget needs a value"),
], ids=["flag", "variable", "variable-fused", "variable-compile", "no-value"])
def test_grpo_mel_checks_flags_and_variables_before_launching(monkeypatch, capsys, argv, env, expected):
    from grpo_mel.integrations import trl_cli

    launched = []
    monkeypatch.setattr(trl_cli, "_launch", lambda *a, **k: launched.append(a))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    line = _one_line_status_2(capsys, lambda: trl_cli.main(argv), expected)
    assert line.startswith("grpo-mel: error: ")
    assert not launched


def test_the_runner_checks_its_variables_too(monkeypatch, capsys):
    """The process `accelerate launch -m grpo_mel.integrations.trl_run` starts: a bad variable is one line, status 2."""
    from grpo_mel.integrations import trl_run

    monkeypatch.setenv("GRPO_MEL_CHUNK_SIZE", "0")
    _one_line_status_2(capsys, lambda: trl_run.main(["grpo", "--config", "r.yaml"]), "GRPO_MEL_CHUNK_SIZE", "'0'")


def test_bad_variable_from_the_shell_is_one_line_and_status_2(tmp_path):
    """As a user types it: ``GRPO_MEL_CHUNK_SIZE=-5 grpo-mel grpo ...`` stops before launching, no traceback."""
    cli = [sys.executable, "-c", "import sys; from grpo_mel.integrations.trl_cli import main; sys.exit(main())"]
    out = subprocess.run(cli + ["grpo", "--config", "recipe.yaml"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, PYTHONPATH=ROOT, GRPO_MEL_CHUNK_SIZE="-5"))
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert [line for line in out.stderr.splitlines() if line.startswith("grpo-mel")] == [
        "grpo-mel: error: --grpo_mel_chunk_size (or GRPO_MEL_CHUNK_SIZE): bad value '-5': chunk_size must be >= 1, "
        "got -5"]
    assert "Traceback" not in out.stderr


def test_version_names_both(capsys):
    import trl

    import grpo_mel
    from grpo_mel.integrations import trl_cli

    assert trl_cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"grpo_mel {grpo_mel.__version__}, TRL {trl.__version__}"


@pytest.mark.skipif(TRL_VERSION < Version("1.14"), reason="grpo-mel hands over to trl.cli (TRL >= 1.14)")
@pytest.mark.parametrize("argv", [["--help"], ["-h"], []])
def test_help_says_what_it_is_then_defers_to_trl(capsys, argv):
    from grpo_mel.integrations import trl_cli
    from grpo_mel.integrations.trl_run import ENV, FLAGS

    with pytest.raises(SystemExit) as exc:  # TRL's argparse help exits
        trl_cli.main(argv)
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    ours, _, theirs = out.partition("TRL's help follows")
    assert ours.startswith("grpo-mel: TRL's command line (`trl`) with grpo_mel's memory-efficient LM head")
    assert "Patched commands: grpo (GRPOTrainer), rloo (RLOOTrainer" in ours
    for name in [*FLAGS, *ENV.values()]:
        assert name in ours, name
    assert "usage: trl" in theirs and "grpo" in theirs  # TRL's own help, after ours


@pytest.mark.skipif(TRL_VERSION < Version("1.14"), reason="grpo-mel hands over to trl.cli (TRL >= 1.14)")
def test_command_help_lists_grpo_mel_options_then_trls(capsys, monkeypatch):
    from grpo_mel.integrations import trl_cli

    monkeypatch.setattr(trl_cli, "_launch", lambda *a, **k: pytest.fail("--help launched something"))
    with pytest.raises(SystemExit) as exc:
        trl_cli.main(["grpo", "--help"])
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    assert out.index("--grpo_mel_chunk_size ROWS") < out.index("usage: trl grpo")


@pytest.mark.skipif(TRL_VERSION >= Version("1.14"), reason="this TRL has the CLI grpo-mel hands over to")
def test_an_old_trl_is_one_line_naming_the_alternative(capsys):
    from grpo_mel.integrations import trl_cli

    _one_line_status_2(capsys, lambda: trl_cli.main(["grpo", "--config", "r.yaml"]),
                       f"the installed TRL is {TRL_VERSION}", "accelerate launch -m grpo_mel.integrations.trl_run")
