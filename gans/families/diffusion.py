"""A class-conditional diffusion model (DDPM, Ho et al. 2020) with classifier-free guidance
(Ho & Salimans 2022), from diffusers' own parts: ``UNet2DModel`` with class embeddings, the
``DDPMScheduler`` for training, and ``DDIMScheduler`` (Song et al. 2021) or
``DPMSolverMultistepScheduler`` (DPM-Solver++, Lu et al. 2022) for sampling in a configurable
number of steps.

Training (one engine step): a batch of real tiles, a random timestep per tile, the tile noised by
the DDPM forward process, the UNet predicting that noise (mean squared error). With probability
``train.label_dropout`` a tile's class is replaced by the "no class" embedding, so one network
learns the conditional and the unconditional model. Sampling (:class:`DiffusionSampler`, the
:class:`~histosynth.roles.Generator` of a run): tile ``i`` starts from noise seeded by
``seeds[i]``; each solver step mixes the two predictions, ``uncond + w (cond - uncond)`` with
guidance scale ``w`` (1: plain conditional). DDIM (eta 0) and DPM-Solver++ are deterministic, so a
tile is a function of its seed and class alone.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gans import classdata
from gans.config import DataConfig
from gans.registry import Family
from histosynth import config as configlib
from histosynth.config import ConfigError, require
from histosynth.data import BatchSampler, TileCache, flip_rot90, to_uint8, to_unit_range
from histosynth.engine import module_state, require_divisible
from histosynth.roles import Criterion, Generator, Grid, LRSchedule, Plan
from histosynth.runtime import Runtime, compiled, eval_mode

SCHEDULERS = ("ddim", "dpm_solver++")


# ----------------------------------------------------------------------------------------------
# config


@dataclass
class DiffusionModelConfig:
    family: Literal["diffusion"] = "diffusion"
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    """UNet widths, one per resolution level (diffusers' block_out_channels); each level but the
    last halves the resolution. The DDPM paper's 32 px model: [128, 256, 256, 256]."""
    layers_per_block: int = 1
    """Residual blocks per level (DDPM: 2)."""
    attention: int = 1
    """Levels, counted from the lowest resolution, with self-attention blocks (DDPM at 32 px: at
    16 x 16, i.e. 2 of 4 levels); attention at 16 x 16 costs about a third of a CPU step at 32 px."""
    norm_groups: int = 8
    """GroupNorm groups; must divide every width."""
    timesteps: int = 1000
    """T, the number of diffusion steps of the DDPM forward process (training)."""
    beta_schedule: Literal["linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    """Noise schedule: ``linear`` (Ho et al. 2020) or ``squaredcos_cap_v2`` (the cosine schedule of
    Nichol & Dhariwal 2021, better at small resolutions)."""
    conditioning: Literal["class", "none"] = "class"
    """``class``: one model for every class, with classifier-free guidance; ``none``: unconditional."""

    def __post_init__(self):
        require(len(self.channels) >= 2 and all(c >= 1 for c in self.channels), "channels",
                f"give two or more positive widths, got {self.channels}")
        require(all(c % self.norm_groups == 0 for c in self.channels), "norm_groups",
                f"{self.norm_groups} must divide every width of channels {self.channels}")
        require(self.layers_per_block >= 1, "layers_per_block", f"must be >= 1, got {self.layers_per_block}")
        require(0 <= self.attention <= len(self.channels), "attention",
                f"must be in 0..{len(self.channels)} (levels with attention), got {self.attention}")
        require(self.timesteps >= 10, "timesteps", f"must be >= 10, got {self.timesteps}")


@dataclass
class DiffusionTrainConfig:
    steps: int = 2000
    """Optimizer steps in the whole run (one batch each)."""
    batch_size: int = 32
    """Real tiles per step, over all torchrun processes together."""
    seed: int = 0
    checkpoint_every: int = 250
    sample_every: int = 500
    """Write a sample grid (one row per class, fixed seeds, EMA model) every this many steps."""
    log_every: int = 25
    snapshot_every: int = 0
    lr: float = 2.0e-4
    """AdamW learning rate (DDPM: 2e-4 at 32 px)."""
    weight_decay: float = 0.0
    warmup_steps: int = 200
    """Linear learning-rate warm-up (DDPM: 5000 over 800k steps)."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    ema_decay: float = 0.9995
    """EMA of the UNet, what sampling uses (DDPM: 0.9999 over 800k steps; shorter runs need less)."""
    ema_start: int = 0
    label_dropout: float = 0.1
    """Share of training tiles whose class is replaced by 'no class' (classifier-free guidance;
    Ho & Salimans: 0.1-0.2); 0: no unconditional model, guidance_scale must then be 1."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "off"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    compile: Literal["auto", "off", "on"] = "auto"
    """As for the GANs (gans/config.py): ``on`` compiles the UNet's training forward pass;
    ``auto`` measures it beside the eager paths on CPU runs long enough to pay for the compile."""
    samples_per_class: int = 6
    kid_every: int = 0
    """Evaluate KID (pixel features) of sampled vs real tiles every this many steps and keep the
    lowest as best.pt; 0: off."""
    kid_samples: int = 128

    def __post_init__(self):
        for key in ("steps", "batch_size", "checkpoint_every", "sample_every", "log_every", "samples_per_class"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(0 <= self.ema_decay < 1, "ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        require(0 <= self.label_dropout < 1, "label_dropout", f"must be in [0, 1), got {self.label_dropout}")
        for key in ("snapshot_every", "kid_every", "warmup_steps", "ema_start"):
            require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        require(self.kid_samples >= 4, "kid_samples", f"must be >= 4, got {self.kid_samples}")

    def plan(self, images_per_step: int) -> Plan:
        return Plan(steps=self.steps, log_every=self.log_every, checkpoint_every=self.checkpoint_every,
                    visualise_every=self.sample_every, evaluate_every=self.kid_every,
                    snapshot_every=self.snapshot_every,
                    criterion=Criterion("kid", "min") if self.kid_every else None,
                    ema_decay=self.ema_decay, ema_start=self.ema_start,
                    lr=LRSchedule(self.lr_schedule, warmup=self.warmup_steps), images_per_step=images_per_step)


@dataclass
class DiffusionSampleConfig:
    scheduler: Literal["ddim", "dpm_solver++"] = "dpm_solver++"
    """Sampler: ``ddim`` (eta 0) or ``dpm_solver++`` (2nd order multistep); both deterministic."""
    steps: int = 20
    """Solver steps per tile (DPM-Solver++: 15-25 are usual; DDIM: 50)."""
    guidance_scale: float = 2.0
    """Classifier-free guidance w: uncond + w (cond - uncond); 1: the conditional model alone."""

    def __post_init__(self):
        require(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        require(self.guidance_scale >= 0, "guidance_scale", f"must be >= 0, got {self.guidance_scale}")


@dataclass
class DiffusionConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: DiffusionModelConfig = field(default_factory=DiffusionModelConfig)
    train: DiffusionTrainConfig = field(default_factory=DiffusionTrainConfig)
    sample: DiffusionSampleConfig = field(default_factory=DiffusionSampleConfig)

    def __post_init__(self):
        require(self.data.image_size % 2 ** (len(self.model.channels) - 1) == 0, "model.channels",
                f"{len(self.model.channels)} levels halve {self.data.image_size} px too often")
        require(self.train.label_dropout > 0 or self.sample.guidance_scale == 1 or self.model.conditioning == "none",
                "sample.guidance_scale", "needs an unconditional model: set train.label_dropout > 0, or 1")


# ----------------------------------------------------------------------------------------------
# networks and schedulers (diffusers')


def build_unet(cfg: DiffusionConfig, num_classes: int) -> nn.Module:
    """diffusers' UNet2DModel; class embeddings for ``num_classes`` classes plus 'no class'."""
    from diffusers import UNet2DModel

    m, n = cfg.model, len(cfg.model.channels)
    attn = [i >= n - m.attention for i in range(n)]
    return UNet2DModel(
        sample_size=cfg.data.image_size, in_channels=3, out_channels=3, layers_per_block=m.layers_per_block,
        block_out_channels=tuple(m.channels), norm_num_groups=m.norm_groups,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        num_class_embeds=num_classes + 1 if num_classes else None)


def training_scheduler(cfg: DiffusionConfig):
    from diffusers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=cfg.model.timesteps, beta_schedule=cfg.model.beta_schedule)


def sampling_scheduler(name: str, train_config: dict):
    """A fresh solver (they keep per-run state) sharing the training noise schedule."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
    if name == "ddim":
        return DDIMScheduler.from_config(train_config)
    # pixel-space data predictions kept in [-1, 1] (dynamic thresholding with a ceiling of 1, as
    # DDIM's clip_sample does) and lambda(t) clipped as diffusers prescribes for the cosine
    # schedule: without them the first data prediction is divided by alpha(995) ~ 1/160 and the
    # solver ends in saturated noise
    return DPMSolverMultistepScheduler.from_config(train_config, algorithm_type="dpmsolver++", solver_order=2,
                                                   thresholding=True, sample_max_value=1.0,
                                                   lambda_min_clipped=-5.1, timestep_spacing="linspace")


# ----------------------------------------------------------------------------------------------
# sampling a trained model


class DiffusionSampler:
    """The :class:`~histosynth.roles.Generator` of a diffusion run. Options: ``scheduler``
    (ddim | dpm_solver++), ``steps``, ``guidance_scale`` (defaults: the run's ``sample`` section)."""

    def __init__(self, unet: nn.Module, classes: list[str], image_size: int, train_config: dict,
                 sample: DiffusionSampleConfig, conditional: bool, device: torch.device | str = "cpu",
                 autocast: Callable[[], Any] = contextlib.nullcontext, batch: int = 64):
        self.unet, self.classes, self.image_size, self.train_config = unet, classes, image_size, train_config
        self.defaults, self.conditional, self.device = sample, conditional, torch.device(device)
        self.autocast, self.batch = autocast, batch

    @torch.no_grad()
    def sample(self, labels: Sequence[int], seeds: Sequence[int], **options: Any) -> torch.Tensor:
        unknown = set(options) - {"scheduler", "steps", "guidance_scale"}
        if unknown:
            raise ConfigError("", f"unknown sampling option(s) {', '.join(sorted(unknown))}; a diffusion "
                                  "model takes scheduler, steps, guidance_scale")
        name = options.get("scheduler", self.defaults.scheduler)
        if name not in SCHEDULERS:
            raise ConfigError("scheduler", f"{name!r} is not a sampler; choose one of {', '.join(SCHEDULERS)}")
        steps = int(options.get("steps", self.defaults.steps))
        w = float(options.get("guidance_scale", self.defaults.guidance_scale))
        out = [self._sample(list(labels[s:s + self.batch]), list(seeds[s:s + self.batch]), name, steps, w)
               for s in range(0, len(seeds), self.batch)]
        return torch.cat(out) if out else torch.empty(0, 3, self.image_size, self.image_size, dtype=torch.uint8)

    def _sample(self, labels: list[int], seeds: list[int], name: str, steps: int, w: float) -> torch.Tensor:
        sched = sampling_scheduler(name, self.train_config)
        sched.set_timesteps(steps, device=self.device)
        s = self.image_size
        x = torch.stack([torch.randn(3, s, s, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds])
        x = x.to(self.device) * sched.init_noise_sigma                    # B x 3 x S x S
        y = torch.as_tensor(labels, dtype=torch.long, device=self.device) if self.conditional else None
        guided = self.conditional and w != 1.0
        null = torch.full_like(y, self.unet.config.num_class_embeds - 1) if guided else None
        with eval_mode(self.unet), self.autocast():
            for t in sched.timesteps:
                inp = sched.scale_model_input(x, t)
                if guided:                                                 # cond and uncond in one pass
                    eps_c, eps_u = self.unet(torch.cat([inp, inp]), t, class_labels=torch.cat([y, null])
                                             ).sample.float().chunk(2)
                    eps = eps_u + w * (eps_c - eps_u)
                else:
                    eps = self.unet(inp, t, class_labels=y).sample.float()
                x = sched.step(eps, t, x).prev_sample
        return to_uint8(x.clamp(-1, 1)).cpu()


def _from_checkpoint(ck: dict, weights: str = "ema", device: Any = "cpu") -> DiffusionSampler:
    cfg = configlib.build(DiffusionConfig, ck["config"])
    k = int(ck["info"]["num_classes"])
    unet = build_unet(cfg, k)
    unet.load_state_dict(module_state(ck, "unet", weights))
    classes = list(ck["info"]["classes"]) if k else ["all"]
    return DiffusionSampler(unet.to(device).eval(), classes, cfg.data.image_size,
                            dict(training_scheduler(cfg).config), cfg.sample, bool(k), device)


# ----------------------------------------------------------------------------------------------
# the task


class DiffusionTask:
    """DDPM training of a (class-conditional) UNet on a tile cache, on the engine."""

    def __init__(self, cfg: DiffusionConfig, data: TileCache, rt: Runtime):
        self.cfg, self.data, self.rt = cfg, data, rt
        t = cfg.train
        require_divisible(t.batch_size, rt.world, "train.batch_size")
        self.plan = t.plan(images_per_step=t.batch_size)
        self.num_classes = len(data.classes) if cfg.model.conditioning == "class" else 0
        self.unet = rt.prepare(build_unet(cfg, self.num_classes))
        self.modules = {"unet": self.unet}
        self.run_unet = compiled(self.unet, rt.compiled)      # what the step calls (sampling: the plain UNet)
        self.optimizers = {"unet": torch.optim.AdamW(self.unet.parameters(), lr=t.lr, weight_decay=t.weight_decay,
                                                     **rt.optimizer_options())}
        self.ema_names = ("unet",)
        self.noise = training_scheduler(cfg)
        self.sampler = BatchSampler(len(data), t.batch_size, t.seed, rt.rank, rt.world)
        self.aug_gen = torch.Generator().manual_seed(t.seed + 1)
        self.labels = torch.from_numpy(np.asarray(data.labels))

    def train_step(self) -> dict[str, torch.Tensor]:
        idx = self.sampler.next()
        x = torch.from_numpy(np.ascontiguousarray(self.data.images[idx.numpy()]))  # B x 3 x S x S uint8
        x = to_unit_range(self.rt.batch(flip_rot90(x, self.aug_gen, self.cfg.data.augment, self.rt.shard)))
        b = x.shape[0]
        y = None
        if self.num_classes:                   # classifier-free guidance: some tiles get 'no class'
            y = self.labels[idx].to(self.rt.device)
            drop = torch.rand(b, device=self.rt.device) < self.cfg.train.label_dropout
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        noise = torch.randn_like(x)
        t = torch.randint(0, self.cfg.model.timesteps, (b,), device=self.rt.device)
        x_t = self.noise.add_noise(x, noise, t)                           # DDPM forward process q(x_t | x_0)
        with self.rt.autocast():
            pred = self.run_unet(x_t, t, class_labels=y).sample
        loss = F.mse_loss(pred.float(), noise)
        opt = self.optimizers["unet"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.detach()}

    def generator(self, unet: nn.Module) -> DiffusionSampler:
        classes = list(self.data.classes) if self.num_classes else ["all"]
        return DiffusionSampler(unet, classes, self.cfg.data.image_size, dict(self.noise.config), self.cfg.sample,
                                bool(self.num_classes), self.rt.device, self.rt.autocast)

    def evaluate(self, models) -> dict[str, float]:
        """KID (pixel features) of fixed-seed samples against a fixed subset of real tiles."""
        from metrics.distribution import kid
        from metrics.features import PixelExtractor

        t = self.cfg.train
        g = torch.Generator().manual_seed(t.seed + 7)
        idx = torch.randperm(len(self.data), generator=g)[:t.kid_samples]
        real = torch.from_numpy(np.array(self.data.images[idx.numpy()]))
        labels = self.labels[idx].tolist() if self.num_classes else [0] * len(idx)
        fake = self.generator(models["unet"]).sample(labels, range(t.seed * 100_000, t.seed * 100_000 + len(idx)))
        ext = PixelExtractor()
        return {"kid": kid(ext(real).double(), ext(fake).double())}

    def visualise(self, models) -> Grid:
        t, rows = self.cfg.train, max(self.num_classes, 1)
        labels = [r for r in range(rows) for _ in range(t.samples_per_class)]
        tiles = self.generator(models["unet"]).sample(labels, range(len(labels)))
        names = self.data.classes if self.num_classes else ["(unconditional)"]
        return to_unit_range(tiles), t.samples_per_class, names

    def info(self) -> dict:
        return {"classes": list(self.data.classes), "num_classes": self.num_classes}

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "aug_gen": self.aug_gen.get_state(), **self.info()}

    def load_state_dict(self, state: dict) -> None:
        if list(state["classes"]) != list(self.data.classes):
            raise ConfigError("data.root", f"the checkpoint was trained on classes {state['classes']}, "
                                           f"the data now has {self.data.classes}")
        self.sampler.load_state_dict(state["sampler"])
        self.aug_gen.set_state(state["aug_gen"])


FAMILY = Family(
    name="diffusion", paper="Ho et al., NeurIPS 2020; Ho & Salimans 2022 (classifier-free guidance)",
    config=DiffusionConfig, config_file="diffusion.yaml",
    smoke=("data.root=data/lung_demo/train", "data.image_size=32", "model.channels=[8, 16]", "model.norm_groups=4",
           "model.timesteps=50", "train.batch_size=8", "train.steps=4", "train.checkpoint_every=2",
           "train.sample_every=2", "train.log_every=1", "train.samples_per_class=2", "train.warmup_steps=0",
           "train.device=cpu", "sample.steps=3"),
    inputs=classdata.inputs, load_data=classdata.load_data, provenance=classdata.provenance,
    build_task=DiffusionTask, from_checkpoint=_from_checkpoint,
    draws=lambda cfg: Generator if cfg.model.conditioning == "class" else None, cpu_bf16=False)
