#!/usr/bin/env bash
# Run a command with the project environment first on PATH (the host's CLI spawns `accelerate`).
set -euo pipefail
env_dir=$("$(dirname "$0")/env.sh")
export PATH="$env_dir/bin:$PATH" VIRTUAL_ENV="$env_dir"
# Tests and the demo never reach a hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 DISABLE_TELEMETRY=1 WANDB_MODE=offline
exec "$@"
