"""The fault-injection harness, CI-sized: a few SIGKILLs (random and inside atomic writes) per job."""

import pytest

from fault_harness import main as harness_main, run_job


@pytest.mark.parametrize("job", ["dcgan", "compare", "ddp_wgan_gp"])
def test_killed_runs_resume_to_the_uninterrupted_result(job, tmp_path):
    r = run_job(job, kills=3, work=tmp_path, seed=1)
    assert r["kills"] >= 2 and r["kills_inside_a_write"] >= 1, r
    assert r["reached_end"] and r["identical_to_uninterrupted"], r
    assert r["tracebacks"] == 0 and not r["temp_files_left"] and not r["unloadable_checkpoints"], r


def test_harness_writes_its_table(tmp_path):
    assert harness_main(["--jobs", "classifier", "--kills", "2", "--out", str(tmp_path)]) == 0
    assert "| classifier |" in (tmp_path / "faults.md").read_text()
