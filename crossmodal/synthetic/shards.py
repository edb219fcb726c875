"""Generated training pairs as webdataset shards in img2dataset's layout, the layout web-scale corpora ship in
(docs/architecture.md, "Streaming shards"): ``00000.tar`` holding ``KEY.jpg``, ``KEY.txt`` and ``KEY.json`` per
picture, with ``00000_stats.json`` and ``00000.parquet`` (the shard's metadata, no pictures) beside it. One caption
per picture, as in CC3M or LAION.

    python -m crossmodal synthetic --format webdataset --train 300000 --shard-size 10000 --out data/shards

Every shard is drawn from a random stream of its own, (seed, shard): shard k is the same bytes whatever the number
of shards, and shards can be written in any order. Tar members carry a fixed time and owner, so the same arguments
always give byte-identical files.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm.auto import tqdm

from crossmodal.synthetic.captions import pair_captions, scene_captions
from crossmodal.synthetic.drawing import render, render_pair, sample_layout, sample_pair_layouts
from crossmodal.synthetic.scenes import sample_pair_scenes, sample_scenes

SHARD_STREAM = 10  # apart from the splits' streams (dataset._split_rng uses 0, 1, 2; captions 3 and up)


def key_digits(shard_size: int) -> int:
    """img2dataset's width of a sample's number inside its shard (its ``oom_sample_per_shard``)."""
    return max(1, math.ceil(math.log10(shard_size)))


def shard_pairs(
    shard: int, count: int, image_size: tuple[int, int], seed: int, pair_fraction: float = 0.0
) -> Iterator[tuple[bytes, str]]:
    """The JPEG and caption of each of ``count`` pictures of shard ``shard``: one-figure scenes, then
    ``pair_fraction`` of them with two figures; each caption one of the scene's five phrasings."""
    rng = np.random.default_rng([seed, SHARD_STREAM, shard])
    pairs = round(count * pair_fraction)
    for scene in sample_scenes(count - pairs, rng):
        jpeg = render(scene, sample_layout(scene, image_size, rng), image_size, rng)
        captions = scene_captions(scene, rng)
        yield jpeg, captions[rng.integers(len(captions))]
    for scene in sample_pair_scenes(pairs, rng):
        jpeg = render_pair(scene, sample_pair_layouts(scene, image_size, rng), image_size, rng)
        captions = pair_captions(scene, int(rng.integers(2**63)))
        yield jpeg, captions[rng.integers(len(captions))]


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size, member.mtime, member.mode = len(data), 0, 0o644
    archive.addfile(member, io.BytesIO(data))


def write_shard(
    out_dir: Path, shard: int, count: int, shard_size: int, image_size: tuple[int, int], seed: int,
    pair_fraction: float = 0.0,
) -> Path:  # fmt: skip
    """Write shard ``shard`` (``count`` pictures) and its stats and metadata files; return the tar's path."""
    name, digits = f"{shard:05d}", key_digits(shard_size)
    rows = []
    # Written under a temporary name and renamed, so an interrupted run never leaves a shard that looks whole.
    partial = out_dir / f"{name}.tar.partial"
    with tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT) as archive:
        for index, (jpeg, caption) in enumerate(shard_pairs(shard, count, image_size, seed, pair_fraction)):
            key = f"{name}{index:0{digits}d}"
            width, height = Image.open(io.BytesIO(jpeg)).size
            meta = {
                "key": key, "caption": caption, "url": None, "status": "success", "error_message": None,
                "width": width, "height": height, "original_width": width, "original_height": height,
            }  # fmt: skip
            _add(archive, f"{key}.jpg", jpeg)
            _add(archive, f"{key}.txt", caption.encode())
            _add(archive, f"{key}.json", json.dumps(meta).encode())
            rows.append(meta)
    pq.write_table(pa.Table.from_pylist(rows), out_dir / f"{name}.parquet")
    stats = {"count": count, "successes": count, "failed_to_download": 0, "failed_to_resize": 0,
             "status_dict": {"success": count}}  # fmt: skip
    (out_dir / f"{name}_stats.json").write_text(json.dumps(stats, indent=2))
    return partial.replace(out_dir / f"{name}.tar")


def write_webdataset(
    out_dir: str | Path, num_pairs: int, shard_size: int, image_size: tuple[int, int] = (96, 96), seed: int = 0,
    pair_fraction: float = 0.0,
) -> list[Path]:  # fmt: skip
    """Write ``num_pairs`` generated pictures, ``shard_size`` to a shard (the last one may hold fewer)."""
    if num_pairs < 1 or shard_size < 1:
        raise ValueError(f"--train {num_pairs} and --shard-size {shard_size} must both be at least 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in tqdm(range(math.ceil(num_pairs / shard_size)), desc="Writing shards", unit="shard"):
        count = min(shard_size, num_pairs - shard * shard_size)
        paths.append(write_shard(out_dir, shard, count, shard_size, image_size, seed, pair_fraction))
    return paths
