"""``grpo-mel``: TRL's own ``trl`` command with grpo_mel's patches applied in every training process. ::

    grpo-mel grpo --config recipe.yaml [any `trl grpo` argument]
    grpo-mel rloo --config recipe.yaml
    grpo-mel grpo --config recipe.yaml --grpo_mel_chunk_size 1024     # grpo_mel's own options, see below
    grpo-mel --help                                                   # grpo_mel's part, then TRL's help
    grpo-mel --version                                                # grpo_mel's and TRL's versions

TRL's CLI (1.14+: ``trl.cli``) parses the command line and starts ``accelerate launch trl/scripts/<command>.py``;
its training commands look ``launch_training_script`` up in ``trl.cli.accelerate_launcher`` when they run. Here
that one function is swapped for the duration of the call: the same ``accelerate launch`` with the same launch and
script arguments, but running :mod:`grpo_mel.integrations.trl_run` as a module, which applies
:func:`grpo_mel.patch_trl` in each process and then runs TRL's script. Every other command (``env``,
``vllm-serve``) is TRL's, untouched. grpo_mel's options (``--grpo_mel_chunk_size ROWS``, ``--grpo_mel_memory_budget
BYTES``, ``--grpo_mel_override_fused_head auto|true|false``, ``--grpo_mel_compile auto|true|false``:
:func:`grpo_mel.patch_grpo`'s arguments, or their
``GRPO_MEL_*`` environment variables) are taken out of the command line and checked here, flags and variables
alike, before anything is launched (a bad one: one line, exit status 2), and reach every launched process through
the environment (:data:`grpo_mel.integrations.trl_run.ENV`).

This module imports nothing of TRL at import time, so that without TRL (a core-only ``pip install grpo_mel``) the
command says how to install it instead of failing on an import.
"""

from __future__ import annotations

import os
import sys

RUNNER = "grpo_mel.integrations.trl_run"
PROG = "grpo-mel"
INSTALL = "pip install 'grpo_mel[trl]'"
#: the commands whose trainer grpo_mel patches (every other command runs as TRL's)
PATCHED = {"grpo": "GRPOTrainer", "rloo": "RLOOTrainer, TRL >= 1.14"}
_TRL_PACKAGES = ("trl", "transformers", "accelerate", "datasets", "peft")


def _launch(script_name: str, launch_args: list[str], training_script_args: list[str], **_) -> None:
    """``accelerate launch [launch_args] -m grpo_mel.integrations.trl_run <command> [training_script_args]``: what
    TRL's ``launch_training_script`` launches, with grpo_mel's runner in front of TRL's script."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    command = script_name.removesuffix(".py")
    launch_command(launch_command_parser().parse_args(["--module", *launch_args, RUNNER, command,
                                                       *training_script_args]))


def header() -> str:
    """What ``grpo-mel --help`` prints before TRL's help."""
    from .trl_run import options_help

    patched = ", ".join(f"{c} ({t})" for c, t in PATCHED.items())
    return "\n".join([
        f"{PROG}: TRL's command line (`trl`) with grpo_mel's memory-efficient LM head in every training process.",
        f"usage: {PROG} <command> [TRL's arguments for it] [grpo_mel's options]   |   {PROG} --version",
        "",
        f"Patched commands: {patched}: their per-token log-probs go through grpo_mel's chunked head.",
        "Every other command (sft, dpo, env, vllm-serve, ...) runs exactly as TRL's.",
        "",
        options_help(),
        "",
        f"TRL's help follows (read `trl` as `{PROG}`; `{PROG} grpo --help` lists `trl grpo`'s arguments):",
        "",
    ])


def _import_trl(prog: str = PROG):
    """``trl``, or one line naming the install command and exit status 2 when TRL (or a package it needs) is not
    installed."""
    from .trl_run import fail

    try:
        import trl
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in _TRL_PACKAGES:
            raise
        fail(prog, f"{PROG} is TRL's command line with grpo_mel's patch and needs TRL ({e.name} is not installed): "
                   f"{INSTALL}")
    return trl


def main(argv: list[str] | None = None) -> int:
    import grpo_mel

    from .trl_run import ENV, OptionError, fail, options_from, options_help, pop_options

    argv = list(sys.argv[1:] if argv is None else argv)
    trl = _import_trl()
    if argv[:1] in (["--version"], ["-V"]):
        print(f"grpo_mel {grpo_mel.__version__}, TRL {trl.__version__}")
        return 0
    asks_help = any(a in ("-h", "--help") for a in argv)
    # grpo_mel's options, flags and GRPO_MEL_* variables alike, are checked before anything is launched
    try:
        options_from(argv, os.environ)
        raw, argv = pop_options(argv)
    except OptionError as e:
        fail(PROG, str(e))
    try:
        from trl.cli import accelerate_launcher
        from trl.cli import main as trl_main
    except ImportError:
        fail(PROG, f"the installed TRL is {trl.__version__}; {PROG} hands over to TRL's command line, which TRL has "
                   f"from 1.14 (trl.cli). With this TRL run `accelerate launch -m {RUNNER} grpo ...` instead, or "
                   "upgrade TRL")
    if not argv or argv[:1] in (["-h"], ["--help"]):
        print(header(), flush=True)
        trl_main(["--help"])
        return 0
    if asks_help and argv[0] in PATCHED:
        print(options_help() + "\n", flush=True)
    for key, value in raw.items():
        os.environ[ENV[key]] = value

    original = accelerate_launcher.launch_training_script
    accelerate_launcher.launch_training_script = _launch
    try:
        return trl_main(argv)
    finally:
        accelerate_launcher.launch_training_script = original


if __name__ == "__main__":
    raise SystemExit(main())
