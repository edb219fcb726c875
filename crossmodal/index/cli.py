"""Index a folder of your own pictures with a trained model, and keep the index current as the folder changes
(docs/architecture.md, "Indexing your own pictures").

    python -m crossmodal index --artifacts runs/demo/artifacts --images ~/Pictures --output-dir runs/my-pictures
    accelerate launch -m crossmodal index --artifacts OWNER/NAME --revision SHA --images DIR --output-dir OUT
    python app.py --artifacts runs/my-pictures

The output is an artifact folder like training's: the app serves it and push_to_hub.py publishes it. Run the same
command again after the folder changed: only new and changed pictures are embedded (a file is unchanged while its
size and modification time are; --verify re-reads and hashes every file instead), removed ones drop out, and the new
index replaces the old one in one step. A run stopped by Ctrl-C or SIGTERM leaves the previous index as it was; the
next run picks up the pictures the stopped one had embedded. Files that are not pictures we accept are listed, with
the reason, in OUT/skipped.json.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import shutil
import signal
import uuid
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from crossmodal.artifacts.contract import INDEX_REPORT, ArtifactError, LoadedArtifacts
from crossmodal.artifacts.hub import load_artifacts, looks_like_path
from crossmodal.artifacts.integrity import add_source_arguments
from crossmodal.encoding.batches import loader_workers
from crossmodal.encoding.embed import all_cores
from crossmodal.index.embed import ChunkWriter, embed_pictures, read_chunks
from crossmodal.index.plan import PreviousIndex, Sources
from crossmodal.index.scan import FileEntry, Skipped, scan_folder
from crossmodal.index.write import recover_folder, replace_folder, write_index

logger = logging.getLogger("crossmodal.index")
# Cosine at which two pictures count as one: measured on real photographs, a resized or re-compressed copy stays above
# it and different photographs stay below (docs/benchmarks.md, "Indexing your own pictures").
DEFAULT_DUPLICATE_THRESHOLD = 0.97
DEFAULT_BATCH_SIZE = 32
THUMBNAIL_SIZE = 256  # for a model whose config.json does not say (TrainConfig.thumbnail_size)


class IndexingError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m crossmodal index", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_source_arguments(parser)
    parser.add_argument("--images", type=Path, required=True, help="the folder of pictures (searched recursively)")
    parser.add_argument("--output-dir", type=Path, required=True, help="the index folder (created or updated)")
    parser.add_argument("--verify", action="store_true", help="hash every file, not only new or changed ones")
    parser.add_argument("--include-hidden", action="store_true", help="also index hidden folders and files")
    parser.add_argument(
        "--duplicate-threshold", type=float, default=DEFAULT_DUPLICATE_THRESHOLD,
        help="pictures at least this similar (cosine) are shown as one result (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--keep-duplicates", action="store_true", help="show near-duplicates as separate results")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="pictures per tower forward")
    parser.add_argument("--num-workers", type=int, default=None, help="decoding workers per process")
    args = parser.parse_args(argv)
    if not args.artifacts:
        parser.error("pass --artifacts PATH_OR_REPO (a trained model's artifact folder) or set CROSSMODAL_ARTIFACTS")
    if not args.images.is_dir():
        parser.error(f"--images: {args.images} is not a folder")
    if not 0 < args.duplicate_threshold <= 1:
        parser.error("--duplicate-threshold: a cosine in (0, 1]")
    if args.batch_size < 1:
        parser.error("--batch-size: at least 1")
    return args


def hidden_sibling(folder: Path, role: str) -> Path:
    return folder.with_name(f".{folder.name}.{role}")


def check_output(output: Path, images: Path, model: LoadedArtifacts) -> None:
    """Refuse an output folder this command must not replace: the model's own, or one that is not an index."""
    if output.resolve() == model.folder.resolve():
        raise IndexingError(f"--output-dir {output} is the model's own folder; pick a new folder for the index")
    if output.resolve() == images.resolve() or output.resolve() in images.resolve().parents:
        raise IndexingError(f"--output-dir {output} holds the pictures folder; pick a folder beside it")
    if output.exists() and any(output.iterdir()):
        try:
            is_index = "index" in json.loads((output / "manifest.json").read_text())
        except (OSError, ValueError, TypeError):
            is_index = False
        if not is_index:
            raise IndexingError(
                f"--output-dir {output} exists and is not an index of pictures; it is left untouched (pick a new "
                "folder, or delete it first)"
            )


def lock(output: Path):
    """Hold a lock on the output for the whole run: two runs writing one index would undo each other's work."""
    output.parent.mkdir(parents=True, exist_ok=True)
    handle = open(hidden_sibling(output, "lock"), "w")  # noqa: SIM115 (held until the process ends)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise IndexingError(f"another index run is writing {output}; wait for it to finish") from None
    return handle


def work_folder(output: Path, model_sha256: str) -> Path:
    """Where this and earlier unfinished runs keep their chunks; emptied when the model changed."""
    work = hidden_sibling(output, "work")
    stamp = work / "model.json"
    try:
        same_model = json.loads(stamp.read_text())["model_sha256"] == model_sha256
    except (OSError, ValueError, KeyError, TypeError):
        same_model = False
    if not same_model:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        stamp.write_text(json.dumps({"model_sha256": model_sha256}))
    return work


def model_source(artifacts: str, revision: str | None) -> str:
    """How the card and manifest name the model: a Hub id and its revision, or only a local folder's name."""
    if looks_like_path(artifacts) or Path(artifacts).expanduser().is_dir():
        return f"local folder {Path(artifacts).expanduser().resolve().name}"
    return f"{artifacts}@{revision}" if revision else artifacts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # SIGTERM (a job scheduler, `kill`) stops the run as Ctrl-C does: loader workers are shut down, and the chunks
    # written so far stay for the next run.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    accelerator = Accelerator()
    output, images = args.output_dir.expanduser(), args.images.expanduser()
    try:
        return run(args, accelerator, output, images)
    except (IndexingError, ArtifactError, ValueError, OSError) as error:  # a disk full or a folder unreadable too
        logger.error("error: %s", error)
        return 2
    except KeyboardInterrupt:
        logger.error("interrupted: %s is as it was; run the same command again to go on from here", output)
        return 130


@dataclass
class Plan:
    """What the main process found before any picture is read."""

    work: Path  # the chunk files of this run and of stopped ones
    previous: PreviousIndex | None  # the index in the output folder, when it can be reused
    entries: list[FileEntry]  # every candidate picture of the folder
    walked_out: list[Skipped]  # what the walk itself refused
    to_embed: list[FileEntry]  # what no source holds: to be read
    known: frozenset[str]  # contents whose embedding a source holds


def make_plan(args: argparse.Namespace, output: Path, images: Path, model_sha256: str) -> Plan:
    """On the main process: list the folder, and look every file up in what is already there."""
    recover_folder(output)
    work = work_folder(output, model_sha256)
    previous = PreviousIndex.open(output, model_sha256) if output.is_dir() else None
    if output.is_dir() and previous is None:
        logger.info("%s: made by other weights, or damaged: it is rebuilt from scratch", output)
    entries, walked_out = scan_folder(images, include_hidden=args.include_hidden, exclude=(output,))
    sources = Sources(previous, [table for _, table in read_chunks(work)], verify=args.verify)
    resolution = sources.resolve(entries)
    logger.info(
        "%s: %d files; %d to read (new, changed, or --verify), the others already looked at",
        images, len(entries), len(resolution.to_embed),
    )  # fmt: skip
    return Plan(work, previous, entries, walked_out, resolution.to_embed, sources.known())


def run(args: argparse.Namespace, accelerator: Accelerator, output: Path, images: Path) -> int:
    # 1. The model, verified, on every process.
    model = load_artifacts(args.artifacts, args.revision)
    model_sha256 = model.manifest["files"]["model.safetensors"]["sha256"]

    # 2. The main process holds the output's lock, lists the folder and decides what to read; all get the plan.
    shared: list = [None]
    if accelerator.is_main_process:
        try:
            check_output(output, images, model)  # before anything is written beside it
            held = lock(output)  # noqa: F841 (released when the process ends)
            plan = make_plan(args, output, images, model_sha256)
            shared = [(plan.to_embed, plan.known, uuid.uuid4().hex[:12], plan.work)]
        except (IndexingError, OSError) as error:
            refused, shared = error, ["refused"]  # the others must hear it, or they would wait for a plan forever
    broadcast_object_list(shared)
    if shared[0] == "refused":
        if accelerator.is_main_process:
            raise refused
        return 2  # the main process says why
    to_embed, known, run_id, work = shared[0]

    # 3. Every process embeds its share into chunk files.
    model.model.to(accelerator.device)
    writer = ChunkWriter(work, model.config.embed_dim, accelerator.process_index, run_id)
    thumbnail_size = json.loads((model.folder / "config.json").read_text()).get("training", {}).get("thumbnail_size")
    with all_cores(accelerator):
        embed_pictures(
            accelerator, model.model, images, to_embed, known, writer, batch_size=args.batch_size,
            num_workers=loader_workers(args.num_workers, accelerator.num_processes),
            thumbnail_size=thumbnail_size or THUMBNAIL_SIZE,
        )  # fmt: skip
    accelerator.wait_for_everyone()

    # 4. The main process writes the index aside from the chunks and the previous index, then swaps it in.
    if accelerator.is_main_process:
        finish(args, output, images, model, model_sha256, plan, run_id)
    return 0


def finish(
    args: argparse.Namespace, output: Path, images: Path, model: LoadedArtifacts, model_sha256: str, plan: Plan,
    run_id: str,
) -> None:  # fmt: skip
    chunks = read_chunks(plan.work)
    sources = Sources(plan.previous, [table for _, table in chunks], verify=args.verify)
    mine = [(number, table) for number, (name, table) in enumerate(chunks) if run_id in name]
    this_run = {path: (number, row) for number, table in mine for row, path in enumerate(table["path"].to_pylist())}
    final = sources.resolve(plan.entries, this_run)
    if final.to_embed:  # every process finished its share, so each file to read has a chunk row: a bug if not
        raise IndexingError(f"{len(final.to_embed)} files were not read, e.g. {final.to_embed[0].path}; run again")
    skipped = sorted([*plan.walked_out, *final.skipped])
    threshold = None if args.keep_duplicates else args.duplicate_threshold
    if plan.previous is not None and unchanged(plan.previous, final.pictures, skipped, threshold):
        shutil.rmtree(plan.work, ignore_errors=True)
        print(f"{output}: up to date ({len(final.pictures)} pictures, {files(len(skipped))} skipped)")
        return
    if not final.pictures:
        examples = "; ".join(f"{item.path}: {item.reason}" for item in skipped[:3])
        raise IndexingError(f"no pictures we can index in {images} ({len(skipped)} files skipped: {examples})")
    staging = hidden_sibling(output, "staging")
    write_index(
        staging, model=model, model_sha256=model_sha256, model_source=model_source(args.artifacts, args.revision),
        folder_name=images.resolve().name, pictures=final.pictures, skipped=skipped, sources=sources,
        duplicate_threshold=threshold,
    )  # fmt: skip
    replace_folder(staging, output)
    shutil.rmtree(plan.work, ignore_errors=True)  # every chunk is in the index now
    embedded = sum(len(table) - table["embedding"].null_count for _, table in mine)
    print(
        f"{output}: {len(final.pictures)} pictures ({embedded} embedded by this run, the others kept), "
        f"{files(len(skipped))} skipped (listed in {INDEX_REPORT})"
    )


def files(count: int) -> str:
    return f"{count} file{'s' * (count != 1)}"


def unchanged(previous: PreviousIndex, pictures: list, skipped: list, threshold: float | None) -> bool:
    """Whether the index would come out as it is: the same files at the same size, time and content, the same files
    skipped for the same reasons, the same grouping of near-duplicates."""
    index = previous.manifest.get("index", {})
    new_skipped = {(item.path, item.size, item.mtime_ns): item.reason for item in skipped}
    return (
        index.get("duplicate_threshold") == threshold
        and len(pictures) == len(previous.rows)
        and all(
            previous.rows.get((p.path, p.size, p.mtime_ns)) is not None
            and previous.sha256[previous.rows[(p.path, p.size, p.mtime_ns)]] == p.sha256
            for p in pictures
        )
        and previous.skipped == new_skipped
    )
