"""The project's commands: ``python -m crossmodal <command> [arguments]``.

    python -m crossmodal pinned install       # the pinned pretrained towers: fetch, verify, fill the caches
    python -m crossmodal synthetic --out DIR  # a generated dataset in the Flickr30k schema
    python -m crossmodal evaluate --artifacts DIR
    python -m crossmodal index --artifacts DIR --images PICTURES --output-dir OUT

Each command's module is imported only when it is asked for, so ``pinned`` does not pay for torch's model code and
``--help`` answers at once. ``python -m crossmodal <command> --help`` lists a command's arguments.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module holding its ``main(argv)``, one line for the list of commands)
COMMANDS = {
    "pinned": ("crossmodal.model.pinned", "install or check the pinned pretrained towers"),
    "synthetic": ("crossmodal.synthetic.dataset", "generate a dataset in the Flickr30k schema"),
    "evaluate": ("crossmodal.encoding.evaluate", "Recall@K of an artifact folder, stored or re-encoded"),
    "index": ("crossmodal.index.cli", "index a folder of your own pictures with a trained model"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "usage: python -m crossmodal <command> [arguments]\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, *rest = argv
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
