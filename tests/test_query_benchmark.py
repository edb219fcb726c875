"""The query-latency benchmark measures the right things: no timing is asserted, only what is timed.

Its floor must find what the search finds, its no-op and floor twins must move answers of the same shape as the real
endpoints (the floor twins running the floor on what they are sent), its Flickr-scale folder must be a real artifact
folder of the default architecture, and the script must report its ratios last and fail when a target is missed.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections import Counter
from pathlib import Path

import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from benchmarks import bare_floor, flickr_scale, load_test, query_latency
from benchmarks.common import FLICKR30K_IMAGES
from benchmarks.measuring_client import arrivals, measuring_client
from benchmarks.query_latency import KINDS, Floor, InProcess, make_queries
from crossmodal.artifacts import verify_artifacts
from crossmodal.preprocess import tokenize
from crossmodal.search import Searcher
from tests.conftest import SUBPROCESS_ENV
from tests.live_server import start_app

SMALL_INDEX = 40  # images; the script's --images


@pytest.fixture(scope="module")
def small_flickr_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("flickr_scale")
    flickr_scale.ensure(cache, SMALL_INDEX)
    return cache


@pytest.fixture(scope="module")
def tiny_searcher(tiny_run):
    return Searcher(verify_artifacts(tiny_run))


def test_flickr_scale_folder_is_a_verified_default_architecture_index(small_flickr_cache):
    folder = flickr_scale.ensure(small_flickr_cache, SMALL_INDEX)  # reused, not rebuilt
    loaded = verify_artifacts(folder)  # files, weights, shapes, unit norms, golden self-test
    config = loaded.config
    assert config.image_tower == "torchvision:efficientnet_b0" and config.embed_dim == 512
    assert config.text_config["vocab_size"] == 30522 and config.text_config["num_hidden_layers"] == 12
    assert config.text_config["hidden_size"] == 384
    assert loaded.image_embeddings.shape == (SMALL_INDEX, 512)
    assert loaded.text_embeddings.shape == (5 * SMALL_INDEX, 512)
    sizes = [len(loaded.thumbnails[row]) for row in range(SMALL_INDEX)]
    assert 8_000 < sum(sizes) / len(sizes) < 40_000  # photo-like: compresses like a 256 px photograph


def test_the_full_scale_defaults_are_flickr30k():
    assert FLICKR30K_IMAGES == 31_783 and sum(flickr_scale.SPLIT_SIZES.values()) == 31_783


def test_floor_finds_what_the_search_finds(tiny_searcher, tmp_path):
    """The floor ranks by its float16 scan alone, so it may swap rows whose scores float16 cannot tell apart (the
    search re-ranks those in float32); anything else is a floor doing other work than the search."""
    queries = make_queries(6, tmp_path)
    floor, ours = Floor(tiny_searcher, queries), InProcess(tiny_searcher, queries)
    searched = {
        "text_to_image": (tiny_searcher.image_embeddings, lambda i: tiny_searcher.text_query(queries.texts[i])),
        "image_to_text": (tiny_searcher.text_embeddings, lambda i: queries.images[i]),
        "image_to_image": (tiny_searcher.image_embeddings, lambda i: queries.images[i]),
    }
    for kind in KINDS:
        matrix, query_of = searched[kind]
        for index in range(6):
            query = query_of(index)
            vector = tiny_searcher.encode_text(query) if kind == "text_to_image" else tiny_searcher.encode_image(query)
            scores = matrix.float() @ vector
            found, wanted = getattr(floor, kind)(index), getattr(ours, kind)(index)
            assert len(found) == len(wanted) == query_latency.K
            torch.testing.assert_close(scores[found], scores[wanted], atol=1e-3, rtol=0, msg=(kind, index))
    # and the search's is the brute-force float32 ranking
    query = tiny_searcher.encode_text(tiny_searcher.text_query(queries.texts[0]))
    reference = torch.argsort(tiny_searcher.image_embeddings.float() @ query, descending=True)[: query_latency.K]
    assert ours.text_to_image(0) == reference.tolist()


@pytest.fixture(scope="module")
def noop_server(tiny_run, tmp_path_factory):
    log = tmp_path_factory.mktemp("noop_app") / "noop.log"
    server = start_app(tiny_run, log, env=SUBPROCESS_ENV, entry=["-m", "benchmarks.noop_app"])
    yield server
    server.process.terminate()
    server.process.wait(timeout=30)


def _query(kind: str, queries):
    return queries.texts[0] if kind == "text_to_image" else handle_file(queries.image_files[0])


def test_twins_answer_with_the_shape_of_the_real_endpoints(noop_server, tiny_searcher, tmp_path):
    client = Client(noop_server.url, verbose=False)
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {f"/{twin}_{kind}" for twin in ("noop", "floor") for kind in KINDS} <= set(endpoints)
    queries = make_queries(1, tmp_path)
    ids = bare_floor.ids_text(tokenize(tiny_searcher.tokenizer, queries.texts[:1], tiny_searcher.config))
    for kind in KINDS:
        real = client.predict(_query(kind, queries), query_latency.K, api_name=f"/{kind}")
        noop = client.predict(_query(kind, queries), query_latency.K, api_name=f"/noop_{kind}")
        floor_query = ids if kind == "text_to_image" else _query(kind, queries)
        floor = client.predict(floor_query, query_latency.K, api_name=f"/floor_{kind}")
        for twin in (noop, floor):
            assert len(twin[1]) == len(real[1]) == query_latency.K
            assert set(twin[1][0]) == set(real[1][0])  # the same JSON fields
            if kind == "image_to_text":
                assert len(twin[0]["data"]) == len(real[0]["data"])  # the same table
            else:
                assert len(twin[0]) == len(real[0])  # as many gallery files to download


def test_floor_twin_runs_the_text_tower_on_the_ids_it_is_sent(noop_server, tiny_searcher):
    client = Client(noop_server.url, verbose=False, download_files=False)
    vocabulary = tiny_searcher.config.text_config["vocab_size"]
    client.predict(f"2 {vocabulary - 1} 3", query_latency.K, api_name="/floor_text_to_image")  # in range: answered
    for not_ids in (f"2 {vocabulary} 3", "a dog in the snow", ""):  # past the embedding table, words, nothing
        with pytest.raises(AppError):
            client.predict(not_ids, query_latency.K, api_name="/floor_text_to_image")


def test_token_ids_as_text_are_what_tokenize_returns(tiny_searcher):
    captions = ["a red circle at the top left", "two dogs"]
    for caption in captions:
        tokens = tokenize(tiny_searcher.tokenizer, [caption], tiny_searcher.config)
        again = bare_floor.tokens_from_ids(bare_floor.ids_text(tokens))
        assert again.keys() == tokens.keys()
        assert all(torch.equal(again[name], tokens[name]) for name in tokens)


def test_interleave_turns_which_measure_goes_first():
    calls = []
    measures = [lambda index, name=name: calls.append((name, index)) for name in "abc"]
    timed = query_latency.interleave(measures, count=3, warmup=0)
    assert [len(seconds) for seconds in timed] == [3, 3, 3]
    assert calls == [(name, index) for index, names in enumerate(["abc", "bca", "cab"]) for name in names]


def test_measuring_client_answers_as_the_stock_one_and_is_woken_by_each_message(noop_server, tmp_path):
    queries = make_queries(1, tmp_path)
    stock = Client(noop_server.url, verbose=False, download_files=False)
    woken = measuring_client(noop_server.url, download_files=False)
    downloading = measuring_client(noop_server.url)
    for kind in KINDS:
        before = arrivals()
        ours = woken.predict(_query(kind, queries), query_latency.K, api_name=f"/{kind}")
        # at least "process_starts" and "process_completed" reached the waiting thread through a signalling deque
        assert arrivals() - before >= 2, kind
        before = arrivals()
        assert ours == stock.predict(_query(kind, queries), query_latency.K, api_name=f"/{kind}"), kind
        assert arrivals() == before  # a stock client in the same process keeps its own, unsignalled, deques
    gallery, results = downloading.predict(queries.texts[0], query_latency.K, api_name="/text_to_image")
    assert len(gallery) == len(results) == query_latency.K
    assert all(Path(item["image"]).is_file() for item in gallery)  # downloads still happen, after the answer


def test_measuring_client_parses_no_ca_bundle_per_call(noop_server, tmp_path, monkeypatch):
    loads = []
    load_verify_locations = ssl.SSLContext.load_verify_locations

    def counted(context, *args, **kwargs):
        loads.append(args or kwargs)
        return load_verify_locations(context, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", counted)
    query = make_queries(1, tmp_path).texts[0]
    stock, ours = Client(noop_server.url, verbose=False), measuring_client(noop_server.url)
    loads.clear()
    stock.predict(query, query_latency.K, api_name="/text_to_image")
    assert len(loads) >= 2 + query_latency.K  # the request, the message stream, each downloaded thumbnail
    loads.clear()
    gallery, _ = ours.predict(query, query_latency.K, api_name="/text_to_image")
    assert loads == [] and len(gallery) == query_latency.K


def test_script_prints_ratios_last_and_fails_a_missed_target(small_flickr_cache, monkeypatch, capsys):
    monkeypatch.setattr(query_latency, "LATENCY_TARGET", 0.0)  # no search is faster than nothing
    arguments = ["--cache", str(small_flickr_cache), "--images", str(SMALL_INDEX), "--queries", "3", "--startups", "1"]
    arguments += ["--client-queries", "3"]
    assert query_latency.main(arguments) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("ratios: in-process text_to_image")
    assert all(f"{flavour} {kind}" in lines[-1] for flavour in query_latency.CLIENTS for kind in KINDS)
    assert "stock" not in lines[-1]  # context rows, printed with no target
    flavours = len(query_latency.CLIENTS) + len(query_latency.CONTEXT_CLIENTS)
    served_floors = [line for line in lines if "(vs in-process)" in line and line.endswith("(context)")]
    assert len(served_floors) == flavours * len(KINDS)
    assert sum("stock json client" in line and line.endswith("(context)") for line in lines) == 2 * len(KINDS)
    assert sum("ms idle" in line and line.endswith("(context)") for line in lines) == 2 * len(KINDS)
    assert sum("again after the client rows" in line and line.endswith("(context)") for line in lines) == len(KINDS)
    scans = [line.split()[4] for line in lines if "scan + topk over" in line]  # each matrix's rows, two dtypes
    assert scans == [str(SMALL_INDEX)] * 2 + [str(5 * SMALL_INDEX)] * 2
    assert sum("float16" in line for line in lines if "scan + topk" in line) == 2
    assert "start-up extra s" in lines[-1]
    assert any(line.startswith("MISSED in-process image_to_text") for line in lines)


def test_queries_arriving_together_are_batched_and_a_bad_one_fails_only_itself(noop_server, tiny_searcher):
    """24 text queries at once, a third of them refusable: they share batches (the server's counts say so), each good
    one gets what it gets alone, and each bad one gets its own message."""
    texts = [tiny_searcher.captions_of[row][0] for row in range(0, 1200, 75)]
    queries = [(text, 3) for text in texts] + [("", 3), ("   ", 5), ("a green ring", 0), ("a red star", 99)] * 2

    async def run():
        client = load_test.GradioHttp(noop_server.url, connections=32)
        try:
            before = await client.batch_sizes()
            together = await asyncio.gather(*(client.call("text_to_image", [q, k]) for q, k in queries))
            after = await client.batch_sizes()
            alone = [await client.call("text_to_image", [q, k]) for q, k in queries]
        finally:
            await client.close()
        return before, together, after, alone

    before, together, after, alone = asyncio.run(run())
    counts = Counter(after["text_to_image"]) - Counter(before.get("text_to_image", {}))
    assert sum(size * n for size, n in counts.items()) == len(queries)
    assert max(counts) > 1, counts  # some arrived together and ran as one batch
    for (query, k), (event, outputs), (_, lone) in zip(queries, together, alone, strict=True):
        assert event == "complete", outputs
        if query.strip() and 1 <= k <= 50:
            assert [hit["image_id"] for hit in outputs[1]] == [hit["image_id"] for hit in lone[1]]
            assert [hit["score"] for hit in outputs[1]] == pytest.approx([hit["score"] for hit in lone[1]], abs=1e-4)
        else:
            assert outputs[0] == [] and re.search("Type a description|from 1 to 50", outputs[1]["error"]), outputs
