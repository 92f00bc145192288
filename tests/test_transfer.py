"""The classifier a researcher trains: backbones behind one factory, ImageNet weights from the
libraries' caches with no network, fine-tuning options, class-based augmentation, group-level
results, and the train-classifier / classify commands on real tiles."""

from __future__ import annotations

import csv
import json
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONE

from classifier.data import TileDataset
from classifier.metrics import by_group, classification_metrics
from classifier.model import create_classifier
from histosynth import config as configlib
from histosynth.data import StepBatches, TileCache
from histosynth.weights import WeightsNotCached


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("variant, dim", [("resnet18", 512), ("densenet121", 1024), ("efficientnet-b0", 1280),
                                          ("timm/resnet10t", 512)])
def test_every_backbone_gives_features_and_logits(variant, dim):
    net = create_classifier(variant, 3, dropout=0.0).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert net.features(x).shape == (2, dim) and net(x).shape == (2, 3)


def test_imagenet_weights_load_from_torchs_cache_with_no_network(tmp_path, monkeypatch, no_network):
    from torchvision.models import resnet18
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsNotCached) as e:
        create_classifier("resnet18", 3, "imagenet")
    msg = str(e.value)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    assert "resnet18-f37072fd.pth" in msg and str(cache) in msg and "https://download.pytorch.org/models/" in msg
    src = resnet18()                                        # a generated "ImageNet" state dict
    cache.mkdir(parents=True)
    torch.save(src.state_dict(), cache / "resnet18-f37072fd.pth")
    net = create_classifier("resnet18", 3, "imagenet")
    assert torch.equal(net.body.conv1.weight, src.conv1.weight) and net.head.out_features == 3


def test_efficientnet_and_densenet_imagenet_files_in_the_librarys_own_format(tmp_path, monkeypatch, no_network):
    from efficientnet_pytorch import EfficientNet
    from torchvision.models import densenet121
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    eff = EfficientNet.from_name("efficientnet-b0")
    torch.save(eff.state_dict(), cache / "efficientnet-b0-355c32eb.pth")
    assert torch.equal(create_classifier("efficientnet-b0", 2, "imagenet").body._conv_stem.weight,
                       eff._conv_stem.weight)
    dense = densenet121()                                   # download.pytorch.org's legacy keys: norm.1 for norm1
    legacy = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in dense.state_dict().items()}
    assert any(".norm.1." in k for k in legacy)
    torch.save(legacy, cache / "densenet121-a639ec97.pth")
    net = create_classifier("densenet121", 2, "imagenet")
    assert torch.equal(net.body.features.denseblock1.denselayer1.norm1.weight,
                       dense.features.denseblock1.denselayer1.norm1.weight)


def test_timm_weights_come_from_the_hugging_face_cache_only(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsNotCached, match="timm/resnet10t are not in the Hugging Face cache"):
        create_classifier("timm/resnet10t", 2, "imagenet")


def test_the_shipped_classifier_config_loads_and_names_bad_keys():
    from classifier.train_classifier import TrainClassifierConfig
    cfg = configlib.load(TrainClassifierConfig, "classifier")[0]
    assert cfg.data.root == "data/lung_demo" and cfg.model.weights is None        # offline by default
    with pytest.raises(configlib.ConfigError, match="sampler.*class_augment"):
        configlib.load(TrainClassifierConfig, "classifier", ["sampler=rare"])


def test_unknown_backbones_name_the_key():
    with pytest.raises(configlib.ConfigError, match="model.variant.*resnet18"):
        from classifier.config import ClassifierConfig
        configlib.load(ClassifierConfig, None, ["model.variant=resnet19"])


# ----------------------------------------------------------------------------------------------
# fine-tuning


def _task(crc_mini, **train):
    from classifier.config import ClassifierConfig
    from classifier.task import ClassifierTask
    from histosynth.runtime import Runtime
    sets = ["model.variant=resnet18", "model.image_size=32", "train.batch_size=8", "train.device=cpu",
            "train.epochs=3", "model.bn_momentum=0.5"] + [f"train.{k}={v}" for k, v in train.items()]
    cfg = configlib.load(ClassifierConfig, None, sets)[0]
    tiles = TileCache.build(crc_mini, 32, progress=False)
    rt = Runtime.from_choices("cpu", "off", "off")
    torch.manual_seed(0)
    return ClassifierTask(cfg, TileDataset(tiles.images, tiles.labels), tiles.images, tiles.labels, tiles.classes, rt, 0)


def test_a_frozen_backbone_keeps_weights_and_statistics_while_the_head_learns(crc_mini):
    task = _task(crc_mini, freeze_epochs=1, backbone_lr=0.1)
    assert [g["lr"] for g in task.optimizers["model"].param_groups] == pytest.approx([1e-4, 1e-3])
    body = {k: v.clone() for k, v in task.model.body.state_dict().items()}
    head = task.model.head.weight.clone()
    for _ in range(task.batches.steps_per_epoch):                     # epoch 0: frozen
        task.train_step()
    assert all(torch.equal(v, task.model.body.state_dict()[k]) for k, v in body.items())   # incl. BN statistics
    assert not torch.equal(head, task.model.head.weight)
    task.train_step()                                                  # epoch 1: everything learns
    assert not torch.equal(body["conv1.weight"], task.model.body.conv1.weight)


# ----------------------------------------------------------------------------------------------
# class-based augmentation


class _Heavy:
    """A dataset whose items say whether they were drawn heavy."""

    def __init__(self, labels):
        self.labels = np.asarray(labels)

    def __len__(self):
        return len(self.labels)

    def get_labels(self):
        return self.labels.tolist()

    def item(self, i, seed, heavy=False):
        return torch.tensor([i, int(self.labels[i]), int(heavy)]), 0


def test_class_augment_tops_rare_classes_up_with_heavily_augmented_draws():
    labels = [0] * 12 + [1] * 4 + [2] * 2
    b = StepBatches(_Heavy(labels), batch_size=6, seed=0, sampler="class_augment")
    assert b.steps_per_epoch == 6                                      # 3 classes x 12 draws / 6
    rows = torch.cat([b[s][0] for s in range(b.steps_per_epoch)])       # one epoch
    i, y, heavy = rows.T.numpy()
    assert np.bincount(y).tolist() == [12, 12, 12]                     # every class as large as the largest
    assert np.bincount(y[heavy == 1], minlength=3).tolist() == [0, 8, 10]   # extra draws: more for rarer classes
    assert sorted(i[heavy == 0].tolist()) == list(range(18))            # every real tile once, plain
    assert torch.equal(b[3][0], StepBatches(_Heavy(labels), 6, 0, "class_augment")[3][0])   # a pure function of the step


# ----------------------------------------------------------------------------------------------
# group level


def test_group_metrics_equal_hand_computed_values():
    y = [0, 0, 0, 1, 1, 1]
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.45, 0.55],            # group a (class 0): mean 0.58 -> 0, vote 1 of 3 -> 1
                      [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])             # group b (class 1): mean -> 1, vote -> 1
    groups = ["a", "a", "a", "b", "b", "b"]
    labels, mean, ids = by_group(y, probs, groups, "mean")
    assert ids == ["a", "b"] and labels.tolist() == [0, 1]
    assert mean == pytest.approx(np.array([[0.5833, 0.4167], [0.3667, 0.6333]]), abs=1e-4)
    assert classification_metrics(labels, mean, ["x", "y"])["balanced_accuracy"] == 1.0
    _, vote, _ = by_group(y, probs, groups, "vote")
    assert vote.argmax(1).tolist() == [1, 1]
    assert classification_metrics(labels, vote, ["x", "y"])["balanced_accuracy"] == 0.5


DEMO = Path(__file__).resolve().parents[1] / "data" / "lung_demo"     # train/ val/ test/


def _images_of_two_tiles(tmp_path: Path) -> Path:
    """A groups file for the demo in which every test image is two tiles of one class (train and
    val tiles each their own image)."""
    path = tmp_path / "images.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "group_id"])
        for i, p in enumerate(sorted(q for q in DEMO.rglob("*.jpg"))):
            rel = p.relative_to(DEMO).as_posix()
            w.writerow([rel, f"{p.parent.name}-image{i // 2}" if rel.startswith("test/") else rel])
    return path


FAST = ["model.image_size=32", "train.batch_size=8", "train.device=cpu", "train.patience=0", "train.epochs=3",
        "train.min_epochs=0", "model.bn_momentum=0.5"]


def test_compare_reports_both_levels_and_the_verdict_names_its_level(crc_mini, tmp_path):
    from experiments.augment_compare import run_compare
    from experiments.config import CompareConfig
    cfg = configlib.load(CompareConfig, None, [
        f"data.root={DEMO}", f"data.groups={_images_of_two_tiles(tmp_path)}", "seeds=[0, 1]",
        "arms=[{name: real_only}, {name: rare_heavy, sampler: class_augment}]", "report.primary=group_balanced_accuracy",
        f"downstream.model.variant={TINY_BACKBONE}", *(f"downstream.{s}" for s in FAST)])[0]
    s = run_compare(cfg, tmp_path / "out", progress=False)
    assert "group_balanced_accuracy" in s["metrics"] and "balanced_accuracy" in s["metrics"]
    assert "balanced accuracy (groups: mean tile probability)" in s["verdict"]
    m = json.loads(next((tmp_path / "out" / "cells").rglob("metrics.json")).read_text())
    assert m["groups"]["mean"]["n"] == m["n"] // 2                       # two tiles per test image
    no_groups = configlib.load(CompareConfig, None, [f"data.root={crc_mini}", "data.split=stratified",
                                                     "report.primary=group_balanced_accuracy"])[0]
    with pytest.raises(configlib.ConfigError, match="report.primary.*needs a groups file"):
        run_compare(no_groups, tmp_path / "out2", progress=False)


def test_train_classifier_then_classify_as_a_new_user_would(crc_mini, tmp_path, capsys):
    from classifier.classify import main as classify_main
    from classifier.train_classifier import main as train_main
    sets = [f"data.root={DEMO}", f"data.groups={_images_of_two_tiles(tmp_path)}", "model.variant=resnet18",
            "augment=stain", *FAST]
    out = tmp_path / "clf"
    assert train_main(["--out", str(out), "--no-progress", *sum((["--set", s] for s in sets), [])]) == 0
    assert "balanced accuracy" in capsys.readouterr().out
    for f in ("report.html", "report.md", "confusion.png", "roc.png", "curves.png", "metrics.json",
              "test_predictions.csv", "run/checkpoints/best.pt"):
        assert (out / f).is_file(), f
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["groups"]) == {"mean", "vote"} and 0 <= m["balanced_accuracy"] <= 1
    assert "| groups (majority vote) |" in (out / "report.md").read_text()
    new = tmp_path / "new"
    new.mkdir()
    tiles = sorted(p for p in crc_mini.rglob("*") if p.is_file())[:5]
    for p in tiles:
        (new / p.name).write_bytes(p.read_bytes())
    (new / "broken.png").write_bytes(b"not an image")
    assert classify_main(["--run", str(out), "--input", str(new), "--out", str(tmp_path / "p.csv"),
                          "--no-progress"]) == 0
    assert "broken.png" in capsys.readouterr().err                       # skipped, and said so
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    classes = json.loads((out / "metrics.json").read_text())["per_class"].keys()
    assert [r["file"] for r in rows] == sorted(p.name for p in tiles)
    assert all(abs(sum(float(r[f"p_{c}"]) for c in classes) - 1) < 1e-3 and r["predicted"] in classes for r in rows)
    assert classify_main(["--run", str(tmp_path / "nowhere"), "--input", str(new), "--out", str(tmp_path / "q.csv")]) == 2
    assert "holds no classifier checkpoint" in capsys.readouterr().err


def test_a_missing_cached_weight_file_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys, no_network):
    from classifier.train_classifier import main as train_main
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    assert train_main(["--out", str(tmp_path / "out"), "--no-progress", "--set", "model.variant=resnet50",
                       "--set", "model.weights=imagenet", *sum((["--set", s] for s in FAST), [])]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert "resnet50-11ad3fa6.pth is not in torch's cache" in err and "https://download.pytorch.org" in err


def test_importing_the_augmentation_library_opens_no_connection(tmp_path):
    import subprocess
    import sys
    code = ("import socket\n"
            "def refuse(*a, **k): raise SystemExit('a network connection was attempted')\n"
            "socket.socket.connect = refuse\nsocket.create_connection = refuse\n"
            "import histosynth, classifier.augment, segmentation.augment\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    r = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True, env=env,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-500:]
