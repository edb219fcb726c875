"""Publish a verified artifact folder to a Hugging Face model repo as one commit, and print how to pin it.

    python push_to_hub.py --artifacts runs/flickr30k/artifacts --repo-id OWNER/NAME [--private]

The folder is verified first (files against manifest.json, weights, embeddings, golden self-test); a folder that
fails is not uploaded at all (exit 2). Only the manifest's files and manifest.json are uploaded. Re-running after an
interruption is safe: the commit lands whole or not at all. The token comes from HF_TOKEN or `hf auth login` unless
--token is given (prefer those: a command-line argument is visible to other users of the machine).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from huggingface_hub import constants
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from crossmodal.artifacts import hub
from crossmodal.artifacts.contract import ArtifactError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, required=True, help="the artifact folder training wrote")
    parser.add_argument("--repo-id", required=True, help="model repo OWNER/NAME (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private (an existing repo is kept)")
    parser.add_argument("--token", default=None, help="write token (default: HF_TOKEN, then `hf auth login`)")
    parser.add_argument("--revision-note", default=None, help="commit message (default: names the file count)")
    parser.add_argument(
        "--space-readme", type=Path, default=None, help="a Space README.md whose front matter to pin to this commit"
    )
    args = parser.parse_args(argv)
    try:
        validate_repo_id(args.repo_id)  # refuse a malformed id before minutes of verification
    except HFValidationError as error:
        parser.error(f"--repo-id: {error}")
    return args


def _secrets(token: str | None) -> list[str]:
    """Every token this process could send: the flag, the environment, and the one `hf auth login` stored.

    The stored token is read from its file rather than through ``get_token``, which may refresh it over the network.
    """
    found = [token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")]
    with contextlib.suppress(OSError):  # no token file, or an unreadable one: redact the others all the same
        found.append(Path(constants.HF_TOKEN_PATH).read_text().strip())
    return sorted({value for value in found if value}, key=len, reverse=True)


def redact(text: str, secrets: list[str]) -> str:
    """Replace every secret in ``text`` with ``***``: error messages of an HTTP stack may echo request headers."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def main(argv: list[str] | None = None) -> int:
    # 1. Arguments. The token is kept only to hand it to the library and to redact it from anything we print.
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    secrets = _secrets(args.token)

    # 2. Verify, then upload in one commit. Verification failures exit 2 with nothing sent.
    try:
        commit = hub.push_artifacts(
            args.artifacts, args.repo_id, private=args.private, token=args.token, commit_message=args.revision_note
        )
    except ArtifactError as error:
        print(f"error: {redact(str(error), secrets)}", file=sys.stderr)
        return 2
    except Exception as error:  # any failure of the upload is reported redacted, never as a traceback
        # HfHubHTTPError, OSError (disk, network) or a transport error: the message may quote the request, so it is
        # redacted; a traceback would print it raw. A Hub commit is atomic, so nothing half-published remains.
        message = redact(f"{type(error).__name__}: {error}", secrets)
        print(f"error: upload to {args.repo_id} failed: {message}", file=sys.stderr)
        print("re-running is safe: a commit lands whole or not at all", file=sys.stderr)
        return 1

    # 3. Tell the user how to pin this exact commit in the Space.
    paths = hub.upload_paths(json.loads((args.artifacts / "manifest.json").read_text()))
    print(f"published {len(paths)} files to {args.repo_id} in one commit")
    print(f"commit: {commit.oid}")
    print(f"url: {commit.commit_url}")
    print()
    print("Pin it in the Space (Settings > Variables):")
    print(f"CROSSMODAL_ARTIFACTS={args.repo_id}")
    print(f"CROSSMODAL_REVISION={commit.oid}")
    print()
    print("and preload it at build time (Space README.md front matter; files land in the default cache,")
    print("~/.cache/huggingface/hub, so leave HF_HOME and HF_HUB_CACHE unset in the Space):")
    print("preload_from_hub:")
    print(f"  - {hub.preload_entry(args.repo_id, paths, commit.oid)}")
    if args.space_readme is not None:
        hub.pin_space_readme(args.space_readme, args.repo_id, paths, commit.oid)
        print(f"\npinned {args.space_readme} (models, preload_from_hub) to {commit.oid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
