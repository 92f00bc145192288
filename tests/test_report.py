"""piq-report: per-class rows, memorisation flags a planted copy, self-contained HTML, caching."""

import json
import shutil

import numpy as np
import pytest
import torch

from gans.generate import main as generate_main
from metrics.features import PixelExtractor
from metrics.report import main as report_main


@pytest.fixture(scope="module")
def synth(tmp_path_factory, trained_run, crc_mini):
    """3 generated tiles per class from the tiny run, plus one exact copy of a training tile."""
    out = tmp_path_factory.mktemp("synth") / "S"
    assert generate_main(["--run", str(trained_run), "--per-class", "3", "--out", str(out),
                          "--no-progress"]) == 0
    cls = sorted(d for d in crc_mini.iterdir() if d.is_dir())[0]
    shutil.copy(sorted(cls.iterdir())[0], out / cls.name / "planted_copy.png")
    return out


def test_report_files_rows_memorisation_and_filter(synth, crc_mini, tmp_path):
    out, filt = tmp_path / "P", tmp_path / "filtered"
    assert report_main(["--real", str(crc_mini), "--fake", str(synth), "--train", str(crc_mini),
                        "--out", str(out), "--filter", str(filt), "--size", "64", "--boot", "0",
                        "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    classes = sorted(d.name for d in crc_mini.iterdir() if d.is_dir())
    assert sorted(m["per_class"]) == classes                         # a row for every class
    for row in [m["overall"], *m["per_class"].values()]:
        assert {"fid", "kid", "precision", "recall", "density", "coverage"} <= set(row)
    # the default with --train is the histology space; on 32 crc_mini tiles in 8 classes it cannot
    # learn, says so and falls back to pixels (on the bundled 172 demo tiles it learns)
    fell_back = any("did not learn" in w and "using --extractor pixels" in w for w in m["warnings"])
    if fell_back:
        assert m["extractor"].startswith("pixels")
    else:
        assert "penultimate layer" in m["extractor"] and "trained here on" in m["extractor"]
    for space in ("features", "pixels"):
        mem = m["memorisation"][space]
        assert mem["n_flagged"] >= 1
        fi, _, d = mem["closest"][0]
        assert d < 1e-4 < mem["threshold"]                            # the planted copy is closest
    assert not list(filt.rglob("planted_copy.png"))
    assert len(list(filt.rglob("*.png"))) == 3 * len(classes)
    import csv
    kept = list(csv.DictReader(open(filt / "manifest.csv")))       # the manifest follows the copy
    assert len(kept) == 3 * len(classes) and all((filt / r["file"]).is_file() for r in kept)
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 5 and "<table>" in page
    assert "Memorisation" in (out / "report.md").read_text()
    for png in ("distribution_per_class", "nearest_neighbours", "closest_pairs", "samples", "stain"):
        assert (out / f"{png}.png").is_file()


def test_second_report_reuses_cached_features(synth, crc_mini, tmp_path, monkeypatch):
    args = ["--real", str(crc_mini), "--fake", str(synth), "--size", "64", "--boot", "0", "--no-progress"]
    assert report_main([*args, "--out", str(tmp_path / "a")]) == 0

    def boom(self, x):
        raise AssertionError("features were recomputed")

    monkeypatch.setattr(PixelExtractor, "forward", boom)
    assert report_main([*args, "--out", str(tmp_path / "b")]) == 0


def test_report_errors_are_one_line(crc_mini, tmp_path, capsys):
    assert report_main(["--real", str(tmp_path / "nope"), "--fake", str(crc_mini), "--out", str(tmp_path / "o")]) == 2
    assert "folder not found" in capsys.readouterr().err
    assert report_main(["--real", str(crc_mini), "--fake", str(crc_mini), "--out", str(tmp_path / "o"),
                        "--extractor", "inception"]) == 2
    assert "needs --weights" in capsys.readouterr().err


def test_histology_extractor_is_trained_once_and_cached(crc_mini, monkeypatch):
    from metrics.histology import histology_weights
    from metrics.features import ClassifierExtractor
    best, note = histology_weights(crc_mini, progress=False, epochs=2)
    import classifier.train

    def boom(*a, **k):
        raise AssertionError("retrained")

    monkeypatch.setattr(classifier.train, "fit", boom)
    assert histology_weights(crc_mini, progress=False, epochs=2) == (best, note)
    ext = ClassifierExtractor(best, "efficientnet-b0", 64)
    from histosynth.data import TileCache
    x = torch.from_numpy(np.array(TileCache.build(crc_mini, 64, progress=False).images[:4]))
    f = ext(x)
    assert f.shape == (4, 1280) and f.std() > 1e-3            # features that are not degenerate


def test_a_report_can_draw_its_tiles_from_a_trained_generator(trained_run, crc_mini, tmp_path, capsys):
    out = tmp_path / "P"
    assert report_main(["--real", str(crc_mini), "--generator", str(trained_run), "--per-class", "3",
                        "--out", str(out), "--size", "32", "--boot", "2", "--no-progress"]) == 0
    classes = sorted(d.name for d in crc_mini.iterdir() if d.is_dir())
    assert sorted(d.name for d in (out / "generated").iterdir() if d.is_dir()) == classes
    m = json.loads((out / "metrics.json").read_text())
    assert m["counts"]["fake"] == 3 * len(classes) and sorted(m["per_class"]) == classes
    assert report_main(["--real", str(crc_mini), "--out", str(tmp_path / "Q")]) == 2
    assert "give --fake" in capsys.readouterr().err
