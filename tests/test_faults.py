"""The fault-injection harness. CI runs a few SIGKILLs (random and inside atomic writes) of two
jobs; every job with many kills is marked ``slow`` and runs with ``python -m pytest -m slow``."""

import pytest

from fault_harness import JOBS, main as harness_main, run_job


def _assert_resumed_exactly(r: dict, min_kills: int) -> None:
    assert r["kills"] >= min_kills and r["kills_inside_a_write"] >= 1, r
    assert r["reached_end"] and r["identical_to_uninterrupted"], r
    assert r["tracebacks"] == 0 and not r["temp_files_left"] and not r["unloadable_checkpoints"], r


@pytest.mark.parametrize("job", ["dcgan", "compare"])
def test_killed_runs_resume_to_the_uninterrupted_result(job, tmp_path):
    _assert_resumed_exactly(run_job(job, kills=3, work=tmp_path, seed=1), 2)


@pytest.mark.slow
@pytest.mark.parametrize("job", sorted(JOBS))
def test_every_job_survives_many_kills(job, tmp_path):
    """Every harness job (GAN families, ACGAN, ADA + LeCam, diffusion, CycleGAN, pix2pix, DDP,
    segmentation, classifier, compare), ten kills each."""
    _assert_resumed_exactly(run_job(job, kills=10, work=tmp_path, seed=2), 5)


def test_harness_writes_its_table(tmp_path):
    assert harness_main(["--jobs", "classifier", "--kills", "1", "--out", str(tmp_path)]) == 0
    assert "| classifier |" in (tmp_path / "faults.md").read_text()
