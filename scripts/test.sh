#!/usr/bin/env bash
# The README's test command: install (with every env's extra), then run the whole suite, slow tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-dev,webshop,alfworld,ray} bash scripts/install.sh
${PYTHON:-python3} -m pytest -q "$@"
