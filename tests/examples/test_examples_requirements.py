"""Issue 17: an example whose flags need a missing optional piece stops when its arguments are parsed: exit
status 2, one line on stderr naming the piece and how to get it, and no model built (so in well under a
second here, not after minutes of training).

A missing package is simulated with ``sys.modules[name] = None``: ``import name`` then raises
ModuleNotFoundError and ``importlib.util.find_spec(name)`` returns None, as for a package never installed.
"""

from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys
import time
import types

import pytest
import torch

from conftest import EXAMPLES, ROOT, load_example

GRPO, SFT = "grpo_reward_task", "sft_loss_match"


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to build a model (or its tokenizer) fails the test."""
    common = load_example(GRPO).C
    assert load_example(SFT).C is common

    def built(*a, **k):
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr(common.ModelSource, "prepare", built)
    monkeypatch.setattr(common.ModelSource, "load", built)


def _missing(monkeypatch, *modules):
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)


def _installed(monkeypatch, module):
    """A stand-in for a package that is installed (find_spec finds it); nothing of it is used."""
    fake = types.ModuleType(module)
    fake.__spec__ = importlib.machinery.ModuleSpec(module, None)
    monkeypatch.setitem(sys.modules, module, fake)


def _no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _gpu_without_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Old GPU")


def _stops(capsys, example, argv, *expected):
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        load_example(example).main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for e in expected:
        assert e in lines[0], (e, lines[0])
    assert time.perf_counter() - t0 < 5, "the check took as long as work"
    return lines[0]


@pytest.mark.parametrize("example,argv,module,expected", [
    (GRPO, ["--plot", "out.png"], "matplotlib", ['--plot needs matplotlib', 'pip install "grpo_mel[plot]"']),
    (GRPO, ["--finetune", "qlora"], "bitsandbytes", ["--finetune qlora needs bitsandbytes",
                                                     'pip install "grpo_mel[bnb]"']),
    (GRPO, ["--use-vllm"], "vllm", ["--use-vllm needs vllm", 'pip install "grpo_mel[vllm]"']),
    (SFT, [], "bitsandbytes", ["--no-4bit", "needs bitsandbytes", 'pip install "grpo_mel[bnb]"']),
], ids=["grpo-plot", "grpo-qlora", "grpo-vllm", "sft-4bit-default"])
def test_missing_package(monkeypatch, capsys, no_model, example, argv, module, expected):
    _missing(monkeypatch, module)
    _stops(capsys, example, argv, *expected)


@pytest.mark.parametrize("example", [GRPO, SFT])
def test_model_path_that_does_not_exist(capsys, no_model, tmp_path, example):
    missing = str(tmp_path / "no" / "such" / "model")
    _stops(capsys, example, ["--model", missing], f"--model {missing}: no such directory")
    # a directory that is not a saved model
    _stops(capsys, example, ["--model", str(tmp_path)], "no config.json")


@pytest.mark.parametrize("example,argv", [(GRPO, ["--bf16"]), (SFT, ["--dtype", "bfloat16"])])
def test_bf16_on_a_gpu_without_bf16(monkeypatch, capsys, no_model, example, argv):
    _gpu_without_bf16(monkeypatch)
    _stops(capsys, example, argv, argv[-1] if example == SFT else "--bf16", "Old GPU", "no bfloat16 support")


def test_vllm_without_a_gpu(monkeypatch, capsys, no_model):
    _installed(monkeypatch, "vllm")
    _no_gpu(monkeypatch)
    _stops(capsys, GRPO, ["--use-vllm"], "--use-vllm", "needs a CUDA GPU")


@pytest.mark.parametrize("example,argv,parsed", [
    (GRPO, ["--bf16", "--finetune", "full", "--model", "llama-1b-random"],  # bf16 on the CPU is allowed
     dict(bf16=True, finetune="full", model="llama-1b-random")),
    (SFT, ["--no-4bit", "--dtype", "bfloat16"], dict(no_4bit=True, dtype="bfloat16")),
    # --full implies --no-4bit; a hub id is not checked locally
    (SFT, ["--full", "--model", "org/name"], dict(full=True, no_4bit=True, model="org/name")),
])
def test_what_needs_nothing_missing_is_accepted(monkeypatch, example, argv, parsed):
    """With bitsandbytes, matplotlib and vllm all missing and no GPU, these parse (the checks are not blanket),
    to the values asked for."""
    _missing(monkeypatch, "bitsandbytes", "matplotlib", "vllm")
    _no_gpu(monkeypatch)
    args = load_example(example).parse_args(argv)  # no SystemExit
    assert {k: getattr(args, k) for k in parsed} == parsed


_CLI = """
import runpy, sys
sys.modules["matplotlib"] = None  # as if not installed
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_cli_exit_status_without_matplotlib():
    """The issue's command line, as a new user runs it: status 2 before anything is printed on stdout."""
    argv = ["--model", "llama-1b-random", "--finetune", "lora", "--compare", "--steps", "2", "--num-generations",
            "4", "--prompts-per-step", "2", "--max-completion-length", "64", "--cpu-measure", "torch",
            "--plot", "out.png"]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", _CLI, os.path.join(EXAMPLES, f"{GRPO}.py"), *argv],
                         capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        'grpo_reward_task.py: error: --plot needs matplotlib, which is not installed: pip install "grpo_mel[plot]"']


@pytest.mark.parametrize("example,argv,expected", [
    (GRPO, ["--chunk-size", "0"], "argument --chunk-size: must be an integer >= 1, got '0'"),
    (GRPO, ["--chunk-size", "-3"], "argument --chunk-size: must be an integer >= 1, got '-3'"),
    (GRPO, ["--chunk-size", "1.5"], "argument --chunk-size: expected an integer >= 1, got '1.5'"),
    (GRPO, ["--memory-budget", "0"], "argument --memory-budget: must be a finite number > 0, got '0'"),
    (GRPO, ["--memory-budget", "nan"], "argument --memory-budget: must be a finite number > 0, got 'nan'"),
    (GRPO, ["--temperature", "0"], "argument --temperature: must be a finite number > 0, got '0'"),
    (GRPO, ["--learning-rate", "inf"], "argument --learning-rate: must be a finite number > 0, got 'inf'"),
    (GRPO, ["--beta", "-0.1"], "argument --beta: must be a finite number >= 0, got '-0.1'"),
    (GRPO, ["--steps", "0"], "argument --steps: must be an integer >= 1, got '0'"),
    (GRPO, ["--num-generations", "1"], "argument --num-generations: must be an integer >= 2, got '1'"),
    (GRPO, ["--tolerance", "-1"], "argument --tolerance: must be a finite number >= 0, got '-1'"),
    (GRPO, ["--grad-norm-tolerance", "x"], "argument --grad-norm-tolerance: expected a finite number >= 0, got 'x'"),
    (GRPO, ["--tiny-hidden", "60"], "argument --tiny-hidden: must be a multiple of 8 (4 attention heads of an even "
                                    "size), got 60"),
    (GRPO, ["--threads", "0"], "argument --threads: must be an integer >= 1, got '0'"),
    (SFT, ["--chunk-size", "0"], "argument --chunk-size: must be an integer >= 1, got '0'"),
    (SFT, ["--grad-accum", "0"], "argument --grad-accum: must be an integer >= 1, got '0'"),
    (SFT, ["--memory-budget", "-5"], "argument --memory-budget: must be a finite number > 0, got '-5'"),
])
def test_bad_values_are_argparse_errors(capsys, no_model, example, argv, expected):
    """A bad number stops the example when its arguments are parsed (argparse's usage, then one error line naming
    the option and the value; status 2), not in a traceback after the model is built."""
    with pytest.raises(SystemExit) as exc:
        load_example(example).main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage: ") and err[-1].startswith(f"{os.path.basename(sys.argv[0])}: error: ")
    assert expected in err[-1], err[-1]
