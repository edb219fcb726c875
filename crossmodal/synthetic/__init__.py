"""Synthetic: a generated image-caption dataset in exactly the Flickr30k schema (``python -m crossmodal synthetic``):
the scenes, how a scene is drawn, how it is captioned, and the splits written to disk.

May import: ``crossmodal.data``, ``crossmodal.config`` (today it needs neither). Nothing in the library imports it:
it is a source of data, like the Hub.
"""
