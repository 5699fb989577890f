#!/usr/bin/env bash
# The main job: the GRPO reward-task example, unpatched vs patched on the same seed: the curves, the peak memory
# per step, and one verdict line (exit status 1 when patched and unpatched differ beyond a tolerance).
# With no arguments it runs a small embedded model on the CPU in about a minute. Arguments are applied on top of
# the defaults below (an explicit flag wins), e.g. `--model /path/to/Llama-3.2-1B-Instruct --bf16` on a GPU,
# `--plot other.png`, `--no-patch`. See examples/grpo_reward_task.py (`--help`).
# It installs the `examples` extra only (TRL, the tokenizer trainer, matplotlib); scripts/test.sh adds `dev`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$(bash scripts/setup_env.sh examples)"
# the defaults: unpatched vs patched, torch-allocator peak on the CPU, a 32000-token vocabulary (as in real
# models), the plot; the same list is examples/grpo_reward_task.py's MAIN_JOB
exec "$venv/bin/python" examples/grpo_reward_task.py \
  --compare --cpu-measure torch --tiny-vocab 32000 --plot outputs/grpo_peak_memory.png "$@"
