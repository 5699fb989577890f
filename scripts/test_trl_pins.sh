#!/usr/bin/env bash
# Run the TRL integration tests (tests/integrations) against several pinned TRL releases.
#
# For each extra pin a virtual environment .venv-trl-<ver> is created (or reused) under the repo root:
# torch==2.13.0 first (the local CPU build, so nothing pulls a CUDA torch), then the pinned
# trl/transformers/peft/accelerate/datasets/bitsandbytes set + test tools, then grpo_mel (editable, no deps).
# The main venv (.venv, TRL 1.16.0) is tested too unless SKIP_MAIN=1.
#
# Usage: bash scripts/test_trl_pins.sh [VERSION ...]      (default: every pin below)
# Env:   SKIP_MAIN=1   skip the main venv;  PYTEST_ARGS="..." extra pytest arguments;
#        SETUP_ONLY=1  only create/update the venvs.
# Exits non-zero if any pin fails (install or tests).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# pin -> "trl transformers peft accelerate datasets bitsandbytes"
declare -A PINS=(
  [0.16.1]="trl==0.16.1 transformers==4.51.3 peft==0.15.2 accelerate==1.6.0 datasets==3.5.0 bitsandbytes==0.50.2"
  [0.19.1]="trl==0.19.1 transformers==4.53.3 peft==0.16.0 accelerate==1.8.1 datasets==3.6.0 bitsandbytes==0.50.2"
  [1.14.2]="trl==1.14.2 transformers==4.57.6 peft==0.18.1 accelerate==1.12.0 datasets==4.8.5 bitsandbytes==0.50.2"
)
ORDER=(0.16.1 0.19.1 1.14.2)
TOOLS="pytest hypothesis tokenizers tensorboard"

if [ "$#" -gt 0 ]; then ORDER=("$@"); fi

setup_venv() {
  local ver="$1" venv="$ROOT/.venv-trl-$1" stamp
  stamp="torch==2.13.0 ${PINS[$ver]} $TOOLS"
  if [ -x "$venv/bin/python" ] && [ -f "$venv/.pins" ] && [ "$(cat "$venv/.pins")" = "$stamp" ]; then
    echo "== reusing $venv"
  else
    echo "== creating $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" || return 1
    "$venv/bin/python" -m pip install -q --upgrade pip || true
    "$venv/bin/python" -m pip install -q torch==2.13.0 || return 1
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install -q ${PINS[$ver]} $TOOLS torch==2.13.0 || return 1
    echo "$stamp" > "$venv/.pins"
  fi
  "$venv/bin/python" -m pip install -q -e . --no-deps || return 1
}

declare -a FAILED=()
declare -a SUMMARY=()

run_tests() {  # name python
  local name="$1" py="$2" t0 rc
  t0=$(date +%s)
  echo "== pytest tests/integrations with $name ($("$py" -c 'import trl, transformers, peft; print("trl", trl.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'))"
  # shellcheck disable=SC2086
  "$py" -m pytest tests/integrations -q ${PYTEST_ARGS:-}
  rc=$?
  SUMMARY+=("$name: rc=$rc in $(( $(date +%s) - t0 ))s")
  [ "$rc" -eq 0 ] || FAILED+=("$name")
}

for ver in "${ORDER[@]}"; do
  if [ -z "${PINS[$ver]+x}" ]; then echo "unknown pin $ver (known: ${!PINS[*]})"; FAILED+=("$ver(unknown)"); continue; fi
  t0=$(date +%s)
  if ! setup_venv "$ver"; then
    echo "!! install failed for TRL $ver"; FAILED+=("trl-$ver(install)"); continue
  fi
  SUMMARY+=("trl-$ver setup: $(( $(date +%s) - t0 ))s")
  [ "${SETUP_ONLY:-0}" = "1" ] && continue
  run_tests "trl-$ver" "$ROOT/.venv-trl-$ver/bin/python"
done

if [ "${SKIP_MAIN:-0}" != "1" ] && [ "${SETUP_ONLY:-0}" != "1" ] && [ "$#" -eq 0 ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then
    run_tests "main-venv" "$ROOT/.venv/bin/python"
  else
    echo "!! no main venv at $ROOT/.venv"; FAILED+=("main-venv(missing)")
  fi
fi

printf '%s\n' "${SUMMARY[@]}"
if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "FAILED: ${FAILED[*]}"
  exit 1
fi
echo "all pins passed"
