"""The query-latency benchmark measures the right things: no timing is asserted, only what is timed.

Its floor must find what the search finds, its no-op and floor twins must move answers of the same shape as the real
endpoints through the benchmark's raw HTTP client (the floor twins running the floor on what they are sent), its
Flickr-scale folder must be a real artifact folder of the default architecture, and the script must print every
target, carry their ratios in its last line and fail when a target is missed.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter

import pytest
import torch

from benchmarks import bare_floor, flickr_scale, query_latency
from benchmarks.common import FLICKR30K_IMAGES
from benchmarks.gradio_http import GradioHttp
from benchmarks.live_server import start_app
from benchmarks.query_latency import KINDS, Floor, InProcess, make_queries
from crossmodal.artifacts.contract import load_verified
from crossmodal.model.dual_encoder import tokenize
from crossmodal.serving.search import Searcher
from tests.conftest import SUBPROCESS_ENV

SMALL_INDEX = 40  # images; the script's --images


@pytest.fixture(scope="module")
def small_flickr_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("flickr_scale")
    flickr_scale.ensure(cache, SMALL_INDEX)
    return cache


@pytest.fixture(scope="module")
def tiny_searcher(tiny_run):
    return Searcher(load_verified(tiny_run))


def test_flickr_scale_folder_is_a_verified_default_architecture_index(small_flickr_cache):
    folder = flickr_scale.ensure(small_flickr_cache, SMALL_INDEX)  # reused, not rebuilt
    loaded = load_verified(folder)  # files, weights, shapes, unit norms, golden self-test
    config = loaded.config
    assert config.image_tower == "efficientnet_b0.ra_in1k" and config.embed_dim == 512
    assert config.text_config["vocab_size"] == 30522 and config.text_config["num_hidden_layers"] == 12
    assert config.text_config["hidden_size"] == 384
    assert loaded.image_embeddings.shape == (SMALL_INDEX, 512)
    assert loaded.text_embeddings.shape == (5 * SMALL_INDEX, 512)
    sizes = [len(loaded.thumbnails[row]) for row in range(SMALL_INDEX)]
    assert 8_000 < sum(sizes) / len(sizes) < 40_000  # photo-like: compresses like a 256 px photograph


def test_the_full_scale_defaults_are_flickr30k():
    assert FLICKR30K_IMAGES == 31_783 and sum(flickr_scale.SPLIT_SIZES.values()) == 31_783


def encode_text(searcher: Searcher, text: str) -> torch.Tensor:
    with torch.inference_mode():
        return searcher.model.encode_text(**tokenize(searcher.tokenizer, [text], searcher.config))[0].float()


def test_floor_finds_what_the_search_finds(tiny_searcher):
    """The floor ranks by its float16 scan alone, so it may swap rows whose scores float16 cannot tell apart (the
    search re-ranks those in float32); anything else is a floor doing other work than the search."""
    queries = make_queries(6)
    floor, ours = Floor(tiny_searcher, queries), InProcess(tiny_searcher, queries)
    searched = {
        "text_to_image": (tiny_searcher.image_embeddings, lambda i: queries.texts[i]),
        "image_to_text": (tiny_searcher.text_embeddings, lambda i: queries.images[i]),
        "image_to_image": (tiny_searcher.image_embeddings, lambda i: queries.images[i]),
    }
    for kind in KINDS:
        matrix, query_of = searched[kind]
        for index in range(6):
            query = query_of(index)
            vector = encode_text(tiny_searcher, query) if kind == "text_to_image" else tiny_searcher.encode_image(query)
            scores = matrix.float() @ vector
            found, wanted = getattr(floor, kind)(index), getattr(ours, kind)(index)
            assert len(found) == len(wanted) == query_latency.K
            torch.testing.assert_close(scores[found], scores[wanted], atol=1e-3, rtol=0, msg=(kind, index))
    # and the search's is the brute-force float32 ranking
    query = encode_text(tiny_searcher, queries.texts[0])
    reference = torch.argsort(tiny_searcher.image_embeddings.float() @ query, descending=True)[: query_latency.K]
    assert ours.text_to_image(0) == reference.tolist()


@pytest.fixture(scope="module")
def noop_server(tiny_run, tmp_path_factory):
    log = tmp_path_factory.mktemp("noop_app") / "noop.log"
    server = start_app(tiny_run, log, env=SUBPROCESS_ENV, entry=["-m", "benchmarks.noop_app"])
    yield server
    server.process.terminate()
    server.process.wait(timeout=30)


def _search(server, endpoint: str, query, files: bool = False):
    """One search through the benchmark's client: ``(outcome, outputs)``."""

    async def run():
        client = GradioHttp(server.url, connections=query_latency.K)
        try:
            return await client.search(endpoint, query, query_latency.K, files)
        finally:
            await client.close()

    return asyncio.run(run())


def test_twins_answer_with_the_shape_of_the_real_endpoints(noop_server, tiny_searcher):
    queries = make_queries(1)
    ids = bare_floor.ids_text(tokenize(tiny_searcher.tokenizer, queries.texts[:1], tiny_searcher.config))
    for kind in KINDS:
        query = queries.texts[0] if kind == "text_to_image" else queries.images[0]
        sent = {kind: query, f"noop_{kind}": query, f"floor_{kind}": ids if kind == "text_to_image" else query}
        answers = {endpoint: _search(noop_server, endpoint, data, files=True) for endpoint, data in sent.items()}
        assert all(outcome == "complete" for outcome, _ in answers.values()), answers  # every gallery file fetched
        real = answers[kind][1]
        for twin in (answers[f"noop_{kind}"][1], answers[f"floor_{kind}"][1]):
            assert len(twin[1]) == len(real[1]) == query_latency.K
            assert set(twin[1][0]) == set(real[1][0])  # the same JSON fields
            if kind == "image_to_text":
                assert len(twin[0]["data"]) == len(real[0]["data"])  # the same table
            else:
                assert len(twin[0]) == len(real[0])  # as many gallery files to fetch


def test_floor_twin_runs_the_text_tower_on_the_ids_it_is_sent(noop_server, tiny_searcher):
    vocabulary = tiny_searcher.config.text_config["vocab_size"]
    assert _search(noop_server, "floor_text_to_image", f"2 {vocabulary - 1} 3")[0] == "complete"  # in range
    for not_ids in (f"2 {vocabulary} 3", "a dog in the snow", ""):  # past the embedding table, words, nothing
        assert _search(noop_server, "floor_text_to_image", not_ids)[0] == "error", not_ids


def test_a_client_measure_fails_on_an_answer_that_is_not_k_results(noop_server):
    """A timed request that got an error, or a refusal in its results' place, stops the benchmark."""
    loop = asyncio.new_event_loop()
    client = GradioHttp(noop_server.url, connections=1)
    queries = query_latency.Queries(texts=["a red circle", "", "not token ids"], images=[])
    try:
        query_latency.served(loop, client, "text_to_image", queries, False, queries.texts)(0)  # answered
        with pytest.raises(RuntimeError, match="did not answer"):
            query_latency.served(loop, client, "text_to_image", queries, False, queries.texts)(1)  # refused
        with pytest.raises(RuntimeError, match="did not answer"):
            query_latency.served(loop, client, "floor_text_to_image", queries, False, queries.texts)(2)  # error
    finally:
        loop.run_until_complete(client.close())
        loop.close()


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


def test_script_prints_every_target_and_ratios_last_and_fails_a_missed_target(small_flickr_cache, monkeypatch, capsys):
    monkeypatch.setattr(query_latency, "LATENCY_TARGET", 0.0)  # no search is faster than nothing
    arguments = ["--cache", str(small_flickr_cache), "--images", str(SMALL_INDEX), "--queries", "3", "--startups", "1"]
    arguments += ["--client-queries", "3"]
    assert query_latency.main(arguments) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    names = [f"in-process {kind}" for kind in KINDS]
    names += [f"{flavour} {kind}" for flavour in query_latency.CLIENTS for kind in KINDS]
    names += ["start-up extra s", "start-up extra GB"]
    assert re.fullmatch("ratios: " + ", ".join(f"{name} \\S+" for name in names), lines[-1]), lines[-1]
    described = lines[-1 - len(names) : -1]  # each target's line, in the same order, just before
    assert [line.split(" (target")[0].rsplit(" ", 1)[0] for line in described] == names
    assert all(line.endswith(": MISSED") for line in described[:3])  # in-process, at 0.0 (a client's can be < 0)
    assert sum(" floor twin " in line for line in lines) == len(query_latency.CLIENTS) * len(KINDS)  # their rows


def test_queries_arriving_together_are_batched_and_a_bad_one_fails_only_itself(noop_server, tiny_searcher):
    """24 text queries at once, a third of them refusable: they share batches (the server's counts say so), each good
    one gets what it gets alone, and each bad one gets its own message."""
    texts = [tiny_searcher.captions_of[row][0] for row in range(0, 1200, 75)]
    queries = [(text, 3) for text in texts] + [("", 3), ("   ", 5), ("a green ring", 0), ("a red star", 99)] * 2

    async def run():
        client = GradioHttp(noop_server.url, connections=32)
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
