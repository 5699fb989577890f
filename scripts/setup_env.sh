#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and install grpo_mel with its test/example extras.
# Usage: source scripts/setup_env.sh   (or bash it; it prints the venv path)
# GRPO_MEL_VENV overrides the venv location (default: .venv in the repo root).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${GRPO_MEL_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" >&2
fi
py="$venv/bin/python"
# torch first and pinned: an unpinned torch (or one pulled in by another package) would fetch a
# multi-GB CUDA build. 2.13.0 is the CPU build on machines without a GPU that carry it locally, and
# the regular (CUDA) wheel elsewhere.
if ! "$py" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
  "$py" -m pip install -q --disable-pip-version-check torch==2.13.0 >&2
fi
stamp="$venv/.grpo_mel_installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ] || [ "$root/requirements/constraints.txt" -nt "$stamp" ]; then
  "$py" -m pip install -q --disable-pip-version-check -c "$root/requirements/constraints.txt" -e "$root[dev]" >&2
  touch "$stamp"
fi
echo "$venv"
