#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and install grpo_mel (editable) with one of its extras.
# Usage: bash scripts/setup_env.sh [dev|examples]   (prints the venv path)
#   dev (default): everything the tests need (scripts/test.sh); examples: what the examples need, TRL, the tokenizer
#   trainer and matplotlib, and nothing else (scripts/run_grpo.sh). dev includes examples.
# GRPO_MEL_VENV overrides the venv location (default: .venv in the repo root).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${GRPO_MEL_VENV:-$root/.venv}"
extra="${1:-dev}"
case "$extra" in
  dev | examples) ;;
  *) echo "setup_env.sh: unknown extra '$extra' (dev or examples)" >&2; exit 2 ;;
esac
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
# one stamp per extra, newer than pyproject.toml and the constraints when that install is current
stamp() { if [ "$1" = dev ]; then echo "$venv/.grpo_mel_installed"; else echo "$venv/.grpo_mel_installed_$1"; fi; }
current() {
  local s
  s="$(stamp "$1")"
  [ -f "$s" ] && [ ! "$root/pyproject.toml" -nt "$s" ] && [ ! "$root/requirements/constraints.txt" -nt "$s" ]
}
if ! current "$extra" && ! { [ "$extra" = examples ] && current dev; }; then
  "$py" -m pip install -q --disable-pip-version-check -c "$root/requirements/constraints.txt" -e "$root[$extra]" >&2
  touch "$(stamp "$extra")"
fi
echo "$venv"
