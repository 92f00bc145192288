"""augment-compare: assembly, splits, leakage guard, the whole pipeline, resume, the control arm."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from classifier.data import ClassFolders
from experiments.assemble import AssemblyError, assemble, synthetic_counts
from experiments.augment_compare import main as compare_main, run_compare
from experiments.config import CompareConfig, SyntheticConfig
from experiments.leakage import LeakageError, file_hashes, verify_synthetic
from experiments.splits import resolve_splits
from histosynth import config as configlib
from histosynth.config import PROJECT_ROOT
from histosynth.data import TileCache
from histosynth.engine import RunDir
from conftest import TINY_BACKBONE, image_files

FAST = ["downstream.model.image_size=32", "downstream.train.batch_size=8", "downstream.train.device=cpu",
        "downstream.train.patience=0", "downstream.train.epochs=2", "downstream.train.min_epochs=0",
        "downstream.model.bn_momentum=0.5", f"downstream.model.variant={TINY_BACKBONE}"]
TINY_GAN = ("[data.image_size=32, model.ch=8, model.z_dim=16, train.batch_size=8, train.steps=4, "
            "train.checkpoint_every=2, train.sample_every=2, train.log_every=1, "
            "train.samples_per_class=2, train.device=cpu]")


def _cfg(*sets) -> CompareConfig:
    return configlib.load(CompareConfig, None, list(sets))[0]


def _split_tree(src: Path, dst: Path, classes: int = 3) -> Path:
    """train/val/test folders from real tiles: per class 2 train, 1 val, 1 test."""
    for cls in sorted(d for d in src.iterdir() if d.is_dir())[:classes]:
        files = sorted(cls.iterdir())[:4]
        for split, fs in (("train", files[:2]), ("val", files[2:3]), ("test", files[3:4])):
            (dst / split / cls.name).mkdir(parents=True, exist_ok=True)
            for f in fs:
                shutil.copy(f, dst / split / cls.name / f.name)
    return dst


# ----------------------------------------------------------------------------------------------
# assembly


def test_synthetic_counts_for_ratios_and_targets():
    real = {"a": 120, "b": 40, "c": 12}
    assert synthetic_counts(real, SyntheticConfig()) == {"a": 0, "b": 0, "c": 0}
    assert synthetic_counts(real, SyntheticConfig("gan", ratio=0.5)) == {"a": 60, "b": 20, "c": 6}
    assert synthetic_counts(real, SyntheticConfig("gan", ratio={"c": 1.0})) == {"a": 0, "b": 0, "c": 12}
    assert synthetic_counts(real, SyntheticConfig("gan", ratio=2.0, classes="minority")) == {"a": 0, "b": 80, "c": 24}
    assert synthetic_counts(real, SyntheticConfig("gan", ratio=1.0, classes=["a"])) == {"a": 120, "b": 0, "c": 0}
    assert synthetic_counts(real, SyntheticConfig("gan", target="balanced")) == {"a": 0, "b": 80, "c": 108}
    assert synthetic_counts(real, SyntheticConfig("gan", target={"b": 100, "a": 50})) == {"a": 0, "b": 60, "c": 0}
    with pytest.raises(configlib.ConfigError, match=r"arms\[2\].synthetic.ratio.d: is not a class.*a, b, c"):
        synthetic_counts(real, SyntheticConfig("gan", ratio={"d": 1.0}), "arms[2].synthetic")


def test_assemble_gives_the_requested_per_class_counts(crc_mini):
    real = TileCache.build(crc_mini, 32, progress=False)
    n = real.class_counts()
    want = {c: (i % 3) for i, c in enumerate(real.classes)}
    data = assemble(real, real, want, seed=0)
    images, labels, synth = data.images, data.labels, data.synthetic
    assert images.shape == (len(real) + sum(want.values()), 3, 32, 32)
    for i, c in enumerate(real.classes):
        assert (labels[synth] == i).sum() == want[c]
        assert (labels == i).sum() == n[c] + want[c]
    other = assemble(real, real, want, seed=1).images
    assert not np.array_equal(images, other)            # another seed draws another subset
    with pytest.raises(AssemblyError, match="needed but the source has"):
        assemble(real, real, {real.classes[0]: 999}, seed=0)


# ----------------------------------------------------------------------------------------------
# configuration


@pytest.mark.parametrize("sets, match", [
    (["arms=[{name: a, synthetic: {source: gan, ratoi: 1}}]", "report.baseline=a"],
     r"arms\[0\].synthetic.ratoi: unknown key; did you mean arms\[0\].synthetic.ratio"),
    (["arms=[{name: a, synthetic: {source: gan, ratio: 1, target: balanced}}]", "report.baseline=a",
      "generators.gan.config=dcgan"], "exactly one of ratio"),
    (["arms=[{name: a}]"], r"report.baseline: 'real_only' is not an arm; arms: a"),
    (["arms=[{name: a, synthetic: {source: gan, ratio: 1}}]", "report.baseline=a", "generators={}"],
     r"arms\[0\].synthetic.source: 'gan' is no generator of this config"),
    (["arms=[{name: a, sampler: balance}]", "report.baseline=a"], "did you mean 'balanced'"),
    (["seeds=[1, 1]"], "distinct seeds"),
])
def test_config_errors_name_the_key(sets, match):
    with pytest.raises(configlib.ConfigError, match=match):
        _cfg(*sets)


def test_shipped_compare_configs_load():
    for name in ("compare_demo", "compare"):
        cfg = configlib.load(CompareConfig, name)[0]
        assert cfg.report.baseline in [a.name for a in cfg.arms]
        assert any(a.labels == "shuffled" for a in cfg.arms)
    assert len(configlib.load(CompareConfig, "compare")[0].seeds) >= 5
    for name in ("compare_monuseg", "compare_monuseg_gpu"):
        cfg = configlib.load(CompareConfig, name)[0]
        assert cfg.task == "segmentation" and cfg.report.primary == "dice"
        assert {a.augment for a in cfg.arms} >= {"flip_rot90", "classic"} and any(a.stain_norm != "none" for a in cfg.arms)
        assert any(a.synthetic.filter is not None for a in cfg.arms)
    assert len(configlib.load(CompareConfig, "compare_monuseg_gpu")[0].seeds) >= 5


# ----------------------------------------------------------------------------------------------
# splits and the leakage guard


def test_group_split_keeps_every_group_in_one_split(crc_mini, tmp_path):
    files = [p.relative_to(crc_mini).as_posix() for p in image_files(crc_mini)]
    with open(tmp_path / "groups.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "group_id"])
        for i, rel in enumerate(files):
            w.writerow([rel, f"g{i // 2}"])                  # pairs of near-duplicates
    cfg = _cfg(f"data.root={crc_mini}", f"data.groups={tmp_path / 'groups.csv'}", "data.test_fraction=0.25")
    splits = resolve_splits(cfg.data, tmp_path / "out", ClassFolders())
    assert splits.method == "groups"
    rows = list(csv.DictReader(open(tmp_path / "out" / "splits" / "split.csv")))
    where = {}
    for r in rows:
        where.setdefault(r["group_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in where.values())
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    again = resolve_splits(cfg.data, tmp_path / "out2", ClassFolders())
    assert list(csv.DictReader(open(tmp_path / "out2" / "splits" / "split.csv"))) == rows
    assert again.roots["train"].is_dir()


def test_a_test_image_planted_in_train_is_refused(crc_mini, tmp_path, capsys):
    data = _split_tree(crc_mini, tmp_path / "data")
    test_file = image_files(data / "test")[0]
    shutil.copy(test_file, data / "train" / test_file.parent.name / f"innocent_name{test_file.suffix}")
    rc = compare_main(["--cfg", "compare_demo", "--out", str(tmp_path / "out"), "--no-progress",
                       "--set", f"data.root={data}",
                       *sum((["--set", s] for s in FAST), [])])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "test image(s) are also in the training set" in err and f"innocent_name{test_file.suffix}" in err
    assert not (tmp_path / "out" / "results.csv").exists()


def test_a_group_spanning_train_and_test_is_refused(crc_mini, tmp_path):
    data = _split_tree(crc_mini, tmp_path / "data")
    train_file = image_files(data / "train")[0]
    test_file = image_files(data / "test")[0]
    (data / "groups.csv").write_text(f"file,group_id\n{train_file.relative_to(data)},patient7\n"
                                     f"{test_file.relative_to(data)},patient7\n")
    with pytest.raises(LeakageError, match="patient7"):
        run_compare(_cfg(f"data.root={data}", *FAST), tmp_path / "out", progress=False)


def test_synthetic_sets_are_verified_before_use(trained_run, crc_mini, tmp_path):
    from gans.generate import generate
    synth = tmp_path / "synth"
    generate(trained_run, synth, 2, device="cpu", progress=False)
    files = [p.relative_to(synth).as_posix() for p in synth.rglob("*.png")]
    info = verify_synthetic(synth, files, {}, [tmp_path / "elsewhere"], False)
    assert info["verified"] and info["generator_train_files"] == len(image_files(crc_mini))
    # the generator was trained on crc_mini: if one of those tiles is a test image, refuse
    test_hashes = file_hashes(crc_mini, [image_files(crc_mini)[0].relative_to(crc_mini).as_posix()])
    with pytest.raises(LeakageError, match="trained on 1 validation/test image"):
        verify_synthetic(synth, files, {h: f"test/{f}" for h, f in test_hashes.items()}, [], False)
    # a tampered tile
    victim = synth / files[0]
    victim.write_bytes(victim.read_bytes()[:-1] + b"\x00")
    with pytest.raises(LeakageError, match=f"do not match the sha256.*{files[0]}"):
        verify_synthetic(synth, files, {}, [], False)
    # no provenance
    victim.unlink()
    files = files[1:]
    (synth / "source.json").unlink()
    with pytest.raises(LeakageError, match="no source.json"):
        verify_synthetic(synth, files, {}, [], False)
    with pytest.warns(UserWarning, match="accepted"):
        assert verify_synthetic(synth, files, {}, [], True)["verified"] is False
    # a tile that is not in the manifest
    shutil.copy(synth / files[0], synth / Path(files[0]).parent / "extra.png")
    with pytest.raises(LeakageError, match="not in its manifest"):
        verify_synthetic(synth, files + [(Path(files[0]).parent / "extra.png").as_posix()], {}, [], True)


# ----------------------------------------------------------------------------------------------
# the whole pipeline


def test_tiny_compare_with_gan_stage_writes_every_report_file(crc_mini, tmp_path):
    arms = ("[{name: real_only, augment: none}, {name: classic, augment: classic}, "
            "{name: gan_x1, synthetic: {source: gan, ratio: 1.0}}, {name: shuffled, labels: shuffled}]")
    cfg = _cfg(f"data.root={crc_mini}", "data.split=stratified", "generators.gan.config=dcgan", f"generators.gan.set={TINY_GAN}",
               f"arms={arms}", "seeds=[0, 1]", *FAST)
    out = tmp_path / "cmp"
    summary = run_compare(cfg, out, progress=False)
    for name in ("results.csv", "summary.json", "report.md", "report.html", "metrics_by_arm.png",
                 "per_class_sensitivity.png", "confusion_matrices.png", "roc_curves.png", "config.yaml",
                 "generators/gan/synthetic/manifest.csv", "generators/gan/synthetic/source.json",
                 "generators/gan/run/checkpoints/last.pt"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert sorted((r["arm"], r["seed"]) for r in rows) == sorted(
        (a, s) for a in ("real_only", "classic", "gan_x1", "shuffled") for s in ("0", "1"))
    n_train = {r["arm"]: (int(r["n_train_real"]), int(r["n_train_synthetic"])) for r in rows}
    assert n_train["gan_x1"][1] == n_train["gan_x1"][0] and n_train["real_only"][1] == 0
    s = json.loads((out / "summary.json").read_text())
    for arm in ("real_only", "gan_x1"):
        m = s["arms"][arm]["metrics"]["balanced_accuracy"]
        assert m["n"] == 2 and m["ci_low"] <= m["mean"] <= m["ci_high"]
    assert set(s["comparisons"]) == {"classic", "gan_x1", "shuffled"}
    assert 0 <= s["comparisons"]["gan_x1"]["balanced_accuracy"]["p_holm"] <= 1
    assert s["verdict"] == summary["verdict"] and "real_only" in s["verdict"]
    md = (out / "report.md").read_text()
    assert "## Verdict" in md and "Holm" in md and "| gan_x1 |" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4
    # the synthetic tiles came from a generator trained on the training split only
    src = json.loads((out / "generators/gan/synthetic/source.json").read_text())
    assert Path(src["train_root"]) == (out / "splits" / "train").resolve()


def _write_cfg(path: Path, root: Path, arms: str, seeds: str, epochs: int) -> Path:
    data = yaml.safe_load("\n".join(["{", f"data: {{root: '{root}', split: stratified}},",
                                     f"arms: {arms},", f"seeds: {seeds}", "}"]))
    data["downstream"] = {"model": {"image_size": 32, "bn_momentum": 0.5, "variant": TINY_BACKBONE},
                          "train": {"batch_size": 8, "device": "cpu", "patience": 0, "epochs": epochs}}
    path.write_text(yaml.safe_dump(data))
    return path


def test_killed_compare_resumes_without_rerunning_finished_cells(crc_mini, tmp_path):
    cfg = _write_cfg(tmp_path / "c.yaml", crc_mini, "[{name: real_only}, {name: other, augment: stain}]",
                     "[0, 1, 2]", 3)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "experiments.augment_compare", "--cfg", str(cfg),
                             "--out", str(out), "--no-progress"], env=env, cwd=PROJECT_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = out / "results.csv"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if results.is_file() and len(results.read_text().splitlines()) >= 2:      # one cell done
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = list(csv.DictReader(open(results)))
    assert 1 <= len(done) < 6, "the kill came too late to test a resume"
    first = RunDir(out / done[0]["cell_dir"]).best
    stamp = first.stat().st_mtime_ns
    assert compare_main(["--cfg", str(cfg), "--out", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader(open(results)))
    assert sorted((r["arm"], r["seed"]) for r in rows) == sorted(
        (a, s) for a in ("real_only", "other") for s in ("0", "1", "2"))         # each cell once
    assert rows[:len(done)] == done and first.stat().st_mtime_ns == stamp       # not re-run
    # a third run has nothing left to do; another config in the same folder is refused
    assert compare_main(["--cfg", str(cfg), "--out", str(out), "--no-progress"]) == 0
    assert list(csv.DictReader(open(results))) == rows
    with pytest.raises(Exception, match="differs in seeds"):
        run_compare(configlib.load(CompareConfig, cfg, ["seeds=[5]"])[0], out, progress=False)


def test_label_shuffled_control_stays_near_chance_on_real_data(tmp_path):
    demo = PROJECT_ROOT / "data" / "lung_demo"
    cfg = _cfg(f"data.root={demo}", "arms=[{name: real_only}, {name: shuffled, labels: shuffled}]",
               "seeds=[0, 1]", "downstream.model.image_size=48", "downstream.model.bn_momentum=0.5",
               "downstream.train.epochs=10", "downstream.train.patience=0", "downstream.train.device=cpu",
               "downstream.train.lr=2e-3", f"downstream.model.variant={TINY_BACKBONE}")
    s = run_compare(cfg, tmp_path / "out", progress=False)
    chance = s["chance"]["balanced_accuracy"]
    shuffled = s["arms"]["shuffled"]["metrics"]["balanced_accuracy"]["mean"]
    real = s["arms"]["real_only"]["metrics"]["balanced_accuracy"]["mean"]
    assert abs(shuffled - chance) < 0.12, shuffled
    assert real > shuffled + 0.15, (real, shuffled)      # the same pipeline does learn real labels
    assert "stayed near chance" in s["verdict"]


def test_the_demo_config_runs_on_an_unseen_dataset_through_set_only(crc_mini, tmp_path):
    """compare_demo.yaml names no class: another ImageFolder train/val/test tree needs no edits."""
    data = _split_tree(crc_mini, tmp_path / "data", classes=3)
    sets = [f"data.root={data}", f"generators.gan.set={TINY_GAN}", "seeds=[0]", *FAST]
    assert compare_main(["--cfg", "compare_demo", "--out", str(tmp_path / "out"), "--no-progress",
                         *sum((["--set", s] for s in sets), [])]) == 0
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["classes"] == sorted(d.name for d in (data / "train").iterdir())
    assert set(s["arms"]) == {"real_only", "classic_aug", "balanced_sampler", "gan_minority_x1",
                              "gan_balanced", "shuffled_control"}


def test_cells_spread_over_two_worker_processes_give_the_serial_results(crc_mini, tmp_path):
    """--workers 2 (one process per GPU on a GPU machine; here two CPU processes): every cell
    once, results.csv written by the parent only, and each cell's numbers equal a serial run's."""
    cfg = _write_cfg(tmp_path / "c.yaml", crc_mini, "[{name: real_only, augment: none}, {name: flips, augment: flip}]",
                     "[0, 1]", 2)
    serial, par = tmp_path / "serial", tmp_path / "par"
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))   # as each of the 2 workers: the
    try:                                                         # sums then add up in the same order
        assert compare_main(["--cfg", str(cfg), "--out", str(serial), "--no-progress", "--workers", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert compare_main(["--cfg", str(cfg), "--out", str(par), "--no-progress", "--workers", "2"]) == 0
    key = ("steps_run", "best_epoch", "val_balanced_accuracy", "balanced_accuracy", "macro_f1", "auc")
    a = {(r["arm"], r["seed"]): [r[k] for k in key] for r in csv.DictReader(open(serial / "results.csv"))}
    b = {(r["arm"], r["seed"]): [r[k] for k in key] for r in csv.DictReader(open(par / "results.csv"))}
    assert len(b) == 4 and len(list(csv.DictReader(open(par / "results.csv")))) == 4
    for cell in a:
        assert a[cell] == b[cell], cell
    assert (par / "report.html").is_file()
    assert compare_main(["--cfg", str(cfg), "--out", str(par), "--no-progress", "--workers", "0"]) == 2


def test_generate_filter_then_compare_chain_passes_the_leakage_guard(crc_mini, tmp_path):
    """train-gan on the training split -> gan-generate -> piq-report --filter -> an arm that uses
    the filtered folder: the filtered set keeps its manifest and provenance (source.json), so the
    leakage guard verifies it instead of refusing it as unverified."""
    from conftest import tiny_overrides
    from gans.generate import main as generate_main
    from gans.train_gan import main as train_main
    from metrics.report import main as report_main

    data = _split_tree(crc_mini, tmp_path / "data")
    run, synth, filt = tmp_path / "run", tmp_path / "synth", tmp_path / "filtered"
    assert train_main(["--cfg", "dcgan", "--out", str(run), "--no-progress",
                       *sum((["--set", s] for s in tiny_overrides(data / "train")), [])]) == 0
    assert generate_main(["--run", str(run), "--per-class", "3", "--out", str(synth), "--no-progress"]) == 0
    victim = image_files(data / "train")[0]          # a planted copy of a training tile is filtered out
    shutil.copy(victim, synth / victim.parent.name / f"copy{victim.suffix}")
    assert report_main(["--real", str(data / "test"), "--fake", str(synth), "--train", str(data / "train"),
                        "--extractor", "pixels", "--out", str(tmp_path / "report"), "--filter", str(filt),
                        "--size", "32", "--boot", "2", "--no-progress"]) == 0
    assert not list(filt.rglob(f"copy{victim.suffix}")) and (filt / "source.json").is_file()
    info = json.loads((filt / "source.json").read_text())
    assert info["filtered"]["removed"] >= 1 and info["train_files_sha256"]
    arms = f"[{{name: real_only}}, {{name: filtered, synthetic: {{source: '{filt}', ratio: 1.0}}}}]"
    s = run_compare(_cfg(f"data.root={data}", "generators={}", f"arms={arms}", "seeds=[0]", *FAST),
                    tmp_path / "cmp", progress=False)
    src = s["data"][f"synthetic source {filt}"]
    assert src["verified"] and src["generator_train_files"] == len(image_files(data / "train"))
    rows = list(csv.DictReader(open(tmp_path / "cmp" / "results.csv")))
    assert {r["arm"]: int(r["n_train_synthetic"]) for r in rows} == {"real_only": 0, "filtered": 6}


def test_a_filtered_arm_gets_the_same_budget_from_a_selected_set(crc_mini, tmp_path):
    """An arm with a filter draws as many synthetic tiles as its unfiltered twin, chosen from
    needed / keep candidates by a classifier trained on the training split; the selection is
    verified by the leakage guard and shown in the report."""
    arms = ("[{name: real_only}, {name: gan_x1, synthetic: {source: gan, ratio: 1.0}}, "
            "{name: gan_x1_sel, synthetic: {source: gan, ratio: 1.0, filter: {by: confidence, keep: 0.5}}}]")
    cfg = _cfg(f"data.root={crc_mini}", "data.split=stratified", "generators.gan.config=dcgan",
               f"generators.gan.set={TINY_GAN}", f"arms={arms}", "seeds=[0]", *FAST)
    out = tmp_path / "cmp"
    s = run_compare(cfg, out, progress=False)
    rows = {r["arm"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert rows["gan_x1_sel"]["n_train_synthetic"] == rows["gan_x1"]["n_train_synthetic"] != "0"
    pool = list(csv.DictReader(open(out / "generators/gan/synthetic/manifest.csv")))
    selected = [p for p in (out / "selected").iterdir()]
    assert len(selected) == 1
    kept = list(csv.DictReader(open(selected[0] / "manifest.csv")))
    assert len(pool) == 2 * len(kept) and all(float(r["confidence"]) >= 0 for r in kept)
    key = next(k for k in s["data"] if k.startswith("synthetic source gan#"))
    assert s["data"][key]["verified"] and s["data"][key]["selected"]["filter"].startswith("confidence")
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and "Selection of gan" in html


def test_the_synthetic_compare_config_runs_on_an_unseen_imbalanced_tree(crc_mini, tmp_path):
    """compare_synthetic.yaml as a user runs it, through --set only: a GAN and a diffusion model
    trained on the training split, each arm at the same budget (100 % of each minority class), the
    selected arms keeping only candidates that pass, every synthetic set verified by the leakage
    guard. Only sizes are shrunk; arms, stages, filters and the report are the shipped ones."""
    data = _split_tree(crc_mini, tmp_path / "data", classes=3)          # ADI, DEB, LYM: 2 / 1 / 1 each
    for f in sorted((crc_mini / "NORM").iterdir())[:2]:                   # ADI the majority: train 4 / 2 / 2
        shutil.copy(f, data / "train" / "ADI" / f.name)
    diffusion = ("[data.image_size=32, 'model.channels=[8, 16]', model.norm_groups=4, model.timesteps=50, "
                 "train.batch_size=4, train.steps=4, train.checkpoint_every=2, train.sample_every=2, "
                 "train.samples_per_class=2, train.warmup_steps=0, train.device=cpu]")
    # per_class=8: candidates to spare (most of a 4-step GAN's tiles are near-copies of 8 real tiles)
    sets = [f"data.root={data}", f"generators.gan.set={TINY_GAN}",
            f"generators.diffusion.set={diffusion}", "generators.diffusion.options={steps: 3, guidance_scale: 1.5}",
            "generators.gan.per_class=8", "generators.diffusion.per_class=8",
            "seeds=[0]", *FAST, "downstream.train.channels_last=off"]
    out = tmp_path / "out"
    assert compare_main(["--cfg", "compare_synthetic", "--out", str(out), "--no-progress",
                         *sum((["--set", s] for s in sets), [])]) == 0
    rows = {r["arm"]: r for r in csv.DictReader(open(out / "results.csv"))}
    shipped = [a.name for a in configlib.load(CompareConfig, "compare_synthetic")[0].arms]
    assert sorted(rows) == sorted(shipped)
    for arm in ("gan", "gan_selected", "diffusion", "diffusion_selected"):     # 2 DEB + 2 LYM tiles each
        assert rows[arm]["n_train_synthetic"] == "4", arm
    for arm in ("real_only", "balanced_sampler", "shuffled_control"):
        assert rows[arm]["n_train_synthetic"] == "0", arm
    for source in ("gan", "diffusion"):
        pool = list(csv.DictReader(open(out / "generators" / source / "synthetic" / "manifest.csv")))
        (selected,) = [d for d in (out / "selected").iterdir() if d.name.startswith(source)]
        kept = list(csv.DictReader(open(selected / "manifest.csv")))
        scored = list(csv.DictReader(open(selected / "selection.csv")))
        assert len(pool) == len(scored) == 24 and {r["file"] for r in kept} <= {r["file"] for r in scored}
        for cls in ("DEB", "LYM"):          # per class: at most the best half, no near-copy, best-ranked
            usable = [r for r in scored if r["class"] == cls and r["near_copy"] == "False"]
            kept_here = [r for r in scored if r["class"] == cls and r["kept"] == "True"]
            assert 2 <= len(kept_here) <= 4 and all(r in usable for r in kept_here)
            assert min(float(r["rank"]) for r in kept_here) >= max(
                [float(r["rank"]) for r in usable if r not in kept_here], default=0)
    summary = json.loads((out / "summary.json").read_text())
    assert all(v["verified"] for k, v in summary["data"].items() if k.startswith("synthetic source"))
    assert "real_only" in (out / "report.html").read_text()
