"""Training a GAN on the engine: run directory, resume == uninterrupted, SIGKILL, NaN guard, safety."""

import errno
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from gans.adversarial import GANTask, load_data
from gans.train_gan import main as train_main, train_gan
from histosynth.checkpoint import CheckpointError, atomic_save, safe_load, sha256_file
from histosynth.config import PROJECT_ROOT
from histosynth.engine import RunDir
from histosynth.runtime import Runtime
from conftest import assert_same_state, tiny_config, tiny_overrides


def _args(root, out, family="sngan", **extra):
    sets = sum((["--set", s] for s in tiny_overrides(root, **extra)), [])
    return ["--cfg", family, "--out", str(out), "--no-progress", *sets]


@pytest.mark.parametrize("family", ["dcgan", "sngan", "wgan_gp"])
def test_short_run_writes_the_run_dir(family, crc_mini, tmp_path):
    out = tmp_path / "run"
    assert train_main(_args(crc_mini, out, family)) == 0
    p = RunDir(out)
    n_classes = len([d for d in crc_mini.iterdir() if d.is_dir()])
    ck = safe_load(p.last)
    assert ck["step"] == 6 and ck["task"] == family and ck["format"] == "histosynth/2"
    assert set(ck["modules"]) == {"G", "D"} and "G" in ck["ema"]
    assert {"torch"} <= set(ck["rng"]) and "sampler" in ck["task_state"]
    # resolved config round-trips and matches the checkpoint's
    import yaml
    assert yaml.safe_load(p.config.read_text()) == ck["config"]
    # sample grid: one row per class, 4 columns of 32 px tiles with 2 px padding
    grid = Image.open(p.samples / "step_000006.png")
    assert grid.height == n_classes * 34 + 2
    assert sorted(x.name for x in p.samples.iterdir()) == ["step_000003.png", "step_000006.png"]
    rows = [json.loads(line) for line in p.metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(k in rows[-1] for k in ("loss_d", "loss_g", "images_per_s"))
    assert (out / "loss.png").is_file() and json.loads((out / "data.json").read_text())["classes"]


def test_discriminator_loss_falls_against_a_fixed_generator(crc_mini):
    cfg = tiny_config(crc_mini, **{"train.lr_d": 1e-3, "train.diffaugment": "''"})
    torch.manual_seed(0)
    task = GANTask(cfg, load_data(cfg, progress=False), Runtime.from_choices("cpu"))
    losses = [task.d_step(*task.real_batch())["loss_d"].item() for _ in range(20)]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


@pytest.mark.parametrize("family", ["sngan", "wgan_gp"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(family, crc_mini, tmp_path, monkeypatch):
    extra = {"train.diffaugment": "color,translation,cutout", "train.lr_schedule": "linear",
             "train.lr_decay_start": 2}
    cfg = tiny_config(crc_mini, family, **extra)
    train_gan(cfg, tmp_path / "full", progress=False)

    calls = {"n": 0}
    real_g_step = GANTask.g_step

    def dying_g_step(self, y):
        calls["n"] += 1
        if calls["n"] == 5:                  # step 5: after the step-3 checkpoint and step-4 log
            raise KeyboardInterrupt
        return real_g_step(self, y)

    monkeypatch.setattr(GANTask, "g_step", dying_g_step)
    with pytest.raises(KeyboardInterrupt):
        train_gan(cfg, tmp_path / "cut", progress=False)
    assert safe_load(RunDir(tmp_path / "cut").last)["step"] == 3
    monkeypatch.setattr(GANTask, "g_step", real_g_step)
    assert train_main(["--resume", str(tmp_path / "cut"), "--no-progress"]) == 0

    assert_same_state(safe_load(RunDir(tmp_path / "full").last),
                      safe_load(RunDir(tmp_path / "cut").last))
    steps = [json.loads(x)["step"] for x in RunDir(tmp_path / "cut").metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]       # the step-4 line of the killed run is not repeated


def test_sigkill_then_resume_reaches_the_final_step(crc_mini, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    total = 600
    args = _args(crc_mini, out, "dcgan", **{"train.steps": total, "train.checkpoint_every": 7,
                                            "train.sample_every": 500})
    proc = subprocess.Popen([sys.executable, "-m", "gans.train_gan", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    paths = RunDir(out)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:      # kill between checkpoints
        if paths.last.is_file() and paths.metrics.is_file() and \
                len(paths.metrics.read_text().splitlines()) >= 24:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ck = paths.last
    assert ck.is_file(), "no checkpoint appeared before the kill"
    killed_at = safe_load(ck)["step"]
    assert 7 <= killed_at < total
    assert train_main(["--resume", str(out), "--no-progress"]) == 0
    assert safe_load(ck)["step"] == total
    steps = [json.loads(x)["step"] for x in paths.metrics.read_text().splitlines()]
    assert steps == list(range(1, total + 1))
    assert not [f for f in ck.parent.iterdir() if f.name != "last.pt"]   # no temp files left


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(crc_mini, tmp_path, monkeypatch, capsys):
    real_d_step = GANTask.d_step
    calls = {"n": 0}

    def nan_d_step(self, real, y):
        out = real_d_step(self, real, y)
        calls["n"] += 1
        if calls["n"] >= 5:
            out["loss_d"] = torch.tensor(float("nan"))
        return out

    monkeypatch.setattr(GANTask, "d_step", nan_d_step)
    out = tmp_path / "run"
    rc = train_main(_args(crc_mini, out, **{"train.checkpoint_every": 2, "train.log_every": 3}))
    err = capsys.readouterr().err
    assert rc == 2 and "loss_d became NaN/Inf at step 6" in err and "(step 4) was kept" in err
    assert "Traceback" not in err
    ck = safe_load(RunDir(out).last)
    assert ck["step"] == 4
    assert all(torch.isfinite(v).all() for v in ck["modules"]["G"].values() if v.is_floating_point())


def test_existing_run_is_never_overwritten(trained_run, crc_mini, capsys):
    before = sha256_file(RunDir(trained_run).last)
    assert train_main(_args(crc_mini, trained_run)) == 2
    assert "--resume" in capsys.readouterr().err
    assert sha256_file(RunDir(trained_run).last) == before


def test_resume_argument_errors(trained_run, tmp_path, capsys):
    assert train_main(["--resume", str(tmp_path), "--no-progress"]) == 2
    assert "no config.yaml" in capsys.readouterr().err
    assert train_main(["--resume", str(trained_run), "--cfg", "sngan"]) == 2
    assert "drop --cfg" in capsys.readouterr().err


def test_resume_refuses_another_family(trained_run, tmp_path, capsys):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    cfg = (run / "config.yaml").read_text().replace("family: sngan", "family: dcgan")
    (run / "config.yaml").write_text(cfg)
    assert train_main(["--resume", str(run), "--no-progress"]) == 2
    assert "holds a 'sngan' model, not 'dcgan'" in capsys.readouterr().err


def test_corrupt_tile_in_training_data_is_skipped_and_recorded(tile_folder, tmp_path, capsys):
    (sorted(tile_folder.iterdir())[0] / "bad.png").write_bytes(b"not a png")
    assert train_main(_args(tile_folder, tmp_path / "run", **{"train.steps": 2})) == 0
    assert "bad.png" in capsys.readouterr().err
    skipped = json.loads((tmp_path / "run" / "data.json").read_text())["skipped"]
    assert len(skipped) == 1 and skipped[0][0].endswith("bad.png")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"modules": _Evil()}, f)
    with pytest.raises(CheckpointError, match="weights_only"):
        safe_load(path)


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"step": 1}, path)

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(OSError):
        atomic_save({"step": 2}, path)
    assert safe_load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_script_entry_point_runs_without_install(tmp_path):
    r = subprocess.run([sys.executable, str(PROJECT_ROOT / "gans" / "train_gan.py"), "--cfg",
                        "sngan.yaml", "--dry-run"], capture_output=True, text=True, cwd=tmp_path,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0 and "family: sngan" in r.stdout


def test_ema_warms_up_then_follows_the_decay():
    from torch.optim.swa_utils import AveragedModel
    from histosynth.engine import ema_with_warmup

    net = torch.nn.Linear(1, 1, bias=False)
    net.weight.data.fill_(0.0)
    ema = AveragedModel(net, multi_avg_fn=ema_with_warmup(0.999), use_buffers=True)
    ema.update_parameters(net)                     # first call copies: 0
    net.weight.data.fill_(1.0)
    ema.update_parameters(net)                     # n=1: decay (1+1)/(10+1) = 2/11
    assert ema.module.weight.item() == pytest.approx(1 - 2 / 11)
    for _ in range(20000):
        ema.update_parameters(net)
    net.weight.data.fill_(2.0)
    ema.update_parameters(net)                     # long run: plain decay 0.999
    assert ema.module.weight.item() == pytest.approx(1.0 + 0.001, abs=1e-5)


def test_unconditional_run_has_one_grid_row_and_ignores_labels(crc_mini, tmp_path):
    out = tmp_path / "run"
    assert train_main(_args(crc_mini, out, "dcgan", **{"model.conditioning": "none"})) == 0
    ck = safe_load(RunDir(out).last)
    assert ck["task_state"]["num_classes"] == 0 and ck["info"]["num_classes"] == 0
    assert not any("embed" in k for k in ck["modules"]["D"])
    assert Image.open(RunDir(out).samples / "step_000006.png").height == 34 + 2


def test_kid_is_logged_during_training_and_resume_stays_exact(crc_mini, tmp_path, monkeypatch):
    extra = {"train.kid_every": 2, "train.kid_samples": 16}
    cfg = tiny_config(crc_mini, **extra)
    train_gan(cfg, tmp_path / "full", progress=False)
    rows = [json.loads(x) for x in RunDir(tmp_path / "full").metrics.read_text().splitlines()]
    kids = [r for r in rows if "kid" in r]
    assert [r["step"] for r in kids] == [2, 4, 6] and all(r["kid"] == r["kid"] for r in kids)
    # the KID pass must not touch the training random streams: same weights as without it
    train_gan(tiny_config(crc_mini), tmp_path / "plain", progress=False)
    assert_same_state(safe_load(RunDir(tmp_path / "full").last),
                      safe_load(RunDir(tmp_path / "plain").last))


def test_kid_does_not_disturb_the_global_rng():
    from metrics.distribution import kid
    torch.manual_seed(123)
    a, b = torch.randn(20, 8).double(), torch.randn(30, 8).double()
    before = torch.get_rng_state()
    kid(a, b)
    assert torch.equal(before, torch.get_rng_state())


def test_compiled_steps_train_the_same_model(crc_mini, tmp_path):
    """train.compile: on runs the steps through torch.compile's wrappers; the checkpoint holds the
    plain modules (same keys, loadable eagerly) and the weights follow the eager run's to within
    float reordering (fp32 here, so the comparison is tight)."""
    sets = {"train.amp": "off", "train.channels_last": "off", "train.steps": 3, "train.ema_decay": 0.0}
    eager, comp = tmp_path / "eager", tmp_path / "compiled"
    torch.manual_seed(0)
    train_gan(tiny_config(crc_mini, "dcgan", **sets), eager, progress=False)
    torch.manual_seed(0)
    train_gan(tiny_config(crc_mini, "dcgan", **sets, **{"train.compile": "on"}), comp, progress=False)
    a, b = safe_load(RunDir(eager).last), safe_load(RunDir(comp).last)
    for name in ("G", "D"):
        assert a["modules"][name].keys() == b["modules"][name].keys()
        for k, v in a["modules"][name].items():
            if v.is_floating_point():
                assert torch.allclose(v, b["modules"][name][k], atol=2e-4), f"{name}.{k}"
    rows = [json.loads(line) for line in RunDir(comp).metrics.read_text().splitlines()]
    assert all(math.isfinite(r["loss_d"]) and math.isfinite(r["loss_g"]) for r in rows)


def test_compile_wraps_the_step_networks_and_leaves_spectral_norm_eager(crc_mini):
    from torch._dynamo.eval_frame import OptimizedModule
    data = load_data(tiny_config(crc_mini, "dcgan"), progress=False)
    task = GANTask(tiny_config(crc_mini, "dcgan"), data, Runtime.from_choices("cpu", compile="on"))
    assert isinstance(task.run_G, OptimizedModule) and isinstance(task.run_D, OptimizedModule)
    assert task.modules["G"] is task.G and not isinstance(task.G, OptimizedModule)
    with pytest.warns(UserWarning, match="spectral norm and stays eager"):
        task = GANTask(tiny_config(crc_mini, "sngan"), data, Runtime.from_choices("cpu", compile="on"))
    assert isinstance(task.run_G, OptimizedModule) and task.run_D is task.D
    off = GANTask(tiny_config(crc_mini, "dcgan"), data, Runtime.from_choices("cpu"))
    assert off.run_G is off.G and off.run_D is off.D
