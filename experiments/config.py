"""Typed configuration of an ``augment-compare`` run.

Sections: ``data`` (where the real train/val/test splits come from), ``generators`` (optional:
named generator stages, each a train-gan config trained on the training split, whose synthetic
sets arms use by name), ``task`` (the downstream task every arm trains: ``classification`` or
``segmentation``) and ``downstream`` (its model and training, shared by
every arm; typed by the task: :class:`classifier.config.ClassifierConfig` for classification),
``arms`` (what differs between arms), ``seeds``, ``report`` and ``leakage``. Unknown keys, wrong
types and out-of-range values fail with the dotted key (``arms[2].synthetic.ratio``,
``downstream.train.lr``) and the file or ``--set`` they came from.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from histosynth import config as configlib
from histosynth.config import require, require_choice
from histosynth.paths import resolve_data_path
from histosynth.registry import get_downstream
from metrics.selection import FilterConfig


@dataclass
class CompareDataConfig:
    root: str = "data/lung_demo"
    """A folder holding ``train/``, ``val/`` and ``test/`` (``split: folders``; without ``val/``,
    validation is carved from train by sample), or one folder that is split here (``split:
    groups`` or ``stratified``). Each is in the task's layout: class folders (classification) or
    ``images/`` + ``masks/`` pairs (segmentation)."""
    split: Literal["auto", "folders", "groups", "stratified"] = "auto"
    """``folders``: use root/train, root/val (or carve it from train), root/test; ``groups``: split
    root by the group ids of ``groups`` (no group spans two splits; stratified by class);
    ``stratified``: a seeded stratified random split (only when samples are independent: no
    near-duplicates); ``auto``: folders when root/train exists, else groups when a groups file
    exists, else stratified."""
    groups: Optional[str] = None
    """CSV with columns ``file`` and ``group_id`` (``lung/groups.csv`` style; ``file`` relative to
    root or a bare file name). Default: root/groups.csv when present. With folders, no group may
    span train and val/test (checked); with ``split: groups``, the split follows the groups."""
    val_fraction: float = 0.15
    test_fraction: float = 0.25
    split_seed: int = 0
    """Seed of the ``groups`` / ``stratified`` split (fixed across arms and seeds)."""
    cache_dir: Optional[str] = None
    """Decoded-tile cache; default $HISTOSYNTH_CACHE or ~/.cache/histosynth."""

    def __post_init__(self):
        for key in ("val_fraction", "test_fraction"):
            v = getattr(self, key)
            require(0 < v < 0.5, key, f"must be in (0, 0.5), got {v}")


@dataclass
class GeneratorStageConfig:
    config: str = "dcgan.yaml"
    """A train-gan config of a class-conditional family (bare names resolve in configs/: dcgan,
    sngan, wgan_gp, diffusion ...) trained on the training split before the arms run. Its
    data.root is always set to the training split."""
    set: list[str] = field(default_factory=list)
    """Overrides for that config, as train-gan's --set (e.g. ["train.steps=600"])."""
    per_class: Union[Literal["auto"], int] = "auto"
    """Synthetic tiles generated per class; ``auto``: as many as the arms need."""
    seed: int = 0
    """First noise seed of generation (tile k uses seed + k)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Sampling options of the family (diffusion: steps, scheduler, guidance_scale), as
    gan-generate's --option."""

    def __post_init__(self):
        require(self.per_class == "auto" or self.per_class >= 1, "per_class",
                f"must be 'auto' or >= 1, got {self.per_class}")


@dataclass
class SyntheticConfig:
    source: str = "none"
    """``none``; the name of a generator stage (``generators:``, e.g. ``gan``); or a folder of
    synthetic tiles (ImageFolder tree with gan-generate's manifest.csv and source.json, verified
    before use)."""
    ratio: Union[float, dict[str, float], None] = None
    """Synthetic tiles per real training tile: one number (1.0 doubles a class) for the classes
    named by ``classes``, or per class by name ({lung_scc: 1.0}: +100 % of lung_scc only)."""
    classes: Union[Literal["all", "minority"], list[str]] = "all"
    """Which classes a numeric ``ratio`` tops up: ``all``, ``minority`` (every class smaller than
    the largest; works on any dataset without naming classes) or a list of class names."""
    target: Union[Literal["balanced"], dict[str, int], None] = None
    """Top classes up with synthetic tiles to a count: ``balanced`` (every class to the largest
    real class) or per class ({lung_scc: 400}). Give ratio or target, not both."""
    filter: Optional[FilterConfig] = None
    """Selective augmentation (metrics/selection.py): the same number of tiles, chosen from
    ``candidates`` = needed / keep by a classifier trained on the real training split only, e.g.
    ``{by: confidence, keep: 0.5}`` (by: confidence | centroid | both); null: unselected."""

    def __post_init__(self):
        if self.source == "none":
            require(self.ratio is None and self.target is None and self.filter is None, "source",
                    "is 'none' but ratio/target/filter is set; name a source (a generator or a folder)")
            return
        require((self.ratio is None) != (self.target is None), "ratio",
                "give exactly one of ratio (synthetic per real tile) or target (count per class)")
        if isinstance(self.ratio, dict):
            for c, v in self.ratio.items():
                require(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0,
                        f"ratio.{c}", f"must be a number >= 0, got {v!r}")
        elif self.ratio is not None:
            require(self.ratio >= 0, "ratio", f"must be >= 0, got {self.ratio}")
        if isinstance(self.target, dict):
            for c, v in self.target.items():
                require(isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                        f"target.{c}", f"must be an integer >= 0, got {v!r}")


@dataclass
class ArmConfig:
    name: str = "real_only"
    """Identifier of the arm (letters, digits, _, . and -); used in tables, plots and folders."""
    augment: str = "flip_rot90"
    """Augmentation policy of the downstream task. Classification (classifier/augment.py): none |
    flip (h/v flips: 4 symmetries) | flip_rot90 (all 8 symmetries) | stain (flip_rot90 + H&E stain
    jitter) | classic (flip_rot90 + affine + elastic + colour + stain jitter). Segmentation
    (segmentation/augment.py): none | flip_rot90 | distort (flip_rot90 + scale/rotation, elastic,
    grid and barrel/pincushion distortion) | stain | classic (distort + colour + stain jitter)."""
    stain_norm: Literal["none", "macenko", "reinhard"] = "none"
    """Stain normalisation of every image the arm sees (training, synthetic, validation and test),
    torchstain's Macenko or Reinhard fitted to a mosaic of training tiles only."""
    sampler: Literal["random", "balanced", "class_augment"] = "random"
    """``balanced``: torchsampler's ImbalancedDatasetSampler (classes drawn equally often);
    ``class_augment``: class-based augmentation -- every tile once, and each class topped up to
    the largest with extra draws of its own tiles under the heavy ``classic`` policy, so the rarer
    a class, the more heavily augmented copies it gets (classification only)."""
    class_weights: Literal["none", "balanced"] = "none"
    """``balanced``: class-weighted cross-entropy (classification only)."""
    labels: Literal["real", "shuffled"] = "real"
    """``shuffled``: training labels permuted (a control that must stay near chance)."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self):
        require(bool(re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,39}", self.name)), "name",
                f"{self.name!r} must be 1-40 letters, digits, _, . or - (not starting with .)")


@dataclass
class CompareReportConfig:
    baseline: str = "real_only"
    """The arm every other arm is compared with (paired over seeds)."""
    test: Literal["t", "wilcoxon", "permutation"] = "t"
    """Paired test over seeds: ``t`` (paired t-test; where it is undefined because every seed's
    difference is the same, the sign-flip test is used and the report says so), ``wilcoxon``
    (signed-rank) or ``permutation`` (exact sign-flip test of the mean difference). With n seeds
    the smallest two-sided p of the last two is 2 / 2^n: they need >= 6 seeds to reach p < 0.05."""
    primary: str = "auto"
    """The metric the verdict is about (all are tabulated); ``auto``: the task's own (balanced
    accuracy for classification; also macro_f1, auc, minority_sensitivity, accuracy)."""
    alpha: float = 0.05
    """Significance level, applied to Holm-adjusted p-values across the compared arms."""

    def __post_init__(self):
        require(0 < self.alpha < 1, "alpha", f"must be in (0, 1), got {self.alpha}")


@dataclass
class LeakageConfig:
    allow_unverified_synthetic: bool = False
    """A synthetic folder without gan-generate's source.json (so its generator's training data
    cannot be checked) is refused unless this is true; the report then says it was unverified."""


@dataclass
class CompareConfig:
    data: CompareDataConfig = field(default_factory=CompareDataConfig)
    generators: dict[str, Any] = field(default_factory=dict)
    """Named generator stages, e.g. ``{gan: {config: dcgan.yaml}, diffusion: {config:
    diffusion.yaml}}``; arms use them by name (``synthetic.source: gan``)."""
    task: str = "classification"
    """The downstream task every arm trains (a package with a downstream.py: ``classification``,
    ``segmentation``)."""
    downstream: Any = field(default_factory=dict)
    """The task's model and training, shared by every arm; keys as the task's config class
    (classification: ``model`` and ``train`` of classifier/config.py; segmentation: ``model``,
    ``train`` and ``eval`` of segmentation/config.py)."""
    arms: list[ArmConfig] = field(default_factory=lambda: [ArmConfig()])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    report: CompareReportConfig = field(default_factory=CompareReportConfig)
    leakage: LeakageConfig = field(default_factory=LeakageConfig)

    def __post_init__(self):
        stages = {}
        for name, stage in self.generators.items():
            require(bool(re.fullmatch(r"[a-z][a-z0-9_]{0,29}", str(name))), f"generators.{name}",
                    "a generator's name is 1-30 lower-case letters, digits or _, starting with a letter")
            if dataclasses.is_dataclass(stage):
                stages[name] = stage
                continue
            try:
                stages[name] = configlib.build(GeneratorStageConfig, stage if isinstance(stage, dict) else {"config": stage})
            except configlib.ConfigError as e:
                raise e.located(f"generators.{name}", None) from None
        self.generators = stages
        task = get_downstream(self.task)
        if not dataclasses.is_dataclass(self.downstream):
            if not isinstance(self.downstream, dict):
                raise configlib.ConfigError("downstream", f"is a section; expected a mapping of keys, "
                                                          f"got {self.downstream!r}")
            try:
                self.downstream = configlib.build(task.config, self.downstream)
            except configlib.ConfigError as e:
                raise e.located("downstream", None) from None
        for i, a in enumerate(self.arms):
            require_choice(a.augment, task.augment_policies, f"arms[{i}].augment",
                           f"an augmentation policy of the {task.name} task")
            if a.synthetic.filter is not None:
                require_choice(a.synthetic.filter.by, task.filters, f"arms[{i}].synthetic.filter.by",
                               f"a filter of the {task.name} task")
            if not task.class_balance:
                require(a.sampler == "random", f"arms[{i}].sampler",
                        f"must be 'random': the {task.name} task has no classes to balance")
                require(a.class_weights == "none", f"arms[{i}].class_weights",
                        f"must be 'none': the {task.name} task has no classes to weight")
        if self.report.primary == "auto":
            self.report.primary = task.spec.primary
        require_choice(self.report.primary, task.spec.names, "report.primary", f"a {task.name} metric")
        require(len(self.arms) >= 1, "arms", "declare at least one arm")
        names = [a.name for a in self.arms]
        dup = sorted({n for n in names if names.count(n) > 1})
        require(not dup, "arms", f"arm names must be unique; repeated: {', '.join(dup)}")
        require(self.report.baseline in names, "report.baseline",
                f"{self.report.baseline!r} is not an arm; arms: {', '.join(names)}")
        require(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), "seeds",
                f"give one or more distinct seeds, got {self.seeds}")
        for i, a in enumerate(self.arms):
            src = a.synthetic.source
            require(src in ("none", *self.generators) or "/" in src or "." in src or resolve_data_path(src).is_dir(),
                    f"arms[{i}].synthetic.source",
                    f"{src!r} is no generator of this config ({', '.join(self.generators) or 'none declared'}) "
                    f"and no folder path; declare generators.{src}.config (e.g. dcgan.yaml) or give a folder")
