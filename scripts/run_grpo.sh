#!/usr/bin/env bash
# The main job: the GRPO reward-task example (patched vs unpatched peak memory and loss).
# With no arguments it runs a small embedded model on the CPU in about a minute; pass
# e.g. `--model /path/to/Llama-3.2-1B-Instruct --bf16` on a GPU. See examples/grpo_reward_task.py.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$(bash scripts/setup_env.sh)"
# default: unpatched vs patched, torch-allocator peak on CPU, a 32000-token vocabulary (as in real models)
if [ $# -eq 0 ]; then set -- --compare --cpu-measure torch --tiny-vocab 32000 --plot outputs/grpo_peak_memory.png; fi
exec "$venv/bin/python" examples/grpo_reward_task.py "$@"
