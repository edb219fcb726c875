"""crossmodal Space: text -> image and image -> text search over Flickr30k, or over an index of your own pictures
(docs/architecture.md, "API endpoints").

    python app.py --artifacts runs/tiny/artifacts                       # a local artifact folder
    python app.py --artifacts runs/my-pictures                          # an index: python -m crossmodal index
    CROSSMODAL_ARTIFACTS=owner/name CROSSMODAL_REVISION=<sha> python app.py   # a Hub repo pinned to a commit

The artifacts are verified before the UI starts; if they fail, the app logs why and exits instead of serving a
half-working page. Public API endpoints: /text_to_image, /image_to_text, /image_to_image.
"""

from __future__ import annotations

import sys

from crossmodal.artifacts.integrity import add_source_arguments, prefetch_source

if __name__ == "__main__":
    # Start hashing the artifact files on the spare core now: the imports below keep the other one busy for seconds.
    prefetch_source(sys.argv[1:])

import argparse
import functools
import logging
import os
import signal
import tempfile
import threading
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import gradio as gr
from huggingface_hub import constants

from crossmodal.artifacts.contract import ArtifactError
from crossmodal.artifacts.hub import load_artifacts
from crossmodal.serving.compute import ComputeThread
from crossmodal.serving.page import example_queries, header, model_card_text, test_rows
from crossmodal.serving.search import IMAGE_CHUNK, MAX_K, CaptionHit, ImageHit, QueryError, Searcher, clean_text

logger = logging.getLogger("crossmodal.app")

MAX_UPLOAD = "10mb"
IMAGE_EXAMPLES = 3
# Queries per batch. The text tower costs 31 ms alone and 9.4 ms a query in eights on 2 cores; the image tower is
# cheapest per image in fours (crossmodal/serving/search.py, IMAGE_CHUNK).
TEXT_BATCH = 16
IMAGE_BATCH = IMAGE_CHUNK
Extension = Callable[[gr.Blocks, "Handlers"], None]


def friendly_errors(handler: Callable) -> Callable:
    """Turn our errors into a gr.Error the person can act on; anything unexpected is logged, never shown raw."""

    @functools.wraps(handler)
    def wrapped(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except QueryError as error:
            raise gr.Error(sentence(error), print_exception=False) from None
        except gr.Error:
            raise
        except Exception:
            logger.exception("unexpected error in %s", handler.__name__)
            raise gr.Error("Something went wrong on our side; please try again.", print_exception=False) from None

    return wrapped


def sentence(error: QueryError) -> str:
    message = str(error)
    return message[:1].upper() + message[1:]


def upload_bytes(value: object) -> bytes | None:
    """The raw bytes of an uploaded image, or None when there is none (Gradio has already checked that the path is in
    its upload folder)."""
    if not isinstance(value, dict) or not value.get("path"):
        return None
    try:
        return Path(value["path"]).read_bytes()
    except OSError:
        logger.warning("upload %s could not be read", value["path"])
        return None


class Handlers:
    """The app's event handlers over one shared, read-only Searcher; per-user data lives in gr.State only.

    Gradio calls them on its worker threads; every search goes to ``compute``, the thread that loaded the model
    (crossmodal/serving/compute.py says why that keeps searches at in-process speed). The three public searches are
    Gradio batch functions: each gets the queries that were waiting together (up to ``max_batch_size``) and returns
    one answer per query. A query we cannot answer is refused in its own slot, ``{"error": message}`` in place of its
    results list, so it never fails the others (Gradio fails a whole batch when its function raises); ``explain``
    turns that into the toast the browser shows.
    """

    def __init__(self, searcher: Searcher, media: Path, compute: ComputeThread) -> None:
        self.searcher = searcher
        self.media = media  # thumbnails served to the browser, each written once
        self.compute = compute
        self.batch_sizes: dict[str, Counter[int]] = defaultdict(Counter)  # endpoint -> batch size -> batches

    def thumbnail_file(self, row: int) -> str:
        """A stored thumbnail as a file Gradio can serve, written once and atomically.

        Handing Gradio PIL images instead makes it re-encode each one into the same cache file on every request, and
        two requests showing the same picture then race: a browser can fetch a half-written image.
        """
        path = self.media / f"thumbnail_{row}.jpg"
        if not path.exists():
            partial = path.with_suffix(f".{threading.get_ident()}.tmp")
            partial.write_bytes(self.searcher.thumbnail(row))
            os.replace(partial, path)
        return str(path)

    def _gallery(self, hits: list[ImageHit]) -> list[tuple[str, str]]:
        return [(self.thumbnail_file(hit.image_index), hit.label) for hit in hits]

    def _image_results(self, hits: list[ImageHit]):
        return self._gallery(hits), [hit.as_json() for hit in hits]

    def _image_answers(self, answers: list[list[ImageHit] | QueryError]):
        outputs = [
            ([], {"error": sentence(a)}) if isinstance(a, QueryError) else self._image_results(a) for a in answers
        ]
        return [gallery for gallery, _ in outputs], [results for _, results in outputs]

    # Batch functions: each argument is a list, one value per query. Their names are the API's parameter names.

    def text_to_image(self, query: list, k: list):
        self.batch_sizes["text_to_image"][len(query)] += 1
        return self._image_answers(self.compute.call(self.searcher.search_texts, query, k))

    def image_to_image(self, image: list, k: list):
        self.batch_sizes["image_to_image"][len(image)] += 1
        uploads = [upload_bytes(value) for value in image]
        return self._image_answers(self.compute.call(self.searcher.search_images, uploads, k, "image"))

    def image_to_text(self, image: list, k: list):
        self.batch_sizes["image_to_text"][len(image)] += 1
        uploads = [upload_bytes(value) for value in image]
        answers: list[list[CaptionHit] | QueryError] = self.compute.call(
            self.searcher.search_images, uploads, k, "text"
        )
        tables, results = [], []
        for answer in answers:
            if isinstance(answer, QueryError):
                tables.append([])
                results.append({"error": sentence(answer)})
            else:
                tables.append([[hit.rank, round(hit.score, 4), hit.caption, hit.image_id] for hit in answer])
                results.append([hit.as_json() for hit in answer])
        return tables, results

    def explain(self, results: list | dict | None, query: str | None = None) -> None:
        """After a search in the browser: a refused query's message as an error toast, or a warning that a long
        query was cut to what the model reads. UI only: API callers read the error from the results."""
        if isinstance(results, dict) and "error" in results:
            raise gr.Error(results["error"], print_exception=False)
        # The API's outputs are fixed (gallery, results), so the page asks the tokenizer again for this warning.
        if isinstance(query, str) and self.searcher.is_truncated(clean_text(query)):
            gr.Warning(f"Long query: only its first {self.searcher.config.max_text_length} word pieces were used.")

    def caption_images(self, results: list[dict] | None) -> list[tuple[str, str]]:
        """The images the found captions belong to, best first, each once (UI only: the API has the ids)."""
        seen: dict[str, str] = {}
        for result in results or []:
            if result["image_id"] is not None:  # an index's captions are the model's, of pictures not in it
                seen.setdefault(result["image_id"], f"#{result['rank']} · {result['caption']}")
        return [(self.thumbnail_file(self.searcher.row(image_id)), label) for image_id, label in seen.items()]

    def remember_selection(self, results: list[dict] | None, event: gr.SelectData) -> str | None:
        """Which result the person clicked, by image id (stable even if the results change)."""
        if not isinstance(results, list) or event.index is None or event.index >= len(results):
            return None
        return results[event.index]["image_id"]

    def more_like_this(self, image_id: str | None, k: int):
        if image_id is None:
            raise QueryError("click one of the results first, then ask for more like it")
        return self._image_results(self.compute.call(self.searcher.more_like, self.searcher.row(image_id), k))


def build_app(
    searcher: Searcher, source: str, media: Path, compute: ComputeThread, extend: Extension | None = None
) -> gr.Blocks:
    """The whole UI; ``media`` is a private folder for the files the browser is shown (it must be allowed).

    Searches run on ``compute``, which someone must ``serve``. ``extend(app, handlers)`` runs inside the Blocks once
    the UI is built: benchmarks add instrumentation that way.
    """
    handlers = Handlers(searcher, media, compute)
    described = "one of its captions" if searcher.artifacts.index is None else "its path in the folder"
    with gr.Blocks(title="crossmodal: text ↔ image search", delete_cache=(3600, 3600)) as app:
        gr.Markdown(header(searcher.artifacts, source))
        with gr.Accordion("About this model", open=False):
            gr.Markdown(model_card_text(searcher.artifacts))
        with gr.Tab("Text → Image"):
            with gr.Row():
                query = gr.Textbox(label="Describe a picture", placeholder="a dog running through the snow", scale=5)
                text_button = gr.Button("Search", variant="primary", scale=1)
            text_k = gr.Slider(1, MAX_K, value=10, step=1, label="How many results")
            gr.Examples(example_queries(searcher), inputs=query, label="Try")
            gallery = gr.Gallery(label=f"Best matches (rank · similarity · {described})", columns=5, height="auto")
            selected = gr.State(None)
            more_button = gr.Button("More like the selected image")
            with gr.Accordion("Results as JSON", open=False):
                gallery_json = gr.JSON(label="results")
        with gr.Tab("Image → Text" if searcher.artifacts.index is None else "Search by image"):
            with gr.Row():
                image = gr.Image(
                    label="Your image", type="filepath", image_mode=None, sources=["upload", "webcam", "clipboard"]
                )
                with gr.Column():
                    image_k = gr.Slider(1, MAX_K, value=10, step=1, label="How many results")
                    image_button = gr.Button("Find captions", variant="primary")
                    examples = [handlers.thumbnail_file(row) for row in test_rows(searcher, IMAGE_EXAMPLES)]
                    gr.Examples(examples, inputs=image, label="Try")
            table = gr.Dataframe(
                headers=["rank", "score", "caption", "image"], datatype=["number", "number", "str", "str"],
                interactive=False, wrap=True, label="Captions that describe it best",
            )  # fmt: skip
            owners = gr.Gallery(
                label="The images those captions describe", columns=5, height="auto",
                visible=searcher.artifacts.index is None,  # an index's captions describe none of its pictures
            )  # fmt: skip
            similar = gr.Gallery(label="Visually similar images", columns=5, height="auto")
            with gr.Accordion("Results as JSON", open=False):
                table_json = gr.JSON(label="captions")
                similar_json = gr.JSON(label="similar images")

        # The public searches are batched (Handlers says how a refused query stays in its own slot); preprocess=False:
        # our checks, not the components', refuse bad input, since a component's error would fail the whole batch.
        text_search = gr.on(
            [query.submit, text_button.click], friendly_errors(handlers.text_to_image), [query, text_k],
            [gallery, gallery_json], api_name="text_to_image", batch=True, max_batch_size=TEXT_BATCH,
            preprocess=False,
        )  # fmt: skip
        text_search.success(handlers.explain, [gallery_json, query], None, api_visibility="private")
        more = more_button.click(
            friendly_errors(handlers.more_like_this), [selected, text_k], [gallery, gallery_json],
            api_visibility="private",
        )  # fmt: skip
        for event in (text_search, more):  # a selection points into the results it was made in, and those are gone
            event.success(lambda: None, None, selected, api_visibility="private")
        gallery.select(handlers.remember_selection, gallery_json, selected, api_visibility="private")
        captions_found = image_button.click(
            friendly_errors(handlers.image_to_text), [image, image_k], [table, table_json],
            api_name="image_to_text", batch=True, max_batch_size=IMAGE_BATCH,
            preprocess=False,  # our decoder, not Pillow's defaults, reads the upload
        )  # fmt: skip
        captions_explained = captions_found.success(handlers.explain, table_json, None, api_visibility="private")
        captions_explained.success(handlers.caption_images, table_json, owners, api_visibility="private")
        captions_explained.success(
            friendly_errors(handlers.image_to_image), [image, image_k], [similar, similar_json],
            api_name="image_to_image", batch=True, max_batch_size=IMAGE_BATCH, preprocess=False,
        )  # fmt: skip
        if extend is not None:
            extend(app, handlers)
    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(parser)
    parser.add_argument("--host", default=None, help="default: GRADIO_SERVER_NAME or 127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help="default: GRADIO_SERVER_PORT or 7860")
    args = parser.parse_args(argv)
    if not args.artifacts:
        parser.error("pass --artifacts PATH_OR_REPO or set CROSSMODAL_ARTIFACTS")
    return args


def main(argv: list[str] | None = None, extend: Extension | None = None) -> int:
    # 1. Where the artifacts come from.
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    stop_on_sigterm()

    # 2. Verify before serving: a folder that fails is never half-served. This thread loads the model, so it is the
    #    one that runs every search later (crossmodal/serving/compute.py).
    compute = ComputeThread()
    try:
        artifacts = load_artifacts(args.artifacts, args.revision)
    except (ArtifactError, ValueError) as error:
        logger.error("refusing to start: %s", error)
        return 1
    searcher = Searcher(artifacts)
    logger.info("serving %s: %d images, %d captions", artifacts.folder, len(searcher.image_ids), len(searcher.captions))

    # 3. Launch with bounded work per request and nothing private reachable over HTTP.
    with tempfile.TemporaryDirectory(prefix="crossmodal-media-") as media:
        # Gradio serves files of a static path where they lie; any other file an answer names is hashed and copied
        # into its cache on every answer (10 thumbnails a search). The folder holds only thumbnails we wrote.
        gr.set_static_paths([media])
        app = build_app(searcher, args.artifacts, Path(media), compute, extend)
        # One search at a time, each with every core (the compute thread runs them one by one anyway); queued
        # requests wait their short turn in Gradio's queue, which tells the browser its place.
        # After every request Gradio rebuilds a pandas summary of up to 10,000 past ones for its monitoring page,
        # which this app turns off: 3-12 ms of CPU each, growing with traffic, on the cores the next search needs.
        os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", str(sys.maxsize))
        app.queue(max_size=64, default_concurrency_limit=1)
        app.launch(
            server_name=args.host,
            server_port=args.port,
            max_file_size=MAX_UPLOAD,
            enable_monitoring=False,
            show_error=True,
            blocked_paths=[str(artifacts.folder.resolve()), constants.HF_HUB_CACHE, str(Path(__file__).resolve())],
            allowed_paths=[media],
            footer_links=["api"],
            prevent_thread_lock=True,  # this thread is needed to search: see serve_until_closed
        )
        serve_until_closed(app, compute)
    return 0


def stop_on_sigterm() -> None:
    """SIGTERM (a Space restarting, ``kill``, a process manager) stops the app as Ctrl-C does: the server closes and
    the media folder is deleted. Python's default ends the process at once and leaves the folder behind, every
    thumbnail ever shown in it (hundreds of MB at Flickr scale)."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
        signal.signal(signal.SIGTERM, interrupt)


def serve_until_closed(app: gr.Blocks, compute: ComputeThread) -> None:
    """Run the searches on this thread while the server runs (what ``launch`` would otherwise block on idly)."""
    try:
        compute.serve(until=lambda: not app.is_running)
    except KeyboardInterrupt:
        logger.info("interrupted: closing the server")
    finally:
        app.close()


if __name__ == "__main__":
    sys.exit(main())
