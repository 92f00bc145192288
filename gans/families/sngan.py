"""SNGAN (Miyato et al. 2018, "Spectral Normalization for GANs"; projection D: Miyato & Koyama 2018).

ResNet generator with (class-conditional) batch norm; ResNet discriminator with spectral norm on
every weight, ReLU, global sum pooling and a projection head. Trained with the hinge loss.
"""

from gans.layers import ResNetDiscriminator, ResNetGenerator
from gans.adversarial import adversarial_family


def build_sngan(image_size: int, num_classes: int, z_dim: int, ch: int):
    G = ResNetGenerator(image_size, num_classes, z_dim, ch)
    D = ResNetDiscriminator(image_size, num_classes, ch, sn=True)
    return G, D


FAMILY = adversarial_family("sngan", build_sngan, default_loss="hinge", paper="Miyato et al., ICLR 2018")
