#!/usr/bin/env bash
# The README's test command: install, then run the whole suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
${PYTHON:-python3} -m pytest -q "$@"
