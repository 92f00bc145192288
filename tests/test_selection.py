"""Selective synthetic augmentation: scores, the choice per class, the folder it writes, the
leakage guard's view of it, gan-generate --filter and an augment-compare arm with a filter."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from conftest import image_files, tiny_overrides
from gans.generate import main as generate_main
from gans.train_gan import main as train_main
from histosynth.config import ConfigError
from metrics.selection import FilterConfig, choose, select_folder


def _scores(conf, dist, copy=None, intended=None):
    n = len(conf)
    return {"intended": np.array(intended if intended is not None else [0] * n),
            "confidence": np.array(conf, float), "centroid_distance": np.array(dist, float),
            "copy": np.array(copy if copy is not None else [False] * n)}


def test_choose_keeps_the_best_share_of_each_class_and_drops_copies():
    s = _scores(conf=[0.9, 0.1, 0.5, 0.8, 0.3, 0.7], dist=[1, 5, 2, 4, 3, 6], intended=[0, 0, 0, 1, 1, 1],
                copy=[True, False, False, False, False, False])
    kept, _ = choose(s, FilterConfig(by="confidence", keep=0.67))
    # class 0: the most confident (0.9) is a near-copy: dropped; then 0.5 and 0.1 -> keeps round(0.67*3)=2
    assert kept.tolist() == [False, True, True, True, False, True]
    kept, _ = choose(s, FilterConfig(by="centroid", keep=0.34))
    assert kept.tolist() == [False, False, True, False, True, False]          # nearest of each class
    kept, rank = choose(s, FilterConfig(by="both", keep=0.34))
    # class 1: confidence ranks 1, 1/3, 2/3; distance ranks 2/3, 1, 1/3 -> means 5/6, 2/3, 1/2
    assert rank[3:] == pytest.approx([5 / 6, 2 / 3, 1 / 2]) and kept[3:].tolist() == [True, False, False]
    kept, _ = choose(s, FilterConfig(by="confidence", keep=None, min_confidence=0.6))
    assert kept.tolist() == [False, False, False, True, False, True]           # the copy still dropped
    kept, _ = choose(s, FilterConfig(by="confidence", keep=0.34, drop_copies=False))
    assert kept[0]


def test_filter_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="keep: give exactly one of keep"):
        FilterConfig(keep=0.5, min_confidence=0.5)
    with pytest.raises(ConfigError, match="min_confidence: .* by: confidence"):
        FilterConfig(by="centroid", keep=None, min_confidence=0.5)
    assert FilterConfig(keep=0.25).candidates(30) == 120


@pytest.fixture(scope="module")
def pool(tmp_path_factory, crc_mini):
    """A run on crc_mini's training share and 6 generated tiles per class, plus two planted
    near-copies of training tiles."""
    root = tmp_path_factory.mktemp("sel")
    train = root / "train"
    shutil.copytree(crc_mini, train)
    run = root / "run"
    assert train_main(["--cfg", "dcgan", "--out", str(run), "--no-progress", *sum((["--set", s] for s in
                       tiny_overrides(train)), [])]) == 0
    assert generate_main(["--run", str(run), "--per-class", "6", "--out", str(root / "synth"), "--no-progress"]) == 0
    return root


def test_select_folder_writes_a_verified_subset_with_scores(pool, tmp_path):
    from experiments.leakage import verify_synthetic
    from histosynth.data import TileCache
    synth = tmp_path / "synth"
    shutil.copytree(pool / "synth", synth)
    first = sorted(d for d in synth.iterdir() if d.is_dir())[0]
    victim = image_files(pool / "train" / first.name)[0]          # a memorised tile, listed in the manifest
    shutil.copy(victim, first / f"copy{victim.suffix}")
    with open(synth / "manifest.csv", "a", newline="") as f:
        import hashlib
        f.write(f"{first.name}/copy{victim.suffix},{first.name},0,x,0,dcgan,"
                f"{hashlib.sha256((first / f'copy{victim.suffix}').read_bytes()).hexdigest()}\n")
    out = tmp_path / "sel"
    summary = select_folder(synth, out, pool / "train", FilterConfig(by="both", keep=0.5), progress=False)
    table = list(csv.DictReader(open(out / "selection.csv")))
    copy = next(r for r in table if r["file"].endswith(f"copy{victim.suffix}"))
    assert copy["near_copy"] == "True" and copy["kept"] == "False"
    assert summary["counts"][first.name] == {"candidates": 7, "kept": 4, "near_copies": 1}
    kept = [r for r in table if r["kept"] == "True"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png") if p.name != "selection.png") == \
        sorted(r["file"] for r in kept)
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert {"confidence", "centroid_distance", "rank", "sha256"} <= set(rows[0]) and len(rows) == len(kept)
    info = json.loads((out / "source.json").read_text())
    assert info["train_files_sha256"] and info["selected"]["selector_train_files_sha256"]
    assert (out / "selection.png").stat().st_size > 10_000
    cache = TileCache.build(out, 32, progress=False)
    prov = verify_synthetic(out, cache.files, {}, [], False)
    assert prov["verified"] and prov["selected"]["filter"].startswith("both")
    # the guard refuses a selection scored by a classifier that saw an evaluation tile (here a
    # tile the generator did not see, so that the selector's check is the one that fires)
    from experiments.leakage import LeakageError
    h = info["selected"]["selector_train_files_sha256"][0]
    info["train_files_sha256"] = [x for x in info["train_files_sha256"] if x != h]
    (out / "source.json").write_text(json.dumps(info))
    with pytest.raises(LeakageError, match="selected by a classifier trained on 1 validation/test"):
        verify_synthetic(out, cache.files, {h: "test/x.png"}, [], False)


def test_generate_filter_writes_candidates_and_the_selection(pool, tmp_path, capsys):
    out = tmp_path / "g"
    assert generate_main(["--run", str(pool / "run"), "--per-class", "3", "--out", str(out), "--filter", "confidence",
                          "--keep", "0.5", "--train", str(pool / "train"), "--no-progress"]) == 0
    classes = sorted(d.name for d in (pool / "train").iterdir() if d.is_dir())
    assert len(list(csv.DictReader(open(out / "candidates" / "manifest.csv")))) == 6 * len(classes)
    assert len(list(csv.DictReader(open(out / "selected" / "manifest.csv")))) == 3 * len(classes)
    assert "kept" in capsys.readouterr().out
    assert generate_main(["--run", str(pool / "run"), "--per-class", "3", "--out", str(tmp_path / "h"),
                          "--filter", "confidence"]) == 2                    # --train is required


def test_a_class_too_small_for_the_extractor_is_one_clear_error(crc_mini, tmp_path, monkeypatch):
    """The histology extractor (selection scores, tissue-space metrics) holds out a stratified
    share of every class: a class with one training tile was an internal error inside
    scikit-learn; now it is a user error naming the class (and so is a one-class tree)."""
    from histosynth.errors import UserError
    from metrics.histology import histology_weights

    monkeypatch.setenv("HISTOSYNTH_CACHE", str(tmp_path / "cache"))
    for cls, n in (("ADI", 3), ("LYM", 1)):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for f in sorted((crc_mini / cls).iterdir())[:n]:
            shutil.copy(f, tmp_path / "train" / cls / f.name)
    with pytest.raises(UserError, match=r"LYM \(1\) have fewer than 2 training tiles"):
        histology_weights(tmp_path / "train", progress=False)
    shutil.rmtree(tmp_path / "train" / "LYM")
    with pytest.raises(UserError, match="has one class"):
        histology_weights(tmp_path / "train", progress=False)
