"""Typed configuration of a GAN run: ``data``, ``model``, ``loss`` and ``train`` sections.

Every key is documented here (and in ``configs/*.yaml``); ``train-gan --dry-run`` prints the
resolved config. Unknown keys, wrong types and out-of-range values are errors that name the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from histosynth.config import require, require_choice
from histosynth.roles import Criterion, LRSchedule, Plan


RESUME_MAY_CHANGE = frozenset({
    "train.steps", "train.checkpoint_every", "train.sample_every", "train.log_every", "train.snapshot_every",
    "train.kid_every", "train.kid_samples", "train.samples_per_class", "train.device", "train.amp",
    "train.channels_last", "train.compile", "data.cache", "data.cache_dir", "data.test_a", "data.test_b",
    "eval.max_images", "eval.tile", "sample.scheduler", "sample.steps", "sample.guidance_scale"})
"""Keys a ``train-gan --resume`` may change: how long it trains, how often it logs, samples,
evaluates and saves, where it runs and caches, and what it is evaluated on. Any other change
would make the run something other than what it was trained as (and its provenance wrong)."""

DATA_ROOTS = frozenset({"data.root", "data.root_a", "data.root_b"})
"""May change on --resume only when the files there are the very ones the run was trained on
(same sha256: the data moved), which train-gan checks against the run's data.json."""


@dataclass
class DataConfig:
    root: str = "data/lung_demo/train"
    """ImageFolder tree: one sub-folder per class of jpg/png/tif tiles (relative paths are tried
    from the working directory, then from the histosynth checkout)."""
    image_size: int = 64
    """Side of the square training tiles: 32, 64 or 128. Tiles are centre-cropped to a square and
    resized once (bicubic, antialiased) when the cache is built."""
    stain_norm: Literal["none", "macenko", "reinhard"] = "none"
    """Stain normalisation applied once when the cache is built (torchstain's Macenko or Reinhard)."""
    stain_reference: Optional[str] = None
    """Reference tile the normaliser is fitted to; default: the first tile of the first class."""
    augment: Literal["none", "flip", "flip_rot90"] = "flip_rot90"
    """Real-image augmentation on the cached tensor each step, named as everywhere in histosynth:
    ``flip`` (horizontal and vertical flips: 4 of the 8 symmetries of the square) or
    ``flip_rot90`` (all 8: flips and 90-degree rotations; tissue has no 'up'). This widens the
    data; DiffAugment (train.diffaugment) is the separate, differentiable augmentation of both
    real and fake images seen by D."""
    cache: Literal["disk", "memory"] = "disk"
    """``disk``: the decoded uint8 tiles are kept as a memory-mapped .npy in ``cache_dir`` and
    reused by later runs; ``memory``: decoded for this run only."""
    cache_dir: Optional[str] = None
    """Where the disk cache lives; default $HISTOSYNTH_CACHE or ~/.cache/histosynth."""

    def __post_init__(self):
        require(self.image_size in (32, 64, 128), "image_size",
                f"must be 32, 64 or 128 for the GAN families, got {self.image_size}")


@dataclass
class ModelConfig:
    family: str = "sngan"
    """A GAN family of gans/families/: dcgan | sngan | wgan_gp (``gans.registry.adversarial_families()``)."""
    conditioning: Literal["class", "ac", "none"] = "class"
    """``class``: one model makes every class (class-conditional G, projection D);
    ``ac``: ACGAN (Odena et al. 2017): class-conditional G, an unconditional D with an auxiliary
    classification head, the auxiliary loss for D and G weighted by ``loss.ac_weight``;
    ``none``: unconditional (class folders are still read; labels are ignored)."""
    z_dim: int = 128
    """Size of the latent noise vector."""
    ch: int = 64
    """Base channel width; the paper settings are 64 (SNGAN/WGAN-GP) and 64 (DCGAN). Small
    values (16-32) make CPU runs fast."""

    def __post_init__(self):
        from gans.registry import adversarial_families

        require_choice(self.family, adversarial_families(), "family", "a GAN family")
        require(1 <= self.z_dim <= 4096, "z_dim", f"must be in 1..4096, got {self.z_dim}")
        require(1 <= self.ch <= 1024, "ch", f"must be in 1..1024, got {self.ch}")


@dataclass
class LossConfig:
    type: Literal["auto", "hinge", "bce", "wasserstein", "lsgan"] = "auto"
    """Adversarial loss; ``auto`` uses the family's paper loss (dcgan: bce (non-saturating),
    sngan: hinge, wgan_gp: wasserstein)."""
    gp_weight: float = 0.0
    """Gradient-penalty weight (Gulrajani 2017: 10 for wgan_gp); 0 turns it off."""
    label_smoothing: float = 0.0
    """One-sided label smoothing (Salimans 2016): real targets become 1 - value (bce, lsgan)."""
    ac_weight: float = 1.0
    """``model.conditioning: ac``: weight of the auxiliary classification loss (cross-entropy of
    the intended class, on real and fake images for D, on fakes for G; Odena 2017: 1)."""
    lecam_weight: float = 0.0
    """LeCam regularisation of D (Tseng et al. 2021) for small data; 0: off (their BigGAN setting
    on limited CIFAR: 0.3)."""
    lecam_decay: float = 0.99
    """Decay of LeCam's moving averages of D's outputs on real and fake images."""

    def __post_init__(self):
        require(self.gp_weight >= 0, "gp_weight", f"must be >= 0, got {self.gp_weight}")
        require(self.ac_weight >= 0, "ac_weight", f"must be >= 0, got {self.ac_weight}")
        require(self.lecam_weight >= 0, "lecam_weight", f"must be >= 0, got {self.lecam_weight}")
        require(0 < self.lecam_decay < 1, "lecam_decay", f"must be in (0, 1), got {self.lecam_decay}")
        require(0 <= self.label_smoothing < 0.5, "label_smoothing",
                f"must be in [0, 0.5), got {self.label_smoothing}")


@dataclass
class TrainConfig:
    steps: int = 300
    """Generator updates in the whole run (each preceded by ``n_dis`` discriminator updates)."""
    batch_size: int = 32
    """Real images per discriminator update."""
    seed: int = 0
    """Seeds model init, noise, data order and augmentation; a CPU run is reproducible."""
    checkpoint_every: int = 100
    """Write checkpoints/last.pt every this many steps (and at the end)."""
    snapshot_every: int = 0
    """Also keep the weights of every this many steps as checkpoints/step_XXXXXX.pt (gan-generate
    --checkpoint STEP draws from one); 0: none."""
    sample_every: int = 100
    """Write samples/step_XXXXXX.png every this many steps (and at the end)."""
    log_every: int = 10
    """Append losses to metrics.jsonl and refresh the progress bar every this many steps."""
    n_dis: int = 1
    """Discriminator updates per generator update (n_critic; 5 in the SNGAN and WGAN-GP papers)."""
    lr_g: float = 2.0e-4
    """Generator learning rate (TTUR: Heusel 2017 use lr_d > lr_g, e.g. 1e-4 / 4e-4)."""
    lr_d: float = 2.0e-4
    """Discriminator learning rate."""
    betas: tuple[float, float] = (0.5, 0.999)
    """Adam betas (DCGAN: 0.5, 0.999; SNGAN / WGAN-GP ResNets: 0.0, 0.9)."""
    lr_schedule: Literal["constant", "linear"] = "constant"
    """``linear``: constant until ``lr_decay_start``, then linear decay to 0 at ``steps``."""
    lr_decay_start: Optional[int] = None
    """Step at which the linear decay starts (``lr_schedule: linear``); null: half of ``steps``
    (CycleGAN's schedule), 0: decay from the start (the WGAN-GP ResNet schedule)."""
    ema_decay: float = 0.999
    """Decay of the exponential moving average of G used for samples and generation; 0: off."""
    ema_start: int = 0
    """Steps before the EMA starts averaging (before that it copies G)."""
    diffaugment: str = ""
    """DiffAugment policy (Zhao 2020) for D's inputs, real and fake: comma-separated subset of
    color, translation, cutout; '' turns it off. Recommended for small data sets."""
    ada: Literal["off", "on"] = "off"
    """Adaptive discriminator augmentation (Karras 2020, gans/ada.py), the alternative to
    DiffAugment for small data: D's inputs augmented with a probability p steered toward
    ``ada_target``; p is logged (ada_p) and kept in checkpoints."""
    ada_target: float = 0.6
    """The r_t = E[sign(D(real))] that p is steered toward (the paper's 0.6)."""
    ada_kimg: float = 500.0
    """Thousands of real images over which p can move from 0 to 1 (paper: 500; a short CPU run of
    20k images needs ~20)."""
    ada_interval: int = 4
    """Discriminator steps between adjustments of p."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``: CUDA when present, else CPU."""
    amp: Literal["auto", "bf16", "off"] = "auto"
    """Mixed precision autocast; ``auto``: bf16 on CUDA GPUs that support it and on CPUs with
    native bf16 (AMX / AVX-512 BF16: SNGAN-32 steps ~4x faster with channels_last), else fp32."""
    channels_last: Literal["auto", "on", "off"] = "auto"
    """NHWC memory layout; ``auto``: on for CUDA and wherever ``amp`` resolves to bf16."""
    compile: Literal["auto", "off", "on"] = "auto"
    """``on``: torch.compile the networks' forward passes in the training steps (checkpoints,
    EMA and sampling use the plain modules; spectral-norm discriminators stay eager: their
    in-place power iteration trips the compiled backward). The first steps compile (16-60 s) and
    a CPU needs a C++ compiler. ``auto``: on a CPU with a compiler, a run long enough (20 min) to
    pay for the compile measures the compiled path beside the eager ones and keeps it where it is
    faster (histosynth/autotune.py); held to AVX2, fp32, compiled vs eager: SNGAN-32 1.02-1.2x,
    CycleGAN at 256 px 0.77-0.82x. Eager on CUDA unless ``on``."""
    samples_per_class: int = 8
    """Columns of the sample grid (one row per class, fixed noise)."""
    kid_every: int = 0
    """Evaluate KID between generated and real tiles every this many steps (and at the end), log
    it to metrics.jsonl and keep the weights of the lowest as checkpoints/best.pt; 0: off. GANs:
    EMA samples vs real tiles of the same class mix; CycleGAN: G_ab(A) vs B (domain KID).
    Measured in the pixel feature space (8 x 8 RGB) of metrics.features."""
    kid_samples: int = 256
    """Tiles per side for that KID (fixed noise and fixed real tiles, so values compare)."""

    def __post_init__(self):
        for key in ("steps", "batch_size", "checkpoint_every", "sample_every", "log_every",
                    "n_dis", "samples_per_class"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        require(self.snapshot_every >= 0, "snapshot_every", f"must be >= 0 (0: none), got {self.snapshot_every}")
        require(self.lr_g > 0, "lr_g", f"must be > 0, got {self.lr_g}")
        require(self.lr_d > 0, "lr_d", f"must be > 0, got {self.lr_d}")
        require(all(0 <= b < 1 for b in self.betas), "betas", f"each must be in [0, 1), got {self.betas}")
        require(0 <= self.ema_decay < 1, "ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        require(self.ema_start >= 0, "ema_start", f"must be >= 0, got {self.ema_start}")
        require(self.kid_every >= 0, "kid_every", f"must be >= 0 (0: off), got {self.kid_every}")
        require(self.kid_samples >= 4, "kid_samples", f"must be >= 4, got {self.kid_samples}")
        if self.lr_decay_start is None:
            self.lr_decay_start = self.steps // 2
        require(0 <= self.lr_decay_start <= self.steps, "lr_decay_start",
                f"must be in [0, steps={self.steps}] or null (half-way), got {self.lr_decay_start}")
        from gans.diffaugment import POLICIES
        bad = [p for p in self.diffaugment.split(",") if p.strip() and p.strip() not in POLICIES]
        require(not bad, "diffaugment", f"unknown policy {', '.join(bad)}; use a comma-separated "
                                        f"subset of {', '.join(POLICIES)} or ''")
        require(self.ada == "off" or not self.diffaugment.strip(), "ada",
                "is on and so is train.diffaugment; choose one of the two augmentations of D")
        require(0 < self.ada_target < 1, "ada_target", f"must be in (0, 1), got {self.ada_target}")
        require(self.ada_kimg > 0, "ada_kimg", f"must be > 0, got {self.ada_kimg}")
        require(self.ada_interval >= 1, "ada_interval", f"must be >= 1, got {self.ada_interval}")

    def plan(self, images_per_step: int) -> Plan:
        """What the engine does when (see :class:`histosynth.roles.Plan`); best.pt is the lowest KID."""
        return Plan(steps=self.steps, log_every=self.log_every, checkpoint_every=self.checkpoint_every,
                    visualise_every=self.sample_every, evaluate_every=self.kid_every,
                    snapshot_every=self.snapshot_every,
                    criterion=Criterion("kid", "min") if self.kid_every else None,
                    ema_decay=self.ema_decay, ema_start=self.ema_start,
                    lr=LRSchedule(self.lr_schedule, decay_start=self.lr_decay_start),
                    images_per_step=images_per_step)


def image_to_image_train(batch_size: int) -> TrainConfig:
    """The training defaults of the image-to-image families (pix2pix, Isola et al. 2017; CycleGAN,
    Zhu et al. 2017): Adam 2e-4 with betas (0.5, 0.999) for G and D, no EMA, linear decay."""
    return TrainConfig(batch_size=batch_size, lr_g=2e-4, lr_d=2e-4, betas=(0.5, 0.999), ema_decay=0.0,
                       lr_schedule="linear", lr_decay_start=None)


@dataclass
class GANConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        # cross-section checks, once the family's default loss is known
        if self.loss.type == "auto":
            from gans.registry import get_family
            self.loss.type = get_family(self.model.family).default_loss
        require(self.loss.label_smoothing == 0 or self.loss.type in ("bce", "lsgan"),
                "loss.label_smoothing", f"only applies to the bce and lsgan losses, not {self.loss.type!r}")
