"""The app exactly as users launch it, plus two twins of each endpoint: the framework's cost, and the floor's, served.

    python -m benchmarks.noop_app --artifacts PATH --port 7861      # same flags as app.py

No-op twins (``/noop_<kind>``) take the same inputs as their endpoint (the client uploads the same image) and return
an answer of the same shape and size, computed at start-up, but search nothing. Timed through ``gradio_client`` they
measure what Gradio and the client cost for that request: the queue, the upload, the JSON, the gallery files the
client downloads.

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

from crossmodal.integrity import prefetch_source

if __name__ == "__main__":
    prefetch_source(sys.argv[1:])  # as app.py does

import gradio as gr

import app
from benchmarks import bare_floor
from crossmodal.preprocess import decode_for_eval, image_batch

K = 10
GALLERY_ANSWERS = 8  # taken in turn: Gradio has their files in its cache after the first calls


def add_twins(blocks: gr.Blocks, handlers: app.Handlers) -> None:
    """No-op and floor twins of the three endpoints, answering from answers computed here, once.

    Gallery answers are the neighbours of a few stored images ("more like this", which encodes nothing), taken in
    turn, so Gradio has their files in its cache after the first calls: the twins pay the framework's cost at its
    cheapest, and bringing a real answer's new files into the cache counts against the endpoint. (The benchmark's
    random-weight index answers 100 text queries with 41 distinct images, so fresh files for every twin answer would
    have favoured the endpoint: 0-3 ms a call, measured.)
    """
    searcher = handlers.searcher
    rows = range(min(GALLERY_ANSWERS, len(searcher.image_ids)))
    galleries = itertools.cycle([handlers.more_like_this(searcher.image_ids[row], K) for row in rows])
    caption_answer = handlers.image_to_text({"path": handlers.thumbnail_file(0)}, K)
    with gr.Column(visible=False):
        query, image, k = gr.Textbox(), gr.Image(type="filepath", image_mode=None), gr.Slider(1, app.MAX_K, value=K)
        gallery, table, results = gr.Gallery(), gr.Dataframe(), gr.JSON()
    button = gr.Button(visible=False)
    button.click(lambda query, k: next(galleries), [query, k], [gallery, results], api_name="noop_text_to_image")
    button.click(
        lambda image, k: caption_answer, [image, k], [table, results], api_name="noop_image_to_text", preprocess=False
    )
    button.click(
        lambda image, k: next(galleries), [image, k], [gallery, results], api_name="noop_image_to_image",
        preprocess=False,
    )  # fmt: skip

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
