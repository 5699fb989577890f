"""``grpo-mel``: TRL's own ``trl`` command with grpo_mel's patches applied in every training process. ::

    grpo-mel grpo --config recipe.yaml [any `trl grpo` argument]
    grpo-mel rloo --config recipe.yaml
    grpo-mel grpo --config recipe.yaml --grpo_mel_chunk_size 1024     # grpo_mel's own options, see below

TRL's CLI (1.14+: ``trl.cli``) parses the command line and starts ``accelerate launch trl/scripts/<command>.py``;
its training commands look ``launch_training_script`` up in ``trl.cli.accelerate_launcher`` when they run. Here
that one function is swapped for the duration of the call: the same ``accelerate launch`` with the same launch and
script arguments, but running :mod:`grpo_mel.integrations.trl_run` as a module, which applies
:func:`grpo_mel.patch_trl` in each process and then runs TRL's script. Every other command (``env``,
``vllm-serve``) is TRL's, untouched. grpo_mel's options (``--grpo_mel_chunk_size ROWS``, ``--grpo_mel_memory_budget
BYTES``, ``--grpo_mel_override_fused_head auto|true|false``: :func:`grpo_mel.patch_grpo`'s arguments) are taken
out of the command line and checked here, and reach every launched process through the environment
(:data:`grpo_mel.integrations.trl_run.ENV`).
"""

from __future__ import annotations

RUNNER = "grpo_mel.integrations.trl_run"


def _launch(script_name: str, launch_args: list[str], training_script_args: list[str], **_) -> None:
    """``accelerate launch [launch_args] -m grpo_mel.integrations.trl_run <command> [training_script_args]``: what
    TRL's ``launch_training_script`` launches, with grpo_mel's runner in front of TRL's script."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    command = script_name.removesuffix(".py")
    launch_command(launch_command_parser().parse_args(["--module", *launch_args, RUNNER, command,
                                                       *training_script_args]))


def main(argv: list[str] | None = None) -> int:
    import os
    import sys

    import trl

    from .trl_run import ENV, pop_options, parse_options

    raw, argv = pop_options(list(sys.argv[1:] if argv is None else argv))
    parse_options(raw)  # a bad value stops here, before anything is launched
    for key, value in raw.items():
        os.environ[ENV[key]] = value

    try:
        from trl.cli import accelerate_launcher
        from trl.cli import main as trl_main
    except ImportError as e:
        raise SystemExit(
            f"grpo-mel needs TRL's CLI of TRL >= 1.14 (trl.cli.accelerate_launcher); the installed TRL is "
            f"{trl.__version__} ({e}). Run `accelerate launch -m {RUNNER} grpo ...` instead."
        ) from e
    original = accelerate_launcher.launch_training_script
    accelerate_launcher.launch_training_script = _launch
    try:
        return trl_main(argv)
    finally:
        accelerate_launcher.launch_training_script = original


if __name__ == "__main__":
    raise SystemExit(main())
