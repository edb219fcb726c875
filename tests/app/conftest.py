"""Fixtures for the tests of the launched app (tests/app/test_*.py), over the shared `app_server`."""

import json
import re
import time

import pyarrow.parquet as pq
import pytest
from gradio_client import Client

from tests.app.helpers import (
    ATTEMPTS,
    FAST,
    Upload,
    assert_still_serving,
    timed_call,
    upload,
    uploaded,
)


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


@pytest.fixture
def ask(client, app_server, tmp_path, timings):
    """Send one query twice: through gradio_client (returns its outputs) and as a raw HTTP call after uploading (its
    wall time is the server's answer time, which must be under FAST). A refused query is answered, not raised: its
    results are ``{"error": message}`` and its gallery or table is empty (app.Handlers says why).

    The gradio_client figure is reported, not asserted: about 0.2 s of it is the client's own polling and threads.
    """

    def send(label: str, api_name: str, query: str | Upload, k, *, expect_error: str | None = None):
        value = upload(tmp_path, query.data, query.name) if isinstance(query, Upload) else query
        start = time.monotonic()
        outputs = client.predict(value, k, api_name=api_name)
        whole = time.monotonic() - start

        raw = uploaded(app_server.url, query) if isinstance(query, Upload) else query
        body = json.dumps({"data": [raw, k]})  # ensure_ascii: even a lone surrogate travels, escaped
        server, event, data = timed_call(app_server.url, api_name.lstrip("/"), body)
        timings[label] = (server, whole)
        assert server < FAST, f"{label}: the server took {server:.2f} s at best of {ATTEMPTS}"
        assert event == "complete", data

        for shown, results in (outputs, data):  # gradio_client's answer, then the raw one
            if expect_error is None:
                assert isinstance(results, list), results
            else:
                assert isinstance(results, dict) and re.search(expect_error, results["error"]), results
                assert not (shown["data"] if isinstance(shown, dict) else shown), shown  # nothing shown
        assert_still_serving(client)
        return outputs

    return send
