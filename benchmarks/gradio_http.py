"""Gradio's documented HTTP API spoken directly, from one asyncio loop: the client the load and query benchmarks time.

``POST /gradio_api/upload`` for an image, ``POST /gradio_api/call/<endpoint>``, then the event stream
``GET /gradio_api/call/<endpoint>/<event_id>``, as any program can. Not ``gradio_client``: its calling thread looks
for each answer only every 50 ms (so latencies come on a 50 ms grid), and every HTTP client it opens (two per call,
one per downloaded file) builds a TLS context, ~40 ms of CPU on the cores the server searches with. This client
reads the answer as it arrives and builds one pool, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx

REQUEST_TIMEOUT = 60.0  # s: a request still unanswered by then counts as an error (a time-out)


class GradioHttp:
    """Gradio's documented HTTP API over one connection pool; every call is one person's request."""

    def __init__(self, base: str, connections: int) -> None:
        self.base = base.rstrip("/") + "/gradio_api"
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self.http = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(REQUEST_TIMEOUT))

    async def close(self) -> None:
        await self.http.aclose()

    async def upload(self, data: bytes) -> dict:
        response = await self.http.post(f"{self.base}/upload", files={"files": ("query.jpg", data, "image/jpeg")})
        response.raise_for_status()
        return {"path": response.json()[0], "meta": {"_type": "gradio.FileData"}}

    async def call(self, endpoint: str, data: list) -> tuple[str, object]:
        """("complete", outputs), ("error", message) or ("busy", message)."""
        posted = await self.http.post(f"{self.base}/call/{endpoint}", json={"data": data})
        if posted.status_code == 503:
            return "busy", posted.text
        if posted.status_code != 200:
            return "error", f"HTTP {posted.status_code}: {posted.text[:200]}"
        event_id = posted.json()["event_id"]
        stream = self.http.stream("GET", f"{self.base}/call/{endpoint}/{event_id}")
        async with stream as response, contextlib.aclosing(response.aiter_lines()) as lines:  # closed on return
            event = None
            async for line in lines:
                if line.startswith("event: "):
                    event = line[len("event: ") :]
                elif line.startswith("data: ") and event in ("complete", "error"):
                    return event, json.loads(line[len("data: ") :])
        return "error", "the event stream ended without an answer"

    async def fetch(self, url: str) -> None:
        response = await self.http.get(url)
        response.raise_for_status()

    async def search(self, endpoint: str, query: str | bytes, k: int, files: bool = False) -> tuple[str, object]:
        """One person's search: an image (bytes) uploaded first, then the call; with ``files``, every gallery file of
        the answer fetched too, all at once, as a browser showing it does. Returns what ``call`` returns."""
        if isinstance(query, bytes):
            query = await self.upload(query)
        outcome, outputs = await self.call(endpoint, [query, k])
        if outcome == "complete" and files and endpoint.endswith("_to_image"):
            await asyncio.gather(*(self.fetch(item["image"]["url"]) for item in outputs[0]))
        return outcome, outputs

    async def batch_sizes(self) -> dict[str, dict[int, int]]:
        """The server's batch-size counts per endpoint since start-up ({} where the server does not report them)."""
        # A connection of its own: the app on main answers an unknown endpoint with an error, after which the
        # server closes that connection, and a pooled one would fail the next person's request.
        reporter = GradioHttp(self.base.removesuffix("/gradio_api"), connections=1)
        try:
            outcome, outputs = await reporter.call("batch_sizes", [])
        finally:
            await reporter.close()
        if outcome != "complete":
            return {}
        return {endpoint: {int(size): n for size, n in counts.items()} for endpoint, counts in outputs[0].items()}
