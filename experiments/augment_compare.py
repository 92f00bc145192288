"""augment-compare: does synthetic data help the downstream model? An honest, resumable comparison.

    augment-compare --cfg compare_demo.yaml --out runs/compare          # whole pipeline
    augment-compare --cfg compare.yaml --out D --set data.root=/my/data --set seeds=[0,1,2,3,4]
    augment-compare --out runs/compare --report-only                    # redraw the report

One command runs every stage: the real splits (by group when a groups file exists) and the
leakage guard; optionally named generator stages (GANs, diffusion) trained on the training split
and the synthetic sets generated from them, and selections from those sets by a classifier
trained on the training split (all verified against their manifests and provenance); then every
arm x seed cell (the downstream task's model, an EfficientNet classifier for ``task:
classification``, trained on the arm's training set, early-stopped on the real validation split,
evaluated on the real test split), and the report. Re-running the same command continues:
finished stages and cells are skipped, a cell killed mid-training continues from its last
checkpoint. Output folder::

    OUT/config.yaml        the resolved config (a second run must match it, or --overwrite)
    OUT/generators/NAME/run/        a generator stage's run directory (train-gan layout)
    OUT/generators/NAME/synthetic/  its synthetic tiles + manifest.csv + source.json
    OUT/selected/SET/      a filter's selection from a synthetic set (manifest with scores,
                           selection.csv, selection.png)
    OUT/cells/ARM/seedS/   the cell's engine run (checkpoints/best.pt, metrics.jsonl) and its test
                           scores (classification: metrics.json, test_predictions.npz)
    OUT/results.csv        one row per finished cell (appended atomically)
    OUT/summary.json, report.md, report.html, *.png

Also runs as ``python -m experiments.augment_compare`` or ``python experiments/augment_compare.py``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python experiments/augment_compare.py` without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from experiments.assemble import assemble, synthetic_counts  # noqa: E402
from experiments.config import ArmConfig, CompareConfig  # noqa: E402
from experiments.leakage import check_groups, check_real, file_hashes, verify_synthetic  # noqa: E402
from experiments.report import summarise, write_report  # noqa: E402
from experiments.splits import SPLITS, group_of, resolve_splits  # noqa: E402
from histosynth import autotune  # noqa: E402
from histosynth import config as configlib  # noqa: E402
from histosynth import engine  # noqa: E402
from histosynth.checkpoint import (atomic_write, atomic_write_csv, atomic_write_text,  # noqa: E402
                                   remove_stale_temps, safe_load, sha256_file)
from histosynth.cli import run_cli  # noqa: E402
from histosynth.data import default_cache_dir  # noqa: E402
from histosynth.images import DataError  # noqa: E402
from histosynth.paths import (OutputExistsError, check_apart, check_claimable, claim_output_dir,  # noqa: E402
                              hold, resolve_data_path)
from histosynth.registry import get_downstream  # noqa: E402
from histosynth.roles import Generator, PairGenerator, TileSet  # noqa: E402
from histosynth.stain import StainNormaliser, reference_mosaic  # noqa: E402

SHUFFLE_SALT = 7919
SYNTHESIS_HINT = {Generator: "use a class-conditional family (dcgan.yaml, sngan.yaml, wgan_gp.yaml, diffusion.yaml)",
                  PairGenerator: "use a mask-conditioned pair generator (pix2pix_monuseg.yaml)"}


def load_compare_config(path, overrides: list[str]) -> tuple[CompareConfig, Path | None]:
    cfg, _, resolved = configlib.load(CompareConfig, path, overrides)
    return cfg, resolved


# ----------------------------------------------------------------------------------------------
# the output folder


def _flatten(d, prefix: str = "") -> dict[str, object]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def claim_compare_dir(out: Path, cfg: CompareConfig, overwrite: bool) -> bool:
    """Prepare ``out``; True when continuing an earlier run of the same config."""
    saved = out / "config.yaml"
    now = configlib.to_dict(cfg)
    started = any((out / p).exists() for p in ("results.csv", "cells", "generators", "selected"))
    if saved.is_file() and not overwrite:
        old = configlib.read_yaml(saved)
        a, b = _flatten(old), _flatten(now)
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff and not started:        # an earlier start failed before computing anything
            atomic_write_text(saved, configlib.dump_yaml(cfg))
            return False
        if diff:
            raise OutputExistsError(f"{out} holds a comparison run with another config (differs in "
                                    f"{', '.join(diff[:6])}); pass --overwrite to start over, or "
                                    "another --out")
        return True
    claim_output_dir(out, overwrite, hint="pass --overwrite to replace it, or another --out")
    atomic_write_text(saved, configlib.dump_yaml(cfg))
    return False


def read_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_result(path: Path, row: dict) -> list[dict]:
    """Add ``row`` to results.csv by rewriting it atomically (a kill never leaves half a row)."""
    rows = read_results(path) + [row]
    fields = list(rows[0])
    for r in rows:
        fields += [k for k in r if k not in fields]
    atomic_write_csv(path, rows, fields)
    return rows


# ----------------------------------------------------------------------------------------------
# stages


def _cache_dir(cfg: CompareConfig) -> Path:
    return Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else default_cache_dir()


def load_split(cfg: CompareConfig, root, role: str, progress: bool, stain: StainNormaliser | None = None):
    """A folder's data as the downstream task reads it (classification: tiles at the model's size;
    segmentation: image-mask tiles, or whole images for val/test), through the shared disk cache
    (decoded once: later calls, and the cell workers, reopen it). ``role``: train | val | test |
    synthetic."""
    return get_downstream(cfg.task).load(cfg.downstream, Path(root), role, _cache_dir(cfg), progress, stain)


def load_splits(cfg: CompareConfig, out: Path, progress: bool):
    splits = resolve_splits(cfg.data, out, get_downstream(cfg.task).layout)
    caches = {s: load_split(cfg, splits.roots[s], s, progress) for s in SPLITS}
    classes = caches["train"].classes
    for s in ("val", "test"):
        if caches[s].classes != classes:
            raise DataError(f"the {s} split has classes {caches[s].classes} but train has {classes}; "
                            "every split needs the same class folders")
    return splits, caches


def sample_groups(splits, data, split: str) -> list[str] | None:
    """The group (image, patient) of each sample of ``split`` from the groups file, a sample
    without one being a group of its own; None without a groups file."""
    if not splits.groups:
        return None
    return [group_of(splits.groups, f"{split}/{f}") or group_of(splits.groups, f) or f"ungrouped:{f}"
            for f in data.sample_files()]


def leakage_checks(splits, caches, progress: bool) -> tuple[dict, dict[str, str]]:
    hashes = {s: file_hashes(splits.roots[s], caches[s].files, progress, f"hashing {s}") for s in SPLITS}
    samples = {s: set(caches[s].sample_files()) for s in SPLITS}     # images, not masks: two empty
    by_sample = {s: {h: f for h, f in hashes[s].items() if f in samples[s]} for s in SPLITS}   # masks may agree
    check_real(by_sample["train"], {"val": by_sample["val"], "test": by_sample["test"]})
    info = {"content hashes": f"no validation/test file in train ({sum(len(h) for h in hashes.values())} files, sha256)"}
    if splits.groups:
        n = check_groups(splits.groups, {s: caches[s].files for s in SPLITS})
        info["groups"] = f"no near-duplicate group spans train and val/test ({n} train groups, {splits.groups_file})"
    else:
        info["groups"] = "no groups file: tiles are assumed independent (give data.groups if they are not)"
    evals = {h: f"{s}/{f}" for s in ("val", "test") for h, f in hashes[s].items()}
    return info, evals


def source_key(arm) -> str:
    """The synthetic set an arm draws from: its source, or that source selected by its filter."""
    spec = arm.synthetic
    return spec.source if spec.filter is None else f"{spec.source}#{spec.filter.tag()}"


def needed(cfg: CompareConfig, real_counts: dict[str, int], key: str) -> dict[str, int]:
    """Tiles per class the arms drawing from set ``key`` need (the most any one of them asks)."""
    need = {c: 0 for c in real_counts}
    for i, arm in enumerate(cfg.arms):
        if source_key(arm) == key:
            for c, n in synthetic_counts(real_counts, arm.synthetic, f"arms[{i}].synthetic").items():
                need[c] = max(need[c], n)
    return need


def candidates_per_class(cfg: CompareConfig, real_counts: dict[str, int], source: str) -> dict[str, int]:
    """Tiles per class a source must supply: what its unselected arms use, and ``needed / keep``
    candidates for each filter that selects from it (classes no arm tops up get none)."""
    most = {c: 0 for c in real_counts}
    for arm in cfg.arms:
        if arm.synthetic.source == source:
            for c, n in needed(cfg, real_counts, source_key(arm)).items():
                most[c] = max(most[c], arm.synthetic.filter.candidates(n) if arm.synthetic.filter else n)
    return {c: n for c, n in most.items() if n}


def generator_stage(cfg: CompareConfig, name: str, train_root: Path, out: Path, per_class: dict[str, int],
                    progress: bool) -> Path:
    """Train generator stage ``name`` on the training split (or continue it) and generate from it."""
    from gans.generate import generate
    from gans.registry import get_family
    from gans.train_gan import load_config, train_gan

    stage = cfg.generators[name]
    gcfg, _ = load_config(stage.config, list(stage.set) + [f"data.root={train_root.resolve()}"])
    task = get_downstream(cfg.task)
    if get_family(gcfg.model.family).draws(gcfg) is not task.synthesis:
        raise configlib.ConfigError(f"generators.{name}.config", f"{stage.config} does not give what the {task.name} "
                                    f"task trains on ({task.synthesis.__name__}); {SYNTHESIS_HINT[task.synthesis]}")
    run, synth = out / "generators" / name / "run", out / "generators" / name / "synthetic"
    ck_path = run / "checkpoints" / "last.pt"
    done = ck_path.is_file() and int(safe_load(ck_path).get("step", -1)) >= gcfg.train.steps
    if not done:
        resume = ck_path.is_file()
        print(f"augment-compare: generator {name}: {'continuing' if resume else 'training'} {stage.config} "
              f"on {train_root} ({gcfg.train.steps} steps) -> {run}", file=sys.stderr)
        train_gan(gcfg, run, resume=resume, overwrite=not resume, progress=progress)
    manifest, source = synth / "manifest.csv", synth / "source.json"
    if manifest.is_file() and source.is_file():
        import json
        info = json.loads(source.read_text())
        with open(manifest, newline="") as f:
            seeds: dict[str, set] = {}          # one seed per tile (per pair: its image and mask rows)
            for row in csv.DictReader(f):
                seeds.setdefault(row["class"], set()).add(row["seed"])
            counts = {c: len(v) for c, v in seeds.items()}
        if info.get("checkpoint_sha256") == sha256_file(ck_path) and all(counts.get(c, 0) >= n
                                                                         for c, n in per_class.items()):
            return synth
    generate(run, synth, per_class, seed=stage.seed, overwrite=True, progress=progress,
             device=gcfg.train.device, options=stage.options)
    return synth


def selected_set(cfg: CompareConfig, arm, source_root: Path, out: Path, train_root: Path,
                 need: dict[str, int], progress: bool) -> Path:
    """``arm``'s filter applied to ``source_root`` (once; kept under OUT/selected/), scored by a
    classifier trained on the training split only."""
    import hashlib
    import json
    spec = arm.synthetic.filter
    digest = hashlib.sha256(str(source_root.resolve()).encode()).hexdigest()[:8]
    root = out / "selected" / f"{Path(arm.synthetic.source).name}-{digest}-{spec.tag()}"
    info = root / "source.json"
    if info.is_file() and (root / "manifest.csv").is_file():
        sel = json.loads(info.read_text()).get("selected", {})
        if sel.get("from") == str(source_root.resolve()) and all(
                sel["counts"].get(c, {}).get("kept", 0) >= n for c, n in need.items()):
            return root
    print(f"augment-compare: selecting from {source_root} ({spec.describe()}) -> {root}", file=sys.stderr)
    get_downstream(cfg.task).select(cfg.downstream, spec, source_root, train_root, root, need, _cache_dir(cfg), progress)
    return root


def load_synthetic(cfg: CompareConfig, out: Path, splits, caches, evals: dict[str, str], progress: bool):
    """Every synthetic set the arms use, by :func:`source_key`: generated (generator stages),
    given (folders) and selected (filters), each verified by the leakage guard."""
    real_counts = caches["train"].class_counts()
    roots: dict[str, Path] = {}
    for src in sorted({a.synthetic.source for a in cfg.arms} - {"none"}):
        if src in cfg.generators:
            stage = cfg.generators[src]
            per_class = ({c: stage.per_class for c in real_counts} if stage.per_class != "auto" else
                         candidates_per_class(cfg, real_counts, src) or {c: 1 for c in real_counts})
            roots[src] = generator_stage(cfg, src, splits.roots["train"], out, per_class, progress)
        else:
            roots[src] = resolve_data_path(src)
            if not roots[src].is_dir():
                raise DataError(f"synthetic source {src} is not a folder (give 'none', a generator: "
                                f"{', '.join(cfg.generators) or 'none declared'}, or a folder written by gan-generate)")
    for arm in cfg.arms:
        key = source_key(arm)
        if arm.synthetic.filter is not None and key not in roots:
            roots[key] = selected_set(cfg, arm, roots[arm.synthetic.source], out, splits.roots["train"],
                                      needed(cfg, real_counts, key), progress)
    sources: dict[str, tuple[object, dict]] = {}
    for key, root in roots.items():
        if key in {source_key(a) for a in cfg.arms}:
            cache = load_split(cfg, root, "synthetic", progress)
            prov = verify_synthetic(root, cache.files, evals, [splits.roots["val"], splits.roots["test"]],
                                    cfg.leakage.allow_unverified_synthetic)
            sources[key] = (cache, {"root": str(root), "classes": cache.class_counts(), **prov})
    return sources


class Inputs:
    """The decoded splits and synthetic sets of every preprocessing the arms ask for (``none``, or a
    stain normalisation fitted on training images only: a mosaic of 16 training tiles written to
    OUT/preprocess/stain_reference.png), decoded on first use through the disk cache. The parent
    builds it from the checked data; a cell worker rebuilds it from the same folders (it then
    reopens what the parent decoded)."""

    def __init__(self, cfg: CompareConfig, out: Path, split_roots: dict[str, str], source_roots: dict[str, str],
                 test_groups: list[str] | None = None, progress: bool = False,
                 loaded: tuple[dict, dict] | None = None):
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.split_roots, self.source_roots, self.test_groups = split_roots, source_roots, test_groups
        self._by_method: dict[str, tuple[dict, dict]] = {"none": loaded} if loaded else {}

    @property
    def reference(self) -> Path:
        return self.out / "preprocess" / "stain_reference.png"

    def stain(self, method: str) -> StainNormaliser | None:
        if method == "none":
            return None
        if not self.reference.is_file():
            from PIL import Image
            mosaic = reference_mosaic(self.get("none")[0]["train"].tileset().images)
            atomic_write(self.reference, lambda f: Image.fromarray(mosaic).save(f, format="PNG"))
        return StainNormaliser.from_file(method, self.reference)

    def get(self, method: str = "none") -> tuple[dict, dict]:
        """(split -> data, synthetic key -> (data, {"root": folder})) preprocessed by ``method``;
        of the synthetic sets, those that arms preprocessed by ``method`` draw from."""
        if method not in self._by_method:
            stain = self.stain(method)
            caches = {s: load_split(self.cfg, root, s, self.progress, stain) for s, root in self.split_roots.items()}
            drawn = {source_key(a) for a in self.cfg.arms if a.stain_norm == method and a.synthetic.source != "none"}
            sources = {k: (load_split(self.cfg, root, "synthetic", self.progress, stain), {"root": root})
                       for k, root in self.source_roots.items() if k in drawn}
            self._by_method[method] = caches, sources
        return self._by_method[method]


@dataclasses.dataclass
class CellConfig:
    """What a cell trained: the downstream section, the arm and the seed (its run's config.yaml)."""
    downstream: Any
    arm: ArmConfig
    seed: int


def run_cell(cfg: CompareConfig, arm, arm_index: int, seed: int, inputs: Inputs, out: Path,
             progress: bool) -> dict:
    """One arm x seed: assemble the arm's training set, let the downstream task train and score
    it, return the results.csv row."""
    caches, sources = inputs.get(arm.stain_norm)
    train = caches["train"]
    counts = synthetic_counts(train.class_counts(), arm.synthetic, f"arms[{arm_index}].synthetic")
    synth = sources[source_key(arm)][0].tileset() if arm.synthetic.source != "none" else None
    data = assemble(train.tileset(), synth, counts, seed)
    if arm.labels == "shuffled":            # the control: labels (and targets) permuted over tiles
        perm = np.random.default_rng(seed + SHUFFLE_SALT).permutation(len(data))
        data = TileSet(data.images, data.labels[perm], data.classes,
                       None if data.targets is None else data.targets[perm], data.synthetic)
    cell = out / "cells" / arm.name / f"seed{seed}"
    t0 = time.time()
    task, dcfg, val = get_downstream(cfg.task), cfg.downstream, caches["val"]
    def build(rt):
        return task.build_task(dcfg, arm, seed, data, val, rt)
    # every cell computes on one path (a paired comparison), measured once for all of them
    rt = autotune.shared(out / "runtime.json", task.name, build, autotune.as_candidates(task.runtime(dcfg)),
                         len(cfg.arms) * len(cfg.seeds), progress)
    summary = engine.train(task.name, CellConfig(dcfg, arm, seed), build, cell, rt, seed=seed, resume=True, progress=progress, desc=f"{arm.name} seed {seed}",
                           keep_final_state=False)
    scores = task.score(dcfg, engine.load_checkpoint(engine.RunDir(cell).checkpoint("best")), data,
                        caches["test"], cell, inputs.test_groups)
    return {"arm": arm.name, "seed": seed, "n_train_real": int((~data.synthetic).sum()),
            "n_train_synthetic": int(data.synthetic.sum()), "steps_run": summary["step"],
            "best_step": summary["best_step"], "stopped_early": summary["stopped_early"], **scores,
            "seconds": round(time.time() - t0, 1), "cell_dir": str(cell.relative_to(out))}



def run_compare(cfg: CompareConfig, out: str | Path, overwrite: bool = False, progress: bool = True,
                report_only: bool = False, workers: int = 1) -> dict:
    """Run (or continue) the whole comparison into ``out``; returns the summary. ``workers`` > 1
    trains that many cells at once, one process each (one per GPU: :mod:`experiments.parallel`)."""
    out = Path(out)
    inputs = compare_inputs(cfg)
    check_apart(out, inputs)
    if report_only:
        if not (out / "config.yaml").is_file():
            raise OutputExistsError(f"{out} is not an augment-compare output folder (no config.yaml)")
    elif not (out / "config.yaml").is_file():           # before the lock file is created there
        check_claimable(out, overwrite, inputs=inputs)
    with hold(out):             # one writer: a second run into the same folder is refused
        return _run_compare(cfg, out, overwrite, progress, report_only, workers)


def compare_inputs(cfg: CompareConfig) -> dict[str, Path | None]:
    """The folders a comparison reads (its --out must lie apart from them)."""
    return {"data.root": resolve_data_path(cfg.data.root),
            "data.groups": resolve_data_path(cfg.data.groups) if cfg.data.groups else None,
            **{f"arms[{i}].synthetic.source": resolve_data_path(a.synthetic.source)
               for i, a in enumerate(cfg.arms) if a.synthetic.source not in ("none", *cfg.generators)}}


def _run_compare(cfg: CompareConfig, out: Path, overwrite: bool, progress: bool, report_only: bool,
                 workers: int) -> dict:
    if not report_only:
        resumed = claim_compare_dir(out, cfg, overwrite)
        if resumed:
            remove_stale_temps(out)
            print(f"augment-compare: continuing {out} (finished cells are skipped)", file=sys.stderr)
    splits, caches = load_splits(cfg, out, progress)
    leak_info, evals = leakage_checks(splits, caches, progress)
    results = out / "results.csv"
    rows = read_results(results)
    sources = {} if report_only else load_synthetic(cfg, out, splits, caches, evals, progress)
    test_groups = sample_groups(splits, caches["test"], "test")
    primary = get_downstream(cfg.task).spec.get(cfg.report.primary)
    if primary.needs_groups and test_groups is None:
        raise configlib.ConfigError("report.primary", f"{primary.name} is measured per group (image, patient) and "
                                    "needs a groups file (data.groups: a file,group_id CSV); there is none")
    inputs = Inputs(cfg, out, {s: str(splits.roots[s]) for s in SPLITS},
                    {k: v[1]["root"] for k, v in sources.items()}, test_groups, progress,
                    loaded=(caches, {k: (v[0], {"root": v[1]["root"]}) for k, v in sources.items()}))
    if not report_only:
        done = {(r["arm"], int(r["seed"])) for r in rows}
        todo = [(s, i, a) for s in cfg.seeds for i, a in enumerate(cfg.arms) if (a.name, s) not in done]
        for method in sorted({a.stain_norm for _, _, a in todo}):
            inputs.get(method)                  # decoded once, here, before any worker starts
        bar = tqdm(total=len(cfg.seeds) * len(cfg.arms), initial=len(cfg.seeds) * len(cfg.arms) - len(todo),
                   desc="cells", unit="cell", disable=not progress)
        if workers > 1 and len(todo) > 1:
            from experiments.parallel import run_cells_parallel

            def on_row(row: dict) -> None:
                nonlocal rows
                rows = append_result(results, row)
                bar.set_postfix_str(f"{row['arm']} seed {row['seed']} done")
                bar.update(1)
            job = {"cfg": cfg, "out": str(out), "split_roots": inputs.split_roots,
                   "source_roots": inputs.source_roots, "test_groups": inputs.test_groups}
            run_cells_parallel(job, [(seed, i) for seed, i, _ in todo], workers, on_row)
        else:
            for seed, i, arm in todo:
                bar.set_postfix_str(f"{arm.name} seed {seed}")
                rows = append_result(results, run_cell(cfg, arm, i, seed, inputs, out, progress))
                bar.update(1)
        bar.close()
    wanted = {a.name for a in cfg.arms}
    seeds = set(cfg.seeds)
    rows = [dict(r, cell_dir=str(out / r["cell_dir"])) for r in rows
            if r["arm"] in wanted and int(r["seed"]) in seeds]
    train = caches["train"]
    task = get_downstream(cfg.task)
    stains = {a.stain_norm for a in cfg.arms} - {"none"}
    extra = {
        "n_test": len(caches["test"]),
        "seeds": list(cfg.seeds),
        "data": {
            "split": f"{splits.method} ({', '.join(f'{s}: {splits.roots[s]}' for s in SPLITS)})",
            **{s: caches[s].describe() for s in SPLITS},
            f"downstream ({task.name})": task.describe(cfg.downstream),
            **{f"synthetic source {k}": v[1] for k, v in sources.items()},
            **({"stain normalisation": f"{', '.join(sorted(stains))}, fitted to a mosaic of 16 training tiles "
                                       f"({inputs.reference.relative_to(out)}); applied to every split and "
                                       "synthetic set of the arms that ask for it"} if stains else {}),
        },
        "leakage": leak_info,
    }
    extra["classes"] = train.classes
    extra["test_unit"] = task.test_unit
    if task.class_balance:
        extra["minority"] = min(train.class_counts().items(), key=lambda kv: kv[1])[0]
    summary = summarise(rows, cfg.arms, task.spec, task.chance(train.classes), cfg.report, extra)
    selections = {f"Selection of {k.split('#')[0]} ({v[1]['selected']['filter']}): best kept and worst "
                  "rejected tiles, score histograms": str(Path(v[1]["root"]).relative_to(out) / "selection.png")
                  for k, v in sources.items() if "selected" in v[1] and Path(v[1]["root"]).is_relative_to(out)}
    selections.update({f"Synthetic pairs of {k}: drawn mask | painted image | nearest real training tile":
                       str(Path(v[1]["root"]).relative_to(out) / "preview.png")
                       for k, v in sources.items() if (Path(v[1]["root"]) / "preview.png").is_file()
                       and Path(v[1]["root"]).is_relative_to(out)})
    write_report(summary, rows, out, task.plots, selections)
    return summary


# ----------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="augment-compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", help="YAML config (bare names resolve in configs/); default with "
                                 "--report-only: OUT/config.yaml")
    p.add_argument("--out", required=True, help="output folder; re-run the same command to continue")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set seeds=[0,1,2,3,4] (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="start over in a non-empty --out")
    p.add_argument("--report-only", action="store_true", help="redraw the report from results.csv")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="train N cells at once, one process each (default: one per visible GPU, "
                        "1 on a CPU); the results do not depend on it")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _main(args: argparse.Namespace) -> int:
    path = args.cfg
    if path is None:
        if not args.report_only:
            raise configlib.ConfigError("", "give --cfg CONFIG (e.g. --cfg compare_demo.yaml)")
        path = Path(args.out) / "config.yaml"
    cfg, _ = load_compare_config(path, args.set)
    if args.dry_run:
        print(configlib.dump_yaml(cfg), end="")
        return 0
    if args.workers is not None and args.workers < 1:
        raise configlib.ConfigError("", f"--workers must be 1 or more, got {args.workers}")
    from experiments.parallel import default_workers
    workers = args.workers or default_workers()
    summary = run_compare(cfg, args.out, args.overwrite, not args.no_progress, args.report_only, workers)
    print(summary["verdict"])
    print(f"augment-compare: report in {Path(args.out) / 'report.html'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli("augment-compare", lambda: _main(args), log_dir=args.out)


if __name__ == "__main__":
    sys.exit(main())
