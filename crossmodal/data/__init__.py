"""Data: rows in the Flickr30k dataset schema, loaded from the Hub or a local folder and checked (schema, bad rows),
and the one decoder every untrusted image goes through.

May import: ``crossmodal.config``. Nothing here knows of a model.
"""
