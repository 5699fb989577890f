"""Run one of TRL's training scripts (``trl/scripts/<command>.py``) in this process with grpo_mel's patches applied
(:func:`grpo_mel.patch_trl`): ::

    accelerate launch -m grpo_mel.integrations.trl_run grpo --config recipe.yaml
    python -m grpo_mel.integrations.trl_run rloo --model_name_or_path ... --dataset_name ...

is ``trl grpo --config recipe.yaml`` (``trl rloo ...``) with grpo_mel's LM head: every argument after the command
is TRL's script's own, except grpo_mel's options (:data:`FLAGS`, e.g. ``--grpo_mel_chunk_size 1024``), which are
taken out before TRL parses the rest; the same options can come from the environment (:data:`ENV`), which is how
the ``grpo-mel`` command (:mod:`grpo_mel.integrations.trl_cli`) hands them to every process it launches. Under
``accelerate launch`` every worker process runs this module, so each one is patched.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import sys

#: grpo_mel's command-line options -> the ``patch_trl`` argument each sets
FLAGS = {"--grpo_mel_chunk_size": "chunk_size", "--grpo_mel_memory_budget": "memory_budget",
         "--grpo_mel_override_fused_head": "override_fused_head"}
#: the same options from the environment (a flag on the command line wins)
ENV = {"chunk_size": "GRPO_MEL_CHUNK_SIZE", "memory_budget": "GRPO_MEL_MEMORY_BUDGET",
       "override_fused_head": "GRPO_MEL_OVERRIDE_FUSED_HEAD"}
_FUSED = {"auto": None, "true": True, "false": False}


def pop_options(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """grpo_mel's flags (``--grpo_mel_chunk_size 64`` or ``--grpo_mel_chunk_size=64``) out of a command line:
    ``({patch_trl argument: raw value}, the other arguments in order)``."""
    raw, rest, i = {}, [], 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name in FLAGS:
            if not eq:
                if i + 1 >= len(argv):
                    raise SystemExit(f"grpo_mel: {name} needs a value")
                i += 1
                value = argv[i]
            raw[FLAGS[name]] = value
        else:
            rest.append(argv[i])
        i += 1
    return raw, rest


def parse_options(raw: dict[str, str]) -> dict:
    """Raw option strings -> ``patch_trl`` keyword arguments; a bad value exits naming the option and the value."""
    flag = {v: k for k, v in FLAGS.items()}
    opts: dict = {}
    for key, value in raw.items():
        try:
            opts[key] = _parse(key, value)
        except (TypeError, ValueError) as e:
            raise SystemExit(f"grpo_mel: {flag[key]} (or {ENV[key]}): bad value {value!r}: {e}") from None
    return opts


def _parse(key: str, value: str):
    from ..planning import validate_chunk_size, validate_memory_budget

    if key == "override_fused_head":
        if value.strip().lower() not in _FUSED:
            raise ValueError(f"must be one of {', '.join(_FUSED)}")
        return _FUSED[value.strip().lower()]
    parsed = int(value) if key == "chunk_size" else float(value)
    (validate_chunk_size if key == "chunk_size" else validate_memory_budget)(parsed)
    return parsed


def options_from(argv: list[str], environ=os.environ) -> tuple[dict, list[str]]:
    """``(patch_trl keyword arguments, TRL's arguments)``: the environment's options, then the command line's."""
    raw = {key: environ[name] for key, name in ENV.items() if environ.get(name, "") != ""}
    flags, rest = pop_options(argv)
    raw.update(flags)
    return parse_options(raw), rest


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        raise SystemExit("usage: python -m grpo_mel.integrations.trl_run <command: grpo, rloo, ...> [TRL's arguments] "
                         "[--grpo_mel_chunk_size ROWS] [--grpo_mel_memory_budget BYTES] "
                         "[--grpo_mel_override_fused_head auto|true|false]")
    command = argv[0]
    opts, rest = options_from(argv[1:])
    if importlib.util.find_spec(f"trl.scripts.{command}") is None:
        raise SystemExit(f"grpo_mel: the installed TRL has no training script trl/scripts/{command}.py")
    from . import patch_trl

    patched = patch_trl(**opts)
    shown = ", ".join(f"{k}={opts.get(k, 'default')}" for k in ENV)
    print(f"grpo_mel: patched {', '.join(patched)} ({shown}) in process {os.getpid()}", file=sys.stderr, flush=True)
    sys.argv = [f"trl {command}", *rest]
    runpy.run_module(f"trl.scripts.{command}", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
