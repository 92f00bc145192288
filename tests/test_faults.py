"""The fault-injection harness. CI runs a few SIGKILLs (random and inside atomic writes) of two
jobs; every job with many kills is marked ``slow`` and runs with ``python -m pytest -m slow``."""

import json

import pytest

from fault_harness import JOBS, main as harness_main, run_job


def _assert_resumed_exactly(r: dict, min_kills: int) -> None:
    assert r["kills"] >= min_kills and r["kills_inside_a_write"] >= 1, r
    assert r["reached_end"] and r["identical_to_uninterrupted"], r
    assert r["tracebacks"] == 0 and not r["temp_files_left"] and not r["unloadable_checkpoints"], r


def test_killed_gan_run_resumes_to_the_uninterrupted_result_and_the_harness_writes_its_table(tmp_path):
    """Through the harness's command line, as its docstring tells a developer to run it."""
    rc = harness_main(["--jobs", "dcgan", "--kills", "3", "--seed", "1", "--out", str(tmp_path)])
    (row,) = json.loads((tmp_path / "faults.json").read_text())
    _assert_resumed_exactly(row, 2)
    assert rc == 0
    assert f"| dcgan | {row['kills']} |" in (tmp_path / "faults.md").read_text()


def test_killed_compare_resumes_to_the_uninterrupted_result(tmp_path):
    _assert_resumed_exactly(run_job("compare", kills=3, work=tmp_path, seed=1), 2)


@pytest.mark.slow
@pytest.mark.parametrize("job", sorted(JOBS))
def test_every_job_survives_many_kills(job, tmp_path):
    """Every harness job (GAN families, ACGAN, ADA + LeCam, diffusion, CycleGAN, pix2pix, DDP,
    segmentation, classifier, compare), ten kills each."""
    _assert_resumed_exactly(run_job(job, kills=10, work=tmp_path, seed=2), 5)
