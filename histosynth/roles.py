"""The contracts between histosynth's parts, in one place.

Four roles, each a :class:`typing.Protocol`; an implementation is any object with these
attributes and methods (nothing to inherit):

``Task``        what :func:`histosynth.engine.train` trains: every GAN family, CycleGAN, the
                classifier (and the toy task of the tests). The engine owns everything common
                (device and precision, EMA, learning-rate schedules, gradient averaging over
                torchrun ranks, checkpoints, exact resume, the NaN guard, progress, logs,
                evaluation, best/snapshot checkpoints); the task owns the maths of one step.
``Generator``   what draws synthetic tiles from a trained run: ``gan-generate``, the training-time
                KID and ``piq-report --generator``. A GAN draws once from noise; a diffusion model
                runs its sampler.
``PairGenerator`` what draws synthetic image-mask pairs (pix2pix: new masks, painted).
``Translator``  what maps images of one domain to another (CycleGAN): ``gan-translate``, ``gan-eval``.
``Downstream``  what ``augment-compare`` trains in every arm x seed cell and how it is scored:
                classification (``classifier/downstream.py``) and segmentation
                (``segmentation/downstream.py``). Its :class:`MetricSpec` tells the report and the
                verdict which metrics exist, which is primary, which way is better and where
                chance lies; its :class:`Layout` what one sample of its data is.

Where new things go (see the README's layout section): a generator family is one module in
``gans/families/`` that defines ``FAMILY`` (found by :mod:`gans.registry`, nothing to register)
plus its YAML in ``configs/``; a downstream task is a package with a ``downstream.py`` that defines
``DOWNSTREAM`` (found by :func:`histosynth.registry.downstream_tasks`) plus its compare YAML.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import nn

# ----------------------------------------------------------------------------------------------
# Task: what the engine trains


@dataclass(frozen=True)
class LRSchedule:
    """Learning-rate factor per optimizer step (the same for every optimizer of a task).

    ``constant``: 1. ``linear``: 1 until ``decay_start``, then linear decay to 0 at the last step
    (CycleGAN's schedule; ``decay_start`` 0 is the WGAN-GP ResNet schedule). ``cosine``: half a
    cosine from 1 to 0 over the steps after the warm-up (the classifier's). Every kind may start
    with ``warmup`` steps of linear warm-up from 1/warmup to 1.
    """

    kind: Literal["constant", "linear", "cosine"] = "constant"
    warmup: int = 0
    decay_start: int = 0

    def factor(self, step: int, total: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "linear":
            span = max(total - self.decay_start, 1)
            return 1.0 if step < self.decay_start else max(0.0, 1.0 - (step - self.decay_start) / span)
        if self.kind == "cosine":
            t = (step - self.warmup) / max(1, total - self.warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
        return 1.0


@dataclass(frozen=True)
class Criterion:
    """The evaluation metric that decides ``best.pt`` and early stopping, and which way is better."""

    metric: str
    mode: Literal["max", "min"] = "max"

    def better(self, value: float, best: float | None) -> bool:
        if not math.isfinite(value):
            return False
        if best is None:
            return True
        return value > best if self.mode == "max" else value < best


@dataclass(frozen=True)
class Plan:
    """How long a task trains and how often the engine logs, evaluates and checkpoints (in steps;
    one step is one call of ``train_step``). A task derives it from its own config."""

    steps: int
    log_every: int = 10
    checkpoint_every: int = 100
    visualise_every: int = 0            # sample grid every N steps (0: never)
    evaluate_every: int = 0             # Task.evaluate every N steps and at the end (0: never)
    snapshot_every: int = 0             # a weights-only checkpoints/step_XXXXXX.pt every N steps (0: never)
    criterion: Criterion | None = None  # what evaluate()'s best value is: best.pt, early stopping
    patience: int = 0                   # stop after this many evaluations without a better value (0: never)
    min_steps: int = 0                  # no early stop before this step
    ema_decay: float = 0.0              # EMA of the modules in Task.ema_names (0: none)
    ema_start: int = 0                  # steps before the EMA starts averaging (it copies until then)
    lr: LRSchedule = field(default_factory=LRSchedule)
    images_per_step: int = 0            # real images one step consumes (all ranks): the images/s column


Grid = tuple[torch.Tensor, int, list[str]]
"""A picture of the model at work: ``N x 3 x H x W`` images in [-1, 1], images per row, row labels."""


@runtime_checkable
class Task(Protocol):
    """One model's training, as the engine runs it.

    ``train_step`` is one whole optimisation step (a GAN's ``n_dis`` discriminator updates and one
    generator update; CycleGAN's generator then discriminator update; one classifier batch). It
    draws its own data, steps its own ``optimizers`` and returns detached scalar tensors (losses,
    diagnostics) that the engine averages, logs and checks for NaN. Nothing passes from one step
    to the next through attributes except the training state the task saves in ``state_dict``.

    The engine attaches learning-rate schedules to ``optimizers``, averages their gradients over
    torchrun ranks before each ``optimizer.step()``, keeps EMA copies of ``modules[n]`` for ``n``
    in ``ema_names``, and saves ``modules``, EMA, ``optimizers``, schedulers, RNG and
    ``state_dict()`` (samplers, generators, pools: whatever the task's data order and randomness
    need to resume exactly). ``info()`` is what a reader of the weights needs without the training
    data (class names, sizes); it is stored in every checkpoint.
    """

    plan: Plan
    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    ema_names: tuple[str, ...]

    def train_step(self) -> dict[str, torch.Tensor]: ...

    def evaluate(self, models: Mapping[str, nn.Module]) -> dict[str, float]:
        """Metrics of the current models (EMA copies where kept); called on rank 0 every
        ``plan.evaluate_every`` steps. ``plan.criterion`` names the one that decides best.pt."""
        ...

    def visualise(self, models: Mapping[str, nn.Module]) -> Grid | None: ...

    def info(self) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# ----------------------------------------------------------------------------------------------
# Generator and Translator: what a trained run does


@runtime_checkable
class Generator(Protocol):
    """Draws synthetic tiles: tile ``i`` of a call is of class ``labels[i]`` (an index into
    ``classes``) from the random stream seeded by ``seeds[i]``, so any tile can be drawn again
    alone. Returns ``B x 3 x S x S`` uint8 on the CPU. ``options`` are family-specific (a
    diffusion sampler's step count, a guidance scale, masks for a mask-conditioned generator);
    unknown options are an error."""

    classes: list[str]
    image_size: int

    def sample(self, labels: Sequence[int], seeds: Sequence[int], **options: Any) -> torch.Tensor: ...


@runtime_checkable
class PairGenerator(Protocol):
    """Draws synthetic image-mask pairs for segmentation: pair ``i`` of a call is a NEW mask drawn
    from the training masks and an image painted for it, both from the random stream seeded by
    ``seeds[i]`` (any pair can be drawn again alone). Returns (``B x 3 x S x S`` uint8 images,
    ``B x S x S`` uint8 masks of class ids) on the CPU. ``options`` are family-specific (the mask
    drawing method, the side S); unknown options are an error."""

    image_size: int

    def sample_pairs(self, seeds: Sequence[int], **options: Any) -> tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class Translator(Protocol):
    """Maps whole images between domains (any size; large images in blended tiles)."""

    directions: tuple[str, ...]

    def translate(self, rgb: np.ndarray, direction: str, tile: int = 512, overlap: int | None = None
                  ) -> np.ndarray: ...


# ----------------------------------------------------------------------------------------------
# Downstream: what augment-compare trains and scores in each cell


@dataclass(frozen=True)
class Metric:
    name: str
    label: str
    higher_is_better: bool = True
    bounds: tuple[float, float] | None = (0.0, 1.0)    # intervals are cut to this range
    plotted: bool = True                               # a panel of the report's bar chart
    needs_groups: bool = False                         # measured per group (data.groups): absent without one


@dataclass(frozen=True)
class MetricSpec:
    """The metrics of a downstream task, as the report and the verdict iterate them."""

    metrics: tuple[Metric, ...]
    primary: str                # the default primary metric of the verdict (``report.primary: auto``)
    control: str | None = None  # the metric a label-shuffled control must keep at chance (Downstream.chance)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.metrics]

    def get(self, name: str) -> Metric:
        for m in self.metrics:
            if m.name == name:
                return m
        raise KeyError(f"{name!r} is not a metric of this task; metrics: {', '.join(self.names)}")


@dataclass
class TileSet:
    """Tiles with their labels, as a downstream task trains on them: ``images`` N x 3 x S x S
    uint8, ``labels`` N class indices into ``classes``, ``targets`` per-tile targets of any shape
    (N x ...: segmentation masks N x S x S; None for classification), ``synthetic`` which tiles
    are synthetic."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    targets: np.ndarray | None = None
    synthetic: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Sample:
    """One sample of a data folder: the files (relative to the folder) that belong together and
    go to the same split, and the stratum a stratified split balances (the class; '' for none)."""

    files: tuple[str, ...]
    stratum: str = ""


@runtime_checkable
class Layout(Protocol):
    """How a downstream task's data sits in a folder (``train/``, ``val/`` or ``test/``, or one
    folder that is split): class folders for classification, ``images/`` + ``masks/`` pairs for
    segmentation. The splitter moves whole samples, never parts of one."""

    description: str

    def samples(self, root: Path) -> list[Sample]:
        """Every sample in ``root``, in a fixed order; a DataError says what is wrong with it."""
        ...


@runtime_checkable
class SplitData(Protocol):
    """A split (or a synthetic set) decoded by :meth:`Downstream.load`: its tiles as a
    :class:`TileSet`, the files it was read from (relative to its folder; the leakage guard
    hashes them) and how many of them identify a sample (``samples``: an image, not its mask)."""

    classes: list[str]
    files: list[str]

    def __len__(self) -> int: ...

    def class_counts(self) -> dict[str, int]: ...

    def sample_files(self) -> list[str]: ...

    def describe(self) -> str:
        """One line for the report: how many samples, tiles, classes."""
        ...

    def tileset(self) -> TileSet: ...


@runtime_checkable
class Downstream(Protocol):
    """A downstream task of ``augment-compare`` (``task:`` in its config).

    ``config`` is the typed class of the compare config's ``downstream:`` section, ``spec`` its
    metrics, ``chance(classes)`` the chance level of those that have one, ``layout`` how its data
    sit in a folder (what the splitter moves together), ``augment_policies`` the names an arm's
    ``augment`` may take, ``class_balance`` whether arms may balance classes (sampler, class
    weights), ``smoke`` ``--set`` overrides of the section for a seconds-long CPU run (the
    contract tests use them).

    ``load`` decodes a folder for a role (``train``, ``val``, ``test`` or ``synthetic``) into the
    task's :class:`SplitData`, optionally stain-normalised. The runner trains every arm x seed cell
    on the engine: ``build_task`` is the cell's :class:`Task` (trained on ``train``, an arm's
    assembled set -- ``train.synthetic`` says which tiles are synthetic, ``train.targets`` carries
    per-tile targets -- with the arm's augmentation policy, sampler and class weights; its plan's
    criterion on ``val``, the loaded validation split, picks best.pt and early stopping).
    ``score`` scores the best checkpoint on the loaded real ``test`` split: a flat mapping with
    every metric of ``spec`` plus any scalars worth a results.csv column; what plots need beyond
    that it leaves in ``cell``. ``plots`` draws the task's own figures of the report (``{title:
    file}``; the per-arm bars of every metric are the report's own).
    """

    name: str
    config: type
    spec: MetricSpec
    layout: Layout
    augment_policies: tuple[str, ...]
    filters: tuple[str, ...]    # what a synthetic set's filter may select by (``by``)
    class_balance: bool
    synthesis: type             # the role a generator stage's run must play: Generator, PairGenerator
    test_unit: str              # what one test sample is called in the verdict: tiles, images
    smoke: tuple[str, ...]

    def chance(self, classes: Sequence[str]) -> dict[str, float]: ...

    def load(self, cfg: Any, root: Path, role: str, cache_dir: Path | None, progress: bool,
             stain: Any = None) -> SplitData: ...

    def describe(self, cfg: Any) -> str: ...

    def select(self, cfg: Any, spec: Any, source: Path, train_root: Path, out: Path, need: dict[str, int],
               cache_dir: Path | None, progress: bool) -> dict:
        """Write the best of synthetic set ``source`` into ``out`` by ``spec`` (a
        :class:`~metrics.selection.FilterConfig`), scored by a model trained on ``train_root``
        only, with a source.json the leakage guard reads; ``need``: what must pass, per class."""
        ...

    def runtime(self, cfg: Any) -> Any:
        """The paths (:class:`~histosynth.runtime.Runtime`: device, precision, layout) cells may
        train on: one, or :meth:`Runtime.candidates` (the rule's first), between which the runner
        measures once for the whole comparison (:func:`histosynth.autotune.shared`)."""
        ...

    def build_task(self, cfg: Any, arm: Any, seed: int, train: TileSet, val: SplitData, rt: Any) -> Task: ...

    def score(self, cfg: Any, best: dict, train: TileSet, test: SplitData, cell: Path,
              groups: Sequence[str] | None = None) -> dict[str, float]:
        """``groups``: the group (image, patient) of each test sample, from data.groups; None
        without one (metrics that need groups are then NaN, and the report leaves them out)."""
        ...

    def plots(self, summary: dict, rows: list[dict], out: Path) -> dict[str, str]: ...
