"""The app exactly as users launch it, plus a no-op twin of each endpoint: the framework's own cost per request.

    python -m benchmarks.noop_app --artifacts PATH --port 7861      # same flags as app.py

Each twin takes the same inputs as its endpoint (the client uploads the same image) and returns an answer of the same
shape and size, computed at start-up, but searches nothing. Timed through ``gradio_client`` it measures what Gradio
and the client cost for that request: the queue, the upload, the JSON, the gallery files the client downloads.
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

K = 10
GALLERY_ANSWERS = 1000  # over what a run asks for (2 clients x 2 gallery kinds x 103): every answer brings new files


def add_noop_endpoints(blocks: gr.Blocks, handlers: app.Handlers) -> None:
    """No-op twins of the three endpoints, answering from answers computed here, once.

    Gallery answers are the neighbours of a different stored image each time ("more like this", which encodes
    nothing), so, like real answers, each one hands Gradio thumbnail files it has to bring into its cache.
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


if __name__ == "__main__":
    sys.exit(app.main(extend=add_noop_endpoints))
