#!/usr/bin/env bash
# Set up (scripts/setup.sh), then QLoRA-fine-tune SmolLM2-135M-Instruct on the chatterbot pairs (configs/quickstart.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m lightning_lora fit --config configs/quickstart.yaml "$@"
