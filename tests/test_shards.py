"""Webdataset shards: the generator writes img2dataset's layout (crossmodal/synthetic/shards.py), and the reader
(crossmodal/data/shards.py) gets every pair back, skips each kind of hostile sample with its reason, and refuses a
missing shard by name."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from crossmodal.data.shards import (
    BadSample,
    Keys,
    ShardError,
    ShardSample,
    expand_shards,
    image_problem,
    read_shard,
)
from crossmodal.data.stream import shard_size, stats_count
from crossmodal.synthetic.shards import shard_pairs, write_webdataset


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_webdataset(out, 25, 10, (32, 32), seed=1)
    return out


def test_shards_follow_img2datasets_layout(shards, tmp_path):
    assert sorted(path.name for path in shards.iterdir()) == [
        f"0000{i}{suffix}" for i in range(3) for suffix in (".parquet", ".tar", "_stats.json")
    ]
    with tarfile.open(shards / "00002.tar") as archive:
        names = archive.getnames()
    assert names[:3] == ["000020.jpg", "000020.txt", "000020.json"]  # 10 a shard: one digit and len(names) == 15
    assert stats_count(str(shards / "00002.tar")) == 5
    copy = tmp_path / "00002.tar"  # without its stats file, a tar is counted from its headers
    copy.write_bytes((shards / "00002.tar").read_bytes())
    assert stats_count(str(copy)) is None and shard_size(str(copy)) == 5
    metadata = pq.read_table(shards / "00000.parquet").to_pylist()
    assert [row["key"] for row in metadata] == [f"00000{i}" for i in range(10)]
    assert {row["status"] for row in metadata} == {"success"}


def test_the_reader_gets_back_every_pair_the_generator_wrote(shards):
    samples = [sample for shard in expand_shards(str(shards / "{00000..00002}.tar")) for sample in read_shard(shard)]
    assert len(samples) == 25 and all(isinstance(sample, ShardSample) for sample in samples)
    assert len({sample.key for sample in samples}) == 25
    written = list(shard_pairs(1, 10, (32, 32), seed=1))
    assert [(sample.image, sample.captions) for sample in samples[10:20]] == [
        (jpeg, (caption,)) for jpeg, caption in written
    ]
    assert all(image_problem(sample) is None for sample in samples)


def test_a_shard_is_the_same_bytes_however_many_shards_are_written(shards, tmp_path):
    write_webdataset(tmp_path, 12, 10, (32, 32), seed=1)
    assert (tmp_path / "00000.tar").read_bytes() == (shards / "00000.tar").read_bytes()


def test_specs_expand_as_open_clip_writes_them(shards):
    tars = [str(shards / f"0000{i}.tar") for i in range(3)]
    assert expand_shards(str(shards / "{00000..00002}.tar")) == tars
    assert expand_shards(str(shards / "*.tar")) == tars
    assert expand_shards(f"{tars[2]}::{shards}/{{00000,00001}}.tar") == [tars[2], *tars[:2]]
    assert expand_shards(str(shards)) == tars  # a folder: its tars (the Parquet files beside them are metadata)


def test_a_missing_shard_is_refused_by_name_before_anything_is_read(shards):
    with pytest.raises(ShardError, match=r"00003\.tar does not exist"):
        expand_shards(str(shards / "{00000..00003}.tar"))
    with pytest.raises(ShardError, match="no shards match"):
        expand_shards(str(shards / "*.tgz"))


def add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(data)
    archive.addfile(member, io.BytesIO(data))


def jpeg(size=(32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, "JPEG")
    return buffer.getvalue()


def test_hostile_samples_are_skipped_each_with_its_reason(tmp_path):
    bomb = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(bomb, "PNG")  # 144 megapixels in a few hundred kB
    shard = tmp_path / "hostile.tar"
    with tarfile.open(shard, "w") as archive:
        add(archive, "good.jpg", jpeg())
        add(archive, "good.txt", b"a red square")
        add(archive, "corrupt.jpg", jpeg()[:200])
        add(archive, "corrupt.txt", b"a cut picture")
        add(archive, "notimage.jpg", b"<html>403 Forbidden</html>")
        add(archive, "notimage.txt", b"a web page")
        add(archive, "bomb.png", bomb.getvalue())
        add(archive, "bomb.txt", b"a huge picture")
        add(archive, "nocaption.jpg", jpeg())
        add(archive, "empty.jpg", jpeg())
        add(archive, "empty.txt", b"  \n")
        add(archive, "fromjson.jpg", jpeg())
        add(archive, "fromjson.json", json.dumps({"caption": "a caption in the json"}).encode())
        add(archive, "noimage.txt", b"words without a picture")
    samples = list(read_shard(str(shard)))
    reasons = {s.key: (image_problem(s) or s) if isinstance(s, ShardSample) else s for s in samples}
    reasons = {key: value.reason if isinstance(value, BadSample) else "ok" for key, value in reasons.items()}
    assert reasons == {
        "good": "ok", "corrupt": "bad image", "notimage": "bad image", "bomb": "bad image",
        "nocaption": "no caption", "empty": "empty caption", "fromjson": "ok", "noimage": "no image",
    }  # fmt: skip
    assert "megapixels" in image_problem(next(s for s in samples if s.key == "bomb")).detail
    assert next(s for s in samples if s.key == "fromjson").captions == ("a caption in the json",)


def test_a_truncated_tar_ends_its_shard_with_a_bad_sample_and_never_hangs(shards, tmp_path):
    data = (shards / "00000.tar").read_bytes()
    with tarfile.open(shards / "00000.tar") as archive:
        members = archive.getmembers()
    sixth = members[15]  # the sixth sample's picture
    # Where the cut falls, and the whole samples before it: the sample still open when the tar breaks may have lost
    # members, so it is counted bad with the shard (in the first case the sixth sample was open, not the fifth).
    cuts = {"inside a member": (sixth.offset_data + 100, 5), "inside a header": (sixth.offset + 100, 4),
            "at a header": (sixth.offset, 4), "before the end blocks": (members[-1].offset_data + 512, 9)}  # fmt: skip
    for where, (size, whole) in cuts.items():
        cut = tmp_path / "cut.tar"
        cut.write_bytes(data[:size])
        samples = list(read_shard(str(cut)))
        assert isinstance(samples[-1], BadSample) and samples[-1].reason == "truncated shard", where
        good = [sample for sample in samples if isinstance(sample, ShardSample)]
        assert len(good) == whole, where
        assert all(image_problem(sample) is None for sample in good)


def test_parquet_shards_in_the_flickr30k_schema_and_in_img2datasets(tmp_path):
    flickr = pa.table({
        "image": [{"bytes": jpeg(), "path": "1.jpg"}, {"bytes": None, "path": None}],
        "caption": [["A dog runs.", "  a   brown dog  "], ["no picture"]],
        "img_id": ["1", "2"],
    })  # fmt: skip
    pq.write_table(flickr, tmp_path / "flickr.parquet")
    first, second = read_shard(str(tmp_path / "flickr.parquet"))
    assert first == ShardSample("1", flickr["image"][0]["bytes"].as_py(), ("A dog runs.", "a brown dog"))
    assert second == BadSample("2", "no image")
    pq.write_table(pa.table({"jpg": [jpeg()], "text": ["a red square"], "key": ["000000000"]}),
                   tmp_path / "img2dataset.parquet")  # fmt: skip
    (sample,) = read_shard(str(tmp_path / "img2dataset.parquet"), Keys(caption="text"))
    assert sample.key == "000000000" and sample.captions == ("a red square",)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ShardError, match=r"broken\.parquet is not a readable Parquet file"):
        list(read_shard(str(tmp_path / "broken.parquet")))


def test_the_command_line_writes_shards(tmp_path):
    command = [sys.executable, "-m", "crossmodal", "synthetic", "--format", "webdataset", "--train", "7",
               "--shard-size", "4", "--width", "32", "--height", "32", "--out", str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "as 2 webdataset shards" in result.stdout
    samples = [sample for shard in expand_shards(str(tmp_path)) for sample in read_shard(shard)]
    assert Counter(type(sample).__name__ for sample in samples) == {"ShardSample": 7}
