"""DCGAN (Radford et al. 2016, "Unsupervised Representation Learning with Deep Convolutional GANs").

All-convolutional: the generator up-samples with stride-2 transposed convolutions, batch norm and
ReLU, ending in tanh; the discriminator down-samples with stride-2 convolutions, batch norm (not on
the first layer) and LeakyReLU(0.2). Weights start from N(0, 0.02) as in the paper. Class
conditioning: a one-hot label concatenated to z in G (Mirza & Osindero 2014) and a projection
term in D. Trained with the non-saturating BCE loss.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gans.adversarial import adversarial_family


def _init(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class DCGANGenerator(nn.Module):
    def __init__(self, image_size: int, num_classes: int, z_dim: int, ch: int):
        super().__init__()
        self.z_dim, self.num_classes, self.image_size = z_dim, num_classes, image_size
        n_up = int(math.log2(image_size)) - 2            # 4x4 -> S needs n_up doublings
        c = ch * 2 ** (n_up - 1)                         # 64 px, ch 64: 512 at 4x4 (paper: 1024 at 128)
        layers = [nn.ConvTranspose2d(z_dim + num_classes, c, 4, 1, 0, bias=False),
                  nn.BatchNorm2d(c), nn.ReLU(True)]      # B x c x 4 x 4
        for _ in range(n_up - 1):
            layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(c // 2), nn.ReLU(True)]
            c //= 2
        layers += [nn.ConvTranspose2d(c, 3, 4, 2, 1), nn.Tanh()]  # B x 3 x S x S
        self.net = nn.Sequential(*layers)
        self.apply(_init)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes:
            z = torch.cat([z, F.one_hot(y, self.num_classes).to(z.dtype)], dim=1)
        return self.net(z[:, :, None, None])


class DCGANDiscriminator(nn.Module):
    def __init__(self, image_size: int, num_classes: int, ch: int):
        super().__init__()
        n_down = int(math.log2(image_size)) - 2          # S -> 4x4
        layers, c = [nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2, True)], ch
        for _ in range(n_down - 1):
            layers += [nn.Conv2d(c, c * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c * 2),
                       nn.LeakyReLU(0.2, True)]
            c *= 2
        self.features = nn.Sequential(*layers)           # B x c x 4 x 4
        self.final = nn.Conv2d(c, 1, 4, 1, 0)            # the paper's last layer: B x 1 x 1 x 1
        self.embed = nn.Embedding(num_classes, c) if num_classes else None  # projection term
        self.feature_dim = c
        self.apply(_init)

    def logit_and_features(self, x: torch.Tensor, y: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logit B and pooled features B x c (what an auxiliary classifier reads)."""
        h = self.features(x)
        feat = h.sum(dim=(2, 3))                         # B x c
        out = self.final(h).flatten()                    # B
        if self.embed is not None:
            out = out + (self.embed(y) * feat).sum(1)
        return out, feat

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.logit_and_features(x, y)[0]


def build_dcgan(image_size: int, num_classes: int, z_dim: int, ch: int):
    return (DCGANGenerator(image_size, num_classes, z_dim, ch),
            DCGANDiscriminator(image_size, num_classes, ch))


FAMILY = adversarial_family("dcgan", build_dcgan, default_loss="bce", paper="Radford et al., ICLR 2016")
