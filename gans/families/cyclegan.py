"""CycleGAN (Zhu et al., ICCV 2017, "Unpaired Image-to-Image Translation") on the shared engine.

Paper defaults: ResNet generator (c7s1-64, d128, d256, 6 or 9 residual blocks, u128, u64,
c7s1-3; instance norm, reflection padding), 70x70 PatchGAN discriminator (C64-C128-C256-C512),
least-squares GAN loss, cycle weight 10, identity weight 0.5 (x the cycle weight), an image pool
of 50 past fakes per domain, Adam(2e-4, 0.5, 0.999), constant learning rate for the first half
and linear decay to 0 over the second. ``G_ab`` maps domain A to B, ``G_ba`` maps B to A.

The engine trains :class:`CycleGANTask` like any other task; one ``train_step`` updates the
generators, then both discriminators on pooled fakes, as in the paper's code. A trained run is a
:class:`CycleGANTranslator` (``gan-translate``, ``gan-eval``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gans.config import TrainConfig, image_to_image_train
from gans.layers import ColumnConv2d
from gans.registry import Family
from histosynth import config as configlib
from histosynth.checkpoint import sha256_file
from histosynth.config import require
from histosynth.data import (BatchSampler, TileCache, cache_dir_of, flip_rot90, random_crop, to_uint8,
                             to_unit_range)
from histosynth.engine import module_state, require_divisible
from histosynth.images import native_size
from histosynth.paths import resolve_data_path
from histosynth.roles import Grid
from histosynth.runtime import Runtime, compiled, eval_mode

# ----------------------------------------------------------------------------------------------
# config


@dataclass
class CycleDataConfig:
    root_a: str = "../shared/data/stain/trainA_he"
    """Folder of domain-A training images (flat: images directly inside)."""
    root_b: str = "../shared/data/stain/trainB_ihc"
    """Folder of domain-B training images; need not pair with A."""
    test_a: Optional[str] = None
    """Domain-A test images for evaluation; paired with test_b by file name when both are given."""
    test_b: Optional[str] = None
    """Domain-B test images; the pairs (same file name) give PSNR/SSIM of G_ab(A) against B."""
    image_size: int = 256
    """Side of the random training crops (a multiple of 4)."""
    load_size: int = 0
    """Images are centre-cropped to a square and resized to this once, when cached; 0 keeps the
    native size (all images must then share one size). Keep 0 to keep the magnification."""
    augment: Literal["none", "flip", "flip_rot90"] = "flip_rot90"
    """Random flips (and 90-degree rotations) of the crops."""
    cache: Literal["disk", "memory"] = "disk"
    cache_dir: Optional[str] = None

    def __post_init__(self):
        require(self.image_size >= 16 and self.image_size % 4 == 0, "image_size",
                f"must be a multiple of 4 and >= 16, got {self.image_size}")
        require(self.load_size == 0 or self.load_size >= self.image_size, "load_size",
                f"must be 0 (native) or >= image_size ({self.image_size}), got {self.load_size}")
        require((self.test_a is None) == (self.test_b is None), "test_b" if self.test_b is None else "test_a",
                "give both test_a and test_b, or neither")


@dataclass
class CycleModelConfig:
    family: Literal["cyclegan"] = "cyclegan"
    ngf: int = 64
    """Generator base width (paper: 64)."""
    ndf: int = 64
    """PatchGAN base width (paper: 64)."""
    n_blocks: int = 9
    """Residual blocks of the generator: 9 (256 px in the paper) or 6 (128 px)."""
    d_layers: int = 3
    """Strided layers of the PatchGAN: 3 gives the 70x70 receptive field."""

    def __post_init__(self):
        for key in ("ngf", "ndf", "n_blocks", "d_layers"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")


@dataclass
class CycleLossConfig:
    type: Literal["lsgan", "bce"] = "lsgan"
    """GAN loss on the patch outputs (paper: least squares)."""
    lambda_cycle: float = 10.0
    """Weight of the cycle-consistency L1 losses (paper: 10)."""
    lambda_identity: float = 0.5
    """Identity loss weight as a fraction of lambda_cycle (paper: 0.5); 0 turns it off."""
    pool_size: int = 50
    """Past fakes kept per domain for D updates (Shrivastava 2017; paper: 50); 0 turns it off."""

    def __post_init__(self):
        require(self.lambda_cycle >= 0, "lambda_cycle", f"must be >= 0, got {self.lambda_cycle}")
        require(self.lambda_identity >= 0, "lambda_identity", f"must be >= 0, got {self.lambda_identity}")
        require(self.pool_size >= 0, "pool_size", f"must be >= 0, got {self.pool_size}")


@dataclass
class CycleEvalConfig:
    max_images: int = 0
    """Evaluate on at most this many test images per domain (0: all)."""
    tile: int = 512
    """Tile side for translating test images larger than this (see gan-translate)."""


@dataclass
class CycleGANConfig:
    data: CycleDataConfig = field(default_factory=CycleDataConfig)
    model: CycleModelConfig = field(default_factory=CycleModelConfig)
    loss: CycleLossConfig = field(default_factory=CycleLossConfig)
    train: TrainConfig = field(default_factory=lambda: image_to_image_train(batch_size=1))
    eval: CycleEvalConfig = field(default_factory=CycleEvalConfig)

    def __post_init__(self):
        require(self.train.n_dis == 1, "train.n_dis", "CycleGAN updates G and D once per step; "
                                                      f"set 1, got {self.train.n_dis}")
        require(not self.train.diffaugment, "train.diffaugment",
                "is not used by CycleGAN (its discriminators see pooled fakes); set ''")
        require(self.train.ada == "off", "train.ada", "is not used by CycleGAN; set off")


# ----------------------------------------------------------------------------------------------
# networks


def _init_normal(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class ResnetBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """B x 3 x H x W in [-1, 1] -> B x 3 x H x W (H, W multiples of 4); fully convolutional."""

    def __init__(self, ngf: int = 64, n_blocks: int = 9):
        super().__init__()
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(3, ngf, 7), nn.InstanceNorm2d(ngf), nn.ReLU(True)]
        c = ngf
        for _ in range(2):                                   # H -> H/4, ngf -> 4 ngf
            layers += [nn.Conv2d(c, c * 2, 3, 2, 1), nn.InstanceNorm2d(c * 2), nn.ReLU(True)]
            c *= 2
        layers += [ResnetBlock(c) for _ in range(n_blocks)]
        for _ in range(2):                                   # H/4 -> H
            layers += [nn.ConvTranspose2d(c, c // 2, 3, 2, 1, output_padding=1),
                       nn.InstanceNorm2d(c // 2), nn.ReLU(True)]
            c //= 2
        layers += [nn.ReflectionPad2d(3), ColumnConv2d(c, 3, 7), nn.Tanh()]    # gans/layers.py: ~1.8x on CPUs
        self.net = nn.Sequential(*layers)
        self.apply(_init_normal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PatchDiscriminator(nn.Module):
    """PatchGAN: B x C x H x W -> B x 1 x H/8-2 x W/8-2 real/fake scores (70x70 receptive field);
    C = ``in_ch``: 3 for an image, 4 for pix2pix's mask beside its image."""

    def __init__(self, ndf: int = 64, n_layers: int = 3, in_ch: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_ch, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = ndf
        for i in range(1, n_layers + 1):
            out = ndf * min(2 ** i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(c, out, 4, stride, 1), nn.InstanceNorm2d(out), nn.LeakyReLU(0.2, True)]
            c = out
        layers += [nn.Conv2d(c, 1, 4, 1, 1)]
        self.net = nn.Sequential(*layers)
        self.apply(_init_normal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ImagePool:
    """History of generated images (Shrivastava 2017), as in CycleGAN.

    Until ``size`` images are stored, each new image is stored and returned. Afterwards each
    query returns, with probability 0.5, a random stored image (replacing it by the new one),
    otherwise the new image. Draws come from a seeded generator; ``state_dict`` keeps the images
    and the generator so a resumed run sees the same history.
    """

    def __init__(self, size: int, seed: int = 0):
        self.size = size
        self.images: list[torch.Tensor] = []
        self.gen = torch.Generator().manual_seed(seed)

    def query(self, batch: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return batch
        out = []
        for img in batch.detach():
            img = img.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(img.clone())
                out.append(img)
            elif torch.rand(1, generator=self.gen).item() < 0.5:
                i = int(torch.randint(0, self.size, (1,), generator=self.gen))
                out.append(self.images[i].clone())
                self.images[i] = img.clone()
            else:
                out.append(img)
        return torch.cat(out)

    def state_dict(self) -> dict:
        stack = torch.cat(self.images).cpu() if self.images else torch.empty(0)
        return {"images": stack, "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        imgs = state["images"]
        self.images = [imgs[i:i + 1].to(device) for i in range(imgs.shape[0])] if imgs.numel() else []
        self.gen.set_state(state["gen"])


# ----------------------------------------------------------------------------------------------
# data


def load_data(cfg: CycleGANConfig, progress: bool = True) -> tuple[TileCache, TileCache]:
    """The two unpaired domains, cached at ``data.load_size`` (0: native size)."""
    d = cfg.data
    out = []
    for key in ("root_a", "root_b"):
        root = resolve_data_path(getattr(d, key))
        size = d.load_size or native_size(root)
        if size < d.image_size:
            raise configlib.ConfigError("data.image_size", f"{d.image_size} is larger than the "
                                        f"images of data.{key} ({size} px); lower it")
        out.append(TileCache.build(root, size, cache_dir=cache_dir_of(d), progress=progress, layout="flat"))
    return out[0], out[1]


def inputs(cfg: CycleGANConfig) -> dict[str, Path | None]:
    return {f"data.{k}": resolve_data_path(getattr(cfg.data, k)) if getattr(cfg.data, k) else None
            for k in ("root_a", "root_b", "test_a", "test_b")}


def provenance(cfg: CycleGANConfig, data: tuple[TileCache, TileCache]) -> dict:
    info = {}
    for key, cache in zip(("a", "b"), data):
        root = resolve_data_path(getattr(cfg.data, f"root_{key}"))
        info.update({f"root_{key}": str(root.resolve()), f"count_{key}": len(cache),
                     f"skipped_{key}": cache.skipped,
                     f"files_sha256_{key}": {f: sha256_file(root / f) for f in cache.files}})
    return info


# ----------------------------------------------------------------------------------------------
# the task


class CycleGANTask:
    """Two generators, two PatchGANs, the paper's losses; batches of random crops from A and B."""

    def __init__(self, cfg: CycleGANConfig, data: tuple[TileCache, TileCache], rt: Runtime):
        self.cfg, self.rt = cfg, rt
        self.data_a, self.data_b = data
        m, t = cfg.model, cfg.train
        require_divisible(t.batch_size, rt.world, "train.batch_size")
        self.plan = t.plan(images_per_step=t.batch_size)
        self.G_ab = rt.prepare(ResnetGenerator(m.ngf, m.n_blocks))
        self.G_ba = rt.prepare(ResnetGenerator(m.ngf, m.n_blocks))
        self.D_a = rt.prepare(PatchDiscriminator(m.ndf, m.d_layers))
        self.D_b = rt.prepare(PatchDiscriminator(m.ndf, m.d_layers))
        self.modules = {"G_ab": self.G_ab, "G_ba": self.G_ba, "D_a": self.D_a, "D_b": self.D_b}
        # the steps call these: the modules, or torch.compile's wrappers (a compiled path)
        self.run = {n: compiled(m, rt.compiled) for n, m in self.modules.items()}
        fused = rt.optimizer_options()
        self.optimizers = {
            "G": torch.optim.Adam(itertools.chain(self.G_ab.parameters(), self.G_ba.parameters()),
                                  lr=t.lr_g, betas=t.betas, **fused),
            "D": torch.optim.Adam(itertools.chain(self.D_a.parameters(), self.D_b.parameters()),
                                  lr=t.lr_d, betas=t.betas, **fused),
        }
        self.ema_names = ("G_ab", "G_ba")
        # each rank keeps a history of its own fakes
        self.pool_a = ImagePool(cfg.loss.pool_size, t.seed + 3 + 1000 * rt.rank)
        self.pool_b = ImagePool(cfg.loss.pool_size, t.seed + 4 + 1000 * rt.rank)
        self.gen = torch.Generator().manual_seed(t.seed + 1)     # crops, flips, batch order
        self.sampler_a = BatchSampler(len(self.data_a), t.batch_size, t.seed, rt.rank, rt.world)
        self.sampler_b = BatchSampler(len(self.data_b), t.batch_size, t.seed + 5, rt.rank, rt.world)
        # the grid shows the same crops at every step: the first tiles' centres
        k = min(4, len(self.data_a), len(self.data_b))
        self.grid_a = self._centre(self.data_a, k)
        self.grid_b = self._centre(self.data_b, k)

    def _centre(self, data: TileCache, k: int) -> torch.Tensor:
        x = torch.from_numpy(np.array(data.images[:k]))           # a copy: the cache is read-only
        s, (h, w) = self.cfg.data.image_size, x.shape[2:]
        y0, x0 = (h - s) // 2, (w - s) // 2
        return to_unit_range(x[:, :, y0:y0 + s, x0:x0 + s])

    def _load(self, data: TileCache, sampler) -> torch.Tensor:
        idx = sampler.next().numpy()
        x = torch.from_numpy(np.ascontiguousarray(data.images[idx]))
        x = random_crop(x, self.cfg.data.image_size, self.gen, self.rt.shard)
        x = flip_rot90(x, self.gen, self.cfg.data.augment, self.rt.shard)
        return to_unit_range(self.rt.batch(x))

    def _gan(self, pred: torch.Tensor, real: bool) -> torch.Tensor:
        target = torch.ones_like(pred) if real else torch.zeros_like(pred)
        if self.cfg.loss.type == "lsgan":
            return F.mse_loss(pred, target)
        return F.binary_cross_entropy_with_logits(pred, target)

    def train_step(self) -> dict[str, torch.Tensor]:
        """Generators on a batch of A and B crops, then both discriminators on the same real
        crops and pooled fakes (the paper's order)."""
        a, b = self._load(self.data_a, self.sampler_a), self._load(self.data_b, self.sampler_b)
        out, fake_a, fake_b = self.g_step(a, b)
        return {**out, **self.d_step(a, b, fake_a, fake_b)}

    def g_step(self, a: torch.Tensor, b: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """One update of both generators; returns the losses and the (detached) fakes G_ba(b), G_ab(a)."""
        lc, li = self.cfg.loss.lambda_cycle, self.cfg.loss.lambda_identity
        for D in (self.D_a, self.D_b):
            D.requires_grad_(False)
        G_ab, G_ba, D_a, D_b = (self.run[n] for n in ("G_ab", "G_ba", "D_a", "D_b"))
        with self.rt.autocast():
            fake_b, fake_a = G_ab(a), G_ba(b)
            rec_a, rec_b = G_ba(fake_b), G_ab(fake_a)
            gan_ab = self._gan(D_b(fake_b).float(), True)
            gan_ba = self._gan(D_a(fake_a).float(), True)
            cyc = F.l1_loss(rec_a.float(), a) + F.l1_loss(rec_b.float(), b)
            loss = gan_ab + gan_ba + lc * cyc
            idt = torch.zeros((), device=a.device)
            if li > 0:
                idt = F.l1_loss(G_ab(b).float(), b) + F.l1_loss(G_ba(a).float(), a)
                loss = loss + lc * li * idt
        opt = self.optimizers["G"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for D in (self.D_a, self.D_b):
            D.requires_grad_(True)
        out = {"loss_g": loss.detach(), "loss_g_gan": (gan_ab + gan_ba).detach(),
               "loss_cycle": cyc.detach(), "loss_idt": idt.detach()}
        return out, fake_a.detach(), fake_b.detach()

    def d_step(self, a: torch.Tensor, b: torch.Tensor, fake_a: torch.Tensor, fake_b: torch.Tensor
               ) -> dict[str, torch.Tensor]:
        """One update of both discriminators: real crops against fakes drawn through the pools."""
        fake_a, fake_b = self.pool_a.query(fake_a), self.pool_b.query(fake_b)
        D_a, D_b = self.run["D_a"], self.run["D_b"]
        with self.rt.autocast():
            loss_a = 0.5 * (self._gan(D_a(a).float(), True) + self._gan(D_a(fake_a).float(), False))
            loss_b = 0.5 * (self._gan(D_b(b).float(), True) + self._gan(D_b(fake_b).float(), False))
        opt = self.optimizers["D"]
        opt.zero_grad(set_to_none=True)
        (loss_a + loss_b).backward()
        opt.step()
        return {"loss_d": (loss_a + loss_b).detach(), "loss_d_a": loss_a.detach(), "loss_d_b": loss_b.detach()}

    @torch.no_grad()
    def visualise(self, models) -> Grid:
        """Rows A | G_ab(A) | G_ba(G_ab(A)) and B | G_ba(B) | G_ab(G_ba(B)), same crops every time."""
        G_ab, G_ba = models["G_ab"], models["G_ba"]
        a, b = self.grid_a.to(self.rt.device), self.grid_b.to(self.rt.device)
        with eval_mode(G_ab, G_ba), self.rt.autocast():
            fb, fa = G_ab(a).float(), G_ba(b).float()
            ra, rb = G_ba(fb).float(), G_ab(fa).float()
        rows, labels = [], []
        for i in range(a.shape[0]):
            rows += [a[i], fb[i], ra[i]]
            labels.append("A > B > A")
        for i in range(b.shape[0]):
            rows += [b[i], fa[i], rb[i]]
            labels.append("B > A > B")
        return torch.stack(rows).cpu(), 3, labels

    @torch.no_grad()
    def evaluate(self, models) -> dict[str, float]:
        """Domain KID (pixel features) of G_ab(A) against B on fixed centre crops."""
        from metrics.distribution import kid
        from metrics.features import PixelExtractor

        n, G = self.cfg.train.kid_samples, models["G_ab"]
        a = self._centre(self.data_a, min(n, len(self.data_a)))
        fakes = []
        with eval_mode(G), self.rt.autocast():
            for s in range(0, a.shape[0], 16):
                fakes.append(to_uint8(G(a[s:s + 16].to(self.rt.device))).cpu())
        real = to_uint8(self._centre(self.data_b, min(n, len(self.data_b))))
        ext = PixelExtractor()
        return {"kid": kid(ext(real).double(), ext(torch.cat(fakes)).double())}

    def info(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"sampler_a": self.sampler_a.state_dict(), "sampler_b": self.sampler_b.state_dict(),
                "gen": self.gen.get_state(), "pool_a": self.pool_a.state_dict(),
                "pool_b": self.pool_b.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler_a.load_state_dict(state["sampler_a"])
        self.sampler_b.load_state_dict(state["sampler_b"])
        self.gen.set_state(state["gen"])
        self.pool_a.load_state_dict(state["pool_a"], self.rt.device)
        self.pool_b.load_state_dict(state["pool_b"], self.rt.device)


# ----------------------------------------------------------------------------------------------
# a trained run


class CycleGANTranslator:
    """The :class:`~histosynth.roles.Translator` of a trained run: ``a2b`` (G_ab), ``b2a`` (G_ba)."""

    directions = ("a2b", "b2a")

    def __init__(self, G_ab: nn.Module, G_ba: nn.Module):
        self.nets = {"a2b": G_ab, "b2a": G_ba}

    def translate(self, rgb: np.ndarray, direction: str, tile: int = 512, overlap: int | None = None) -> np.ndarray:
        from gans.tiling import translate_image
        return translate_image(self.nets[direction], rgb, tile, tile // 8 if overlap is None else overlap)


def _from_checkpoint(ck: dict, weights: str = "ema", device: Any = "cpu") -> CycleGANTranslator:
    cfg = configlib.build(CycleGANConfig, ck["config"])
    nets = []
    for name in ("G_ab", "G_ba"):
        G = ResnetGenerator(cfg.model.ngf, cfg.model.n_blocks)
        G.load_state_dict(module_state(ck, name, weights))
        nets.append(G.to(device).eval())
    return CycleGANTranslator(*nets)


def _evaluate_run(run: Path, progress: bool) -> dict:
    from gans.cyclegan_eval import evaluate_run
    return evaluate_run(run, progress=progress)


FAMILY = Family(name="cyclegan", paper="Zhu et al., ICCV 2017", config=CycleGANConfig,
                config_file="cyclegan_cpu.yaml",
                smoke=("data.root_a=data/lung_demo/train/lung_aca", "data.root_b=data/lung_demo/train/lung_n",
                       "data.image_size=32", "model.ngf=8", "model.ndf=8", "model.n_blocks=2", "loss.pool_size=3",
                       "train.batch_size=2", "train.steps=4", "train.checkpoint_every=2", "train.sample_every=2",
                       "train.log_every=1", "train.device=cpu", "eval.max_images=2", "eval.tile=128"),
                inputs=inputs, load_data=load_data, provenance=provenance, build_task=CycleGANTask,
                from_checkpoint=_from_checkpoint, finish=_evaluate_run)
