"""The compute thread: calls from any thread run on the owner, in order; shutting down fails waiting calls, never hangs.

And why it exists: torch work sent through it from several threads keeps one OpenMP team in the process, where the
same work run on those threads directly gives each of them a team of its own.
"""

import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from crossmodal.serving.compute import ComputeClosedError, ComputeThread

WAIT = 30  # seconds; a test that needs them has hung


def serve_while(compute: ComputeThread, work):
    """Serve ``compute`` on this (owner) thread while ``work()`` runs on another; returns what ``work`` returned."""
    with ThreadPoolExecutor(1) as pool:
        result = pool.submit(work)
        compute.serve(until=result.done)
        return result.result(timeout=WAIT)


def test_calls_on_the_owner_thread_run_at_once():
    compute = ComputeThread()
    assert compute.call(threading.get_ident) == threading.get_ident()


def test_calls_from_other_threads_run_on_the_owner_in_order():
    compute, order = ComputeThread(), []

    def job(number: int) -> int:
        order.append(number)
        return threading.get_ident()

    def from_workers():
        in_sequence = [compute.call(job, number) for number in range(20)]
        with ThreadPoolExecutor(4) as pool:
            return in_sequence, list(pool.map(lambda number: compute.call(job, number), range(8)))

    in_sequence, concurrent = serve_while(compute, from_workers)
    assert set(in_sequence) == set(concurrent) == {threading.get_ident()}
    assert order[:20] == list(range(20)) and sorted(order[20:]) == list(range(8))


def test_a_calls_exception_reaches_its_caller_and_serving_goes_on():
    compute = ComputeThread()

    def work():
        with pytest.raises(ValueError, match="bad query"):
            compute.call(int, "bad query")
        return compute.call(int, "42")

    assert serve_while(compute, work) == 42


def test_keyword_arguments_pass_through():
    compute = ComputeThread()
    assert serve_while(compute, lambda: compute.call(int, "ff", base=16)) == 255


def test_after_serving_stops_calls_fail_instead_of_hanging():
    compute = ComputeThread()
    compute.serve(until=lambda: True)
    with ThreadPoolExecutor(1) as pool:
        late = pool.submit(compute.call, threading.get_ident)
        with pytest.raises(ComputeClosedError):
            late.result(timeout=WAIT)


def test_calls_waiting_when_serving_stops_fail_instead_of_hanging():
    compute, finished, waiting = ComputeThread(), threading.Event(), []

    def last_job():
        waiting.append(pool.submit(compute.call, threading.get_ident))
        while compute._jobs.qsize() == 0:  # queued behind this job, which is the last one served
            time.sleep(0.001)
        finished.set()

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(compute.call, last_job)
        compute.serve(until=finished.is_set)
        first.result(timeout=WAIT)
        with pytest.raises(ComputeClosedError):
            waiting[0].result(timeout=WAIT)


def test_ctrl_c_during_a_call_stops_serving_and_its_caller_is_told():
    compute = ComputeThread()

    def interrupted():
        raise KeyboardInterrupt

    with ThreadPoolExecutor(1) as pool:
        caller = pool.submit(compute.call, interrupted)
        with pytest.raises(KeyboardInterrupt):
            compute.serve(until=lambda: False)
        with pytest.raises(ComputeClosedError):
            caller.result(timeout=WAIT)


def test_only_the_owner_can_serve():
    compute = ComputeThread()
    with ThreadPoolExecutor(1) as pool, pytest.raises(RuntimeError, match="thread that created"):
        pool.submit(compute.serve, lambda: True).result(timeout=WAIT)


def test_torch_from_several_threads_keeps_one_openmp_team():
    """Counted in a fresh interpreter: OS threads while 3 callers that ran a parallel torch op are still alive."""
    script = textwrap.dedent(
        """
        import os, sys, threading
        import torch
        from crossmodal.serving.compute import ComputeThread

        torch.set_num_threads(2)
        x = torch.randn(256, 256)
        (x @ x).sum()  # the owner's own team, as the app's model loading makes it
        compute, hold, ready = ComputeThread(), threading.Event(), threading.Semaphore(0)
        direct = sys.argv[1] == "direct"

        def caller():
            compute.call(lambda: (x @ x).sum()) if not direct else (x @ x).sum()
            ready.release()
            hold.wait()

        before = len(os.listdir("/proc/self/task"))
        callers = [threading.Thread(target=caller) for _ in range(3)]
        for thread in callers:
            thread.start()
        done = [0]

        def all_ready():
            while ready.acquire(blocking=False):
                done[0] += 1
            return done[0] == 3

        compute.serve(until=all_ready)
        print(len(os.listdir("/proc/self/task")) - before)
        hold.set()
        """
    )
    added = {}
    for mode in ("direct", "compute"):
        result = subprocess.run(
            [sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=120, check=False
        )
        assert result.returncode == 0, result.stderr[-2000:]
        added[mode] = int(result.stdout.split()[-1])
    assert added["compute"] == 3  # the callers themselves
    assert added["direct"] == 6  # each caller plus an OpenMP worker of its own


def test_app_handlers_search_on_the_compute_thread(tiny_run, tmp_path):
    """Every handler that touches the model hands its search to the compute thread, whichever thread Gradio used."""
    import app
    from crossmodal.artifacts.contract import load_verified
    from crossmodal.serving.search import Searcher

    searcher, compute, ran_on = Searcher(load_verified(tiny_run)), ComputeThread(), {}

    def spy(name: str):
        search = getattr(searcher, name)

        def noting_the_thread(*args, **kwargs):
            ran_on[name] = threading.get_ident()
            return search(*args, **kwargs)

        return noting_the_thread

    searches = ("search_texts", "search_images", "more_like")
    for name in searches:
        setattr(searcher, name, spy(name))  # the real search still runs; the spy only notes its thread
    handlers = app.Handlers(searcher, tmp_path, compute)
    upload = {"path": handlers.thumbnail_file(0)}

    def requests():  # the public handlers take a batch: one list per input, one answer per query
        galleries, results = handlers.text_to_image([searcher.captions[0], ""], [3, 3])
        assert len(galleries[0]) == len(results[0]) == 3
        assert galleries[1] == [] and "Type a description" in results[1]["error"]
        assert len(handlers.image_to_text([upload], [4])[1][0]) == 4
        assert handlers.image_to_image([upload, None], [2, 2])[1][0][0]["image_id"] == searcher.image_ids[0]
        assert handlers.batch_sizes == {"text_to_image": {2: 1}, "image_to_text": {1: 1}, "image_to_image": {2: 1}}
        assert len(handlers.more_like_this(searcher.image_ids[0], 5)[1]) == 5
        return threading.get_ident()

    assert serve_while(compute, requests) != threading.get_ident()
    assert ran_on == dict.fromkeys(searches, threading.get_ident())
