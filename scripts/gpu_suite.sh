#!/usr/bin/env bash
# The GPU suite (scripts/gpu_suite.py): parity tests on CUDA, the LM-head benchmark at two head shapes, the 1B
# GRPO example and the SFT check, into one markdown report under $OUT (else outputs/gpu_suite/); one device call on
# an H200. Wheels in .whl/ are installed first (never torch); see docs/benchmarks.md ("GPU suite").
#   bash scripts/gpu_suite.sh               # on a CUDA machine, with the python3 that has torch
#   bash scripts/gpu_suite.sh --cpu-smoke   # the same steps at tiny sizes on the CPU, in the project's venv
#                                           # (scripts/setup_env.sh); scripts/test.sh runs it
# Exit status 1 if a step failed or did not run. GRPO_MEL_PYTHON picks the interpreter for either.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${GRPO_MEL_PYTHON:-}"
if [ -z "$py" ]; then
  if [ "${1:-}" = "--cpu-smoke" ]; then py="$(bash scripts/setup_env.sh)/bin/python"; else py=python3; fi
fi
export GRPO_MEL_SUITE_CMD="bash scripts/gpu_suite.sh${*:+ $*}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's grpo_mel, whatever is installed
exec "$py" scripts/gpu_suite.py "$@"
