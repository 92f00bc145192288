"""gan-generate: an ImageFolder tree of PNGs per class and a manifest that identifies each tile."""

import csv

import numpy as np
from PIL import Image

from gans.generate import main as generate_main
from histosynth.checkpoint import sha256_file


def test_generate_writes_n_per_class_and_manifest(trained_run, tmp_path, crc_mini):
    out = tmp_path / "synth"
    assert generate_main(["--run", str(trained_run), "--per-class", "3", "--out", str(out),
                          "--no-progress"]) == 0
    classes = sorted(d.name for d in crc_mini.iterdir() if d.is_dir())
    assert sorted(d.name for d in out.iterdir() if d.is_dir()) == classes
    for c in classes:
        files = sorted((out / c).glob("*.png"))
        assert len(files) == 3
        img = Image.open(files[0])
        assert img.size == (32, 32) and img.mode == "RGB"
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert len(rows) == 3 * len(classes)
    ck_sha = sha256_file(trained_run / "checkpoints" / "last.pt")
    for r in rows:
        assert r["checkpoint_sha256"] == ck_sha and r["step"] == "6" and r["family"] == "sngan"
        assert sha256_file(out / r["file"]) == r["sha256"]
        assert r["file"].startswith(r["class"] + "/")
    assert len({r["seed"] for r in rows}) == len(rows)


def test_same_seed_gives_the_same_tiles(trained_run, tmp_path):
    for name in ("a", "b"):
        assert generate_main(["--run", str(trained_run), "--per-class", "2", "--out",
                              str(tmp_path / name), "--seed", "5", "--no-progress"]) == 0
    a = sorted((tmp_path / "a").rglob("*.png"))
    b = sorted((tmp_path / "b").rglob("*.png"))
    assert [np.asarray(Image.open(x)).tolist() for x in a] == [np.asarray(Image.open(x)).tolist() for x in b]


def test_generate_errors_are_one_line(tmp_path, trained_run, capsys):
    assert generate_main(["--run", str(tmp_path), "--per-class", "2", "--out", str(tmp_path / "o")]) == 2
    assert "not a histosynth run directory" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("precious")
    assert generate_main(["--run", str(trained_run), "--per-class", "2", "--out", str(tmp_path / "full")]) == 2
    assert (tmp_path / "full" / "keep.txt").read_text() == "precious"


def test_per_class_counts_write_only_the_classes_asked_for(trained_run, tmp_path, crc_mini):
    from gans.generate import generate
    classes = sorted(d.name for d in crc_mini.iterdir() if d.is_dir())
    generate(trained_run, tmp_path / "s", {classes[1]: 3, classes[4]: 1}, seed=10, progress=False, device="cpu")
    rows = list(csv.DictReader(open(tmp_path / "s" / "manifest.csv")))
    assert [(r["class"], int(r["seed"])) for r in rows] == [(classes[1], 10), (classes[1], 11), (classes[1], 12),
                                                            (classes[4], 13)]
    assert sorted(d.name for d in (tmp_path / "s").iterdir() if d.is_dir()) == [classes[1], classes[4]]
