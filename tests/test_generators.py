"""ACGAN for every adversarial family and the class-conditional diffusion family."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from conftest import tiny_config
from gans.adversarial import GANTask, load_data
from gans.generate import main as generate_main
from gans.registry import adversarial_families, create_model, families
from gans.train_gan import load_config, main as train_main, train_gan
from histosynth.config import ConfigError
from histosynth.roles import Generator
from histosynth.runtime import Runtime

CPU = Runtime.from_choices("cpu", "off", "off")


# ----------------------------------------------------------------------------------------------
# ACGAN (Odena et al. 2017)


@pytest.mark.parametrize("family", adversarial_families())
def test_acgan_discriminator_has_an_auxiliary_classifier_and_no_projection(family):
    G, D = create_model(family, 32, 3, z_dim=16, ch=8, conditioning="ac")
    D.eval()                                  # spectral norm's power iteration runs in train mode only
    x = G(torch.randn(4, 16), torch.tensor([0, 1, 2, 0]))
    logits, cls = D.classify(x)
    assert logits.shape == (4,) and cls.shape == (4, 3)
    assert torch.equal(D(x, torch.tensor([2, 2, 2, 2])), D(x, None))      # the logit ignores labels
    assert not any("embed" in k for k in D.net.state_dict())               # no projection term


@pytest.mark.parametrize("family", adversarial_families())
def test_acgan_step_trains_the_auxiliary_classifier(family, crc_mini):
    cfg = tiny_config(crc_mini, family, **{"model.conditioning": "ac", "train.lr_d": 2e-3, "loss.ac_weight": 1.0,
                                           "train.diffaugment": "''", "train.amp": "off"})
    torch.manual_seed(0)
    task = GANTask(cfg, load_data(cfg, progress=False), CPU)
    real, y = task.real_batch()
    first = task.d_step(real, y)
    assert {"loss_ac_d", "ac_acc_real"} <= set(first)
    for _ in range(40):
        last = task.d_step(real, y)                      # the same real batch: D must learn its classes
    assert last["loss_ac_d"] < 0.8 * first["loss_ac_d"], (first["loss_ac_d"], last["loss_ac_d"])
    out = task.g_step(y)
    assert torch.isfinite(out["loss_g"]) and out["loss_ac_g"] > 0


def test_acgan_run_generates_tiles_of_every_class(crc_mini, tmp_path):
    cfg = tiny_config(crc_mini, "dcgan", **{"model.conditioning": "ac"})
    train_gan(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_ac_d" in r and "loss_ac_g" in r for r in rows if "loss_d" in r)
    assert generate_main(["--run", str(tmp_path / "run"), "--per-class", "2", "--out", str(tmp_path / "s"),
                          "--no-progress"]) == 0
    classes = sorted(d.name for d in crc_mini.iterdir() if d.is_dir())
    assert sorted(r["class"] for r in csv.DictReader(open(tmp_path / "s" / "manifest.csv"))) == sorted(classes * 2)


def test_a_family_without_pooled_features_refuses_ac(monkeypatch):
    import dataclasses

    import torch.nn as nn
    from gans import registry

    class Plain(nn.Module):                    # a discriminator with no logit_and_features
        def forward(self, x, y=None):
            return x.mean((1, 2, 3))
    plain = dataclasses.replace(families()["dcgan"], name="plain", networks=lambda **k: (nn.Identity(), Plain()))
    monkeypatch.setitem(registry.families(), "plain", plain)
    with pytest.raises(ConfigError, match="model.conditioning: 'ac' is not available for plain"):
        create_model("plain", 32, 3, conditioning="ac")


# ----------------------------------------------------------------------------------------------
# the diffusion family


def _diffusion(crc_mini, **extra):
    sets = [*families()["diffusion"].smoke, f"data.root={crc_mini}", *(f"{k}={v}" for k, v in extra.items())]
    return load_config("diffusion", sets)[0]


def test_diffusion_loss_falls(crc_mini):
    from gans.families.diffusion import DiffusionTask
    cfg = _diffusion(crc_mini, **{"train.lr": 2e-3, "model.timesteps": 1000})
    torch.manual_seed(0)
    task = DiffusionTask(cfg, load_data(cfg, progress=False), CPU)
    losses = [task.train_step()["loss"].item() for _ in range(60)]
    assert np.mean(losses[-15:]) < 0.7 * np.mean(losses[:15]), (np.mean(losses[:15]), np.mean(losses[-15:]))


def test_diffusion_sampling_is_a_function_of_seed_and_class(crc_mini, tmp_path):
    cfg = _diffusion(crc_mini)
    train_gan(cfg, tmp_path / "run", progress=False)
    from gans.registry import load_run
    from histosynth.roles import Generator
    gen, ck, _ = load_run(tmp_path / "run", Generator)
    assert isinstance(gen, Generator) and ck["task"] == "diffusion"
    alone = gen.sample([1], [7])
    batch = gen.sample([0, 1, 2], [3, 7, 9])                 # the same tile inside another batch
    assert alone.shape == (1, 3, 32, 32) and alone.dtype == torch.uint8
    assert (alone[0].int() - batch[1].int()).abs().max() <= 1
    assert not torch.equal(gen.sample([1], [7], guidance_scale=1.0), gen.sample([1], [7], guidance_scale=4.0))
    assert not torch.equal(gen.sample([1], [7], scheduler="ddim"), alone)
    with pytest.raises(ConfigError, match="unknown sampling option.*temperature"):
        gen.sample([1], [7], temperature=0.5)
    assert generate_main(["--run", str(tmp_path / "run"), "--per-class", "2", "--out", str(tmp_path / "s"),
                          "--option", "steps=2", "--option", "scheduler=ddim", "--no-progress"]) == 0
    assert len(list(csv.DictReader(open(tmp_path / "s" / "manifest.csv")))) == 2 * len(gen.classes)
    assert generate_main(["--run", str(tmp_path / "run"), "--per-class", "1", "--out", str(tmp_path / "t"),
                          "--option", "guidance=3"]) == 2


class _NearlyRightDenoiser(torch.nn.Module):
    """Predicts the noise that leads back to one known tile, 3 % too large: a trained network is
    never exact, and a sampler must not amplify that into noise."""

    def __init__(self, x0: torch.Tensor, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.x0, self.ab = x0, alphas_cumprod
        self.config = type("Config", (), {"num_class_embeds": 2})()

    def forward(self, x, t, class_labels=None):
        ab = self.ab[int(t)]
        eps = (x - ab.sqrt() * self.x0) / (1 - ab).sqrt()
        return type("Out", (), {"sample": 1.03 * eps})()


@pytest.mark.parametrize("scheduler,steps", [("dpm_solver++", 10), ("dpm_solver++", 20), ("ddim", 50)])
def test_diffusion_samplers_land_on_the_tile_a_nearly_right_denoiser_points_to(scheduler, steps):
    """With the cosine schedule, alpha(t) ~ 1/160 at the first step: DPM-Solver++ without clipped
    data predictions divided the denoiser's small error by it and ended in saturated noise (every
    lung tile of a 1200-step run was static)."""
    from gans.families.diffusion import DiffusionSampleConfig, DiffusionSampler, training_scheduler
    from histosynth.data import to_uint8
    cfg = load_config("diffusion", [])[0]
    train_config = dict(training_scheduler(cfg).config)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(3, 16, 16, generator=g) * 1.6 - 0.8)              # a tile in [-0.8, 0.8]
    unet = _NearlyRightDenoiser(x0, training_scheduler(cfg).alphas_cumprod)
    sampler = DiffusionSampler(unet, ["a"], 16, train_config, DiffusionSampleConfig(), conditional=False)
    out = sampler.sample([0, 0], [1, 2], scheduler=scheduler, steps=steps).int()
    err = (out - to_uint8(x0).int()).abs().float().mean(dim=(1, 2, 3))
    assert (err < 6).all(), err                                          # uint8 levels; saturated noise: ~100


def test_diffusion_config_errors_name_the_key(tmp_path, capsys):
    with pytest.raises(ConfigError, match="model.norm_groups: 5 must divide"):
        load_config("diffusion", ["model.norm_groups=5"])
    with pytest.raises(ConfigError, match="sample.guidance_scale: needs an unconditional model"):
        load_config("diffusion", ["train.label_dropout=0", "sample.guidance_scale=3"])
    assert train_main(["--cfg", "diffusion", "--out", str(tmp_path / "r"), "--set", "sample.scheduler=euler"]) == 2
    err = capsys.readouterr().err
    assert "sample.scheduler" in err and "'dpm_solver++'" in err and not (tmp_path / "r").exists()
    assert families()["diffusion"].draws(load_config("diffusion", [])[0]) is Generator


# ----------------------------------------------------------------------------------------------
# ADA and LeCam


def test_ada_probability_follows_the_overfitting_heuristic():
    from gans.ada import AdaptiveAugment
    ada = AdaptiveAugment(target=0.6, interval=2, kimg=0.064, batch=16)     # one move: 16 * 2 / 64 = 0.5
    ada.observe(torch.ones(16))
    assert ada.p == 0.0                                                    # adjusted every 2 steps only
    ada.observe(torch.tensor([1.0] * 12 + [-1.0] * 4))                     # r_t = (16 + 8) / 32 = 0.75
    assert ada.r_t == pytest.approx(0.75) and ada.p == pytest.approx(0.5)
    state = ada.state_dict()
    ada.observe(torch.ones(16))
    ada.observe(torch.ones(16))
    assert ada.p == pytest.approx(1.0)                                     # D overfits: p up, capped at 1
    again = AdaptiveAugment(target=0.6, interval=2, kimg=0.064, batch=16)
    again.load_state_dict(state)
    again.observe(-torch.ones(16))
    again.observe(-torch.ones(16))
    assert again.r_t == -1.0 and again.p == pytest.approx(0.0)             # D does not overfit: p down


def test_ada_transforms_keep_shape_and_gradients_and_vanish_at_p_zero():
    from gans.ada import augment
    x = (torch.rand(8, 3, 32, 32) * 2 - 1).requires_grad_(True)
    assert augment(x, 0.0) is x
    torch.manual_seed(0)
    y = augment(x, 1.0)
    assert y.shape == x.shape and not torch.allclose(y, x)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    torch.manual_seed(0)
    x = torch.rand(64, 3, 32, 32) * 2 - 1
    z = augment(x, 0.05)               # ~11 chances of a transform per image: ~60 % untouched at p 0.05
    untouched = sum(bool((z[i] - x[i]).abs().max() < 1e-4) for i in range(64))
    assert 15 < untouched < 60, untouched


def test_lecam_by_hand():
    from gans.ada import LeCam
    reg = LeCam(decay=0.5)
    real, fake = torch.tensor([2.0, 4.0]), torch.tensor([-1.0, -3.0])
    # ema = 0.5 * (means 3, -2): real 1.5, fake -1.0
    out = reg(real, fake)
    expect = ((real - (-1.0)).clamp(min=0) ** 2).mean() + ((1.5 - fake).clamp(min=0) ** 2).mean()
    assert out.item() == pytest.approx(expect.item())


def test_ada_and_lecam_in_a_run(crc_mini, tmp_path):
    cfg = tiny_config(crc_mini, "sngan", **{"train.ada": "on", "train.ada_kimg": 0.05, "train.ada_interval": 1,
                                            "loss.lecam_weight": 0.3, "train.diffaugment": "''", "train.steps": 6})
    train_gan(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("ada_p" in r and "lecam" in r for r in rows)
    from histosynth.checkpoint import safe_load
    ck = safe_load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ck["task_state"]["ada"]["steps"] == 6 * cfg.train.n_dis
    assert ck["task_state"]["ada"]["p"] == pytest.approx(rows[-1]["ada_p"])          # p is in the checkpoint
    with pytest.raises(ConfigError, match="train.ada: is on and so is train.diffaugment"):
        tiny_config(crc_mini, "sngan", **{"train.ada": "on", "train.diffaugment": "color"})
