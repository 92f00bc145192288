"""The class-conditional GAN task every adversarial family shares (DCGAN, SNGAN, WGAN-GP).

A family module gives its networks and paper loss to :func:`adversarial_family`; everything else
is here or in :mod:`gans.classdata` (the training data: a decoded tile cache of class folders): the :class:`GANTask` the
engine trains (``n_dis`` discriminator updates then one generator update per step, stylegan2-ada
style maths in one object), and :class:`NoiseSampler`, the :class:`~histosynth.roles.Generator`
of a trained run.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gans.ada import AdaptiveAugment, LeCam
from gans.classdata import inputs, load_data, provenance
from gans.config import GANConfig
from gans.diffaugment import diff_augment, parse_policy
from gans.losses import AdversarialLoss, gradient_penalty
from gans.registry import Family, create_model
from histosynth import config as configlib
from histosynth.config import ConfigError
from histosynth.data import BatchSampler, TileCache, flip_rot90, to_uint8, to_unit_range
from histosynth.engine import module_state, require_divisible
from histosynth.roles import Generator, Grid
from histosynth.runtime import Runtime, compiled, eval_mode


# ----------------------------------------------------------------------------------------------
# sampling a trained generator


class NoiseSampler:
    """The :class:`~histosynth.roles.Generator` of a ``G(z, y)`` network: tile ``i`` is
    ``G(z_i, labels[i])`` with ``z_i`` drawn from a generator seeded by ``seeds[i]``."""

    def __init__(self, G: nn.Module, classes: list[str], z_dim: int, image_size: int,
                 device: torch.device | str = "cpu", autocast: Callable[[], Any] = contextlib.nullcontext):
        self.G, self.classes, self.z_dim, self.image_size = G, classes, z_dim, image_size
        self.device, self.autocast = torch.device(device), autocast
        self.conditional = bool(getattr(G, "num_classes", 0))

    @torch.no_grad()
    def sample(self, labels: Sequence[int], seeds: Sequence[int], **options: Any) -> torch.Tensor:
        if options:
            raise ConfigError("", f"a GAN generator takes no sampling options (got {', '.join(options)})")
        z = torch.stack([torch.randn(self.z_dim, generator=torch.Generator().manual_seed(int(s)))
                         for s in seeds]).to(self.device)
        y = torch.as_tensor(list(labels), dtype=torch.long, device=self.device) if self.conditional else None
        with eval_mode(self.G), self.autocast():
            return to_uint8(self.G(z, y)).cpu()                  # B x 3 x S x S uint8


def _from_checkpoint(ck: dict, weights: str = "ema", device: Any = "cpu") -> NoiseSampler:
    cfg = configlib.build(GANConfig, ck["config"])
    info = ck["info"]
    num_classes = int(info["num_classes"])
    G, _ = create_model(ck["task"], cfg.data.image_size, num_classes, cfg.model.z_dim, cfg.model.ch)
    G.load_state_dict(module_state(ck, "G", weights))
    classes = list(info["classes"]) if num_classes else ["all"]
    return NoiseSampler(G.to(device).eval(), classes, cfg.model.z_dim, cfg.data.image_size, device)


# ----------------------------------------------------------------------------------------------
# the task


class GANTask:
    """Everything model-specific about training a (class-conditional) GAN on a tile cache.

    One ``train_step``: ``n_dis`` discriminator updates, each on a fresh real batch and fresh
    fakes of the same labels, then one generator update for the labels of the last real batch.
    """

    def __init__(self, cfg: GANConfig, data: TileCache, rt: Runtime):
        self.cfg, self.data, self.rt = cfg, data, rt
        t = cfg.train
        require_divisible(t.batch_size, rt.world, "train.batch_size")
        self.plan = t.plan(images_per_step=t.n_dis * t.batch_size)
        self.num_classes = len(data.classes) if cfg.model.conditioning != "none" else 0
        self.ac = cfg.model.conditioning == "ac"          # ACGAN: D classifies, no projection
        G, D = create_model(cfg.model.family, cfg.data.image_size, self.num_classes,
                            cfg.model.z_dim, cfg.model.ch, cfg.model.conditioning)
        self.G, self.D = rt.prepare(G), rt.prepare(D)
        fused = rt.optimizer_options()
        self.modules = {"G": self.G, "D": self.D}
        # the steps call these: the modules, or torch.compile's wrappers (a compiled path)
        self.run_G, self.run_D = compiled(self.G, rt.compiled), compiled(self.D, rt.compiled)
        self.optimizers = {
            "G": torch.optim.Adam(self.G.parameters(), lr=t.lr_g, betas=t.betas, **fused),
            "D": torch.optim.Adam(self.D.parameters(), lr=t.lr_d, betas=t.betas, **fused),
        }
        self.ema_names = ("G",)
        self.loss = AdversarialLoss(cfg.loss.type, cfg.loss.label_smoothing)
        self.gp_weight = cfg.loss.gp_weight
        self.policy = parse_policy(t.diffaugment)
        self.ada = AdaptiveAugment(t.ada_target, t.ada_interval, t.ada_kimg, t.batch_size) if t.ada == "on" else None
        self.lecam = LeCam(cfg.loss.lecam_decay) if cfg.loss.lecam_weight > 0 else None
        self.sampler = BatchSampler(len(data), t.batch_size, t.seed, rt.rank, rt.world)
        self.aug_gen = torch.Generator().manual_seed(t.seed + 1)
        self.labels = torch.from_numpy(np.asarray(data.labels))
        g = torch.Generator().manual_seed(t.seed + 2)
        rows = max(self.num_classes, 1)
        self.fixed_z = torch.randn(rows * t.samples_per_class, cfg.model.z_dim, generator=g)
        self.fixed_y = torch.arange(rows).repeat_interleave(t.samples_per_class)

    # -- data --------------------------------------------------------------------------------
    def real_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's share of the next global batch: images in [-1, 1] and labels (or None)."""
        idx = self.sampler.next()
        x = torch.from_numpy(np.ascontiguousarray(self.data.images[idx.numpy()]))  # B x 3 x S x S uint8
        x = flip_rot90(x, self.aug_gen, self.cfg.data.augment, self.rt.shard)
        x = to_unit_range(self.rt.batch(x))
        y = self.labels[idx].to(self.rt.device) if self.num_classes else None
        return x, y

    def _noise(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.cfg.model.z_dim, device=self.rt.device)

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        """What D sees of any image, real or fake: DiffAugment's or ADA's transforms, or ``x``."""
        if self.policy:
            return diff_augment(x, self.policy)
        return self.ada(x) if self.ada is not None else x

    # -- one step ------------------------------------------------------------------------------
    def train_step(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for _ in range(self.cfg.train.n_dis):
            real, y = self.real_batch()
            out.update(self.d_step(real, y))
        out.update(self.g_step(y))
        return out

    def _discriminate(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """D's logits (fp32) and, for an ACGAN, its class logits."""
        if self.ac:
            logits, cls = self.D.classify(x)
            return logits.float(), cls.float()
        return self.run_D(x, y).float(), None

    def d_step(self, real: torch.Tensor, y: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """One discriminator update on ``real`` and as many fresh fakes of labels ``y``."""
        self.D.requires_grad_(True)
        with torch.no_grad(), self.rt.autocast():
            fake = self.run_G(self._noise(real.shape[0]), y)
        with self.rt.autocast():
            real_logits, real_cls = self._discriminate(self._augment(real), y)
            fake_logits, fake_cls = self._discriminate(self._augment(fake), y)
            loss = self.loss.d(real_logits, fake_logits)
        total = loss
        out = {"loss_d": loss.detach(), "d_real": real_logits.mean().detach(),
               "d_fake": fake_logits.mean().detach()}
        if self.ac:          # D learns the intended class of real and fake images (Odena 2017)
            ac = F.cross_entropy(real_cls, y) + F.cross_entropy(fake_cls, y)
            total = total + self.cfg.loss.ac_weight * ac
            out["loss_ac_d"] = ac.detach()
            out["ac_acc_real"] = (real_cls.argmax(1) == y).float().mean()
        if self.lecam is not None:
            reg = self.lecam(real_logits, fake_logits)
            total = total + self.cfg.loss.lecam_weight * reg
            out["lecam"] = reg.detach()
        if self.ada is not None:
            self.ada.observe(real_logits)
            out["ada_p"] = torch.tensor(self.ada.p, device=real_logits.device)
        if self.gp_weight > 0:
            gp = gradient_penalty(self.D, self._augment(real), self._augment(fake.float()), y)
            total = total + self.gp_weight * gp
            out["gp"] = gp.detach()
        opt = self.optimizers["D"]
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        return out

    def g_step(self, y: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """One generator update on a batch of fakes of labels ``y`` (this rank's share)."""
        n = self.cfg.train.batch_size // self.rt.world
        self.D.requires_grad_(False)
        with self.rt.autocast():
            fake = self.run_G(self._noise(n), y)
            logits, cls = self._discriminate(self._augment(fake), y)
            loss = self.loss.g(logits)
        out = {"loss_g": loss.detach()}
        total = loss
        if self.ac:          # G makes images D classifies as their intended class
            ac = F.cross_entropy(cls, y)
            total = total + self.cfg.loss.ac_weight * ac
            out["loss_ac_g"] = ac.detach()
        opt = self.optimizers["G"]
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        self.D.requires_grad_(True)
        return out

    # -- evaluation, pictures and state --------------------------------------------------------
    def generator(self, G: nn.Module) -> NoiseSampler:
        classes = list(self.data.classes) if self.num_classes else ["all"]
        return NoiseSampler(G, classes, self.cfg.model.z_dim, self.cfg.data.image_size, self.rt.device,
                            self.rt.autocast)

    def evaluate(self, models) -> dict[str, float]:
        """KID (pixel features) between a fixed seeded subset of real tiles and as many tiles of the
        same labels drawn by the (EMA) generator from fixed seeds: comparable across steps."""
        from metrics.distribution import kid
        from metrics.features import PixelExtractor

        t = self.cfg.train
        g = torch.Generator().manual_seed(t.seed + 7)
        idx = torch.randperm(len(self.data), generator=g)[:t.kid_samples]
        real = torch.from_numpy(np.array(self.data.images[idx.numpy()]))
        labels = self.labels[idx].tolist() if self.num_classes else [0] * len(idx)
        gen, seeds = self.generator(models["G"]), range(t.seed * 100_000, t.seed * 100_000 + len(idx))
        fake = torch.cat([gen.sample(labels[s:s + 64], seeds[s:s + 64]) for s in range(0, len(idx), 64)])
        ext = PixelExtractor()
        return {"kid": kid(ext(real).double(), ext(fake).double())}

    @torch.no_grad()
    def visualise(self, models) -> Grid:
        """Fixed-noise samples (one row per class): float images in [-1, 1], row length, row labels."""
        G = models["G"]
        y = self.fixed_y.to(self.rt.device) if self.num_classes else None
        with eval_mode(G), self.rt.autocast():
            imgs = G(self.fixed_z.to(self.rt.device), y).float().cpu()
        labels = self.data.classes if self.num_classes else ["(unconditional)"]
        return imgs, self.cfg.train.samples_per_class, labels

    def info(self) -> dict:
        return {"classes": list(self.data.classes), "num_classes": self.num_classes}

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "aug_gen": self.aug_gen.get_state(), **self.info(),
                **({"ada": self.ada.state_dict()} if self.ada is not None else {}),
                **({"lecam": self.lecam.state_dict()} if self.lecam is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        if list(state["classes"]) != list(self.data.classes):
            raise ConfigError("data.root", f"the checkpoint was trained on classes {state['classes']}, "
                                           f"the data now has {self.data.classes}")
        self.sampler.load_state_dict(state["sampler"])
        self.aug_gen.set_state(state["aug_gen"])
        if self.ada is not None:
            self.ada.load_state_dict(state["ada"])
        if self.lecam is not None:
            self.lecam.load_state_dict(state["lecam"])


SMOKE = ("data.root=data/lung_demo/train", "data.image_size=32", "model.ch=8", "model.z_dim=16",
         "train.batch_size=8", "train.steps=4", "train.checkpoint_every=2", "train.sample_every=2",
         "train.log_every=1", "train.samples_per_class=2", "train.device=cpu")


def adversarial_family(name: str, networks: Callable[..., tuple[nn.Module, nn.Module]],
                       default_loss: str, paper: str) -> Family:
    """The :class:`~gans.registry.Family` of a class-conditional GAN with these networks."""
    return Family(name=name, paper=paper, config=GANConfig, config_file=f"{name}.yaml", smoke=SMOKE,
                  inputs=inputs, load_data=load_data, provenance=provenance, build_task=GANTask,
                  from_checkpoint=_from_checkpoint,
                  draws=lambda cfg: Generator if cfg.model.conditioning != "none" else None,
                  networks=networks, default_loss=default_loss)

