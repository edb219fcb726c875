"""gradio_client without two costs of its own that distort latency measured on the server's machine.

Both are the client's, not the server's, yet ``benchmarks.query_latency`` would count them as the endpoint's:

1. A 50 ms poll. gradio_client's reader thread puts each server message for a call into a deque, and the calling
   thread looks at that deque every 50 ms (``gradio_client.utils.stream_sse_v1plus`` sleeps 0.05 s while it is empty,
   a sleep added so that a waiting client stops spinning a core: gradio-app/gradio#7091). So every answer is seen on a
   50 ms grid: two endpoints whose server times differ by 20 ms differ through the client by 0 or 50 ms, depending on
   where the grid falls, and an endpoint's extra over its no-op twin measures the grid rather than the server. A
   browser's EventSource has no such grid. Here each call's deque signals the messages it receives, and the wait in
   ``gradio_client.utils`` ends at that signal (its 50 ms stays the timeout). Stock clients in the same process keep
   their poll: their deques never signal.
2. A TLS context per HTTP client. gradio_client opens a new httpx client for each call's request, another for its
   message stream and one more per downloaded file, and httpx builds a TLS context for each, even over plain HTTP:
   the CA bundle parsed again, ~40 ms of CPU (perf: libcrypto's PEM decoding). On a machine of its own that is the
   client's time; on this 2-core machine it runs on the cores the server searches with, while it searches. Here
   every HTTP client a measuring client opens shares one context, built once (``ssl_verify`` is passed through to
   httpx, which takes an ``ssl.SSLContext`` as ``verify``).

The requests, the threads and the parsing stay gradio_client's own.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections import deque

import gradio_client.utils
import httpx
from gradio_client import Client

_POLL = "time.sleep(0.05)"  # what gradio_client's per-call wait does, checked so a change in it cannot go unnoticed

_tls = httpx.create_ssl_context()  # what httpx builds for every client it opens, built once
_arrived = threading.Condition()
_arrivals = 0  # messages received so far by every measuring client in this process
_seen = threading.local()  # the count each waiting thread last saw


class _SignallingDeque(deque):
    def append(self, message) -> None:
        global _arrivals
        super().append(message)
        with _arrived:
            _arrivals += 1
            _arrived.notify_all()


class _SignallingMessages(dict):
    """A client's ``pending_messages_per_event``: each event's deque becomes one that signals."""

    def __setitem__(self, event_id, messages) -> None:
        if not isinstance(messages, _SignallingDeque):
            messages = _SignallingDeque(messages)
        super().__setitem__(event_id, messages)

    def setdefault(self, event_id, default=None):
        if event_id not in self:
            self[event_id] = deque() if default is None else default
        return self[event_id]


class _TimeWokenByMessages:
    """``time`` as gradio_client.utils sees it, with a ``sleep`` that also ends when a message arrives."""

    def __getattr__(self, name: str):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        # A message may land between the caller's empty-deque check and this wait: comparing against the count this
        # thread last saw (not waiting for the next notify) returns at once in that case, so no message waits 50 ms.
        with _arrived:
            last = getattr(_seen, "count", None)
            if last is not None:
                _arrived.wait_for(lambda: _arrivals != last, timeout=seconds)
            _seen.count = _arrivals


def _install() -> None:
    if isinstance(gradio_client.utils.time, _TimeWokenByMessages):
        return
    if _POLL not in inspect.getsource(gradio_client.utils.stream_sse_v1plus):
        raise RuntimeError(
            f"gradio_client's per-call wait no longer does {_POLL}: check benchmarks/measuring_client.py against it"
        )
    gradio_client.utils.time = _TimeWokenByMessages()


def arrivals() -> int:
    """Messages the measuring clients of this process have received so far (tests check the wiring with it)."""
    return _arrivals


def measuring_client(url: str, **options) -> Client:
    """``Client(url, verbose=False, **options)``, its calls woken by their messages instead of a 50 ms poll, every
    HTTP client it opens sharing one TLS context."""
    _install()
    client = Client(url, verbose=False, ssl_verify=_tls, **options)
    if not isinstance(client.pending_messages_per_event, dict) or client.pending_messages_per_event:
        raise RuntimeError("gradio_client changed how it keeps messages: check benchmarks/measuring_client.py")
    client.pending_messages_per_event = _SignallingMessages()
    return client
