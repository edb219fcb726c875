"""Encoding: whole splits through the towers (batched, on every core or the accelerator), their Recall@K under the
Flickr30k protocol, and ``python -m crossmodal evaluate`` over an artifact folder.

It sits below training because training evaluates validation and test with it, and above artifacts because the
evaluate command reads an artifact folder.

May import: ``crossmodal.artifacts``, ``crossmodal.model``, ``crossmodal.data``, ``crossmodal.config``.
"""
