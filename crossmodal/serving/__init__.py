"""Serving: what app.py serves: the search core over verified artifacts, the one thread all torch work runs on, and
the page's words (header, examples, card).

May import: ``crossmodal.artifacts``, ``crossmodal.model``, ``crossmodal.data``, ``crossmodal.config``; not
encoding, training or index, so the app loads none of their code.
"""
