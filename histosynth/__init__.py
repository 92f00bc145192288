"""Shared core of histosynth: typed configs, image reading, tile cache, checkpoints."""
