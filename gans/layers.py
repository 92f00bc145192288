"""Building blocks shared by the GAN families: conditional BN, ResNet up/down blocks, projection.

Shapes in comments: B batch, C channels, H x W spatial size, K number of classes.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm


# ----------------------------------------------------------------------------------------------
# resampling folded into the neighbouring 3x3 convolution
#
# Nearest 2x upsampling followed by a 3x3 convolution (padding 1) is one linear map, and so is a
# 3x3 convolution followed by 2x2 average pooling. Each equals a single convolution with a 4x4
# kernel at the low resolution: a transposed one of stride 2 for the first, a stride-2 one for the
# second. Every output pixel then costs 4 x 4 taps at a quarter of the pixels instead of 3 x 3 at
# all of them: 2.25x fewer multiply-adds for the same result (up to float rounding). Measured on
# SNGAN-32's blocks (b64, forward + backward, 2-core Zen 4): 16->32 px G conv 1.94 -> 0.94 s in
# fp32 on AVX2 kernels, 0.76 -> 0.37 s in bf16; 32->16 px D conv 0.53 -> 0.24 s, 0.20 -> 0.10 s.
# The 4x4 kernel is built from the 3x3 weight at every call (so spectral norm, optimizers and
# checkpoints see the same parameters as the literal blocks): row k of it sums the 3x3 rows that
# land on input row offset k.

# row k of a 4x4 kernel <- the 3x3 weight rows that land on input row offset k
_UP_TAPS = torch.tensor([[0., 0., 1.], [0., 1., 1.], [1., 1., 0.], [1., 0., 0.]])
_DOWN_TAPS = torch.tensor([[1., 0., 0.], [1., 1., 0.], [0., 1., 1.], [0., 0., 1.]])


def _kernel4(weight: torch.Tensor, taps: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The 4x4 kernel T W T^T of a 3x3 ``weight`` (O x I x 3 x 3), computed in the weight's own
    precision (autocast casts it with the input, as it would the 3x3 weight)."""
    t = taps.to(weight)                                                        # 4 x 3; no copy for fp32 CPU
    with torch.autocast(weight.device.type, enabled=False):
        return torch.einsum("ka,oiab,lb->" + ("iokl" if transposed else "oikl"), t, weight, t)


def upsample_conv3x3(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(nearest_upsample_2x(x))`` for a 3x3 convolution with padding 1, computed on ``x`` as
    one stride-2 transposed convolution: B x I x H x W -> B x O x 2H x 2W."""
    return F.conv_transpose2d(x, _kernel4(conv.weight, _UP_TAPS, True), conv.bias, stride=2, padding=1)


def conv3x3_avgpool(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``avg_pool2d(conv(x), 2)`` for a 3x3 convolution with padding 1, computed as one stride-2
    convolution: B x I x H x W -> B x O x H/2 x W/2 (H, W even)."""
    return F.conv2d(x, _kernel4(conv.weight, _DOWN_TAPS, False) / 4, conv.bias, stride=2, padding=1)


# ----------------------------------------------------------------------------------------------
# a convolution with a handful of output channels, computed column by column
#
# An image generator's last layer (CycleGAN's 7x7 convolution 64 -> 3 at full resolution) gives
# CPU convolution kernels, which block output channels by 8 or 16, almost nothing to vectorise
# over: held to AVX2 it ran at 38 GFLOP/s where CycleGAN's 256-channel layers reach 150-180. The
# same map is a kh x 1 convolution into O x kw channels (kernel column j of output o in channel
# o * kw + j), whose partial results are summed shifted by j pixels. The multiply-adds are the
# same; forward + backward, 2-core Zen 4, b1 @ 256 and b4 @ 128: 107-117 -> 60-63 ms fp32 NCHW
# held to AVX2; natively 105-123 -> 53-62 ms fp32 NCHW, 40-42 -> 22-23 ms bf16 channels_last.
# Horizontal zero padding is applied before the kh x 1 convolution: passed to it, it sent CPU
# kernels down a slow path (107 instead of 47 ms).


class ColumnConv2d(nn.Conv2d):
    """``nn.Conv2d`` (the same parameters, state dict and map, up to float rounding) for a stride-1
    convolution with few output channels, computed on the CPU as kernel columns summed shifted
    (see above); ``fused = False``, or a CUDA input (not measured there), runs the library's own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if (self.stride, self.dilation, self.groups, self.padding_mode) != ((1, 1), (1, 1), 1, "zeros") \
                or isinstance(self.padding, str):
            raise ValueError("ColumnConv2d computes stride-1, undilated, ungrouped convolutions with numeric "
                             "zero padding only")
        self.fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused or x.device.type != "cpu":
            return super().forward(x)
        o, c, kh, kw = self.weight.shape
        ph, pw = self.padding
        if pw:
            x = F.pad(x, (pw, pw))
        cols = self.weight.permute(0, 3, 1, 2).reshape(o * kw, c, kh, 1)     # channel o * kw + j: column j
        z = F.conv2d(x, cols, None, 1, (ph, 0))                                # B x O*kw x H' x W'
        b, _, h, w = z.shape
        parts = z.view(b, o, kw, h, w).to(torch.promote_types(z.dtype, torch.float32))   # bf16 summed in fp32
        out = sum(parts[:, :, j, :, j:j + w - kw + 1] for j in range(kw))      # B x O x H' x (W' - kw + 1)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out.to(z.dtype)


def set_fused(model: nn.Module, fused: bool) -> nn.Module:
    """Make every ResNet block of ``model`` resample folded into its convolutions and every
    :class:`ColumnConv2d` compute by columns (``fused``, the default), or both literally as
    written in the papers' code (interpolate/pool, then convolve; one convolution): the
    benchmarks' reference-equivalent path computes the latter."""
    for m in model.modules():
        if isinstance(m, (GBlock, DBlock, ColumnConv2d)):
            m.fused = fused
    return model


def maybe_sn(module: nn.Module, enabled: bool) -> nn.Module:
    """Spectral normalisation (Miyato 2018, one power iteration per step) when ``enabled``."""
    return spectral_norm(module) if enabled else module


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm whose scale and shift are looked up per class (num_classes=0: plain affine BN)."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.bn = nn.BatchNorm2d(channels, affine=num_classes == 0)
        if num_classes:
            self.gamma = nn.Embedding(num_classes, channels)
            self.beta = nn.Embedding(num_classes, channels)
            nn.init.ones_(self.gamma.weight)
            nn.init.zeros_(self.beta.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        h = self.bn(x)                                          # B x C x H x W
        if self.num_classes:
            g = self.gamma(y)[:, :, None, None]                 # B x C x 1 x 1
            b = self.beta(y)[:, :, None, None]
            h = h * g + b
        return h


class GBlock(nn.Module):
    """Pre-activation ResNet up-block: BN-ReLU-up-conv3-BN-ReLU-conv3, shortcut up-conv1."""

    def __init__(self, cin: int, cout: int, num_classes: int, upsample: bool = True):
        super().__init__()
        self.upsample = upsample
        self.bn1 = ConditionalBatchNorm2d(cin, num_classes)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.bn2 = ConditionalBatchNorm2d(cout, num_classes)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if (cin != cout or upsample) else nn.Identity()
        nn.init.xavier_uniform_(self.conv1.weight, 2 ** 0.5)
        nn.init.xavier_uniform_(self.conv2.weight, 2 ** 0.5)
        self.fused = True               # upsampling folded into conv1 (see upsample_conv3x3)

    def _up(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="nearest") if self.upsample else x

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        h = F.relu(self.bn1(x, y))                              # B x cin x H x W
        if self.upsample and self.fused:
            h = upsample_conv3x3(h, self.conv1)                 # B x cout x 2H x 2W
            skip = self._up(self.shortcut(x))                   # a 1x1 conv commutes with upsampling
        else:
            h = self.conv1(self._up(h))
            skip = self.shortcut(self._up(x))
        h = self.conv2(F.relu(self.bn2(h, y)))
        return h + skip


def _norm(kind: str, channels: int) -> nn.Module:
    """Critic normalisation: 'none' or 'layer' (LayerNorm over C,H,W as GroupNorm(1, C))."""
    return nn.GroupNorm(1, channels) if kind == "layer" else nn.Identity()


class DBlock(nn.Module):
    """Pre-activation ResNet down-block: ReLU-conv3-ReLU-conv3-avgpool, shortcut conv1-avgpool.

    ``first=True`` is the 'optimized' input block of Miyato 2018: no ReLU on the raw image, and the
    shortcut pools before its 1x1 conv.
    """

    def __init__(self, cin: int, cout: int, downsample: bool = True, first: bool = False,
                 sn: bool = True, norm: str = "none"):
        super().__init__()
        self.downsample, self.first = downsample, first
        self.conv1 = maybe_sn(nn.Conv2d(cin, cout, 3, 1, 1), sn)
        self.conv2 = maybe_sn(nn.Conv2d(cout, cout, 3, 1, 1), sn)
        # the optimized first block normalises once, after its first conv
        self.norm1 = _norm(norm, cout if first else cin)
        self.norm2 = nn.Identity() if first else _norm(norm, cout)
        learn_sc = cin != cout or downsample
        self.shortcut = maybe_sn(nn.Conv2d(cin, cout, 1), sn) if learn_sc else nn.Identity()
        self.fused = True               # pooling folded into conv2 (see conv3x3_avgpool)

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 2) if self.downsample else x

    def _conv2_down(self, h: torch.Tensor) -> torch.Tensor:
        if self.downsample and self.fused:
            return conv3x3_avgpool(h, self.conv2)               # B x cout x H/2 x W/2
        return self._down(self.conv2(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            h = self._conv2_down(F.relu(self.norm1(self.conv1(x))))
            return h + self.shortcut(self._down(x))
        h = self.conv1(F.relu(self.norm1(x)))
        h = self._conv2_down(F.relu(self.norm2(h)))
        # a 1x1 conv commutes with average pooling: pool first, 4x fewer multiply-adds
        skip = self.shortcut(self._down(x)) if self.fused else self._down(self.shortcut(x))
        return h + skip


class ProjectionHead(nn.Module):
    """Logit = w . phi(x) + embed(y) . phi(x) (projection discriminator, Miyato & Koyama 2018)."""

    def __init__(self, channels: int, num_classes: int, sn: bool = True):
        super().__init__()
        linear = nn.Linear(channels, 1)
        nn.init.xavier_uniform_(linear.weight)
        self.linear = maybe_sn(linear, sn)
        self.embed = None
        if num_classes:
            embed = nn.Embedding(num_classes, channels)
            nn.init.xavier_uniform_(embed.weight)             # as in Miyato & Koyama's code
            self.embed = maybe_sn(embed, sn)

    def forward(self, feat: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        out = self.linear(feat).squeeze(1)                     # B
        if self.embed is not None:
            out = out + (self.embed(y) * feat).sum(1)
        return out


def resnet_widths(image_size: int, ch: int, kind: str) -> list[int]:
    """Channel widths of the ResNet G ('g') or D ('d') of SNGAN / WGAN-GP at ``image_size``.

    32 px follows the CIFAR models (G: 4*ch everywhere, D: 2*ch everywhere; ch=64 gives mimicry's
    SNGAN-32 with ngf 256 / ndf 128); 64 and 128 px follow Miyato 2018's ImageNet models.
    """
    table = {
        ("g", 32): [4, 4, 4, 4], ("d", 32): [2, 2, 2, 2],
        ("g", 64): [16, 8, 4, 2, 1], ("d", 64): [1, 2, 4, 8, 16],
        ("g", 128): [16, 16, 8, 4, 2, 1], ("d", 128): [1, 2, 4, 8, 16, 16],
    }
    if (kind, image_size) not in table:
        raise ValueError(f"image_size {image_size} is not supported; choose 32, 64 or 128")
    return [m * ch for m in table[(kind, image_size)]]


class ResNetGenerator(nn.Module):
    """z (B x z_dim), y (B) -> image B x 3 x S x S in [-1, 1]; starts at 4x4 and doubles."""

    def __init__(self, image_size: int, num_classes: int, z_dim: int, ch: int):
        super().__init__()
        self.z_dim, self.num_classes, self.image_size = z_dim, num_classes, image_size
        widths = resnet_widths(image_size, ch, "g")
        self.fc = nn.Linear(z_dim, 4 * 4 * widths[0])
        self.blocks = nn.ModuleList(GBlock(a, b, num_classes) for a, b in zip(widths, widths[1:]))
        self.bn = nn.BatchNorm2d(widths[-1])
        self.out = nn.Conv2d(widths[-1], 3, 3, 1, 1)
        nn.init.xavier_uniform_(self.fc.weight)
        nn.init.xavier_uniform_(self.out.weight)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.fc(z).view(z.shape[0], -1, 4, 4)               # B x C0 x 4 x 4
        for block in self.blocks:
            h = block(h, y)                                     # doubles H, W
        return torch.tanh(self.out(F.relu(self.bn(h))))         # B x 3 x S x S


class ResNetDiscriminator(nn.Module):
    """image B x 3 x S x S, y (B) -> logit B; ReLU, global pooling, projection head.

    ``pool``: ``sum`` (SNGAN, Miyato 2018) or ``mean`` (the WGAN-GP ResNet critic, Gulrajani 2017).
    """

    def __init__(self, image_size: int, num_classes: int, ch: int, sn: bool, norm: str = "none",
                 pool: str = "sum"):
        super().__init__()
        self.num_classes, self.pool = num_classes, pool
        widths = resnet_widths(image_size, ch, "d")
        # 32 px: two down-sampling blocks then two at 8x8; 64/128: every block but the last halves
        n_down = 2 if image_size == 32 else len(widths) - 1
        blocks = [DBlock(3, widths[0], downsample=True, first=True, sn=sn, norm=norm)]
        for i, (a, b) in enumerate(zip(widths, widths[1:]), start=1):
            blocks.append(DBlock(a, b, downsample=i < n_down, sn=sn, norm=norm))
        self.blocks = nn.Sequential(*blocks)
        self.head = ProjectionHead(widths[-1], num_classes, sn=sn)
        self.feature_dim = widths[-1]

    def logit_and_features(self, x: torch.Tensor, y: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logit B and pooled features B x C (what an auxiliary classifier reads)."""
        h = F.relu(self.blocks(x))                              # B x C x h x w
        feat = h.sum(dim=(2, 3)) if self.pool == "sum" else h.mean(dim=(2, 3))   # B x C
        return self.head(feat, y), feat                         # B, B x C

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.logit_and_features(x, y)[0]


class AuxiliaryClassifierD(nn.Module):
    """The discriminator of an ACGAN (Odena et al. 2017): an unconditional discriminator's
    real/fake logit plus a K-way classifier on its pooled features. ``forward`` gives the logit
    alone (gradient penalty, generic code); ``classify`` gives both."""

    def __init__(self, D: nn.Module, num_classes: int):
        super().__init__()
        if not hasattr(D, "logit_and_features"):
            raise ValueError(f"{type(D).__name__} exposes no pooled features for an auxiliary classifier")
        self.net = D
        self.aux = nn.Linear(D.feature_dim, num_classes)        # B x C -> B x K

    def classify(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logit, feat = self.net.logit_and_features(x)
        return logit, self.aux(feat)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x)
