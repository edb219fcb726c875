"""One OS thread for all of a process's torch work, however many threads ask for it.

Why: torch's CPU kernels run on OpenMP (libgomp), which gives every OS thread that starts a parallel region a team of
worker threads of its own. Once the process holds more of those threads than there are cores, libgomp stops letting
idle workers spin and puts them to sleep after a short fixed count, so each of the hundreds of parallel regions in a
forward pass waits for a wake-up. Gradio runs handlers on whichever worker thread of its pool is free, and the app
loaded its model on the main thread: on 2 cores a search then costs ~1.3-1.8x what it costs when one thread does it
all (measured in docs/benchmarks.md). Handing every torch call to the one thread that loaded the model keeps it at
one team.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

Result = TypeVar("Result")
_POLL_SECONDS = 0.1  # how soon ``serve`` notices it should stop


class ComputeClosedError(RuntimeError):
    """The compute thread has stopped serving (the app is shutting down)."""


class ComputeThread:
    """Runs calls on the thread that created it; other threads wait for their turn, in order.

    The owner calls ``serve`` once it has nothing else to do (the app: after launching the server). Calls made on
    the owner thread itself run at once, so start-up code and single-threaded callers need no server.
    """

    def __init__(self) -> None:
        self._owner = threading.get_ident()
        self._jobs: queue.SimpleQueue[tuple[Future, Callable, tuple, dict]] = queue.SimpleQueue()
        self._closed = threading.Event()

    def call(self, function: Callable[..., Result], /, *args, **kwargs) -> Result:
        """``function(*args, **kwargs)`` on the owner thread; its result or exception comes back to this one."""
        if threading.get_ident() == self._owner:
            return function(*args, **kwargs)
        if self._closed.is_set():
            raise ComputeClosedError("the compute thread has stopped")
        future: Future[Result] = Future()
        self._jobs.put((future, function, args, kwargs))
        if self._closed.is_set():  # closed while queueing: ``serve`` may already have drained the queue
            self._cancel_waiting()
        return future.result()

    def serve(self, until: Callable[[], bool]) -> None:
        """Run queued calls, in order, until ``until()`` is true; calls still waiting then fail, none hangs."""
        if threading.get_ident() != self._owner:
            raise RuntimeError("serve() must run on the thread that created the ComputeThread")
        try:
            while not until():
                try:
                    future, function, args, kwargs = self._jobs.get(timeout=_POLL_SECONDS)
                except queue.Empty:
                    continue
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    future.set_result(function(*args, **kwargs))
                except Exception as error:  # the caller's to handle
                    future.set_exception(error)
                except BaseException:  # Ctrl-C: serving stops, and the caller is told why, not interrupted
                    future.set_exception(ComputeClosedError("the app is shutting down"))
                    raise
        finally:
            self._closed.set()
            self._cancel_waiting()

    def _cancel_waiting(self) -> None:
        while True:
            try:
                future, *_ = self._jobs.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(ComputeClosedError("the app is shutting down"))
