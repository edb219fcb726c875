#!/usr/bin/env bash
# Lint, then the whole test suite (README gives its time on 2 CPU cores).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
ruff check .
ruff format --check .
python -m pytest -q "$@"
