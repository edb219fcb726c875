"""The app exactly as users launch it, plus two twins of each endpoint: the framework's cost, and the floor's, served.

    python -m benchmarks.noop_app --artifacts PATH --port 7861      # same flags as app.py

No-op twins (``/noop_<kind>``) take the same inputs as their endpoint (the client uploads the same image) and return
an answer of the same shape and size, computed at start-up, but search nothing, one request at a time (as the
endpoints did before they were batched). ``/batch_sizes`` reports how many batches of each size every
endpoint and twin has run (``benchmarks.load_test`` reads it). Timed through a client, the no-op twins measure
what Gradio and the client cost for that request: the queue, the upload, the JSON, the gallery files it fetches.

Floor twins (``/floor_<kind>``) do what the no-op twins do and, on the compute thread as a search would, also run
the query's floor (``benchmarks.bare_floor``): the bare tower on a prepared input, then ``topk``. Text -> image's
takes the query's token ids as text (the client tokenizes); the image ones take the same upload and run the tower on
an image prepared at start-up (an EfficientNet costs the same whatever the pixels). Timed next to the no-op twin,
each gives the floor as the server meets it: after the same pause between requests, on the same cold cores.

Only this launcher has the twins; ``python app.py`` serves the three public endpoints alone.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable

from crossmodal.artifacts.integrity import prefetch_source

if __name__ == "__main__":
    prefetch_source(sys.argv[1:])  # as app.py does

import gradio as gr

import app
from benchmarks import bare_floor
from crossmodal.model.preprocess import decode_for_eval, image_batch

K = 10
GALLERY_ANSWERS = 8  # taken in turn: Gradio has their files in its cache after the first calls


def add_twins(blocks: gr.Blocks, handlers: app.Handlers) -> None:
    """No-op and floor twins of the three endpoints, answering from answers computed here, once.

    Gallery answers are the neighbours of a few stored images ("more like this", which encodes nothing), taken in
    turn. Their thumbnails lie in the app's media folder, which Gradio serves as a static path, like every answer's:
    a twin pays what the endpoint pays to show a picture, except writing a new thumbnail the first time it is shown.
    """
    searcher = handlers.searcher
    rows = range(min(GALLERY_ANSWERS, len(searcher.image_ids)))
    galleries = itertools.cycle([handlers.more_like_this(searcher.image_ids[row], K) for row in rows])
    tables, table_results = handlers.image_to_text([{"path": handlers.thumbnail_file(0)}], [K])
    caption_answer = (tables[0], table_results[0])
    with gr.Column(visible=False):
        query, image, k = gr.Textbox(), gr.Image(type="filepath", image_mode=None), gr.Slider(1, app.MAX_K, value=K)
        gallery, table, results = gr.Gallery(), gr.Dataframe(), gr.JSON()
    button = gr.Button(visible=False)

    def twin(name: str, answer: Callable[[], tuple]) -> Callable:
        """A no-op that answers one request at a time, as every endpoint did before batching: what the framework
        costs per request (the reference of the load benchmark's throughput target)."""

        def answer_one(query, k):
            handlers.batch_sizes[name][1] += 1
            return answer()

        return answer_one

    twins = [
        ("noop_text_to_image", query, gallery, lambda: next(galleries)),
        ("noop_image_to_text", image, table, lambda: caption_answer),
        ("noop_image_to_image", image, gallery, lambda: next(galleries)),
    ]
    for name, source, shown, answer in twins:
        button.click(twin(name, answer), [source, k], [shown, results], api_name=name, preprocess=False)

    def batch_sizes() -> dict[str, dict[str, int]]:
        return {name: {str(size): n for size, n in counts.items()} for name, counts in handlers.batch_sizes.items()}

    button.click(batch_sizes, None, results, api_name="batch_sizes")

    pixels = image_batch([decode_for_eval(searcher.thumbnail(0), searcher.config)], searcher.config)

    def floor_text_to_image(ids: str, k: int):
        handlers.compute.call(bare_floor.text_to_image, searcher, bare_floor.tokens_from_ids(ids), int(k))
        return next(galleries)

    def floor_image_to_text(image, k: int):
        handlers.compute.call(bare_floor.image_to_text, searcher, pixels, int(k))
        return caption_answer

    def floor_image_to_image(image, k: int):
        handlers.compute.call(bare_floor.image_to_image, searcher, pixels, int(k))
        return next(galleries)

    button.click(floor_text_to_image, [query, k], [gallery, results], api_name="floor_text_to_image")
    button.click(floor_image_to_text, [image, k], [table, results], api_name="floor_image_to_text", preprocess=False)
    button.click(
        floor_image_to_image, [image, k], [gallery, results], api_name="floor_image_to_image", preprocess=False
    )


if __name__ == "__main__":
    sys.exit(app.main(extend=add_twins))
