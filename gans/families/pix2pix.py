"""pix2pix (Isola et al., CVPR 2017, "Image-to-Image Translation with Conditional Adversarial
Networks") as a mask -> H&E painter, on the shared engine: synthetic image-mask pairs for
segmentation.

Paper defaults: a U-Net generator, a 70x70 PatchGAN discriminator that sees the mask beside the
image (conditional GAN), the non-saturating GAN loss plus lambda = 100 x L1 to the real image,
Adam(2e-4, 0.5, 0.999), constant learning rate then linear decay. Here the U-Net is
segmentation-models-pytorch's (``model.encoder``, from scratch), fully convolutional: trained on
``data.image_size`` crops, it paints masks of any multiple of 32 (pairs come out at
``data.tile_size``). The mask enters as one channel in [-1, 1], beside a channel of per-pixel
Gaussian noise (``model.noise``; the paper used dropout as its noise), so one mask can be
painted many ways.

A trained run is a :class:`~histosynth.roles.PairGenerator`: it draws NEW masks from the bank of
training mask tiles stored in its checkpoint (:class:`segmentation.masks.MaskDrawer`: training
masks only, never validation or test) and paints them. ``gan-generate`` writes them as a pairs
folder (images/, masks/, manifest, source.json) that ``augment-compare`` with ``task:
segmentation`` verifies and uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gans.config import TrainConfig, image_to_image_train
from gans.families.cyclegan import PatchDiscriminator
from gans.registry import Family
from histosynth import config as configlib
from histosynth.checkpoint import sha256_file
from histosynth.config import ConfigError, require
from histosynth.data import BatchSampler, cache_dir_of, flip_rot90, random_crop, to_uint8, to_unit_range
from histosynth.engine import module_state, require_divisible
from histosynth.paths import resolve_data_path
from histosynth.roles import Grid, PairGenerator
from histosynth.runtime import Runtime, compiled, eval_mode, fold_batchnorm
from segmentation.data import PairSet, load_pairs
from segmentation.masks import METHODS, MaskDrawer
from segmentation.model import unet_inference_runtime

# ----------------------------------------------------------------------------------------------
# config


@dataclass
class PairDataConfig:
    root: str = "data/monuseg_demo/train"
    """A pairs folder: images/ and masks/ matched by file name (binary masks, 0/255). In
    augment-compare this is always the training split."""
    tile_size: int = 256
    """Images are cut once into tiles of this side (the bank new masks are drawn from, and the
    side of generated pairs: make it the segmenter's model.tile_size); a multiple of 32."""
    image_size: int = 128
    """Side of the random training crops (a multiple of 32)."""
    augment: Literal["none", "flip", "flip_rot90"] = "flip_rot90"
    """The same random flips (and 90-degree rotations) of image and mask."""
    cache: Literal["disk", "memory"] = "disk"
    cache_dir: Optional[str] = None

    def __post_init__(self):
        for key in ("tile_size", "image_size"):
            v = getattr(self, key)
            require(v % 32 == 0 and v >= 64, key, f"must be a multiple of 32 and >= 64, got {v}")
        require(self.tile_size >= self.image_size, "tile_size",
                f"must be >= image_size ({self.image_size}), got {self.tile_size}")


@dataclass
class PairModelConfig:
    family: Literal["pix2pix"] = "pix2pix"
    encoder: str = "resnet18"
    """Encoder of the U-Net generator (segmentation-models-pytorch name; from scratch)."""
    noise: bool = True
    """A channel of Gaussian noise beside the mask (the same mask painted many ways)."""
    ndf: int = 64
    """PatchGAN base width (paper: 64)."""
    d_layers: int = 3
    """Strided layers of the PatchGAN: 3 gives the 70x70 receptive field."""

    def __post_init__(self):
        require(self.ndf >= 1 and self.d_layers >= 1, "ndf", "ndf and d_layers must be >= 1")


@dataclass
class PairLossConfig:
    type: Literal["bce", "lsgan"] = "bce"
    """GAN loss on the patch outputs (paper: the non-saturating cross-entropy)."""
    lambda_l1: float = 100.0
    """Weight of the L1 distance to the real image (paper: 100)."""

    def __post_init__(self):
        require(self.lambda_l1 >= 0, "lambda_l1", f"must be >= 0, got {self.lambda_l1}")


@dataclass
class PairSampleConfig:
    masks: Literal["transform", "place", "mix"] = "transform"
    """How new masks are drawn from the training masks (segmentation/masks.py): ``transform``
    (a training tile deformed: symmetry, scale, rotation, elastic), ``place`` (training nuclei
    placed anew) or ``mix``. gan-generate --option masks=place overrides it."""


@dataclass
class Pix2PixConfig:
    data: PairDataConfig = field(default_factory=PairDataConfig)
    model: PairModelConfig = field(default_factory=PairModelConfig)
    loss: PairLossConfig = field(default_factory=PairLossConfig)
    train: TrainConfig = field(default_factory=lambda: image_to_image_train(batch_size=4))
    sample: PairSampleConfig = field(default_factory=PairSampleConfig)

    def __post_init__(self):
        t = self.train
        require(t.n_dis == 1, "train.n_dis", f"pix2pix updates D and G once per step; set 1, got {t.n_dis}")
        require(not t.diffaugment and t.ada == "off", "train.diffaugment",
                "is not used by pix2pix (its D sees the mask beside the image); set '' and train.ada: off")
        require(t.kid_every == 0, "train.kid_every", "is not measured for pix2pix; set 0")


# ----------------------------------------------------------------------------------------------
# networks


class MaskPainter(nn.Module):
    """G: ``B x 1 x H x W`` masks in {0, 1} (+ ``B x 1 x H x W`` noise) -> ``B x 3 x H x W`` images
    in [-1, 1]; H and W multiples of 32. A segmentation-models-pytorch U-Net, from scratch."""

    def __init__(self, encoder: str = "resnet18", noise: bool = True):
        super().__init__()
        import segmentation_models_pytorch as smp
        try:
            self.net = smp.Unet(encoder_name=encoder, encoder_weights=None, in_channels=2 if noise else 1, classes=3)
        except KeyError as e:
            raise ConfigError("model.encoder", f"{e}; see segmentation_models_pytorch.encoders") from None
        self.noise = noise

    def forward(self, mask: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        x = mask * 2 - 1
        if self.noise:
            x = torch.cat([x, noise if noise is not None else torch.zeros_like(x)], 1)
        return torch.tanh(self.net(x))


def _pack(bank: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.packbits(bank.astype(bool)))


def _unpack(packed: torch.Tensor, shape: Sequence[int]) -> np.ndarray:
    n = int(np.prod(shape))
    return np.unpackbits(packed.numpy())[:n].reshape(shape).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# data


def load_data(cfg: Pix2PixConfig, progress: bool = True) -> PairSet:
    d = cfg.data
    return load_pairs(resolve_data_path(d.root), d.tile_size, 1, None, cache_dir_of(d), progress)


def inputs(cfg: Pix2PixConfig) -> dict[str, Path | None]:
    return {"training pairs (data.root)": resolve_data_path(cfg.data.root)}


def provenance(cfg: Pix2PixConfig, data: PairSet) -> dict:
    """data.json: the pairs read and the sha256 of every file (images and masks)."""
    root = resolve_data_path(cfg.data.root)
    return {"root": str(root.resolve()), "pairs": len(set(data.stems)), "tiles": len(data),
            "skipped": data.skipped, "files_sha256": {f: sha256_file(root / f) for f in data.files}}


# ----------------------------------------------------------------------------------------------
# the task


class Pix2PixTask:
    """G paints the mask of a random training crop; D judges (mask, image) patches; one step
    updates D, then G (GAN + lambda x L1)."""

    def __init__(self, cfg: Pix2PixConfig, data: PairSet, rt: Runtime):
        self.cfg, self.rt, self.data = cfg, rt, data
        m, t = cfg.model, cfg.train
        require_divisible(t.batch_size, rt.world, "train.batch_size")
        self.plan = t.plan(images_per_step=t.batch_size)
        self.G = rt.prepare(MaskPainter(m.encoder, m.noise))
        self.D = rt.prepare(PatchDiscriminator(m.ndf, m.d_layers, in_ch=4))
        self.modules = {"G": self.G, "D": self.D}
        self.run = {n: compiled(mod, rt.compiled) for n, mod in self.modules.items()}
        fused = rt.optimizer_options()
        self.optimizers = {"G": torch.optim.Adam(self.G.parameters(), lr=t.lr_g, betas=t.betas, **fused),
                           "D": torch.optim.Adam(self.D.parameters(), lr=t.lr_d, betas=t.betas, **fused)}
        self.ema_names = ("G",)
        self.gen = torch.Generator().manual_seed(t.seed + 1)          # crops, flips, noise
        self.sampler = BatchSampler(len(data), t.batch_size, t.seed, rt.rank, rt.world)
        k = min(4, len(data))                                         # the grid: the same masks always
        pick = np.linspace(0, len(data) - 1, k).round().astype(int)
        self.grid_masks = torch.from_numpy(np.asarray(data.masks)[pick]).float()[:, None]
        self.grid_real = to_unit_range(torch.from_numpy(np.asarray(data.images)[pick]))
        self.grid_noise = torch.randn(self.grid_masks.shape, generator=torch.Generator().manual_seed(t.seed + 2))

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = self.sampler.next().numpy()
        img = torch.from_numpy(np.ascontiguousarray(np.asarray(self.data.images)[idx]))     # B x 3 x T x T uint8
        mask = torch.from_numpy(np.ascontiguousarray(np.asarray(self.data.masks)[idx]))[:, None]
        both = torch.cat([img, mask], 1)                   # the same crop and flips for both
        both = random_crop(both, self.cfg.data.image_size, self.gen, self.rt.shard)
        both = flip_rot90(both, self.gen, self.cfg.data.augment, self.rt.shard)
        noise = torch.randn(both.shape[0], 1, *both.shape[2:], generator=self.gen)
        real, m = to_unit_range(both[:, :3]), both[:, 3:].float()
        return self.rt.batch(real), self.rt.batch(m), self.rt.batch(noise)

    def _gan(self, pred: torch.Tensor, real: bool) -> torch.Tensor:
        target = torch.ones_like(pred) if real else torch.zeros_like(pred)
        if self.cfg.loss.type == "lsgan":
            return F.mse_loss(pred, target)
        return F.binary_cross_entropy_with_logits(pred, target)

    def train_step(self) -> dict[str, torch.Tensor]:
        real, mask, noise = self._batch()                  # B x 3 x S x S, B x 1 x S x S, B x 1 x S x S
        G, D = self.run["G"], self.run["D"]
        cond = mask * 2 - 1
        with self.rt.autocast():
            fake = G(mask, noise)
        # D: real (mask, image) pairs against painted ones
        with self.rt.autocast():
            d_real = D(torch.cat([cond, real], 1)).float()
            d_fake = D(torch.cat([cond, fake.detach()], 1)).float()
        loss_d = 0.5 * (self._gan(d_real, True) + self._gan(d_fake, False))
        opt = self.optimizers["D"]
        opt.zero_grad(set_to_none=True)
        loss_d.backward()
        opt.step()
        # G: fool D, stay near the real image
        with self.rt.autocast():
            d_fake = D(torch.cat([cond, fake], 1)).float()
        l1 = F.l1_loss(fake.float(), real)
        loss_g = self._gan(d_fake, True) + self.cfg.loss.lambda_l1 * l1
        opt = self.optimizers["G"]
        opt.zero_grad(set_to_none=True)
        loss_g.backward()
        opt.step()
        return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach(), "l1": l1.detach(),
                "d_real": torch.sigmoid(d_real).mean().detach(), "d_fake": torch.sigmoid(d_fake).mean().detach()}

    def evaluate(self, models) -> dict[str, float]:
        return {}

    @torch.no_grad()
    def visualise(self, models) -> Grid:
        G = models["G"]
        with eval_mode(G), self.rt.autocast():
            fake = G(self.grid_masks.to(self.rt.device), self.grid_noise.to(self.rt.device)).float().cpu()
        k = len(fake)
        masks = self.grid_masks.repeat(1, 3, 1, 1) * 2 - 1
        return torch.cat([masks, fake.clamp(-1, 1), self.grid_real]), k, ["mask", "painted", "real"]

    def info(self) -> dict[str, Any]:
        bank = np.asarray(self.data.masks)
        return {"tile_size": self.cfg.data.tile_size, "classes": ["background", "nucleus"],
                "mask_bank": _pack(bank), "mask_bank_shape": list(bank.shape)}

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict(), "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.gen.set_state(state["gen"])


# ----------------------------------------------------------------------------------------------
# a trained run


class Pix2PixPairs:
    """The :class:`~histosynth.roles.PairGenerator` of a trained run. Options: ``masks``
    (transform | place | mix; default: the run's sample.masks) and ``size`` (the side of the
    pairs, a multiple of 32; default: data.tile_size)."""

    def __init__(self, G: MaskPainter, bank: np.ndarray, image_size: int, masks: str, rt: Runtime, batch: int = 16):
        self.G = rt.prepare(fold_batchnorm(G))            # eval-mode painter: BatchNorms folded
        self.drawer, self.image_size, self.masks, self.rt, self.batch = MaskDrawer(bank), image_size, masks, rt, batch

    @torch.no_grad()
    def sample_pairs(self, seeds: Sequence[int], **options: Any) -> tuple[torch.Tensor, torch.Tensor]:
        unknown = set(options) - {"masks", "size"}
        if unknown:
            raise ConfigError("", f"unknown sampling option(s) {', '.join(sorted(unknown))}; pix2pix takes masks, size")
        method = options.get("masks", self.masks)
        if method not in METHODS:
            raise ConfigError("masks", f"{method!r} is not a mask drawing method; choose one of {', '.join(METHODS)}")
        size = int(options.get("size", self.image_size))
        if size % 32 or size < 64:
            raise ConfigError("size", f"must be a multiple of 32 and >= 64, got {size}")
        masks = np.stack([self.drawer.draw(np.random.default_rng(int(s)), size, method) for s in seeds])
        noise = torch.stack([torch.randn(1, size, size, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        images = []
        with eval_mode(self.G):
            for i in range(0, len(seeds), self.batch):
                m = self.rt.batch(torch.from_numpy(masks[i:i + self.batch]).float()[:, None])
                with self.rt.autocast():
                    painted = self.G(m, self.rt.batch(noise[i:i + self.batch]))
                images.append(to_uint8(painted).cpu())
        return torch.cat(images), torch.from_numpy(masks)


def _from_checkpoint(ck: dict, weights: str = "ema", device: Any = "cpu") -> Pix2PixPairs:
    cfg = configlib.build(Pix2PixConfig, ck["config"])
    G = MaskPainter(cfg.model.encoder, cfg.model.noise)
    G.load_state_dict(module_state(ck, "G", weights))
    bank = _unpack(ck["info"]["mask_bank"], ck["info"]["mask_bank_shape"])
    return Pix2PixPairs(G.eval(), bank, int(ck["info"]["tile_size"]), cfg.sample.masks, unet_inference_runtime(str(device)))


FAMILY = Family(name="pix2pix", paper="Isola et al., CVPR 2017", config=Pix2PixConfig,
                config_file="pix2pix_monuseg.yaml",
                smoke=("data.root=data/monuseg_demo/train", "data.tile_size=64", "data.image_size=64",
                       "model.encoder=resnet18", "model.ndf=8", "train.batch_size=2", "train.steps=4",
                       "train.checkpoint_every=2", "train.sample_every=2", "train.log_every=1", "train.device=cpu"),
                inputs=inputs, load_data=load_data, provenance=provenance, build_task=Pix2PixTask,
                from_checkpoint=_from_checkpoint, draws=lambda cfg: PairGenerator)
