"""The real app over HTTP: what a gradio_client user gets (DESIGN 4.4), what hostile input gets, what is never served.

Every query goes to `python app.py` in a subprocess (the shared `app_server` fixture), never to the handlers
in-process, so Gradio's own pre- and post-processing is part of what is tested.
"""

import io
import json
import math
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import httpx
import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from crossmodal.artifacts import verify_artifacts
from crossmodal.search import MAX_K, Searcher
from tests.conftest import ROOT, SUBPROCESS_ENV, free_port

ENDPOINTS = {"/text_to_image": ["query", "k"], "/image_to_text": ["image", "k"], "/image_to_image": ["image", "k"]}
FAST = 1.0  # seconds: a refused or bounded request must come back at once, not tie up one of the two workers
ATTEMPTS = 3  # timed tries per request; work that is really slow (decoding a bomb) is slow on every try
BOMB_RSS_LIMIT = 200e6  # bytes the server may grow by while refusing a 169-megapixel PNG (decoded: 169 MB at 1 bit)
SELF_RETRIEVAL_SAMPLE = 40
ALL_IMAGES_R1_FLOOR = 0.15  # own image first among all 1,200: ~26% for the tiny model (chance 0.08%); see below
ALL_IMAGES_TOP5_FLOOR = 0.6  # own image in the top 5: ~89%
GALLERY_CAPTION = re.compile(r"#(\d+) · (-?\d+\.\d{3}) · (.+)", re.DOTALL)


# --- fixtures and helpers -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(app_server) -> Client:
    return Client(app_server.url, verbose=False)


@pytest.fixture(scope="module")
def tables(app_server) -> tuple[dict, dict]:
    """images.parquet and captions.parquet of the served artifacts, as columns."""
    images = pq.read_table(app_server.artifacts / "images.parquet").to_pydict()
    captions = pq.read_table(app_server.artifacts / "captions.parquet").to_pydict()
    return images, captions


@pytest.fixture(scope="module")
def test_rows(tables) -> list[int]:
    return [row for row, split in enumerate(tables[0]["split"]) if split == "test"]


@pytest.fixture(scope="module")
def timings():
    """Wall times of every hostile request, reported once at the end (pytest -s shows it)."""
    measured: dict[str, tuple[float, float]] = {}  # label -> (server answer, whole gradio_client call)
    yield measured
    if measured:
        server, whole = (max(measured, key=lambda label, i=i: measured[label][i]) for i in (0, 1))
        print(
            f"\nbad-input requests: {len(measured)}; slowest server answer {measured[server][0]:.3f} s ({server}), "
            f"slowest gradio_client call {measured[whole][1]:.3f} s ({whole})"
        )


@dataclass(frozen=True)
class Upload:
    """An image file as a person would upload it."""

    name: str
    data: bytes


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def upload(tmp_path, data: bytes, name: str) -> dict:
    """A file for gradio_client, which uploads it with the request as the browser would."""
    path = tmp_path / name
    path.write_bytes(data)
    return handle_file(str(path))


def uploaded(url: str, query: Upload) -> dict:
    """Upload ahead of a raw call, so that the call's timing is the server's answer alone."""
    response = httpx.post(f"{url}gradio_api/upload", files={"files": (query.name, query.data)}, timeout=30)
    assert response.status_code == 200, response.text
    return {"path": response.json()[0], "meta": {"_type": "gradio.FileData"}}


def thumbnail(tables, row: int) -> Image.Image:
    return Image.open(io.BytesIO(tables[0]["thumbnail"][row])).convert("RGB")


@pytest.fixture
def ask(client, app_server, tmp_path, timings):
    """Send one query twice: through gradio_client (returns its outputs, or raises AppError) and as a raw HTTP call
    after uploading (its wall time is the server's answer time, which must be under FAST).

    The gradio_client figure is reported, not asserted: about 0.2 s of it is the client's own polling and threads.
    """

    def send(label: str, api_name: str, query: str | Upload, k, *, expect_error: str | None = None):
        value = upload(tmp_path, query.data, query.name) if isinstance(query, Upload) else query
        start = time.monotonic()
        try:
            outputs = client.predict(value, k, api_name=api_name)
            error = None
        except AppError as raised:
            outputs, error = None, str(raised)
        whole = time.monotonic() - start

        raw = uploaded(app_server.url, query) if isinstance(query, Upload) else query
        body = json.dumps({"data": [raw, k]})  # ensure_ascii: even a lone surrogate travels, escaped
        server, event, data = timed_call(app_server.url, api_name.lstrip("/"), body)
        timings[label] = (server, whole)
        assert server < FAST, f"{label}: the server took {server:.2f} s at best of {ATTEMPTS}"

        if expect_error is None:
            assert error is None and event == "complete", (error, data)
        else:
            assert error is not None and re.search(expect_error, error), error
            assert event == "error" and re.search(expect_error, data["error"]), data
        assert_still_serving(client)
        return outputs

    return send


def assert_still_serving(client) -> None:
    gallery, results = client.predict("a green ring", 3, api_name="/text_to_image")
    assert len(gallery) == len(results) == 3


def assert_ranked(results: list[dict], k: int) -> None:
    assert [result["rank"] for result in results] == list(range(1, k + 1))
    scores = [result["score"] for result in results]
    assert scores == sorted(scores, reverse=True), scores


def assert_gallery_shows(gallery: list[dict], results: list[dict], tables) -> None:
    """Each gallery tile is the result at the same position: its rank, score, first caption and picture."""
    assert len(gallery) == len(results)
    row_of = {image_id: row for row, image_id in enumerate(tables[0]["image_id"])}
    for tile, result in zip(gallery, results, strict=True):
        rank, score, caption = GALLERY_CAPTION.fullmatch(tile["caption"]).groups()
        assert int(rank) == result["rank"] and caption == result["captions"][0]
        assert abs(float(score) - result["score"]) <= 6e-4  # the tile shows 3 decimals, the JSON 4
        shown = np.asarray(Image.open(tile["image"]).convert("RGB"), dtype=np.float32)
        stored = np.asarray(thumbnail(tables, row_of[result["image_id"]]), dtype=np.float32)
        assert shown.shape == stored.shape and np.abs(shown - stored).mean() < 8  # same picture, re-encoded


def call_api(url: str, api_name: str, body: str) -> tuple[str, object]:
    """POST a raw JSON body to /gradio_api/call/<api_name>, then read the event stream: (event, data)."""
    with httpx.Client(base_url=url, timeout=30) as http:
        response = http.post(
            f"gradio_api/call/{api_name}", content=body.encode(), headers={"content-type": "application/json"}
        )
        assert response.status_code == 200, response.text
        stream = http.get(f"gradio_api/call/{api_name}/{response.json()['event_id']}")
    assert stream.status_code == 200, stream.text
    event, data = re.search(r"event: (\w+)\ndata: (.*)", stream.text).groups()
    return event, json.loads(data)


def timed_call(url: str, api_name: str, body: str) -> tuple[float, str, object]:
    """call_api, timed: the best of up to ATTEMPTS tries, since a machine shared with other runs stalls at times."""
    best = math.inf
    for _ in range(ATTEMPTS):
        start = time.monotonic()
        event, data = call_api(url, api_name, body)
        best = min(best, time.monotonic() - start)
        if best < FAST:
            break
    return best, event, data


def queue_messages(url: str, api_name: str, data: list) -> list[dict]:
    """Run an endpoint through the queue, as the browser does, and return every message (logs and warnings too)."""
    with httpx.Client(base_url=url, timeout=30) as http:
        dependencies = http.get("config").json()["dependencies"]
        fn_index = next(index for index, dep in enumerate(dependencies) if dep["api_name"] == api_name)
        session = uuid.uuid4().hex
        join = {"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None, "trigger_id": None}
        assert http.post("gradio_api/queue/join", json=join).status_code == 200
        messages = []
        with http.stream("GET", "gradio_api/queue/data", params={"session_hash": session}) as stream:
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    messages.append(json.loads(line[5:]))
                    if messages[-1]["msg"] == "process_completed":
                        break
    return messages


# --- the API contract -----------------------------------------------------------------------------------------------


def test_api_has_exactly_the_three_named_endpoints(client):
    api = client.view_api(return_format="dict", print_info=False)
    assert set(api["named_endpoints"]) == set(ENDPOINTS)
    assert not api["unnamed_endpoints"]
    for name, parameters in ENDPOINTS.items():
        described = api["named_endpoints"][name]["parameters"]
        assert [parameter["parameter_name"] for parameter in described] == parameters
        assert described[1]["parameter_default"] == 10 and not described[0]["parameter_has_default"]
        assert len(api["named_endpoints"][name]["returns"]) == 2  # what the UI shows, and the JSON


@pytest.mark.parametrize("k", [1, 7, MAX_K])
def test_text_to_image_gallery_matches_json(client, tables, k):
    gallery, results = client.predict("a small white star at the top", k, api_name="/text_to_image")
    assert_ranked(results, k)
    assert_gallery_shows(gallery, results, tables)
    assert {"rank", "score", "image_id", "captions", "filename", "split"} <= set(results[0])


@pytest.mark.parametrize("k", [1, 7, MAX_K])
def test_image_endpoints_show_what_their_json_says(client, tables, test_rows, tmp_path, k):
    image = upload(tmp_path, tables[0]["thumbnail"][test_rows[3]], "query.jpg")
    table, captions = client.predict(image, k, api_name="/image_to_text")
    assert_ranked(captions, k)
    assert table["headers"] == ["rank", "score", "caption", "image"]
    assert table["data"] == [[hit["rank"], hit["score"], hit["caption"], hit["image_id"]] for hit in captions]
    owners = {image_id: row for row, image_id in enumerate(tables[0]["image_id"])}
    for hit in captions:  # each caption is stored, and belongs to the image the result names
        caption_rows = [row for row, text in enumerate(tables[1]["caption"]) if text == hit["caption"]]
        assert owners[hit["image_id"]] in {tables[1]["image_index"][row] for row in caption_rows}

    gallery, images = client.predict(image, k, api_name="/image_to_image")
    assert_ranked(images, k)
    assert_gallery_shows(gallery, images, tables)


def test_stored_captions_find_their_own_image_through_the_api(app_server, tables, test_rows):
    """A sample of test captions against all 1,200 images, and the same answer as the in-process Searcher.

    The tiny model tells the 100 test images apart (test t2i R@1 ~ 89%) but confuses shapes across all 1,200
    (train and val included): rank 1 lands near 26% (chance: 0.08%), top 5 near 89%. See test_search.
    """
    searcher = Searcher(verify_artifacts(app_server.artifacts))
    test = set(test_rows)
    sample = [row for row, image in enumerate(tables[1]["image_index"]) if image in test]
    sample = sample[:: len(sample) // SELF_RETRIEVAL_SAMPLE][:SELF_RETRIEVAL_SAMPLE]
    first = top5 = 0
    for row in sample:
        caption, own = tables[1]["caption"][row], tables[0]["image_id"][tables[1]["image_index"][row]]
        event, (_, results) = call_api(app_server.url, "text_to_image", json.dumps({"data": [caption, 5]}))
        assert event == "complete"
        ids = [result["image_id"] for result in results]
        hits = searcher.text_to_image(searcher.text_query(caption), 5)
        # The server answers what the search core answers (up to the order of float-noise ties).
        assert [result["score"] for result in results] == pytest.approx([hit.score for hit in hits], abs=2e-4)
        assert sorted(ids) == sorted(hit.image_id for hit in hits), caption
        first += ids[0] == own
        top5 += own in ids
    r1, r5 = first / len(sample), top5 / len(sample)
    print(f"\nAPI self-retrieval over {len(sample)} test captions among 1,200 images: rank 1 {r1:.0%}, top 5 {r5:.0%}")
    assert r1 >= ALL_IMAGES_R1_FLOOR, f"rank 1 {r1:.0%} ({first}/{len(sample)}), top 5 {r5:.0%}"
    assert r5 >= ALL_IMAGES_TOP5_FLOOR, f"rank 1 {r1:.0%}, top 5 {r5:.0%} ({top5}/{len(sample)})"


def test_indexed_images_find_themselves_first(client, tables, test_rows, tmp_path):
    for row in test_rows[:5]:
        image = upload(tmp_path, tables[0]["thumbnail"][row], f"indexed_{row}.jpg")
        _, results = client.predict(image, 3, api_name="/image_to_image")
        assert results[0]["image_id"] == tables[0]["image_id"][row], results
        assert results[0]["score"] > 0.98


# --- hostile and unusual input ------------------------------------------------------------------------------------


def test_decompression_bomb_is_refused_fast_and_without_memory(ask, app_server):
    bomb = Upload("bomb.png", encode(Image.new("1", (13_000, 13_000)), "PNG"))  # 169 MP, ~20 kB on disk
    server = psutil.Process(app_server.process.pid)
    before = server.memory_info().rss
    for api_name in ("/image_to_text", "/image_to_image"):
        ask(f"bomb {api_name}", api_name, bomb, 5, expect_error="too large to decode safely; the limit is 40 mega")
    growth = server.memory_info().rss - before
    print(f"\nserver RSS growth across 4 decompression-bomb requests: {growth / 1e6:+.1f} MB")
    assert growth < BOMB_RSS_LIMIT


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"


def _truncated_jpeg() -> bytes:
    data = encode(Image.new("RGB", (64, 64), "red"), "JPEG")
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "query,message",
    [
        (Upload("photo.jpg", _truncated_jpeg()), "corrupt or truncated"),
        (Upload("notes.jpg", b"just some text, not a picture\n"), "not a supported image"),
        (Upload("empty.jpg", b""), "the file is empty"),
        (Upload("drawing.eps", EPS), "not a supported image"),  # Pillow would run Ghostscript on it: never opened
        (Upload("dot.png", encode(Image.new("RGB", (1, 1)), "PNG")), "1x1; at least 16 px"),
    ],
    ids=["truncated-jpeg", "text-named-jpg", "zero-bytes", "eps", "one-pixel"],
)
def test_bad_files_are_refused_with_a_clear_message(ask, query, message):
    ask(query.name, "/image_to_text", query, 5, expect_error=message)


def _sixteen_bit(image: Image.Image) -> Image.Image:
    return Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)  # mode I;16


@pytest.mark.parametrize(
    "convert,fmt",
    [
        (lambda image: image.convert("RGBA"), "PNG"),
        (lambda image: image.convert("P"), "PNG"),
        (lambda image: image.convert("LA"), "PNG"),
        (lambda image: image.convert("CMYK"), "JPEG"),
        (_sixteen_bit, "PNG"),
    ],
    ids=["rgba", "palette", "la", "cmyk-jpeg", "16-bit-grey"],
)
def test_unusual_image_modes_are_processed(ask, tables, test_rows, convert, fmt):
    image = convert(thumbnail(tables, test_rows[0]))
    data = encode(image, fmt)
    assert Image.open(io.BytesIO(data)).mode == image.mode  # the file really is in that mode
    table, results = ask(f"mode {image.mode}", "/image_to_text", Upload(f"query.{fmt.lower()}", data), 5)
    assert len(results) == len(table["data"]) == 5


def test_exif_orientation_is_applied(client, tables, test_rows, tmp_path):
    upright = thumbnail(tables, test_rows[0]).resize((64, 96))  # portrait, so a wrong rotation cannot go unseen
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # landscape pixels; EXIF 6 says "turn 90° clockwise"
    exif = Image.Exif()
    exif[0x0112] = 6
    options = {"quality": 100, "subsampling": 0}

    def ids(data: bytes, name: str) -> list[str]:
        _, results = client.predict(upload(tmp_path, data, name), 10, api_name="/image_to_image")
        return [result["image_id"] for result in results]

    expected = ids(encode(upright, "JPEG", **options), "upright.jpg")
    assert ids(encode(stored, "JPEG", exif=exif, **options), "rotated.jpg") == expected
    assert ids(encode(stored, "JPEG", **options), "sideways.jpg") != expected  # the test can tell


def test_animated_gif_uses_its_first_frame(client, tables, test_rows, tmp_path):
    first, second = thumbnail(tables, test_rows[0]), thumbnail(tables, test_rows[50])
    animated = encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    assert Image.open(io.BytesIO(animated)).n_frames == 2

    def ids(data: bytes, name: str) -> list[str]:
        _, results = client.predict(upload(tmp_path, data, name), 5, api_name="/image_to_image")
        return [result["image_id"] for result in results]

    assert (
        ids(animated, "animated.gif") == ids(encode(first, "GIF"), "first.gif") != ids(encode(second, "GIF"), "2.gif")
    )


@pytest.mark.parametrize("query", ["", "  \n\t  "], ids=["empty", "whitespace"])
def test_empty_text_is_refused(ask, query):
    ask(f"text {query!r}", "/text_to_image", query, 5, expect_error="Type a description to search for")


def test_megabyte_query_is_answered_fast_and_warned_about(ask, app_server):
    query = ("a small white star at the top " * 40_000)[:1_000_000]
    gallery, results = ask("1M-char query", "/text_to_image", query, 5)
    assert len(gallery) == len(results) == 5
    messages = queue_messages(app_server.url, "text_to_image", [query, 5])  # as the browser, which shows warnings
    assert messages[-1]["success"]
    warnings = [message["log"] for message in messages if message["msg"] == "log" and message["level"] == "warning"]
    assert warnings == ["Long query: only its first 32 word pieces were used."], messages


def test_lone_surrogate_gets_a_clean_answer(client, app_server, timings):
    # gradio_client cannot UTF-8-encode "\ud800"; JSON carries it escaped, so the body is sent by hand.
    body = json.dumps({"data": ["a green \ud800ring", 5]})
    assert "\\ud800" in body
    elapsed, event, data = timed_call(app_server.url, "text_to_image", body)
    timings["lone surrogate"] = (elapsed, elapsed)
    assert elapsed < FAST
    assert event == "complete", data  # answered for the cleaned text "a green ring"
    assert len(data[1]) == 5
    event, data = call_api(app_server.url, "text_to_image", json.dumps({"data": ["\ud800", 5]}))
    assert event == "error" and "Type a description" in data["error"], data  # nothing left after cleaning
    assert_still_serving(client)


@pytest.mark.parametrize("k", [0, 10_000], ids=["k=0", "k=10000"])
@pytest.mark.parametrize("api_name", list(ENDPOINTS))
def test_k_out_of_range_is_refused(ask, tables, api_name, k):
    query = "a green ring" if api_name == "/text_to_image" else Upload("query.jpg", tables[0]["thumbnail"][0])
    # /text_to_image gets the Slider's own bounds check; the image endpoints (preprocess=False) get ours.
    message = rf"less than minimum value 1|greater than maximum value {MAX_K}|whole number from 1 to {MAX_K}"
    ask(f"{api_name} k={k}", api_name, query, k, expect_error=message)


# --- what is never served ---------------------------------------------------------------------------------------------


def private_files(app_server) -> dict[str, bytes]:
    """Path as requested -> bytes that must not come back."""
    files = {"/etc/passwd": b"root:", str(ROOT / "app.py"): b"def build_app"}
    for name in ("model.safetensors", "manifest.json"):
        path = app_server.artifacts.resolve() / name
        files[str(path)] = path.read_bytes()[:64]
    return files


def test_private_files_are_not_served(app_server):
    with httpx.Client(base_url=app_server.url, timeout=10) as http:
        for path, secret in private_files(app_server).items():
            for route in (f"gradio_api/file={path}", f"gradio_api/file{path}"):  # current and deprecated file routes
                response = http.get(route)
                assert response.status_code in (403, 404), (route, response.status_code)
                assert secret not in response.content, route


def test_files_the_client_did_not_upload_are_not_read(app_server):
    """An image input naming a server path (not an upload) is refused before our handler reads anything."""
    for path in private_files(app_server):
        body = json.dumps({"data": [{"path": path, "meta": {"_type": "gradio.FileData"}}, 5]})
        event, data = call_api(app_server.url, "image_to_text", body)
        assert event == "error", data
        assert re.search("not uploaded by a user|blocked_paths", data["error"]), data


@pytest.mark.parametrize(
    "route", ["monitoring", "monitoring/summary", "monitoring/anykey", "gradio_api/monitoring"], ids=str
)
def test_no_monitoring_dashboard(app_server, route):
    response = httpx.get(app_server.url + route, timeout=10, follow_redirects=False)
    assert response.status_code in (403, 404), response.status_code
    assert "dashboard" not in response.text.lower() and "monitoring url" not in response.text.lower()


# --- start-up ---------------------------------------------------------------------------------------------------------


def test_corrupted_weights_refuse_to_start(tiny_run, tmp_path):
    folder = tmp_path / "artifacts"
    shutil.copytree(tiny_run, folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern in the middle of the tensors, header intact
    weights.write_bytes(bytes(data))
    port = free_port()
    result = subprocess.run(
        [sys.executable, "app.py", "--artifacts", str(folder), "--port", str(port)],
        cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "refusing to start" in output and "model.safetensors" in output, output[-3000:]
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # nothing was ever served


def test_no_artifacts_is_a_usage_error(monkeypatch, capsys):
    """In-process (a second interpreter would spend ~20 s importing torch and Gradio to print one line)."""
    import app

    for name in ("CROSSMODAL_ARTIFACTS", "CROSSMODAL_REVISION"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exit_:
        app.main([])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "CROSSMODAL_ARTIFACTS" in error and "--artifacts" in error, error
