"""crossmodal: CLIP-style text<->image retrieval, one sub-package per stage (docs/architecture.md, "Where each stage
lives").

The layers, highest first; a package imports only from the layers below it, and the packages of one layer never
import each other. ``lint-imports`` checks this (pyproject.toml, ``[tool.importlinter]``):

    serving | index | training | synthetic    the app's search, your own pictures, the training run, the generator
    encoding                                  embedding whole splits, Recall@K, evaluating an artifact folder
    artifacts                                 the artifact folder: its contract, writing, verifying, the Hub
    model                                     the towers, tokenizer, eval transform and pinned checkpoints
    data                                      the dataset schema, its checks, decoding untrusted image bytes
    config                                    the shared vocabulary: model and training configs, presets

The commands are ``python -m crossmodal <command>`` (crossmodal/__main__.py). Importing this package imports nothing
else: the app's entry point hashes the artifacts before its heavy imports (crossmodal/artifacts/integrity.py).
"""
