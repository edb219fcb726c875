#!/usr/bin/env bash
# Lint (style, format, the import layers), then the whole test suite (README gives its time on 2 CPU cores).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
ruff check .
ruff format --check .
lint-imports  # the layers of docs/architecture.md, "Where each stage lives"
python -m pytest -q "$@"
