"""Hostile and unusual input to the launched app: each is answered at once with a clear error, or processed."""

import io
import json

import numpy as np
import psutil
import pytest
from PIL import Image

from crossmodal.serving.search import MAX_K
from tests.app.helpers import (
    BOMB_RSS_LIMIT,
    ENDPOINTS,
    FAST,
    Upload,
    assert_still_serving,
    call_api,
    encode,
    queue_messages,
    thumbnail,
    timed_call,
    upload,
)


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
    # The browser's step after each search (app.Handlers.explain) warns, through the queue as the browser calls it.
    messages = queue_messages(app_server.url, "explain", [results, query])
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
    assert event == "complete" and "Type a description" in data[1]["error"], data  # nothing left after cleaning
    assert_still_serving(client)


@pytest.mark.parametrize("k", [0, 10_000], ids=["k=0", "k=10000"])
@pytest.mark.parametrize("api_name", list(ENDPOINTS))
def test_k_out_of_range_is_refused(ask, tables, api_name, k):
    query = "a green ring" if api_name == "/text_to_image" else Upload("query.jpg", tables[0]["thumbnail"][0])
    # /text_to_image gets the Slider's own bounds check; the image endpoints (preprocess=False) get ours.
    message = rf"less than minimum value 1|greater than maximum value {MAX_K}|whole number from 1 to {MAX_K}"
    ask(f"{api_name} k={k}", api_name, query, k, expect_error=message)
