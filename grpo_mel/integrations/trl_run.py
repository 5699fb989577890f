"""Run one of TRL's training scripts (``trl/scripts/<command>.py``) in this process with grpo_mel's patches applied
(:func:`grpo_mel.patch_trl`): ::

    accelerate launch -m grpo_mel.integrations.trl_run grpo --config recipe.yaml
    python -m grpo_mel.integrations.trl_run rloo --model_name_or_path ... --dataset_name ...

is ``trl grpo --config recipe.yaml`` (``trl rloo ...``) with grpo_mel's LM head: every argument after the command
is TRL's script's own. Under ``accelerate launch`` every worker process runs this module, so each one is patched.
The ``grpo-mel`` command (:mod:`grpo_mel.integrations.trl_cli`) launches this module for you.
"""

from __future__ import annotations

import importlib.util
import runpy
import sys


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        raise SystemExit("usage: python -m grpo_mel.integrations.trl_run <command: grpo, rloo, ...> [TRL's arguments]")
    command, rest = argv[0], argv[1:]
    if importlib.util.find_spec(f"trl.scripts.{command}") is None:
        raise SystemExit(f"grpo_mel: the installed TRL has no training script trl/scripts/{command}.py")
    from . import patch_trl

    patch_trl()
    sys.argv = [f"trl {command}", *rest]
    runpy.run_module(f"trl.scripts.{command}", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
