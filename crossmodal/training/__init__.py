"""Training: one run of the recipe under Accelerate: setting it up, the training pairs and their loader, augmentation,
locked towers' features, the optimizer, the symmetric contrastive loss, the loop, checkpoints that resume mid-epoch.

May import: ``crossmodal.encoding`` (validation and test Recall@K), ``crossmodal.model``, ``crossmodal.data``,
``crossmodal.config``. Not ``crossmodal.artifacts``: train_accelerate.py writes the artifact folder from what
:func:`crossmodal.training.loop.train` returns.
"""
