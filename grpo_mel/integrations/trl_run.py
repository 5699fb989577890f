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
from typing import NoReturn

#: grpo_mel's command-line options -> the ``patch_trl`` argument each sets
FLAGS = {"--grpo_mel_chunk_size": "chunk_size", "--grpo_mel_memory_budget": "memory_budget",
         "--grpo_mel_override_fused_head": "override_fused_head", "--grpo_mel_compile": "compile"}
#: the same options from the environment (a flag on the command line wins)
ENV = {"chunk_size": "GRPO_MEL_CHUNK_SIZE", "memory_budget": "GRPO_MEL_MEMORY_BUDGET",
       "override_fused_head": "GRPO_MEL_OVERRIDE_FUSED_HEAD", "compile": "GRPO_MEL_COMPILE"}
_TRI_STATE = {"auto": None, "true": True, "false": False}  # override_fused_head, compile
#: what each option takes and means, for the help text
_HELP = {"chunk_size": ("ROWS", "rows (completion tokens) per LM-head chunk, an integer >= 1 (default: planned from "
                                "the memory budget)"),
         "memory_budget": ("BYTES", "bytes for one chunk's working set, > 0 (default: 96 MiB on the CPU, a share of "
                                    "free memory on CUDA)"),
         "override_fused_head": ("auto|true|false", "on TRL >= 1.15 (its own fused head): true = grpo_mel's head, "
                                                    "false = TRL's, auto (default) = TRL's where it runs its Triton "
                                                    "kernel (CUDA), grpo_mel's elsewhere"),
         "compile": ("auto|true|false", "true = each LM-head chunk's log-prob / entropy function and its backward "
                                        "run through torch.compile (Inductor; only grpo_mel's chunk, never the "
                                        "model; a compile failure runs it eagerly, with one warning), false = "
                                        "eagerly, auto (default) = the measured default for the device")}


class OptionError(ValueError):
    """A grpo_mel option (flag or environment variable) with a bad value; the message names the option, its variable
    and the value. The commands print it as one line and exit with status 2, before anything is launched."""


def options_help() -> str:
    """grpo_mel's options for ``--help``: each flag with its environment variable, then what it takes."""
    import textwrap

    lines = ["grpo_mel's options (anywhere on the command line; a flag wins over its environment variable):"]
    for flag, key in FLAGS.items():
        metavar, meaning = _HELP[key]
        lines.append(f"  {flag} {metavar}   (or {ENV[key]}=...)")
        lines += textwrap.wrap(meaning, 110, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def pop_options(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """grpo_mel's flags (``--grpo_mel_chunk_size 64`` or ``--grpo_mel_chunk_size=64``) out of a command line:
    ``({patch_trl argument: raw value}, the other arguments in order)``."""
    raw, rest, i = {}, [], 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name in FLAGS:
            if not eq:
                if i + 1 >= len(argv):
                    raise OptionError(f"{name} needs a value")
                i += 1
                value = argv[i]
            raw[FLAGS[name]] = value
        else:
            rest.append(argv[i])
        i += 1
    return raw, rest


def parse_options(raw: dict[str, str]) -> dict:
    """Raw option strings -> ``patch_trl`` keyword arguments; a bad value raises :class:`OptionError` naming the
    option and the value."""
    flag = {v: k for k, v in FLAGS.items()}
    opts: dict = {}
    for key, value in raw.items():
        try:
            opts[key] = _parse(key, value)
        except (TypeError, ValueError) as e:
            raise OptionError(f"{flag[key]} (or {ENV[key]}): bad value {value!r}: {e}") from None
    return opts


def _parse(key: str, value: str):
    from ..planning import validate_chunk_size, validate_memory_budget

    if key in ("override_fused_head", "compile"):
        if value.strip().lower() not in _TRI_STATE:
            raise ValueError(f"must be one of {', '.join(_TRI_STATE)}")
        return _TRI_STATE[value.strip().lower()]
    parsed = int(value) if key == "chunk_size" else float(value)
    (validate_chunk_size if key == "chunk_size" else validate_memory_budget)(parsed)
    return parsed


def options_from(argv: list[str], environ=os.environ) -> tuple[dict, list[str]]:
    """``(patch_trl keyword arguments, TRL's arguments)``: the environment's options, then the command line's (a flag
    wins). Every value given is checked, a variable's too: :class:`OptionError` names the first bad one."""
    raw = {key: environ[name] for key, name in ENV.items() if environ.get(name, "") != ""}
    flags, rest = pop_options(argv)
    raw.update(flags)
    return parse_options(raw), rest


def fail(prog: str, msg: str, status: int = 2) -> NoReturn:
    """Stop with one line on stderr (no traceback) and ``status`` (2, as argparse does for bad arguments)."""
    print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "grpo_mel.integrations.trl_run"
    if not argv or argv[0].startswith("-"):
        fail(prog, "a command comes first: python -m grpo_mel.integrations.trl_run <command: grpo, rloo, ...> "
                   "[TRL's arguments] [--grpo_mel_chunk_size ROWS] [--grpo_mel_memory_budget BYTES] "
                   "[--grpo_mel_override_fused_head auto|true|false] [--grpo_mel_compile auto|true|false]")
    command = argv[0]
    try:
        opts, rest = options_from(argv[1:])
    except OptionError as e:
        fail(prog, str(e))
    if importlib.util.find_spec("trl") is None:
        fail(prog, "TRL is not installed: pip install 'grpo_mel[trl]'")
    if importlib.util.find_spec(f"trl.scripts.{command}") is None:
        fail(prog, f"the installed TRL has no training script trl/scripts/{command}.py")
    from . import patch_trl

    summary = patch_trl(**opts)
    print(f"{summary} (process {os.getpid()})", file=sys.stderr, flush=True)  # one line: what was patched, which head
    sys.argv = [f"trl {command}", *rest]
    runpy.run_module(f"trl.scripts.{command}", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
