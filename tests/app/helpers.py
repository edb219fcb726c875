"""Helpers for the tests of the launched app: building uploads, calling the raw HTTP API, checking results."""

import io
import json
import math
import re
import time
import uuid
from dataclasses import dataclass

import httpx
import numpy as np
from gradio_client import handle_file
from PIL import Image

ENDPOINTS = {"/text_to_image": ["query", "k"], "/image_to_text": ["image", "k"], "/image_to_image": ["image", "k"]}


FAST = 1.0  # seconds: a refused or bounded request must come back at once, not tie up one of the two workers


ATTEMPTS = 3  # timed tries per request; work that is really slow (decoding a bomb) is slow on every try


BOMB_RSS_LIMIT = 200e6  # bytes the server may grow by while refusing a 169-megapixel PNG (decoded: 169 MB at 1 bit)


SELF_RETRIEVAL_SAMPLE = 40


ALL_IMAGES_R1_FLOOR = 0.15  # own image first among all 1,200: ~26% for the tiny model (chance 0.08%); see below


ALL_IMAGES_TOP5_FLOOR = 0.6  # own image in the top 5: ~89%


GALLERY_CAPTION = re.compile(r"#(\d+) · (-?\d+\.\d{3}) · (.+)", re.DOTALL)


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
    """Run an event through the queue, as the browser does, and return every message (logs and warnings too).

    ``api_name`` is an endpoint's name, or a private event's function name (Gradio's config lists both)."""
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
