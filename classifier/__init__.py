"""histosynth classifier (see the README's roadmap)."""
