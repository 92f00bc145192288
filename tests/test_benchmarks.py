"""benchmarks/run.py on a fresh clone: bundled data only, the CPU recorded with every figure, and a
failed section named in the results while the sections that finished are kept."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from histosynth.config import PROJECT_ROOT


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_run", PROJECT_ROOT / "benchmarks" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_failed_section_is_named_and_the_others_are_kept(tmp_path, monkeypatch):
    bench = _bench_module()
    real_run = subprocess.run

    def run(cmd, **kw):                       # the conv section's process dies; data runs for real
        if "--_child" in cmd and cmd[cmd.index("--_child") + 1] == "conv":
            return subprocess.CompletedProcess(cmd, 1, "", "Traceback ...\nRuntimeError: out of memory\n")
        return real_run(cmd, **kw)

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(sys, "argv", ["run.py", "--sections", "conv", "data", "--iters", "1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="conv"):
        bench.main()
    saved = json.loads((tmp_path / "benchmarks.json").read_text())
    assert saved["meta"]["failed"] == {"conv": "RuntimeError: out of memory"}
    assert {r["section"] for r in saved["results"]} == {"data"} and len(saved["results"]) == 3
    assert all(r["s"] > 0 for r in saved["results"])
    meta = saved["meta"]
    assert meta["torch_cpu_capability"] and isinstance(meta["cpu_flags"], list) and meta["cpu"]
    md = (tmp_path / "benchmarks.md").read_text()
    assert "section conv FAILED: RuntimeError: out of memory" in md and "CPU: " in md and "flags" in md


def test_the_cyclegan_section_runs_on_bundled_data_alone():
    """It once read ../shared/data/stain: on a fresh clone elsewhere the whole run then failed."""
    from gans.families.cyclegan import load_data
    bench = _bench_module()
    cfg = bench.cyclegan_config(4, 128)
    a, b = load_data(cfg, progress=False)
    assert len(a) >= 4 and len(b) >= 4 and a.images.shape[-1] == 256
    for root in (cfg.data.root_a, cfg.data.root_b):
        assert str(root).startswith(str(PROJECT_ROOT / "data")), root
