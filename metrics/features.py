"""Feature extractors for distribution metrics, behind one interface. Nothing is downloaded.

* ``inception``: torchvision's InceptionV3 pool features (2048-d), only from a local weights file
  the user names (a torchvision ``inception_v3`` state dict). Inputs are resized to 299 px and
  ImageNet-normalised.
* ``histology`` (the report's choice for tissue): the same EfficientNet layer, from a classifier
  trained on the real training split (``metrics.histology``) or a histosynth classifier checkpoint,
  L2-normalised to radius sqrt(d) (:func:`on_sphere`).
* ``efficientnet``: the penultimate layer (global-average-pooled, 1280-d for b0) of a classifier
  backbone (an efficientnet-pytorch EfficientNet by default; any backbone of classifier/model.py
  through a histosynth checkpoint) from a local file: ImageNet weights or, better for histology,
  a classifier trained on the real training split. A randomly initialised EfficientNet is not
  offered: its eval-mode features vanish (~1e-13), so distances in that space mean nothing.
* ``pixels``: area-downsampled 8 x 8 RGB (192-d) in [0, 1]: transparent, needs no weights, the
  pixel space of the memorisation check; it sees colour and layout, not tissue.

Every extractor maps ``B x 3 x H x W`` uint8 to ``B x D`` float features and has a ``describe()``
string that reports name that the report prints.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from histosynth.checkpoint import CheckpointError, safe_load

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _state_dict(path: str | Path) -> dict:
    obj = safe_load(path)
    if isinstance(obj.get("modules"), dict) and "model" in obj["modules"]:   # a histosynth classifier
        return obj["modules"]["model"]
    for key in ("state_dict", "model"):
        if key in obj and isinstance(obj[key], dict):
            return obj[key]
    return obj


class Extractor(nn.Module):
    name = "base"
    dim = 0
    input_size = 224

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div(255.0)
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return (x - IMAGENET_MEAN.to(x.device)) / IMAGENET_STD.to(x.device)

    def describe(self) -> str:
        return self.name


class InceptionExtractor(Extractor):
    name, dim, input_size = "inception_v3", 2048, 299

    def __init__(self, weights: str | Path):
        super().__init__()
        from torchvision.models import inception_v3

        if not Path(weights).is_file():
            raise CheckpointError(f"InceptionV3 weights not found: {weights} (histosynth never "
                                  "downloads weights; point to a torchvision inception_v3 state dict)")
        net = inception_v3(weights=None, aux_logits=True, init_weights=False)
        net.load_state_dict(_state_dict(weights))
        net.fc = nn.Identity()
        self.net, self.weights = net.eval(), str(weights)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.prepare(x))

    def describe(self) -> str:
        return f"InceptionV3 pool features (2048-d), weights {self.weights}"


def on_sphere(f: torch.Tensor) -> torch.Tensor:
    """``B x D`` features L2-normalised to radius sqrt(D): the distribution metrics then see
    directions only (KID's cubic kernel (x.y / D + 1)^3 sees cosines). An extractor trained from
    scratch on a small set gives some tiles penultimate norms 20-50x the median (seen on LC25000
    lung: norms up to 361, median 7.5), and raw KID is then ruled by them: with 5 % of the real
    tiles' features 30x longer, KID between two real halves exceeds KID against blurred tiles
    (2.6e4 vs 1.2e3) -- on the sphere it is unchanged."""
    return F.normalize(f, dim=1) * f.shape[1] ** 0.5


class ClassifierExtractor(Extractor):
    """The pooled features (penultimate layer) of a classifier backbone (classifier/model.py:
    EfficientNet, ResNet, DenseNet, timm) from a local file: a histosynth classifier checkpoint, or
    the backbone's own state dict (e.g. ImageNet weights). ``sphere``: on the sphere of
    :func:`on_sphere` (the histology space)."""
    name = "efficientnet"

    def __init__(self, weights: str | Path, variant: str = "efficientnet-b0", input_size: int = 224,
                 note: str = "", sphere: bool = False):
        super().__init__()
        from classifier.model import create_classifier

        if not Path(weights).is_file():
            raise CheckpointError(f"classifier weights not found: {weights} (histosynth never "
                                  "downloads weights; point to a local state dict)")
        state = _state_dict(weights)
        head = state.get("head.weight", state.get("_fc.weight"))
        self.net = create_classifier(variant, head.shape[0] if head is not None else 1000, weights).eval()
        self.dim = self.net.head.in_features
        self.input_size, self.variant, self.weights, self.note = input_size, variant, weights, note
        self.sphere = sphere

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.net.features(self.prepare(x))                   # B x dim
        return on_sphere(f.float()) if self.sphere else f

    def describe(self) -> str:
        return (f"{self.variant} penultimate layer ({self.dim}-d) at {self.input_size} px"
                + (", L2-normalised to radius sqrt(d)" if self.sphere else "") + f", weights {self.weights}"
                + (f"; {self.note}" if self.note else ""))


class PixelExtractor(Extractor):
    name, dim = "pixels", 192

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x.float() / 255.0, 8).flatten(1)   # B x 192

    def describe(self) -> str:
        return "pixels: 8 x 8 area-downsampled RGB (192-d), colour and layout only"
