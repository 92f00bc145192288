"""Typed configuration of a segmenter: ``model`` and ``train`` sections (the ``downstream:``
section of an augment-compare config with ``task: segmentation``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from histosynth.config import require, require_choice

ARCHS = ("Unet", "UnetPlusPlus", "FPN", "Linknet", "DeepLabV3Plus")
DECODER_ARCHS = ("Unet", "UnetPlusPlus")      # those whose decoder_channels is one width per block


@dataclass
class SegmenterModelConfig:
    arch: str = "Unet"
    """segmentation-models-pytorch architecture: Unet | UnetPlusPlus | FPN | Linknet | DeepLabV3Plus."""
    encoder: str = "resnet18"
    """Its encoder (any smp encoder name): resnet18 / resnet34 give the residual-encoder U-Net;
    vgg11_bn a plain convolutional U-Net encoder as in Ronneberger et al. 2015."""
    encoder_weights: Optional[str] = None
    """null: from scratch; ``imagenet``: the library's own ImageNet weights from its cache
    (Hugging Face hub cache; never downloaded at run time: a missing file is a one-line error that
    says how to fetch it once); or a local state-dict file."""
    tile_size: int = 256
    """Training images are cut once into tiles of this side (overlapping a little where it does
    not divide the image; synthetic pairs should be this size); training crops are cut from them."""
    image_size: int = 224
    """Side of the random training crops (a multiple of 32). Validation and test images are
    predicted whole (see eval.window), at their native resolution."""
    decoder_channels: Optional[list[int]] = None
    """Unet / UnetPlusPlus: the five decoder blocks' widths, deepest first; null: the library's
    (256, 128, 64, 32, 16). Most of a U-Net's arithmetic is its decoder at full resolution:
    [128, 64, 32, 16, 8] trains a resnet18 U-Net in ~0.7x the time (2-core CPU, 128 px crops)."""

    def __post_init__(self):
        require_choice(self.arch, ARCHS, "arch", "a segmentation-models-pytorch architecture")
        require(self.image_size % 32 == 0 and self.image_size >= 64, "image_size",
                f"must be a multiple of 32 and >= 64, got {self.image_size}")
        require(self.tile_size >= self.image_size, "tile_size",
                f"must be >= image_size ({self.image_size}), got {self.tile_size}")
        if self.decoder_channels is not None:
            require(self.arch in DECODER_ARCHS, "decoder_channels",
                    f"applies to {' / '.join(DECODER_ARCHS)}, not {self.arch}; set it to null")
            require(len(self.decoder_channels) == 5 and min(self.decoder_channels) >= 1, "decoder_channels",
                    f"must be five widths >= 1 (one per decoder block, deepest first), got {self.decoder_channels}")


@dataclass
class SegmenterTrainConfig:
    steps: int = 1500
    """Optimizer steps (one batch of random crops each)."""
    batch_size: int = 8
    """Crops per step, over all torchrun processes together."""
    lr: float = 1.0e-3
    weight_decay: float = 1.0e-4
    warmup_steps: int = 100
    evaluate_every: int = 250
    """Validation Dice on the whole validation images every this many steps (decides best.pt)."""
    patience: int = 0
    """Stop after this many evaluations without a better validation Dice; 0: never."""
    dice_weight: float = 1.0
    """Loss = binary cross-entropy + dice_weight x soft Dice loss (smp.losses)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "off"] = "auto"
    """``auto``: bf16 autocast on CUDA GPUs that support it and on CPUs with native bf16 (AMX /
    AVX-512 BF16: measured 2-3x per step for a resnet18 U-Net on 2 cores), fp32 elsewhere."""
    channels_last: Literal["auto", "on", "off"] = "auto"
    num_workers: int = 0

    def __post_init__(self):
        for key in ("steps", "batch_size", "evaluate_every"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(self.patience >= 0 and self.warmup_steps >= 0 and self.dice_weight >= 0, "patience",
                "patience, warmup_steps and dice_weight must be >= 0")


@dataclass
class SegmenterEvalConfig:
    threshold: float = 0.5
    """Foreground where the predicted probability is at least this."""
    instances: Literal["watershed", "components"] = "watershed"
    """How predicted nuclei are separated for AJI / PQ: ``watershed`` (touching nuclei split at
    the maxima of the distance transform) or ``components`` (connected components)."""
    min_size: int = 10
    """Predicted objects smaller than this (px) are dropped before instance metrics."""
    window: int = 1024
    """Whole images are predicted in one pass up to this side; larger ones in overlapping
    windows of this side (a multiple of 32), averaged."""

    def __post_init__(self):
        require(0 < self.threshold < 1, "threshold", f"must be in (0, 1), got {self.threshold}")
        require(self.min_size >= 0, "min_size", f"must be >= 0, got {self.min_size}")
        require(self.window % 32 == 0 and self.window >= 64, "window",
                f"must be a multiple of 32 and >= 64, got {self.window}")


@dataclass
class SegmenterConfig:
    model: SegmenterModelConfig = field(default_factory=SegmenterModelConfig)
    train: SegmenterTrainConfig = field(default_factory=SegmenterTrainConfig)
    eval: SegmenterEvalConfig = field(default_factory=SegmenterEvalConfig)
