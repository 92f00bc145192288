"""histosynth segmentation: a U-Net downstream task for augment-compare (nuclei, glands, regions)."""
