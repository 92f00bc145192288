"""Pretrained weights from the libraries' own caches, never from the network at run time.

torchvision and efficientnet-pytorch keep their ImageNet weights in torch's hub cache
(``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch/hub/checkpoints``) under the file name
of their download URL; timm and segmentation-models-pytorch keep theirs in the Hugging Face
cache (``$HF_HOME``). :func:`torch_hub_file` finds a file in the first, :func:`offline_hub`
makes the Hugging Face hub answer from the second only. A missing file is a
:class:`WeightsNotCached` error that names the file, where it goes and where to download it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from histosynth.errors import UserError


class WeightsNotCached(UserError, FileNotFoundError):
    """Pretrained weights asked for are not in the library's cache; the message says what to fetch."""


def torch_hub_file(url: str, what: str) -> Path:
    """The cached file of ``url`` in torch's hub cache, or WeightsNotCached naming it."""
    import torch

    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / os.path.basename(url)
    if not path.is_file():
        raise WeightsNotCached(f"{what}: {path.name} is not in torch's cache {folder} (nothing is downloaded at "
                               f"run time); download {url} into that folder once (or set TORCH_HOME), or set "
                               "model.weights to a local file or null")
    return path


@contextlib.contextmanager
def offline_hub():
    """The Hugging Face hub in offline mode for the block: the cache or an error, at once
    (huggingface_hub reads HF_HUB_OFFLINE when it is imported, so its constant is switched too)."""
    from huggingface_hub import constants
    before, env = constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before
        if env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = env


def hf_cache_dir() -> str:
    return os.environ.get("HF_HOME", "~/.cache/huggingface")
