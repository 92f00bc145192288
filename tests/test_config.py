"""Typed configs: every shipped YAML loads; bad keys, types and ranges name the key and the file."""

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gans.config import GANConfig
from gans.train_gan import main as train_main
from histosynth import config as configlib
from histosynth.config import CONFIG_DIR, ConfigError

ALL_CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
GAN_CONFIGS = [p for p in ALL_CONFIGS if not p.name.startswith(("compare", "classifier"))]   # test_compare, test_transfer
COMMON = ["data.image_size", "train.steps", "train.batch_size", "train.seed",
          "train.checkpoint_every", "train.sample_every"]


def _get(cfg, dotted):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("path", GAN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_with_the_required_keys(path):
    from gans.families.cyclegan import CycleGANConfig
    from gans.train_gan import load_config

    cfg, _ = load_config(path, [])
    raw = __import__("yaml").safe_load(path.read_text())
    roots = ["data.root_a", "data.root_b"] if isinstance(cfg, CycleGANConfig) else ["data.root"]
    for key in COMMON + roots:
        section, name = key.split(".")
        assert name in raw[section], f"{path.name} does not spell out {key}"
        _get(cfg, key)
    if not isinstance(cfg, CycleGANConfig):
        assert (Path(configlib.PROJECT_ROOT) / cfg.data.root).is_dir(), "demo data must ship"


def test_bare_names_resolve_in_configs():
    assert configlib.resolve_config_path("sngan") == CONFIG_DIR / "sngan.yaml"
    assert configlib.resolve_config_path("sngan.yaml") == CONFIG_DIR / "sngan.yaml"


def test_unknown_key_in_a_file_names_key_file_and_closest(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  stpes: 10\n")
    with pytest.raises(ConfigError) as e:
        configlib.load(GANConfig, f)
    msg = str(e.value)
    assert "train.stpes" in msg and str(f) in msg and "did you mean train.steps" in msg


def test_unknown_section_is_refused(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("trian:\n  steps: 10\n")
    with pytest.raises(ConfigError, match=r"trian: unknown key; did you mean train"):
        configlib.load(GANConfig, f)


@pytest.mark.parametrize("override, fragment", [
    ("model.nonexistent=1", "model.nonexistent: unknown key"),
    ("train.steps=abc", "train.steps: expected an integer"),
    ("train.lr_d=-0.1", "train.lr_d: must be > 0"),
    ("data.image_size=48", "data.image_size: must be 32, 64 or 128"),
    ("train.amp=fp8", "train.amp: 'fp8' is not a valid choice; choose one of 'auto', 'bf16', 'off'"),
    ("model.family=sngn", "did you mean 'sngan'"),
    ("train.diffaugment=color,zoom", "train.diffaugment: unknown policy zoom"),
    ("loss.label_smoothing=0.1", "loss.label_smoothing: only applies to the bce and lsgan"),
    ("train.betas=[0.5]", "train.betas: expected 2 values"),
])
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        configlib.load(GANConfig, "sngan", [override])
    assert fragment in str(e.value) and "--set" in str(e.value)


def test_overrides_are_typed_and_applied():
    cfg, _, _ = configlib.load(GANConfig, "sngan", ["train.steps=7", "train.lr_g=1e-4",
                                                    "train.betas=[0.0, 0.99]"])
    assert cfg.train.steps == 7 and cfg.train.lr_g == 1e-4 and cfg.train.betas == (0.0, 0.99)


def test_auto_loss_resolves_to_the_family_paper_loss():
    for name, loss in [("sngan", "hinge"), ("dcgan", "bce"), ("wgan_gp", "wasserstein")]:
        assert configlib.load(GANConfig, name)[0].loss.type == loss


def test_cli_unknown_key_exits_nonzero_naming_it(capsys):
    assert train_main(["--cfg", "sngan.yaml", "--set", "model.nonexistent=1"]) == 2
    err = capsys.readouterr().err
    assert "model.nonexistent" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_dry_run_prints_the_resolved_config(capsys):
    assert train_main(["--cfg", "sngan", "--set", "train.steps=123", "--dry-run"]) == 0
    out = capsys.readouterr().out
    cfg, _, _ = configlib.load(GANConfig, None, base=__import__("yaml").safe_load(out))
    assert cfg.train.steps == 123 and cfg.loss.type == "hinge"


@settings(max_examples=60, deadline=None)
@given(section=st.sampled_from(["data", "model", "loss", "train"]),
       key=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12),
       value=st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=5), st.booleans()))
def test_property_any_unknown_key_is_rejected_by_name(section, key, value):
    from dataclasses import fields
    known = {f.name for f in fields(type(getattr(GANConfig(), section)))}
    if key in known:
        return
    with pytest.raises(ConfigError) as e:
        configlib.build(GANConfig, {section: {key: value}}, "x.yaml")
    assert f"{section}.{key}" in str(e.value)


@settings(max_examples=60, deadline=None)
@given(steps=st.integers(min_value=-5, max_value=10**6))
def test_property_steps_range(steps):
    if steps >= 1:
        assert configlib.build(GANConfig, {"train": {"steps": steps, "lr_decay_start": 0}}).train.steps == steps
    else:
        with pytest.raises(ConfigError, match="train.steps: must be >= 1"):
            configlib.build(GANConfig, {"train": {"steps": steps}})


def test_bare_on_off_in_yaml_mean_the_choices_not_booleans(tmp_path):
    from classifier.config import ClassifierConfig
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  channels_last: off\n")
    assert configlib.load(ClassifierConfig, p)[0].train.channels_last == "off"
    assert configlib.load(ClassifierConfig, None, ["train.channels_last=on"])[0].train.channels_last == "on"
    assert configlib.load(ClassifierConfig, None, ["train.amp=off"])[0].train.amp == "off"
    with pytest.raises(ConfigError, match="train.amp: True is not a valid choice"):
        configlib.load(ClassifierConfig, None, ["train.amp=on"])      # 'on' is not an amp choice
