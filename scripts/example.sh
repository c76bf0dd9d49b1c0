#!/usr/bin/env bash
# The main job on the bundled real example (stories260K + a LoRA trained on TinyShakespeare):
# installs what is needed, then compresses with the solar CLI, restores and evaluates.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
bash scripts/setup.sh
python3 -m bench.example "$@"
