#!/usr/bin/env bash
# Create .venv from requirements.txt once, with README's install command; later calls reuse it. Sourced by the
# other scripts.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ] || ! cmp -s requirements.txt .venv/requirements.txt; then
  python3 -m venv .venv && .venv/bin/pip install -r requirements.txt
  cp requirements.txt .venv/requirements.txt  # remember what was installed
fi
export PATH="$PWD/.venv/bin:$PATH"
