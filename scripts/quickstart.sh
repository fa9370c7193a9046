#!/usr/bin/env bash
# Set up (scripts/setup.sh), then fine-tune SmolLM2-135M-Instruct with LoRA on the chatterbot pairs (configs/quickstart.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m lightning_lora fit --config configs/quickstart.yaml "$@"
