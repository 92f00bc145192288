"""Reliability, round two: each defect of the second bad-input round, as a test that failed
before its fix. Outputs never overlap inputs, provenance cannot be rewritten, names from files
cannot escape --out, one writer per run, the cache checks itself, and every failure is one line."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bad_inputs import make_corpus
from conftest import image_files, tiny_overrides
from experiments.augment_compare import main as compare_main
from gans.cyclegan_eval import main as eval_main
from gans.generate import main as generate_main
from gans.train_gan import main as train_main
from gans.translate import main as translate_main
from histosynth.checkpoint import safe_load
from histosynth.config import PROJECT_ROOT
from histosynth.engine import RunDir
from metrics.report import main as report_main
from test_cyclegan import tiny_cycle_sets


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, crc_mini):
    return make_corpus(tmp_path_factory.mktemp("bad2") / "corpus", crc_mini)


def _sets(items):
    return sum((["--set", str(s)] for s in items), [])


def _run(main, argv, capsys):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, err


def _one_line(rc, err, prog, *needles, code=2):
    errors = [line for line in err.splitlines() if line.startswith(f"{prog}: error:")]
    assert rc == code and len(errors) == 1, err
    for n in needles:
        assert n in errors[0], (n, errors[0])


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*")):
        h.update(p.relative_to(root).as_posix().encode())
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


def _copy(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.fixture
def data(tmp_path, crc_mini):
    """A writable copy of the real tiles (three classes)."""
    return _copy(crc_mini, tmp_path / "data")


# ----------------------------------------------------------------------------------------------
# high: outputs overlapping inputs


def test_overwrite_never_deletes_an_input(data, tmp_path, trained_run, capsys):
    before = _digest(data)
    tiny = _sets(tiny_overrides(data))
    rc, err = _run(train_main, ["--cfg", "dcgan", "--out", data, "--overwrite", "--no-progress", *tiny], capsys)
    _one_line(rc, err, "train-gan", "is the training data")
    rc, err = _run(train_main, ["--cfg", "dcgan", "--out", data / "newclass", "--no-progress", *tiny], capsys)
    _one_line(rc, err, "train-gan", "is inside the training data")
    rc, err = _run(compare_main, ["--cfg", "compare_demo", "--out", data, "--overwrite", "--no-progress",
                                  "--set", f"data.root={data}"], capsys)
    _one_line(rc, err, "augment-compare", "is the data.root")
    rc, err = _run(report_main, ["--real", data, "--fake", data, "--out", data, "--overwrite"], capsys)
    _one_line(rc, err, "piq-report", "is the --real")
    assert _digest(data) == before and not (data / "newclass").exists()


def test_generate_refuses_to_write_over_its_generators_training_data(data, tmp_path, capsys):
    """gan-generate --out <the run's own training folder> --overwrite once replaced the real
    tiles with synthetic ones (exit 0), and the next training run trained on them."""
    run = tmp_path / "run"
    assert train_main(["--cfg", "dcgan", "--out", str(run), "--no-progress", *_sets(tiny_overrides(data))]) == 0
    before = _digest(data)
    rc, err = _run(generate_main, ["--run", run, "--per-class", 1, "--out", data, "--overwrite"], capsys)
    _one_line(rc, err, "gan-generate", "is the run's training data")
    rc, err = _run(generate_main, ["--run", run, "--per-class", 1, "--out", run / "synth"], capsys)
    _one_line(rc, err, "gan-generate", "is inside the run")
    assert _digest(data) == before


def test_overwrite_only_replaces_what_histosynth_wrote(trained_run, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.docx").write_text("two years of work")
    rc, err = _run(generate_main, ["--run", trained_run, "--per-class", 1, "--out", mine, "--overwrite"], capsys)
    _one_line(rc, err, "gan-generate", "was not written by histosynth")
    assert (mine / "thesis.docx").read_text() == "two years of work"
    out = tmp_path / "synth"
    for _ in range(2):                                     # a histosynth folder: replaced
        rc, _ = _run(generate_main, ["--run", trained_run, "--per-class", 1, "--out", out, "--overwrite",
                                     "--no-progress"], capsys)
        assert rc == 0


def test_a_resume_cannot_rewrite_what_the_run_was_trained_on(data, tmp_path, crc_mini, capsys):
    run = tmp_path / "run"
    assert train_main(["--cfg", "dcgan", "--out", str(run), "--no-progress",
                       *_sets(tiny_overrides(data, **{"train.steps": 4, "train.checkpoint_every": 2}))]) == 0
    provenance, config = (run / "data.json").read_bytes(), (run / "config.yaml").read_bytes()
    other = tmp_path / "other"
    for i, c in enumerate(sorted(d for d in data.iterdir() if d.is_dir())):   # same classes, other tiles
        (other / c.name).mkdir(parents=True)
        for f in sorted(c.iterdir())[:2]:
            Image.open(f).convert("RGB").rotate(90).save(other / c.name / f"{f.stem}_r.png")
    rc, err = _run(train_main, ["--resume", run, "--no-progress", "--set", f"data.root={other}",
                                "--set", "train.steps=6"], capsys)
    _one_line(rc, err, "train-gan", "training data", "changed since it started")
    rc, err = _run(train_main, ["--resume", run, "--no-progress", "--set", "model.ch=16"], capsys)
    _one_line(rc, err, "train-gan", "model.ch: cannot change on --resume")
    assert (run / "data.json").read_bytes() == provenance and (run / "config.yaml").read_bytes() == config
    moved = _copy(data, tmp_path / "moved")                 # the same files elsewhere: allowed
    assert train_main(["--resume", str(run), "--no-progress", "--set", f"data.root={moved}",
                       "--set", "train.steps=6"]) == 0
    assert safe_load(RunDir(run).last)["step"] == 6
    assert json.loads((run / "data.json").read_text())["files_sha256"] == json.loads(provenance)["files_sha256"]


def test_class_names_from_a_checkpoint_never_become_paths_outside_out(trained_run, tmp_path, capsys):
    import shutil
    for hostile in ("../../escaped", "/tmp/absolute_escape", "..", "a/b"):
        run = tmp_path / f"run{abs(hash(hostile))}"
        shutil.copytree(trained_run, run)
        ck = safe_load(RunDir(run).last)
        ck["info"]["classes"] = [hostile] + ck["info"]["classes"][1:]
        torch.save(ck, RunDir(run).last)                   # still loads with weights_only=True
        before = {p for p in tmp_path.parent.rglob("*")}
        rc, err = _run(generate_main, ["--run", run, "--per-class", 1, "--out", tmp_path / "o" / "deep"], capsys)
        _one_line(rc, err, "gan-generate", "cannot be used as a file name")
        assert {p for p in tmp_path.parent.rglob("*")} == before
    assert not Path("/tmp/absolute_escape").exists()


# ----------------------------------------------------------------------------------------------
# medium


def test_one_writer_per_run(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_main(["--cfg", "dcgan", "--out", str(run), "--no-progress", *_sets(tiny_overrides(data))]) == 0
    temp = run / "checkpoints" / ".last.pt.99999.tmp"           # another writer's write in flight
    temp.write_bytes(b"half a checkpoint")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom histosynth.paths import hold\n"
                               f"with hold({str(run)!r}):\n    print('held', flush=True)\n    time.sleep(60)"],
                              cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rc, err = _run(train_main, ["--resume", run, "--no-progress", "--set", "train.steps=8"], capsys)
        _one_line(rc, err, "train-gan", f"in use by process {holder.pid}")
        rc, err = _run(train_main, ["--cfg", "dcgan", "--out", run, "--overwrite", "--no-progress",
                                    *_sets(tiny_overrides(data))], capsys)
        _one_line(rc, err, "train-gan", f"in use by process {holder.pid}")
        assert temp.read_bytes() == b"half a checkpoint" and safe_load(RunDir(run).last)["step"] == 6
    finally:
        holder.kill()
        holder.wait()
    assert train_main(["--resume", str(run), "--no-progress", "--set", "train.steps=8"]) == 0  # released
    assert not temp.exists()


def test_the_tile_cache_checks_itself(data, tmp_path, recwarn):
    from histosynth.data import TileCache
    cache = tmp_path / "cache"
    fresh = np.array(TileCache.build(data, 32, progress=False).images)
    TileCache.build(data, 32, cache_dir=cache, progress=False)
    npy = next(cache.glob("*.npy"))
    for damage in ("truncate", "flip"):
        raw = bytearray(npy.read_bytes())
        if damage == "truncate":
            raw = raw[:-100]
        else:
            raw[-10] ^= 0xFF                                     # same size, wrong content
        npy.write_bytes(bytes(raw))
        tiles = TileCache.build(data, 32, cache_dir=cache, progress=False)
        assert np.array_equal(np.array(tiles.images), fresh)
        assert any("damaged" in str(w.message) for w in recwarn.list)
        recwarn.clear()
    # pixels rewritten with the file's size and modification time restored: not served stale
    f = image_files(data)[0]
    st = f.stat()
    img = np.array(Image.open(f).convert("RGB"))
    Image.fromarray(255 - img).save(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = TileCache.build(data, 32, cache_dir=cache, progress=False)
    i = again.files.index(str(f.relative_to(data)))
    assert not np.array_equal(np.array(again.images[i]), fresh[i])


def test_translate_keeps_every_output_of_inputs_sharing_a_stem(corpus, tmp_path, stain_domains, capsys):
    cycle = tmp_path / "cycle"
    assert train_main(["--cfg", "cyclegan_cpu", "--out", str(cycle), "--no-progress",
                       *_sets(tiny_cycle_sets(*stain_domains, **{"train.steps": 2, "eval.max_images": 1}))]) == 0
    capsys.readouterr()
    stems = _copy(corpus / "stems", tmp_path / "stems")
    before = _digest(stems)
    rc, err = _run(translate_main, ["--run", cycle, "--input", stems, "--out", tmp_path, "--direction", "a2b",
                                    "--overwrite"], capsys)
    _one_line(rc, err, "gan-translate", "contains the --input")
    assert _digest(stems) == before
    rc, err = _run(translate_main, ["--run", cycle, "--input", corpus / "stems", "--out", tmp_path / "t",
                                    "--direction", "a2b", "--no-progress"], capsys)
    assert rc == 0
    import csv
    rows = list(csv.DictReader(open(tmp_path / "t" / "manifest.csv")))
    assert sorted(r["output"] for r in rows) == ["a_jpg.png", "a_png.png", "a_tif.png"]
    for r in rows:
        assert hashlib.sha256((tmp_path / "t" / r["output"]).read_bytes()).hexdigest() == r["sha256"]
    rc, err = _run(translate_main, ["--run", cycle, "--input", corpus / "long", "--out", tmp_path / "l",
                                    "--direction", "a2b", "--no-progress"], capsys)
    assert rc == 0 and len(list((tmp_path / "l").glob("x*.png"))) == 1
    rc, err = _run(translate_main, ["--run", cycle, "--input", corpus / "flat", "--out", tmp_path / "f",
                                    "--direction", "a2b", "--no-progress"], capsys)
    assert rc == 0 and "tiny.png: too small to translate" in err and "broken_link.png: a broken symbolic link" in err
    rc, err = _run(eval_main, ["--run", cycle, "--test-a", corpus / "flat", "--test-b", corpus / "flat",
                               "--max-images", 0, "--no-progress"], capsys)
    assert rc == 0 and "tiny.png: too small to translate" in err


@pytest.mark.parametrize("batch", ["-1", "0"])
def test_generate_batch_size_must_be_positive(trained_run, tmp_path, batch, capsys):
    rc, err = _run(generate_main, ["--run", trained_run, "--per-class", 2, "--out", tmp_path / "g",
                                   "--batch-size", batch], capsys)
    _one_line(rc, err, "gan-generate", "--batch-size: must be >= 1")
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("name, needle", [
    ("alias_bomb", "YAML aliases"), ("duplicate_key", "steps: appears twice"),
    ("duplicate_section", "train: appears twice"), ("deep", "nested more than 32 levels"),
    ("latin1", "not UTF-8")])
def test_hostile_yaml_is_one_line_at_once(name, needle, corpus, tmp_path, capsys):
    t0 = time.perf_counter()
    rc, err = _run(train_main, ["--cfg", corpus / "yaml" / f"{name}.yaml", "--out", tmp_path / "r"], capsys)
    _one_line(rc, err, "train-gan", needle)
    rc, err = _run(compare_main, ["--cfg", corpus / "yaml" / f"{name}.yaml", "--out", tmp_path / "c"], capsys)
    _one_line(rc, err, "augment-compare", needle)
    assert time.perf_counter() - t0 < 5 and not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------------------------
# every failure is one line


def test_disk_full_and_read_only_are_one_line_and_keep_the_checkpoint(data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    tiny = _sets(tiny_overrides(data, **{"train.steps": 4, "train.checkpoint_every": 2}))
    assert train_main(["--cfg", "dcgan", "--out", str(run), "--no-progress", *tiny]) == 0
    kept = RunDir(run).last.read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(RunDir(run).last))
    monkeypatch.setattr(torch, "save", full)
    rc, err = _run(train_main, ["--resume", run, "--no-progress", "--set", "train.steps=6"], capsys)
    _one_line(rc, err, "train-gan", "no space left on the device", "--resume")
    assert RunDir(run).last.read_bytes() == kept
    monkeypatch.undo()

    def read_only(*a, **k):
        raise PermissionError(errno.EROFS, "Read-only file system", str(tmp_path / "g"))
    monkeypatch.setattr("histosynth.paths.Path.mkdir", read_only)
    rc, err = _run(generate_main, ["--run", run, "--per-class", 1, "--out", tmp_path / "g"], capsys)
    _one_line(rc, err, "gan-generate", "read-only")


def test_a_failed_start_does_not_block_the_corrected_command(corpus, data, tmp_path, capsys):
    out = tmp_path / "r"
    rc, err = _run(train_main, ["--cfg", "dcgan", "--out", out, "--no-progress",
                                *_sets(tiny_overrides(corpus / "empty_class"))], capsys)
    _one_line(rc, err, "train-gan", "empty class folder")
    assert train_main(["--cfg", "dcgan", "--out", str(out), "--no-progress", *_sets(tiny_overrides(data))]) == 0


def test_a_bug_is_one_line_with_the_traceback_kept_for_a_report(data, tmp_path, monkeypatch, capsys):
    from gans.adversarial import GANTask

    def bug(self):
        return 1 / 0
    monkeypatch.setattr(GANTask, "train_step", bug)
    out = tmp_path / "r"
    rc, err = _run(train_main, ["--cfg", "dcgan", "--out", out, "--no-progress", *_sets(tiny_overrides(data))], capsys)
    _one_line(rc, err, "train-gan", "internal error, ZeroDivisionError at test_reliability.py", code=1)
    log = out / "histosynth-error.log"
    assert "Traceback" in log.read_text() and "ZeroDivisionError" in log.read_text()


def test_interrupt_and_sigterm_say_how_to_continue(data, tmp_path, monkeypatch, capsys):
    from classifier.task import ClassifierTask

    def interrupted(self):
        raise KeyboardInterrupt
    monkeypatch.setattr(ClassifierTask, "train_step", interrupted)
    rc, err = _run(compare_main, ["--cfg", "compare_demo", "--out", tmp_path / "c", "--no-progress",
                                  *_sets([f"data.root={data}", "data.split=stratified", "generators={}",
                                          "arms=[{name: real_only}]", "seeds=[0]", "downstream.train.device=cpu"])],
                   capsys)
    assert rc == 130 and "re-run the same command to continue" in err and "--resume" not in err
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "gans.train_gan", "--cfg", "dcgan", "--out", str(run),
                             "--no-progress", *_sets(tiny_overrides(data, **{"train.steps": 5000,
                                                                             "train.checkpoint_every": 5}))],
                            env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not RunDir(run).last.is_file():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "stopped by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    assert safe_load(RunDir(run).last)["step"] >= 5


# ----------------------------------------------------------------------------------------------
# silent surprises


def test_silent_surprises_are_said(corpus, data, tmp_path, capsys):
    rc, err = _run(train_main, ["--cfg", "dcgan", "--out", tmp_path / "r", "--no-progress",
                                *_sets(tiny_overrides(corpus / "images", **{"train.steps": 2}))], capsys)
    assert rc == 0
    assert "nested/extra.png" in err and "broken_link.png: a broken symbolic link" in err
    assert "tiny.png: too small (3 x 3 px)" in err
    one = _copy(data / sorted(os.listdir(data))[0], tmp_path / "one" / "only")
    rc, err = _run(compare_main, ["--cfg", "compare_demo", "--out", tmp_path / "c", "--no-progress",
                                  *_sets([f"data.root={one.parent}", "data.split=stratified", "generators={}",
                                          "arms=[{name: real_only}]"])],
                   capsys)
    _one_line(rc, err, "augment-compare", "needs at least two")


def test_piq_report_says_what_it_cannot_compare(data, tmp_path, trained_run, capsys):
    few = tmp_path / "few"
    few.mkdir()
    for f in image_files(data)[:2]:
        Image.open(f).convert("RGB").save(few / f.name)
    rc, err = _run(report_main, ["--real", data, "--fake", few, "--out", tmp_path / "p"], capsys)
    _one_line(rc, err, "piq-report", "--fake has 2 readable tile(s)")
    assert generate_main(["--run", str(trained_run), "--per-class", "3", "--out", str(tmp_path / "g"),
                          "--no-progress"]) == 0                # 32 px tiles against 224 px real ones
    renamed = tmp_path / "renamed"
    for c in (tmp_path / "g").iterdir():
        if c.is_dir():
            _copy(c, renamed / f"x_{c.name}")
    capsys.readouterr()
    rc, err = _run(report_main, ["--real", data, "--fake", renamed, "--out", tmp_path / "q", "--size", 32,
                                 "--boot", 3, "--no-progress"], capsys)
    assert rc == 0 and "share no class folder name" in err and "synthetic 32 x 32 px" in err
    m = json.loads((tmp_path / "q" / "metrics.json").read_text())
    for name in ("fid", "kid", "precision", "recall", "density", "coverage"):   # inside its own interval
        row = m["overall"][name]
        assert row["ci_low"] <= row["value"] <= row["ci_high"], name
