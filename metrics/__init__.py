"""histosynth metrics: PIQ full-reference scores, distribution metrics, memorisation, piq-report."""
