"""Shared core of histosynth: typed configs, image reading, tile cache, checkpoints."""

import os

# Nothing reaches the network at run time: albumentations otherwise asks PyPI for its latest
# version when it is imported (and waits for the answer on a machine that has no network).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
