"""Training-set assembly: the real training split plus synthetic tiles at a ratio or a target.

Validation and test sets are never touched here: they are real only.
"""

from __future__ import annotations

import numpy as np

from experiments.config import SyntheticConfig
from histosynth.config import ConfigError
from histosynth.roles import TileSet
from histosynth.errors import UserError


class AssemblyError(UserError, ValueError):
    """The synthetic source cannot supply what an arm asks for; the message says what to change."""


def synthetic_counts(real_counts: dict[str, int], spec: SyntheticConfig, where: str = "synthetic") -> dict[str, int]:
    """Synthetic tiles to add per class.

    ``ratio`` r: round(r * real count) for each class in ``classes`` (all | minority: smaller
    than the largest | a list); a mapping names the classes and ratios itself;
    ``target`` t: max(0, t - real count); ``balanced``: the largest real class's count.
    """
    classes = list(real_counts)
    if spec.source == "none":
        return {c: 0 for c in classes}

    def check(mapping: dict, key: str) -> None:
        unknown = [c for c in mapping if c not in real_counts]
        if unknown:
            raise ConfigError(f"{where}.{key}.{unknown[0]}", f"is not a class of the training split; "
                                                            f"classes: {', '.join(classes)}")

    if spec.ratio is not None:
        if isinstance(spec.ratio, dict):
            check(spec.ratio, "ratio")
            return {c: int(round(spec.ratio.get(c, 0.0) * n)) for c, n in real_counts.items()}
        if spec.classes == "all":
            chosen = set(classes)
        elif spec.classes == "minority":
            top = max(real_counts.values())
            chosen = {c for c, n in real_counts.items() if n < top}
        else:
            check(dict.fromkeys(spec.classes), "classes")
            chosen = set(spec.classes)
        return {c: int(round(spec.ratio * n)) if c in chosen else 0 for c, n in real_counts.items()}
    if spec.target == "balanced":
        top = max(real_counts.values())
        return {c: top - n for c, n in real_counts.items()}
    check(spec.target, "target")
    return {c: max(0, spec.target.get(c, n) - n) for c, n in real_counts.items()}


def assemble(real: TileSet, synth: TileSet | None, counts: dict[str, int], seed: int) -> TileSet:
    """The real training tiles plus ``counts`` synthetic tiles per class, as one :class:`TileSet`
    (``synthetic`` marks the added tiles; per-tile ``targets`` travel with their tiles).

    Synthetic tiles are drawn without replacement by ``seed`` (a different subset per seed when
    the pool is larger than needed); their labels are mapped onto the real class order.
    """
    picks: list[tuple[int, np.ndarray]] = []             # (class index, synthetic tile indices)
    rng = np.random.default_rng(seed)
    for ci, c in enumerate(real.classes):
        need = counts.get(c, 0)
        if need == 0:
            continue
        if synth is None or c not in synth.classes:
            raise AssemblyError(f"{need} synthetic {c} tiles are needed but the synthetic source has "
                                f"no class {c!r}" + (f" (it has {', '.join(synth.classes)})" if synth else ""))
        pool = np.flatnonzero(synth.labels == synth.classes.index(c))
        if len(pool) < need:
            raise AssemblyError(f"{need} synthetic {c} tiles are needed but the source has {len(pool)}; "
                                "generate more (gan.per_class) or lower the ratio/target")
        picks.append((ci, np.sort(rng.choice(pool, size=need, replace=False))))
    images = [np.asarray(real.images)] + [np.asarray(synth.images[p]) for _, p in picks]
    labels = [real.labels] + [np.full(len(p), ci, dtype=np.int64) for ci, p in picks]
    flags = [np.zeros(len(real), bool)] + [np.ones(len(p), bool) for _, p in picks]
    targets = None
    if real.targets is not None:
        if picks and synth.targets is None:
            raise AssemblyError("the real tiles carry targets (e.g. masks) but the synthetic source has none")
        targets = np.concatenate([np.asarray(real.targets)] + [np.asarray(synth.targets[p]) for _, p in picks])
    return TileSet(np.concatenate(images), np.concatenate(labels), list(real.classes), targets,
                   np.concatenate(flags))
