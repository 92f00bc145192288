"""histosynth experiments (see the README's roadmap)."""
