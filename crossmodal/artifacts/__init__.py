"""Artifacts: the artifact folder (docs/architecture.md, "Artifact folder"): its contract and verified loading, writing
it once after training, its sha256s, thumbnails, model card and plots, and the Hub boundary (pull and push).

May import: ``crossmodal.model``, ``crossmodal.data``, ``crossmodal.config``. Reading (contract, hub, integrity,
thumbnails) stays apart from writing (export, model_card, plots) so the app never imports what only writing needs.
"""
