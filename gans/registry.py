"""The registry of generator families: every module of ``gans/families/`` that defines ``FAMILY``.

A :class:`Family` carries what ``train-gan``, ``gan-generate``, ``gan-translate`` and
``augment-compare`` need, so none of them names a family: its typed config class, how to decode
its training data and record its provenance, how to build its :class:`~histosynth.roles.Task`,
and what a trained checkpoint becomes (a :class:`~histosynth.roles.Generator` that draws tiles or
a :class:`~histosynth.roles.Translator` that maps images). Adversarial families (DCGAN, SNGAN,
WGAN-GP) share the class-conditional GAN task of :mod:`gans.adversarial` and differ in their
networks and paper loss (``networks``, ``default_loss``).

Adding a family: one module in ``gans/families/`` (networks, and a config class if it needs its
own keys) defining ``FAMILY``, plus its YAML in ``configs/``. The tests are parametrized over this
registry.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from histosynth.config import ConfigError, require_choice
from histosynth.engine import RunDir, RunDirError, load_checkpoint
from histosynth.registry import discover
from histosynth.roles import Generator, PairGenerator, Task, Translator
from histosynth.runtime import Runtime

RESOLUTIONS = (32, 64, 128)


@dataclass(frozen=True, kw_only=True)
class Family:
    name: str
    paper: str
    config: type
    """The typed config class of a run of this family (``train-gan`` builds it from the YAML)."""
    config_file: str
    """Its shipped config in configs/ (a CPU-sized run on the bundled demo data)."""
    smoke: tuple[str, ...]
    """``--set`` overrides of that config for a seconds-long CPU run on the bundled demo data
    (the contract tests train every family with them)."""
    inputs: Callable[[Any], dict[str, Any]]
    """config -> the folders and files a run reads, by name (its run directory stays apart from them)."""
    load_data: Callable[[Any, bool], Any]
    """(config, progress) -> the decoded training data (rank 0 decodes first under torchrun)."""
    provenance: Callable[[Any, Any], dict]
    """(config, data) -> RUN/data.json: roots, counts, skipped files, sha256 of every training file."""
    build_task: Callable[[Any, Any, Runtime], Task]
    """(config, data, runtime) -> the task the engine trains."""
    from_checkpoint: Callable[[dict, str, Any], Generator | Translator]
    """(checkpoint, weights 'ema' | 'raw', device) -> what the trained run does."""
    draws: Callable[[Any], type | None] = lambda cfg: None
    """What a trained run of this config gives augment-compare's generator stages:
    :class:`~histosynth.roles.Generator` (tiles of named classes: class-conditional families),
    :class:`~histosynth.roles.PairGenerator` (image-mask pairs), or None (unconditional tiles, or
    a translator)."""
    cpu_bf16: bool = True
    """Does ``amp: auto`` mean bf16 autocast + channels_last on a CPU with native bf16 (AMX /
    AVX-512 BF16)? True where it was measured to pay (the GANs: 2-5x); False keeps fp32 NCHW on
    every CPU (the diffusion UNet: bf16 measured 12 % slower)."""
    finish: Callable[[Path, bool], dict] | None = None
    """(run dir, progress) -> called on rank 0 after training (CycleGAN: its evaluation)."""
    networks: Callable[..., tuple[nn.Module, nn.Module]] | None = None
    """Adversarial families: (image_size, num_classes, z_dim, ch) -> (G, D)."""
    default_loss: str | None = None
    """Adversarial families: the paper's loss, used for ``loss.type: auto``."""


@functools.cache
def families() -> dict[str, Family]:
    return discover("gans.families", "FAMILY")


def list_families() -> list[str]:
    return sorted(families())


def adversarial_families() -> list[str]:
    """The families trained by the class-conditional GAN task (the ones with G/D networks)."""
    return sorted(n for n, f in families().items() if f.networks is not None)


def get_family(name: str, key: str = "model.family") -> Family:
    require_choice(name, list_families(), key, "a registered family")
    return families()[name]


def create_model(family: str, image_size: int = 64, num_classes: int = 0, z_dim: int = 128,
                 ch: int = 64, conditioning: str = "class") -> tuple[nn.Module, nn.Module]:
    """(generator, discriminator) of an adversarial ``family``; ``num_classes=0``: unconditional.

    The generator maps ``(z: B x z_dim, y: B or None)`` to ``B x 3 x S x S`` in [-1, 1]; the
    discriminator maps ``(x, y)`` to one logit per image: with a projection term
    (``conditioning="class"``), or, for ``"ac"``, unconditional with an auxiliary classifier
    head (:class:`gans.layers.AuxiliaryClassifierD`).
    """
    require_choice(family, adversarial_families(), "model.family", "a family with G/D networks")
    if image_size not in RESOLUTIONS:
        raise ValueError(f"image_size {image_size} is not supported; choose one of {RESOLUTIONS}")
    build = families()[family].networks
    G, D = build(image_size=image_size, num_classes=num_classes, z_dim=z_dim, ch=ch)
    if conditioning == "ac" and num_classes:
        from gans.layers import AuxiliaryClassifierD
        _, D_plain = build(image_size=image_size, num_classes=0, z_dim=z_dim, ch=ch)
        try:
            D = AuxiliaryClassifierD(D_plain, num_classes)
        except ValueError as e:
            raise ConfigError("model.conditioning", f"'ac' is not available for {family}: {e}") from None
    return G, D


_WHAT = ((Translator, "translates images between domains (gan-translate, gan-eval)"),
         (PairGenerator, "draws image-mask pairs (gan-generate writes images/ and masks/)"),
         (Generator, "draws tiles (gan-generate, piq-report --generator)"))


def _does(trained: Any) -> str:
    return next((what for role, what in _WHAT if isinstance(trained, role)), "does neither")


def load_run(run: str | Path, role: type | tuple[type, ...], checkpoint: str | int = "last", weights: str = "ema",
             device: Any = "cpu") -> tuple[Generator | PairGenerator | Translator, dict, Path]:
    """What a trained run does, as ``role`` (Generator, PairGenerator, Translator, or a tuple of
    them), its checkpoint and the checkpoint's path; a run of another role is refused. ``checkpoint``: ``last``, ``best`` or a
    snapshot's step."""
    run_dir = RunDir(Path(run))
    if not run_dir.config.is_file():
        raise RunDirError(f"{run} is not a histosynth run directory (no config.yaml)")
    path = run_dir.checkpoint(checkpoint)
    ck = load_checkpoint(path, families(), f"it is not a generator family ({', '.join(list_families())})")
    family = families()[ck["task"]]
    trained = family.from_checkpoint(ck, weights, device)
    if not isinstance(trained, role):
        raise RunDirError(f"{run} is a {family.name} run, which {_does(trained)}; this command needs one that "
                          + " or ".join(w for r, w in _WHAT if r in (role if isinstance(role, tuple) else (role,))))
    return trained, ck, path
