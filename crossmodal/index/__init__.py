"""Index: your own pictures as an artifact folder (docs/architecture.md, "Indexing your own pictures"): the walk of
the folder, the plan of what to embed, the embedding as a stream, the writing and the swap into place, and
``python -m crossmodal index``.

May import: ``crossmodal.encoding``, ``crossmodal.artifacts``, ``crossmodal.model``, ``crossmodal.data``,
``crossmodal.config``; not serving or training.
"""
