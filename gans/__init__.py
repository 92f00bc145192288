"""histosynth generators: class-conditional DCGAN / SNGAN / WGAN-GP and CycleGAN, on one engine."""

from gans.registry import create_model, get_family, list_families

__all__ = ["create_model", "get_family", "list_families"]
