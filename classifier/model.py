"""Classifiers behind one factory: a backbone that pools features, and a linear head.

Backbones (``model.variant``):

* ``efficientnet-b0`` ... ``efficientnet-b8`` (efficientnet-pytorch);
* ``resnet18``, ``resnet50``, ``densenet121`` (torchvision);
* ``timm/<name>``: any timm model by name (timm is installed with segmentation-models-pytorch).

Weights (``model.weights``): None (from scratch); ``imagenet``, the library's own standard
ImageNet weights from its own cache only (torchvision and efficientnet-pytorch: torch's hub cache,
``$TORCH_HOME``; timm: the Hugging Face cache), a missing file being one line that names the file,
the folder and the download URL; or a local file: a state dict of the backbone (e.g. ImageNet
weights downloaded by hand) or a histosynth classifier checkpoint. The head is loaded only when
its class count matches, else it stays freshly initialised. Nothing is ever downloaded.

Every classifier is a :class:`Classifier`: ``body(x)`` gives ``B x dim`` pooled features (what the
histology feature space and selection read), ``head`` the logits; inputs are ImageNet-normalised
(:func:`histosynth.data.normalise`) for every backbone.
"""

from __future__ import annotations

import functools
import itertools
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from efficientnet_pytorch.utils import Conv2dStaticSamePadding

from histosynth.checkpoint import CheckpointError, safe_load
from histosynth.config import ConfigError
from histosynth.runtime import cpu_kernels_avx512
from histosynth.weights import WeightsNotCached, hf_cache_dir, offline_hub, torch_hub_file

EFFICIENTNETS = tuple(f"efficientnet-b{i}" for i in range(9))
TORCHVISION = ("resnet18", "resnet50", "densenet121")
VARIANTS = EFFICIENTNETS + TORCHVISION
"""The named backbones; ``timm/<name>`` adds every timm model."""


class Classifier(nn.Module):
    """``body`` (``B x 3 x H x W`` -> ``B x dim`` pooled features) + dropout + linear ``head``."""

    def __init__(self, body: nn.Module, dim: int, num_classes: int, dropout: float = 0.2):
        super().__init__()
        self.body, self.drop, self.head = body, nn.Dropout(dropout), nn.Linear(dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.body(x)))


def check_variant(variant: str, key: str = "model.variant") -> None:
    if variant in VARIANTS or (variant.startswith("timm/") and len(variant) > 5):
        return
    from histosynth.config import require_choice
    require_choice(variant, list(VARIANTS) + ["timm/<any timm model>"], key, "a backbone")


def _unwrap(state: dict) -> dict:
    if isinstance(state.get("modules"), dict) and isinstance(state["modules"].get("model"), dict):
        return state["modules"]["model"]                     # a histosynth run checkpoint
    for key in ("model", "state_dict"):
        if isinstance(state.get(key), dict):
            return state[key]
    return state


def upgrade_state(state: dict) -> dict:
    """A classifier state dict in this module's layout: checkpoints written before the factory
    (a bare efficientnet-pytorch EfficientNet: ``_fc.*`` and backbone keys) are renamed."""
    if any(k.startswith(("body.", "head.")) for k in state):
        return state
    return {(f"head.{k[4:]}" if k.startswith("_fc.") else f"body.{k}"): v for k, v in state.items()}


# DenseNet weights on download.pytorch.org use the legacy key format 'norm.1'; torchvision's loader
# renames them as it reads (the same pattern as torchvision.models.densenet)
_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def _raw(variant: str, imagenet: bool) -> tuple[nn.Module, str]:
    """The library's network with its own 1000-class head (ImageNet weights loaded when asked)
    and the name of that head's attribute."""
    if variant in EFFICIENTNETS:
        from efficientnet_pytorch import EfficientNet
        from efficientnet_pytorch.utils import load_pretrained_weights, url_map
        net = EfficientNet.from_name(variant)
        # the library's own switch from its Python-level autograd Function (sigmoid recomputed in
        # backward, saves little at tile sizes) to torch's fused SiLU kernels: the same function
        net.set_swish(memory_efficient=False)
        set_same_padding(net, folded=True)
        if imagenet:
            if variant not in url_map:
                raise WeightsNotCached(f"efficientnet-pytorch publishes no standard ImageNet weights for {variant}")
            path = torch_hub_file(url_map[variant], f"ImageNet weights of {variant}")
            load_pretrained_weights(net, variant, weights_path=str(path), verbose=False)
        return net, "_fc"
    if variant in TORCHVISION:
        from torchvision.models import get_model, get_model_weights
        net = get_model(variant, weights=None)
        if imagenet:
            w = get_model_weights(variant).DEFAULT
            state = safe_load(torch_hub_file(w.url, f"ImageNet weights of {variant} ({w})"))
            if variant.startswith("densenet"):
                state = {(_DENSENET_KEY.sub(r"\1\2", k)): v for k, v in state.items()}
            net.load_state_dict(state)
        return net, "fc" if variant.startswith("resnet") else "classifier"
    import timm
    name = variant.removeprefix("timm/")
    try:
        with offline_hub():
            net = timm.create_model(name, pretrained=imagenet)
    except RuntimeError as e:                     # timm: unknown model
        raise ConfigError("model.variant", f"{e}") from None
    except Exception as e:
        if not imagenet:
            raise
        raise WeightsNotCached(f"ImageNet weights of timm/{name} are not in the Hugging Face cache ({hf_cache_dir()}; "
                               f"{type(e).__name__}); fetch them once where there is network with python -c "
                               f"\"import timm; timm.create_model('{name}', pretrained=True)\", or set model.weights "
                               "to a local file or null") from None
    return net, ""


class FoldedSameConv(Conv2dStaticSamePadding):
    """A stride-1 "same" convolution whose zero padding is its own (see :func:`set_same_padding`),
    run with only the taps that can reach its input: on an H x W map, taps more than H - 1 rows
    (W - 1 columns) from the kernel's centre only ever multiply padding. EfficientNet at 64 px
    ends on 2 x 2 maps, where its 5 x 5 depthwise kernels are 3 x 3 in effect; cropped, their
    backward pass, the slowest of the step, takes 13 instead of 21 ms held to AVX2 (2-core
    Zen 4, channels_last, batch 64). Value and gradients are the uncropped convolution's: the
    cropped taps' gradients are exactly zero in both. Without AVX-512 kernels a depthwise one on
    a map of at most ``SUM_PIXELS`` pixels runs as sums over them (:func:`depthwise_by_sums`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (ph, pw) = self.weight.shape[-2:], self.padding
        h, w = x.shape[-2:]
        ch, cw = max(0, ph - (h - 1)), max(0, pw - (w - 1))
        weight = self.weight[..., ch:kh - ch, cw:kw - cw]
        if h * w <= SUM_PIXELS and self.groups == self.in_channels == self.out_channels and _sums_pay(x):
            return depthwise_by_sums(x, weight, self.bias)
        if not (ch or cw):
            return super().forward(x)                 # (its static padding is an Identity once folded)
        return F.conv2d(x, weight, self.bias, self.stride, (ph - ch, pw - cw), self.dilation, self.groups)


# A depthwise "same" convolution on a map of a few pixels is a per-channel matrix: output pixel p
# is the sum over input pixels q of x[q] times the tap that joins them, w[q - p + centre]. Summed
# as such (one broadcast product per input pixel, channels contiguous in channels_last), a 2 x 2
# map takes 5 instead of 14-21 ms forward + backward (EfficientNet-B0's last 1152-channel
# depthwise convolutions at 64 px, batch 64, fp32 channels_last, held to AVX2 on 2 Zen 4 cores),
# where oneDNN's AVX2 depthwise backward is slowest. With AVX-512 kernels oneDNN is faster (4.2
# against 6.2 ms), and on 4 x 4 maps the sums lose everywhere (16 products per pixel).
SUM_PIXELS = 4


def _sums_pay(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled("cpu") and not cpu_kernels_avx512())


@functools.lru_cache(maxsize=None)
def _tap_of(h: int, w: int, kh: int, kw: int) -> torch.Tensor:
    """Q x P: the flat index of the kernel tap joining input pixel q to output pixel p of a
    stride-1 "same" convolution on an h x w map, kh * kw (a zero slot) where none does."""
    idx = torch.full((h * w, h * w), kh * kw, dtype=torch.long)
    for (qy, qx), (py, px) in itertools.product(itertools.product(range(h), range(w)), repeat=2):
        i, j = qy - py + kh // 2, qx - px + kw // 2
        if 0 <= i < kh and 0 <= j < kw:
            idx[qy * w + qx, py * w + px] = i * kw + j
    return idx


def depthwise_by_sums(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=(kh // 2, kw // 2), groups=C)`` for a depthwise
    ``weight`` (C x 1 x kh x kw, odd sides) as sums over the input pixels (see above)."""
    b, c, h, w = x.shape
    taps = F.pad(weight.reshape(c, -1), (0, 1))[:, _tap_of(h, w, *weight.shape[-2:])]   # C x Q x P
    m = taps.permute(1, 2, 0)                                         # Q x P x C
    xq = x.permute(0, 2, 3, 1).reshape(b, h * w, 1, c)                # B x Q x 1 x C (a view in channels_last)
    out = sum(xq[:, q] * m[q] for q in range(h * w))                  # B x P x C
    if bias is not None:
        out = out + bias
    out = out.contiguous().view(b, h, w, c).permute(0, 3, 1, 2)       # B x C x H x W, channels_last strides
    return out if x.is_contiguous(memory_format=torch.channels_last) else out.contiguous()


def set_same_padding(net: nn.Module, folded: bool = True) -> None:
    """efficientnet-pytorch pads the input of every "same" convolution with an ``nn.ZeroPad2d``
    of its own; where that padding is symmetric (every stride-1 conv: most of the depthwise
    ones) the convolution's own zero padding (``folded``) computes the same without a padded
    copy of the input, and of its gradient in backward, and taps that can only meet padding on
    a small map are skipped (``FoldedSameConv``). ``folded=False``: the library's layers as they
    come (the benchmarks' reference path). Parameters and state dicts do not change."""
    for m in net.modules():
        if not isinstance(m, Conv2dStaticSamePadding):
            continue
        if folded and isinstance(m.static_padding, nn.ZeroPad2d) and tuple(m.padding) == (0, 0):
            left, right, top, bottom = m.static_padding.padding
            if left == right and top == bottom:
                m.padding, m.static_padding = (top, left), nn.Identity()
                if tuple(m.stride) == (1, 1) and tuple(m.dilation) == (1, 1):
                    m.__class__ = FoldedSameConv       # the same module, with the cropping forward
        elif not folded and tuple(m.padding) != (0, 0):
            (ph, pw), m.padding = m.padding, (0, 0)
            m.static_padding = nn.ZeroPad2d((pw, pw, ph, ph))
            m.__class__ = Conv2dStaticSamePadding


def _strip_head(net: nn.Module, head: str) -> tuple[nn.Module, int]:
    """``net`` returning pooled features, and their width."""
    if not head:                                             # timm
        dim = net.num_features
        net.reset_classifier(0)
        return net, dim
    layer = getattr(net, head)
    dim = layer.in_features
    setattr(net, head, nn.Identity())
    if hasattr(net, "_dropout"):                             # efficientnet-pytorch: dropout moves to the head
        net._dropout = nn.Identity()
    return net, dim


def create_classifier(variant: str, num_classes: int, weights: str | Path | None = None,
                      dropout: float = 0.2, bn_momentum: float = 0.1) -> Classifier:
    """``variant`` with a ``num_classes`` head (see the module docstring for ``weights``).
    ``bn_momentum`` is in PyTorch's convention (see ClassifierModelConfig.bn_momentum)."""
    check_variant(variant)
    imagenet = weights == "imagenet"
    local = None if weights is None or imagenet else Path(weights)
    if local is not None and not local.is_file():
        raise CheckpointError(f"classifier weights not found: {weights} (histosynth never downloads weights; "
                              "point model.weights to a local state dict, imagenet, or null)")
    net, head = _raw(variant, imagenet)
    state = _unwrap(safe_load(local)) if local is not None else None
    if state is not None and not any(k.startswith(("body.", "head.")) for k in state):
        _load_raw(net, head, state, variant, local)              # the library's own layout
        state = None
    body, dim = _strip_head(net, head)
    model = Classifier(body, dim, num_classes, dropout)
    if state is not None:                                        # a histosynth classifier
        _load_wrapped(model, state, variant, local)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = bn_momentum
    return model


def _load_raw(net: nn.Module, head: str, state: dict, variant: str, path: Path) -> None:
    own = net.state_dict()
    heads = [k for k in state if head and k.startswith(f"{head}.")]
    if any(k in own and own[k].shape != state[k].shape for k in heads):
        state = {k: v for k, v in state.items() if k not in heads}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit {variant}: {_first(e)}; is it a state dict of this "
                              "backbone?") from None
    missing = [k for k in missing if not (head and k.startswith(f"{head}."))]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit {variant}: {len(missing)} missing and {len(unexpected)} "
                              f"unexpected tensors (e.g. {(missing + unexpected)[0]}); is it a state dict of "
                              "this backbone?")


def _load_wrapped(model: Classifier, state: dict, variant: str, path: Path) -> None:
    state = upgrade_state(state)
    if "head.weight" in state and state["head.weight"].shape != model.head.weight.shape:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit {variant}: {_first(e)}; is it a classifier of this "
                              "backbone?") from None
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit {variant}: {len(missing)} missing and {len(unexpected)} "
                              f"unexpected tensors (e.g. {(missing + unexpected)[0]}); is it a classifier of "
                              "this backbone?")


def _first(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[1].strip() if len(lines) > 1 else str(e)


def backbone_parameters(model: Classifier) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(backbone, head) parameters: the two learning-rate groups of fine-tuning."""
    return list(model.body.parameters()), list(model.head.parameters())
