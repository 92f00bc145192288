"""Adversarial losses and the GAN loss object with ``d_step`` / ``g_step`` (stylegan2-ada style).

The shared training loop (:mod:`gans.train`) knows nothing of GAN maths: it calls
``task.d_step()`` ``n_dis`` times and ``task.g_step()`` once per step, and saves whatever
``task.modules`` / ``task.optimizers`` / ``task.extra_state()`` hold.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gans.config import GANConfig
from gans.diffaugment import diff_augment, parse_policy
from gans.registry import create_model
from histosynth.data import BatchSampler, TileCache, flip_rot90, to_uint8, to_unit_range
from histosynth.runtime import Runtime, compiled, eval_mode


class AdversarialLoss:
    """D and G objectives on logits. ``kind``: hinge | bce (non-saturating) | wasserstein | lsgan."""

    def __init__(self, kind: str, label_smoothing: float = 0.0):
        self.kind, self.real_target = kind, 1.0 - label_smoothing

    def d(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        if self.kind == "hinge":
            return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
        if self.kind == "bce":
            return (F.binary_cross_entropy_with_logits(real, torch.full_like(real, self.real_target))
                    + F.softplus(fake).mean())
        if self.kind == "wasserstein":
            return fake.mean() - real.mean()
        if self.kind == "lsgan":
            return 0.5 * ((real - self.real_target) ** 2).mean() + 0.5 * (fake ** 2).mean()
        raise ValueError(self.kind)

    def g(self, fake: torch.Tensor) -> torch.Tensor:
        if self.kind in ("hinge", "wasserstein"):
            return -fake.mean()
        if self.kind == "bce":
            return F.softplus(-fake).mean()
        if self.kind == "lsgan":
            return 0.5 * ((fake - 1) ** 2).mean()
        raise ValueError(self.kind)


def gradient_penalty(D: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     y: torch.Tensor | None) -> torch.Tensor:
    """E[(||grad_x D(x_hat)||_2 - 1)^2] at random interpolates x_hat (Gulrajani 2017), in fp32."""
    eps = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
    x_hat = (eps * real.float() + (1 - eps) * fake.float()).requires_grad_(True)
    with torch.autocast(real.device.type, enabled=False):
        out = D(x_hat, y)
    grad, = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


class GANTask:
    """Everything model-specific about training a (class-conditional) GAN on a tile cache."""

    def __init__(self, cfg: GANConfig, data: TileCache, rt: Runtime):
        self.cfg, self.data, self.rt = cfg, data, rt
        t = cfg.train
        self.num_classes = len(data.classes) if cfg.model.conditioning == "class" else 0
        G, D = create_model(cfg.model.family, cfg.data.image_size, self.num_classes,
                            cfg.model.z_dim, cfg.model.ch)
        self.G, self.D = rt.prepare(G), rt.prepare(D)
        fused = {"fused": True} if rt.device.type == "cuda" else {}
        self.modules = {"G": self.G, "D": self.D}
        # the steps call these: the modules, or torch.compile's wrappers (train.compile: on)
        self.run_G, self.run_D = compiled(self.G, t.compile), compiled(self.D, t.compile)
        self.optimizers = {
            "G": torch.optim.Adam(self.G.parameters(), lr=t.lr_g, betas=t.betas, **fused),
            "D": torch.optim.Adam(self.D.parameters(), lr=t.lr_d, betas=t.betas, **fused),
        }
        self.ema_names = ["G"]
        self.n_dis = t.n_dis
        self.phases = ("d",) * t.n_dis + ("g",)
        self.loss = AdversarialLoss(cfg.loss.type, cfg.loss.label_smoothing)
        self.gp_weight = cfg.loss.gp_weight
        self.policy = parse_policy(t.diffaugment)
        self.sampler = BatchSampler(len(data), t.batch_size, t.seed, rt.rank, rt.world)
        self.aug_gen = torch.Generator().manual_seed(t.seed + 1)
        self.labels = torch.from_numpy(np.asarray(data.labels))
        g = torch.Generator().manual_seed(t.seed + 2)
        rows = max(self.num_classes, 1)
        self.fixed_z = torch.randn(rows * t.samples_per_class, cfg.model.z_dim, generator=g)
        self.fixed_y = torch.arange(rows).repeat_interleave(t.samples_per_class)
        self._last_y: torch.Tensor | None = None

    # -- data --------------------------------------------------------------------------------
    def _real_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = self.sampler.next()
        x = torch.from_numpy(np.ascontiguousarray(self.data.images[idx.numpy()]))  # B x 3 x S x S uint8
        x = flip_rot90(x, self.aug_gen, self.cfg.data.augment, self.rt.shard)
        x = to_unit_range(self.rt.batch(x))
        y = self.labels[idx].to(self.rt.device) if self.num_classes else None
        return x, y

    def _noise(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.cfg.model.z_dim, device=self.rt.device)

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        return diff_augment(x, self.policy) if self.policy else x

    # -- the two phases ----------------------------------------------------------------------
    def d_step(self) -> dict[str, torch.Tensor]:
        real, y = self._real_batch()
        self._last_y = y
        self.D.requires_grad_(True)
        with torch.no_grad(), self.rt.autocast():
            fake = self.run_G(self._noise(real.shape[0]), y)
        with self.rt.autocast():
            real_logits = self.run_D(self._augment(real), y).float()
            fake_logits = self.run_D(self._augment(fake), y).float()
            loss = self.loss.d(real_logits, fake_logits)
        total = loss
        out = {"loss_d": loss.detach(), "d_real": real_logits.mean().detach(),
               "d_fake": fake_logits.mean().detach()}
        if self.gp_weight > 0:
            gp = gradient_penalty(self.D, self._augment(real), self._augment(fake.float()), y)
            total = total + self.gp_weight * gp
            out["gp"] = gp.detach()
        opt = self.optimizers["D"]
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        return out

    def g_step(self) -> dict[str, torch.Tensor]:
        y = self._last_y
        n = self.cfg.train.batch_size // self.rt.world
        self.D.requires_grad_(False)
        with self.rt.autocast():
            fake = self.run_G(self._noise(n), y)
            loss = self.loss.g(self.run_D(self._augment(fake), y).float())
        opt = self.optimizers["G"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        self.D.requires_grad_(True)
        return {"loss_g": loss.detach()}

    # -- pictures and state ------------------------------------------------------------------
    @torch.no_grad()
    def sample_grid(self, gens: dict[str, nn.Module]) -> tuple[torch.Tensor, int, list[str]]:
        """Fixed-noise samples (one row per class): float images in [-1, 1], row length, row labels."""
        G = gens["G"]
        y = self.fixed_y.to(self.rt.device) if self.num_classes else None
        with eval_mode(G), self.rt.autocast():
            imgs = G(self.fixed_z.to(self.rt.device), y).float().cpu()
        labels = self.data.classes if self.num_classes else ["(unconditional)"]
        return imgs, self.cfg.train.samples_per_class, labels

    @torch.no_grad()
    def kid_pair(self, gens: dict[str, nn.Module], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(real, generated) uint8 batches for the training-time KID: a fixed seeded subset of real
        tiles and as many EMA samples from fixed noise with the same class labels."""
        g = torch.Generator().manual_seed(self.cfg.train.seed + 7)
        idx = torch.randperm(len(self.data), generator=g)[:n]
        real = torch.from_numpy(np.array(self.data.images[idx.numpy()]))
        z = torch.randn(len(idx), self.cfg.model.z_dim, generator=g)
        y = self.labels[idx].to(self.rt.device) if self.num_classes else None
        G = gens["G"]
        fakes = []
        with eval_mode(G), self.rt.autocast():
            for s in range(0, len(idx), 64):
                fakes.append(to_uint8(G(z[s:s + 64].to(self.rt.device), None if y is None else y[s:s + 64])).cpu())
        return real, torch.cat(fakes)

    def extra_state(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "aug_gen": self.aug_gen.get_state(),
                "classes": list(self.data.classes), "num_classes": self.num_classes}

    def load_extra_state(self, state: dict) -> None:
        if list(state["classes"]) != list(self.data.classes):
            raise ValueError(f"the checkpoint was trained on classes {state['classes']}, the data "
                             f"now has {self.data.classes}")
        self.sampler.load_state_dict(state["sampler"])
        self.aug_gen.set_state(state["aug_gen"])
