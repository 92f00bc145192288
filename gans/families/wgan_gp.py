"""WGAN-GP (Gulrajani et al. 2017, "Improved Training of Wasserstein GANs").

The paper's ResNet generator (batch norm, class-conditional here) and a ResNet critic without
batch norm (the gradient penalty is per-sample) and without spectral norm, with layer norm as in
the paper's 64 px model, and global mean pooling as in its code. Trained with the Wasserstein loss, gradient penalty weight 10 and
``n_dis`` (n_critic) = 5 critic steps per generator step. The critic is conditioned by projection.
"""

from gans.layers import ResNetDiscriminator, ResNetGenerator
from gans.adversarial import adversarial_family


def build_wgan_gp(image_size: int, num_classes: int, z_dim: int, ch: int):
    G = ResNetGenerator(image_size, num_classes, z_dim, ch)
    D = ResNetDiscriminator(image_size, num_classes, ch, sn=False, norm="layer", pool="mean")
    return G, D


FAMILY = adversarial_family("wgan_gp", build_wgan_gp, default_loss="wasserstein", paper="Gulrajani et al., NeurIPS 2017")
