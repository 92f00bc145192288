"""Shared fixtures: real tiles (the team's shared bundle when present, else the bundled demo)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n N`: one thread per worker process (and per process a test starts), so N workers
    # on N cores never oversubscribe them (two 2-thread torch processes on 2 cores run up to 8x slower)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

from histosynth import config as configlib
from histosynth.config import PROJECT_ROOT

SHARED = Path(os.environ.get("HISTOSYNTH_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))
DEMO = PROJECT_ROOT / "data" / "lung_demo"
# timm's tiny test EfficientNet (< 0.5 M parameters): for tests of the comparison machinery, which
# hold for any backbone; EfficientNet-B0 itself is trained by the classifier and engine tests
TINY_BACKBONE = "timm/test_efficientnet"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HISTOSYNTH_CACHE", str(tmp_path_factory.getbasetemp() / "tile-cache"))


@pytest.fixture(scope="session")
def crc_mini(tmp_path_factory) -> Path:
    """32 real CRC tiles in 8 class folders (../shared/data/crc_mini), or the bundled lung demo:
    a copy, so that no test -- not even one that finds a regression of the input/output guards --
    can change the team's data or the checkout's demo tiles."""
    p = SHARED / "crc_mini"
    return Path(shutil.copytree(p if p.is_dir() else DEMO / "train", tmp_path_factory.mktemp("data") / "crc_mini"))


@pytest.fixture(scope="session")
def lung_train() -> Path:
    p = SHARED / "lung" / "train"
    return p if p.is_dir() else DEMO / "train"


@pytest.fixture(scope="session")
def stain_domains() -> tuple[Path, Path]:
    """Unpaired H&E (A) and IHC (B) 256 px tiles (../shared/data/stain), else two demo classes."""
    p = SHARED / "stain"
    if p.is_dir():
        return p / "trainA_he", p / "trainB_ihc"
    return DEMO / "train" / "lung_aca", DEMO / "train" / "lung_n"


@pytest.fixture
def tile_folder(tmp_path, crc_mini) -> Path:
    """A writable copy of three classes of real tiles (4 per class at most)."""
    dst = tmp_path / "tiles"
    for cls in sorted(d for d in crc_mini.iterdir() if d.is_dir())[:3]:
        (dst / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:4]:
            shutil.copy(f, dst / cls.name / f.name)
    return dst


def tiny_overrides(root: Path, **extra) -> list[str]:
    """--set strings for a seconds-long CPU run: 32 px, narrow nets, small batches."""
    sets = {"data.root": str(root), "data.image_size": 32, "model.ch": 8, "model.z_dim": 16,
            "train.batch_size": 8, "train.steps": 6, "train.checkpoint_every": 3,
            "train.sample_every": 3, "train.log_every": 1, "train.samples_per_class": 4,
            "train.device": "cpu"}
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]


def tiny_config(root: Path, cfg: str = "sngan", **extra):
    from gans.config import GANConfig

    return configlib.load(GANConfig, cfg, tiny_overrides(root, **extra))[0]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, crc_mini) -> Path:
    """A finished 6-step conditional SNGAN run on real tiles (shared by read-only tests)."""
    from gans.train_gan import train_gan

    out = tmp_path_factory.mktemp("runs") / "sngan"
    mp = pytest.MonkeyPatch()
    mp.setenv("HISTOSYNTH_CACHE", str(tmp_path_factory.getbasetemp() / "tile-cache"))
    try:
        train_gan(tiny_config(crc_mini), out, progress=False)
    finally:
        mp.undo()
    return out


def calls_of(function):
    """A context manager (a TorchFunctionMode) that records the arguments of every call of the
    torch ``function`` made inside it, in ``.calls``: which kernels a model actually ran."""
    import torch

    class Recorder(torch.overrides.TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls: list[tuple] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is function:
                self.calls.append(args)
            return func(*args, **(kwargs or {}))

        @property
        def shapes(self) -> list[tuple[int, ...]]:
            """The shape of each call's second argument (for F.conv2d: the weight)."""
            return [tuple(a[1].shape) for a in self.calls]

    return Recorder()


def conv_weight_shapes():
    """:func:`calls_of` ``F.conv2d``: its ``.shapes`` are the weight shapes the layers ran."""
    import torch

    return calls_of(torch.nn.functional.conv2d)


def assert_same_state(a: dict, b: dict) -> None:
    """Two checkpoints hold bit-identical weights, EMA, optimizer and scheduler state."""
    import torch

    for part in ("modules", "ema"):
        for name in a[part]:
            for k, v in a[part][name].items():
                assert torch.equal(v, b[part][name][k]), f"{part}.{name}.{k} differs"
    for name in a["optimizers"]:
        sa, sb = a["optimizers"][name]["state"], b["optimizers"][name]["state"]
        for i in sa:
            for k in sa[i]:
                assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k]))
    assert a["schedulers"] == b["schedulers"] and a["step"] == b["step"]


def image_files(root: Path) -> list[Path]:
    """Every image file under ``root`` (the shared crc_mini is PNG, the bundled demo JPEG)."""
    from histosynth.images import IMAGE_EXTENSIONS
    return sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
