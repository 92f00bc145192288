"""CycleGAN on the engine: shapes, a finite step, the image pool, runs, resume, tiling, eval."""

import csv
import json
import shutil

import numpy as np
import piq
import pytest
import torch
import torch.nn as nn

from gans.cyclegan_eval import evaluate_run, paired_scores
from gans.families.cyclegan import (CycleGANConfig, CycleGANTask, ImagePool, PatchDiscriminator, ResnetGenerator,
                                    load_data as load_domains)
from gans.tiling import _starts, translate_image
from gans.translate import main as translate_main
from gans.train_gan import load_config, main as train_main, train_gan
from histosynth.checkpoint import safe_load
from histosynth.engine import RunDir
from histosynth.images import list_images, read_rgb8
from histosynth.runtime import Runtime
from conftest import assert_same_state


def tiny_cycle_sets(a, b, **extra):
    sets = {"data.root_a": str(a), "data.root_b": str(b), "data.image_size": 32, "model.ngf": 8,
            "model.ndf": 8, "model.n_blocks": 2, "loss.pool_size": 3, "train.batch_size": 2,
            "train.steps": 6, "train.checkpoint_every": 3, "train.sample_every": 3,
            "train.log_every": 1, "train.device": "cpu", "eval.max_images": 3, "eval.tile": 128}
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]


def tiny_cycle_config(a, b, **extra) -> CycleGANConfig:
    return load_config("cyclegan_cpu", tiny_cycle_sets(a, b, **extra))[0]


@pytest.mark.parametrize("size", [64, 128, 256])
def test_generator_and_discriminator_shapes(size):
    G, D = ResnetGenerator(ngf=8, n_blocks=2), PatchDiscriminator(ndf=8)
    x = torch.rand(2, 3, size, size) * 2 - 1
    y = G(x)
    assert y.shape == x.shape and y.abs().max() <= 1
    assert D(y).shape == (2, 1, size // 8 - 2, size // 8 - 2)     # 30 x 30 patches at 256 px


def test_paper_sizes():
    n = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    assert n(ResnetGenerator(64, 9)) == pytest.approx(11.378, abs=0.01)   # junyanz resnet_9blocks
    assert n(PatchDiscriminator(64, 3)) == pytest.approx(2.765, abs=0.01)  # junyanz basic D


def test_one_step_keeps_every_weight_finite(stain_domains):
    cfg = tiny_cycle_config(*stain_domains)
    torch.manual_seed(0)
    task = CycleGANTask(cfg, load_domains(cfg, progress=False), Runtime.from_choices("cpu"))
    before = {k: v.clone() for k, v in task.G_ab.state_dict().items()}
    out = task.train_step()
    assert all(torch.isfinite(v) for v in out.values())
    for m in task.modules.values():
        assert all(torch.isfinite(p).all() for p in m.parameters())
    assert any(not torch.equal(before[k], v) for k, v in task.G_ab.state_dict().items())


def test_pool_returns_past_images_half_the_time():
    pool = ImagePool(5, seed=0)
    first = pool.query(torch.arange(5.0).view(5, 1, 1, 1))
    assert torch.equal(first.flatten(), torch.arange(5.0))         # filling: returns the input
    n, from_history = 4000, 0
    for i in range(n):
        new = torch.full((1, 1, 1, 1), 100.0 + i)
        out = pool.query(new)
        from_history += int(out.item() != new.item())
    assert from_history / n == pytest.approx(0.5, abs=0.03)
    assert torch.equal(ImagePool(0).query(first), first)            # pool_size 0: pass-through


def test_short_run_writes_checkpoints_grids_and_eval(stain_domains, tmp_path):
    out = tmp_path / "run"
    assert train_main(["--cfg", "cyclegan_cpu", "--out", str(out), "--no-progress",
                       *sum((["--set", s] for s in tiny_cycle_sets(*stain_domains)), [])]) == 0
    p = RunDir(out)
    ck = safe_load(p.last)
    assert ck["task"] == "cyclegan" and ck["step"] == 6
    assert set(ck["modules"]) == {"G_ab", "G_ba", "D_a", "D_b"}
    assert sorted(f.name for f in p.samples.iterdir()) == ["step_000003.png", "step_000006.png"]
    from PIL import Image
    grid = Image.open(p.samples / "step_000006.png")
    assert grid.height == 8 * 34 + 2                            # 4 A rows + 4 B rows of 32 px crops
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["cycle"]) == {"a_to_a", "b_to_b"} and ev["cycle"]["a_to_a"]["psnr"]["n"] == 3
    assert set(ev["stain_od"]) == {"real_a", "real_b", "fake_a", "fake_b"}
    assert "Cycle consistency" in (out / "eval.md").read_text()
    rows = [json.loads(x) for x in p.metrics.read_text().splitlines()]
    assert {"loss_cycle", "loss_idt", "loss_d_a", "loss_d_b"} <= set(rows[-1])


def test_resume_equals_uninterrupted(stain_domains, tmp_path, monkeypatch):
    cfg = tiny_cycle_config(*stain_domains, **{"eval.max_images": 1})
    train_gan(cfg, tmp_path / "full", progress=False)
    real_g_step, calls = CycleGANTask.g_step, {"n": 0}

    def dying(self, a, b):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_g_step(self, a, b)

    monkeypatch.setattr(CycleGANTask, "g_step", dying)
    with pytest.raises(KeyboardInterrupt):
        train_gan(cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(CycleGANTask, "g_step", real_g_step)
    assert train_main(["--resume", str(tmp_path / "cut"), "--no-progress"]) == 0
    a, b = safe_load(RunDir(tmp_path / "full").last), safe_load(RunDir(tmp_path / "cut").last)
    assert_same_state(a, b)
    for pool in ("pool_a", "pool_b"):
        assert torch.equal(a["task_state"][pool]["images"], b["task_state"][pool]["images"])


class ToyInstanceNorm(nn.Module):
    """Output depends on each input tile's statistics, like CycleGAN's instance norm: the case
    that makes naive tiling leave seams."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return torch.tanh((x - x.mean((2, 3), keepdim=True)) / (x.std((2, 3), keepdim=True) + 1e-3) * self.scale)


def _seam_stats(out: np.ndarray, tile: int, overlap: int, band: int = 32):
    """Mean signed step across each column (per 32-row band): at tile borders vs inside tiles."""
    o = out.astype(float)
    dx = np.diff(o, axis=1).mean(axis=2)                           # H x (W-1)
    h = o.shape[0] // band * band
    step = np.abs(dx[:h].reshape(h // band, band, -1).mean(axis=1)).mean(axis=0)
    borders = set()
    for s in _starts(o.shape[1], tile, tile - overlap):
        if s > 0:
            borders.add(s - 1)
        if s + tile < o.shape[1]:
            borders.add(s + tile - 1)
    inside = [i for i in range(len(step)) if i not in borders]
    return step[sorted(borders)].max(), np.quantile(step[inside], 0.99)


def test_tiled_translation_has_no_seams(stain_domains):
    img = read_rgb8(list_images(stain_domains[0])[0])             # a real tile, larger than 64
    G = ToyInstanceNorm()
    blended = translate_image(G, img, tile=64, overlap=16)
    assert blended.shape == img.shape and blended.dtype == np.uint8
    border, inside = _seam_stats(blended, 64, 16)
    assert border <= inside
    hard_border, hard_inside = _seam_stats(translate_image(G, img, tile=64, overlap=0), 64, 0)
    assert hard_border > hard_inside                               # the check can fail


def test_odd_sized_images_keep_their_size():
    G = ResnetGenerator(8, 1).eval()
    for shape in [(37, 53, 3), (130, 70, 3)]:
        img = (np.random.default_rng(0).random(shape) * 255).astype(np.uint8)
        assert translate_image(G, img, tile=64, overlap=8).shape == shape


@pytest.fixture(scope="module")
def cycle_run(tmp_path_factory, stain_domains):
    out = tmp_path_factory.mktemp("cycle") / "run"
    train_gan(tiny_cycle_config(*stain_domains, **{"eval.max_images": 1}), out, progress=False)
    return out


def test_paired_eval_equals_direct_piq_calls(cycle_run, stain_domains, tmp_path):
    # a real paired split: B is A with a different "scanner" colour response
    ta, tb = tmp_path / "A", tmp_path / "B"
    ta.mkdir(), tb.mkdir()
    for f in list_images(stain_domains[0])[:3]:
        shutil.copy(f, ta / f"{f.stem}.png")
        a = read_rgb8(f).astype(float)
        from PIL import Image
        Image.fromarray(np.clip(255 * (a / 255) ** 1.3, 0, 255).astype(np.uint8)).save(tb / f"{f.stem}.png")
    (tb / "unpaired_extra.png").write_bytes((tb / f"{list_images(ta)[0].stem}.png").read_bytes())
    with pytest.warns(UserWarning, match="unpaired_extra"):
        r = evaluate_run(cycle_run, str(ta), str(tb), max_images=0, progress=False)
    ident = {row["file"]: row for row in r["paired"]["identity"]["per_image"]}
    assert len(ident) == 3 and set(r["paired"]) == {"cyclegan", "identity", "reinhard", "macenko"}
    for f in list_images(ta):
        x = torch.from_numpy(read_rgb8(f)).permute(2, 0, 1)[None].float() / 255
        y = torch.from_numpy(read_rgb8(tb / f.name)).permute(2, 0, 1)[None].float() / 255
        assert ident[f.name]["psnr"] == pytest.approx(piq.psnr(x, y, data_range=1.0).item(), rel=1e-6)
        assert ident[f.name]["ssim"] == pytest.approx(piq.ssim(x, y, data_range=1.0).item(), rel=1e-6)
    assert r["paired"]["identity"]["psnr"]["mean"] == pytest.approx(np.mean([v["psnr"] for v in ident.values()]))
    assert "Paired: prediction of B from A" in (cycle_run / "eval.md").read_text()
    same = read_rgb8(list_images(ta)[0])
    assert paired_scores(same, same)["ssim"] == pytest.approx(1.0)


def test_translate_folder_one_output_per_input(cycle_run, stain_domains, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    files = list_images(stain_domains[1])[:3]
    for f in files:
        shutil.copy(f, src / f.name)
    (src / "broken.png").write_bytes(b"nope")
    out = tmp_path / "out"
    assert translate_main(["--run", str(cycle_run), "--input", str(src), "--out", str(out),
                           "--direction", "b2a", "--tile", "128", "--no-progress"]) == 0
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert len(rows) == 3 and {r["direction"] for r in rows} == {"b2a"}
    for f in files:
        assert read_rgb8(out / f"{f.stem}.png").shape == read_rgb8(f).shape


def test_translate_and_generate_refuse_the_wrong_family(cycle_run, trained_run, tmp_path, capsys):
    from gans.generate import main as generate_main
    assert translate_main(["--run", str(trained_run), "--input", str(tmp_path), "--out",
                           str(tmp_path / "o"), "--direction", "a2b"]) == 2
    assert ("is a sngan run, which draws tiles (gan-generate, piq-report --generator); this command needs one "
            "that translates images between domains") in capsys.readouterr().err
    assert generate_main(["--run", str(cycle_run), "--per-class", "1", "--out", str(tmp_path / "g")]) == 2
    assert "is a cyclegan run, which translates images between domains (gan-translate, gan-eval)" \
        in capsys.readouterr().err
    assert not (tmp_path / "g").exists() and not (tmp_path / "o").exists()


def test_cyclegan_config_checks(stain_domains):
    from histosynth.config import ConfigError
    with pytest.raises(ConfigError, match="train.n_dis: CycleGAN updates G and D once"):
        tiny_cycle_config(*stain_domains, **{"train.n_dis": 2})
    with pytest.raises(ConfigError, match="data.test_b: give both"):
        tiny_cycle_config(*stain_domains, **{"data.test_a": "x"})
    with pytest.raises(ConfigError, match="model.ngff: unknown key; did you mean model.ngf"):
        tiny_cycle_config(*stain_domains, **{"model.ngff": 3})


def test_domain_kid_is_logged(stain_domains, tmp_path):
    cfg = tiny_cycle_config(*stain_domains, **{"train.kid_every": 3, "train.kid_samples": 8,
                                               "eval.max_images": 1})
    train_gan(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in RunDir(tmp_path / "run").metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if "kid" in r] == [3, 6]
