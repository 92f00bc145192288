"""Registry of model families and the ``create_model`` factory (timm style).

A family file registers itself with ``@register_family``; importing :mod:`gans` imports every
family file, so ``list_families()`` is complete. A family knows how to build its networks and
which loss its paper used (``default_loss``, used when the config says ``loss.type: auto``).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

RESOLUTIONS = (32, 64, 128)


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[..., tuple[nn.Module, nn.Module]]  # (image_size, num_classes, z_dim, ch) -> (G, D)
    default_loss: str
    paper: str


_FAMILIES: dict[str, Family] = {}


def register_family(name: str, default_loss: str, paper: str):
    def deco(fn: Callable[..., tuple[nn.Module, nn.Module]]):
        if name in _FAMILIES:
            raise ValueError(f"model family {name!r} is registered twice")
        _FAMILIES[name] = Family(name, fn, default_loss, paper)
        return fn
    return deco


def list_families() -> list[str]:
    return sorted(_FAMILIES)


def get_family(name: str) -> Family:
    if name not in _FAMILIES:
        close = difflib.get_close_matches(name, list(_FAMILIES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown model family {name!r}{hint} (registered: {', '.join(list_families())})")
    return _FAMILIES[name]


def create_model(family: str, image_size: int = 64, num_classes: int = 0, z_dim: int = 128,
                 ch: int = 64) -> tuple[nn.Module, nn.Module]:
    """(generator, discriminator) of ``family``; ``num_classes=0`` makes them unconditional.

    The generator maps ``(z: B x z_dim, y: B or None)`` to ``B x 3 x S x S`` in [-1, 1]; the
    discriminator maps ``(x, y)`` to one logit per image.
    """
    if image_size not in RESOLUTIONS:
        raise ValueError(f"image_size {image_size} is not supported; choose one of {RESOLUTIONS}")
    return get_family(family).build(image_size=image_size, num_classes=num_classes, z_dim=z_dim, ch=ch)
