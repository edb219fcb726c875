"""The real app over HTTP: what a gradio_client user gets (docs/architecture.md, "API endpoints"), and what is never
served.

Every query goes to `python app.py` in a subprocess (the shared `app_server` fixture), never to the handlers
in-process, so Gradio's own pre- and post-processing is part of what is tested.
"""

import json
import re
import shutil
import signal
import socket
import subprocess
import sys

import httpx
import pytest
from gradio_client import Client

from benchmarks.live_server import free_port, start_app
from crossmodal.artifacts.contract import load_verified
from crossmodal.serving.search import MAX_K, Searcher
from tests.app.helpers import (
    ALL_IMAGES_R1_FLOOR,
    ALL_IMAGES_TOP5_FLOOR,
    ENDPOINTS,
    SELF_RETRIEVAL_SAMPLE,
    assert_gallery_shows,
    assert_ranked,
    call_api,
    upload,
)
from tests.conftest import ROOT, SUBPROCESS_ENV

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
    searcher = Searcher(load_verified(app_server.artifacts))
    test = set(test_rows)
    sample = [row for row, image in enumerate(tables[1]["image_index"]) if image in test]
    sample = sample[:: len(sample) // SELF_RETRIEVAL_SAMPLE][:SELF_RETRIEVAL_SAMPLE]
    first = top5 = 0
    for row in sample:
        caption, own = tables[1]["caption"][row], tables[0]["image_id"][tables[1]["image_index"][row]]
        event, (_, results) = call_api(app_server.url, "text_to_image", json.dumps({"data": [caption, 5]}))
        assert event == "complete"
        ids = [result["image_id"] for result in results]
        hits = searcher.text_to_image(caption, 5)
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


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_and_sigterm_stop_the_server_cleanly(tiny_run, tmp_path, stop):
    """The signal reaches the main thread while it runs searches (it is the compute thread): the server closes, exit
    0, and the media folder of shown thumbnails is deleted (Python's default SIGTERM would leave it behind)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    server = start_app(tiny_run, tmp_path / "server.log", env={**SUBPROCESS_ENV, "TMPDIR": str(scratch)})
    try:
        answer = Client(server.url, verbose=False, download_files=False).predict(
            "a red circle", 2, api_name="/text_to_image"
        )
        assert len(answer[1]) == 2
        media = list(scratch.glob("crossmodal-media-*"))
        assert len(media) == 1 and any(media[0].glob("thumbnail_*.jpg"))  # thumbnails were written for the answer
        server.process.send_signal(stop)
        assert server.process.wait(timeout=60) == 0, server.log.read_text()[-3000:]
    finally:
        if server.process.poll() is None:
            server.process.kill()
    assert "interrupted: closing the server" in server.log.read_text()
    assert not media[0].exists()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", int(server.url.rsplit(":", 1)[1].strip("/")))) != 0


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
