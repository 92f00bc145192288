"""histosynth GANs: class-conditional DCGAN / SNGAN / WGAN-GP on one training loop."""

from gans import dcgan, sngan, wgan_gp  # noqa: F401  (register the families)
from gans.registry import create_model, get_family, list_families

__all__ = ["create_model", "get_family", "list_families"]
