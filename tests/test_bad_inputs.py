"""Every CLI against the generated bad-input corpus: a skip-and-report warning or a one-line
error naming the problem, a non-zero exit for errors, never a traceback, never lost outputs."""

import hashlib
from pathlib import Path

import pytest

from bad_inputs import ODD_READABLE, UNREADABLE, make_corpus
from conftest import tiny_overrides
from test_cyclegan import tiny_cycle_sets

from experiments.augment_compare import main as compare_main
from gans.cyclegan_eval import main as eval_main
from gans.generate import main as generate_main
from gans.train_gan import main as train_main
from gans.translate import main as translate_main
from metrics.report import main as report_main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, crc_mini):
    return make_corpus(tmp_path_factory.mktemp("bad") / "corpus", crc_mini)


def _run(main, argv, capsys):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, err


def _sets(items):
    return sum((["--set", s] for s in items), [])


def _one_line_error(rc, err, prog, *needles):
    errors = [line for line in err.splitlines() if line.startswith(f"{prog}: error:")]
    assert rc == 2 and len(errors) == 1, err
    for n in needles:
        assert n in errors[0], (n, errors[0])


def _skipped_and_read(err):
    for name in UNREADABLE:
        assert name in err, f"{name} was not reported as skipped"
    for name in ODD_READABLE:
        assert name not in err, f"{name} should have been converted, not skipped"


def _first_runs_and_second_is_refused(main, prog, first, second, out, needle, capsys):
    """``first`` succeeds with every bad file reported; ``second`` into the same ``out`` is refused
    with one line naming ``needle``, and ``out`` is byte-for-byte unchanged."""
    rc, err = _run(main, first, capsys)
    assert rc == 0
    _skipped_and_read(err)
    before = _tree_digest(out)
    rc, err = _run(main, second, capsys)
    _one_line_error(rc, err, prog, needle)
    assert _tree_digest(out) == before


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


COMPARE_FAST = ["downstream.model.image_size=32", "downstream.train.batch_size=8", "downstream.train.epochs=1",
                "downstream.train.patience=0", "downstream.train.min_epochs=0", "downstream.train.device=cpu",
                "generators={}", "seeds=[0]", "arms=[{name: real_only}]"]


def test_train_gan(corpus, tmp_path, capsys):
    args = ["--cfg", "dcgan", "--out", tmp_path / "r", "--no-progress"]
    _first_runs_and_second_is_refused(
        train_main, "train-gan", args + _sets(tiny_overrides(corpus / "images", **{"train.steps": 2})),
        args + _sets(tiny_overrides(corpus / "images")), tmp_path / "r", "pass --resume", capsys)
    rc, err = _run(train_main, ["--cfg", "dcgan", "--out", tmp_path / "e", "--no-progress",
                                *_sets(tiny_overrides(corpus / "empty_class"))], capsys)
    _one_line_error(rc, err, "train-gan", "empty class folder", "Add images or remove the folder")


@pytest.mark.parametrize("name, needle", [
    ("unknown_key", "model.chanels: unknown key"), ("wrong_type", "train.steps: expected an integer"),
    ("negative_lr", "train.lr_g"), ("missing_path", "/nonexistent/histosynth/data"),
    ("not_a_mapping", "must be a mapping"), ("broken", "not valid YAML")])
def test_bad_yaml(name, needle, corpus, tmp_path, capsys):
    rc, err = _run(train_main, ["--cfg", corpus / "yaml" / f"{name}.yaml", "--out", tmp_path / "r",
                                "--no-progress"], capsys)
    _one_line_error(rc, err, "train-gan", needle)
    if name in ("unknown_key", "wrong_type", "not_a_mapping", "broken"):
        rc, err = _run(compare_main, ["--cfg", corpus / "yaml" / f"{name}.yaml", "--out", tmp_path / "c",
                                      "--no-progress"], capsys)
        _one_line_error(rc, err, "augment-compare")


def test_generate_and_translate(corpus, trained_run, stain_domains, tmp_path, capsys):
    rc, err = _run(generate_main, ["--run", tmp_path / "missing", "--per-class", 2, "--out", tmp_path / "g"], capsys)
    _one_line_error(rc, err, "gan-generate", "missing")
    # a checkpoint of another family: a GAN run given to gan-translate
    rc, err = _run(translate_main, ["--run", trained_run, "--input", corpus / "flat", "--out", tmp_path / "t",
                                    "--direction", "a2b"], capsys)
    _one_line_error(rc, err, "gan-translate", "sngan")
    cycle = tmp_path / "cycle"
    assert train_main(["--cfg", "cyclegan_cpu", "--out", str(cycle), "--no-progress",
                       *_sets(tiny_cycle_sets(*stain_domains, **{"train.steps": 2, "eval.max_images": 1}))]) == 0
    capsys.readouterr()
    rc, err = _run(generate_main, ["--run", cycle, "--per-class", 2, "--out", tmp_path / "g"], capsys)
    _one_line_error(rc, err, "gan-generate", "cyclegan")
    rc, err = _run(translate_main, ["--run", cycle, "--input", corpus / "flat", "--out", tmp_path / "t",
                                    "--direction", "a2b", "--device", "cpu"], capsys)
    assert rc == 0
    _skipped_and_read(err)
    # unpaired names in a paired CycleGAN test split: reported, not a crash
    rc, err = _run(eval_main, ["--run", cycle, "--test-a", corpus / "unpaired" / "a", "--test-b",
                               corpus / "unpaired" / "b"], capsys)
    assert rc == 0 and "no partner" in err and "x1" in err and "y2" in err, err


def test_piq_report(corpus, tmp_path, capsys):
    args = ["--real", corpus / "images", "--fake", corpus / "images", "--out", tmp_path / "p", "--no-progress"]
    _first_runs_and_second_is_refused(report_main, "piq-report", args + ["--size", 32, "--boot", 0], args,
                                      tmp_path / "p", "already exists", capsys)
    rc, err = _run(report_main, ["--real", corpus / "empty_class", "--fake", corpus / "images", "--out",
                                 tmp_path / "q", "--no-progress"], capsys)
    _one_line_error(rc, err, "piq-report", "empty class folder")


def test_augment_compare(corpus, tmp_path, capsys):
    args = ["--cfg", "compare_demo", "--out", tmp_path / "c", "--no-progress",
            *_sets([f"data.root={corpus / 'split'}", *COMPARE_FAST])]
    _first_runs_and_second_is_refused(compare_main, "augment-compare", args, args + ["--set", "seeds=[1]"],
                                      tmp_path / "c", "differs in seeds", capsys)
    for root, needle in ((corpus / "empty_class", "no train/ val/ test/"), (tmp_path / "nowhere", "nowhere")):
        rc, err = _run(compare_main, ["--cfg", "compare_demo", "--out", tmp_path / "d", "--no-progress",
                                      *_sets([f"data.root={root}", *COMPARE_FAST])], capsys)
        assert rc == 2 and "Traceback" not in err, err
    rc, err = _run(compare_main, ["--cfg", "compare_demo", "--out", tmp_path / "d", "--no-progress",
                                  *_sets([*COMPARE_FAST, f"data.root={corpus / 'split'}", "report.baseline=x",
                                          "arms=[{name: x, synthetic: {source: /nowhere, ratio: 1}}]"])], capsys)
    _one_line_error(rc, err, "augment-compare", "/nowhere")


def test_cuda_out_of_memory_names_the_batch_size_to_lower(crc_mini, tmp_path, capsys, monkeypatch):
    import torch
    from gans.adversarial import GANTask

    def oom(self, *args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(GANTask, "d_step", oom)
    rc, err = _run(train_main, ["--cfg", "sngan", "--out", tmp_path / "r", "--no-progress",
                                *_sets(tiny_overrides(crc_mini))], capsys)
    _one_line_error(rc, err, "train-gan", "out of GPU memory", "train.batch_size")
