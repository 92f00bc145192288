"""Typed configuration of a classifier run: ``model`` and ``train`` sections.

Used on its own and as the ``classifier`` section of an ``augment-compare`` config. Unknown keys,
wrong types and out-of-range values are errors that name the key (see ``histosynth.config``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from histosynth.config import require


@dataclass
class ClassifierModelConfig:
    variant: str = "efficientnet-b0"
    """The backbone (classifier/model.py): efficientnet-b0 ... efficientnet-b8 (efficientnet-pytorch),
    resnet18, resnet50, densenet121 (torchvision), or timm/<name> (any timm model)."""
    weights: Optional[str] = None
    """null: from scratch; ``imagenet``: the library's own standard ImageNet weights from its own
    cache (torch's hub cache, $TORCH_HOME; timm: the Hugging Face cache) -- a missing file is one
    line naming the file, the folder and the download URL; or a local file (the backbone's state
    dict, or a histosynth classifier). The head is replaced when its class count differs. Nothing
    is ever downloaded."""
    image_size: int = 224
    """Side of the square input tiles (centre-crop + resize once, into the tile cache)."""
    dropout: float = 0.2
    """Dropout before the final layer (efficientnet-pytorch's dropout_rate; 0.2 for b0)."""
    bn_momentum: float = 0.1
    """BatchNorm running-statistics momentum, PyTorch convention (weight of the new batch).
    efficientnet-pytorch's default (0.01, the TensorFlow 0.99) needs thousands of steps before
    eval-mode statistics fit the data; a from-scratch run on a small set never gets there and
    predicts one class. 0.1 (PyTorch's default) converges in a few dozen steps."""

    def __post_init__(self):
        from classifier.model import check_variant
        check_variant(self.variant, "variant")
        require(16 <= self.image_size <= 1024, "image_size", f"must be in 16..1024, got {self.image_size}")
        require(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        require(0 < self.bn_momentum < 1, "bn_momentum", f"must be in (0, 1), got {self.bn_momentum}")


@dataclass
class ClassifierTrainConfig:
    epochs: int = 30
    """Maximum epochs (an epoch is one pass over the assembled training set)."""
    batch_size: int = 32
    """Tiles per optimizer step, over all torchrun processes together (each takes its share), as
    the GANs' train.batch_size: the same config trains the same way on any number of processes."""
    lr: float = 1.0e-3
    """Peak AdamW learning rate, reached after ``warmup_epochs`` and cosine-decayed to 0."""
    weight_decay: float = 1.0e-2
    """AdamW decoupled weight decay."""
    warmup_epochs: float = 1.0
    """Linear learning-rate warm-up, in epochs (may be fractional)."""
    patience: int = 8
    """Early stopping: stop when validation balanced accuracy has not improved for this many
    epochs; 0 turns early stopping off. The best epoch's weights are kept and evaluated."""
    min_epochs: int = 0
    """No early stop before this epoch (from scratch on imbalanced data the first epochs predict
    the majority class, a plateau that is not convergence)."""
    class_weights: Literal["none", "balanced"] = "none"
    """``balanced``: cross-entropy weighted by n / (k * n_c) of the assembled training set."""
    label_smoothing: float = 0.0
    freeze_epochs: int = 0
    """Fine-tuning: the backbone is frozen (weights and BatchNorm statistics) for the first N
    epochs, so only the new head trains; 0: everything trains from the start."""
    backbone_lr: float = 1.0
    """Fine-tuning: the backbone's learning rate as a fraction of ``lr`` (e.g. 0.1 for pretrained
    weights); the head always uses ``lr``."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "off"] = "auto"
    """Mixed precision: ``auto`` is bf16 autocast on CUDA GPUs that support it, fp32 elsewhere."""
    channels_last: Literal["auto", "on", "off"] = "on"
    """Memory layout. channels_last is the fast one for EfficientNet on CUDA and also on CPU
    (measured: 20 % faster per step for B0 at 64 px on 2 cores); ``auto``: on CUDA only."""
    num_workers: int = 0
    """DataLoader worker processes for augmentation (0: in the main process)."""

    def __post_init__(self):
        require(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.warmup_epochs >= 0, "warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        require(self.patience >= 0, "patience", f"must be >= 0, got {self.patience}")
        require(0 <= self.min_epochs <= self.epochs, "min_epochs",
                f"must be in 0..epochs ({self.epochs}), got {self.min_epochs}")
        require(0 <= self.label_smoothing < 1, "label_smoothing",
                f"must be in [0, 1), got {self.label_smoothing}")
        require(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        require(0 <= self.freeze_epochs < self.epochs, "freeze_epochs",
                f"must be in 0..epochs-1 ({self.epochs - 1}), got {self.freeze_epochs}")
        require(0 < self.backbone_lr <= 10, "backbone_lr", f"must be in (0, 10], got {self.backbone_lr}")


@dataclass
class ClassifierConfig:
    model: ClassifierModelConfig = field(default_factory=ClassifierModelConfig)
    train: ClassifierTrainConfig = field(default_factory=ClassifierTrainConfig)
