"""histosynth metrics (see the README's roadmap)."""
