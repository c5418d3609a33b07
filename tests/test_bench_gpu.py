"""bench/gpu.py, the device run, on the CPU: its dry run takes every section's code path in seconds, so the run on a
lent GPU cannot fail on a typo; the sizes it measures there, its reading of pytest's output and of device names."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from bench import gpu

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_takes_every_sections_path_on_the_cpu_and_renders_from_its_json(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.gpu", "--dry-run", "--output-dir", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    sections = report["sections"]
    assert report["dry_run"] and [name for name, section in sections.items() if "error" in section] == []
    runs = sections["throughput"]["runs"]
    assert [(row["model"], row["run"]) for row in runs] == [(model, run) for model in gpu.MODELS for run in gpu.RUNNERS]
    assert all(row["tokens_per_s"] > 0 and row["mfu"] > 0 for row in runs), runs
    assert sections["tests"]["counts"] == {"PASSED": 1} and sections["tests"]["exit_status"] == 0
    assert sections["cl"]["exit_status"] == 0  # the CL run's arguments parse: its methods are the benchmark's recipes
    assert (tmp_path / "gpu.md").read_text() == gpu.markdown(report).rstrip() + "\n"


def test_a_failing_section_is_recorded_the_next_runs_and_a_rerun_keeps_the_others(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("no such thing")

    monkeypatch.setitem(gpu.SECTIONS, "tests", broken)
    monkeypatch.setitem(gpu.SECTIONS, "cl", lambda out, dry, deadline: {"command": "x", "dry_run": "not run"})
    assert gpu.main(["--dry-run", "--sections", "tests", "cl", "--output-dir", str(tmp_path)]) == 0
    monkeypatch.setitem(gpu.SECTIONS, "cl", lambda out, dry, deadline: {"command": "y", "dry_run": "again"})
    assert gpu.main(["--dry-run", "--sections", "cl", "--output-dir", str(tmp_path)]) == 0
    sections = json.loads((tmp_path / "gpu.json").read_text())["sections"]
    assert sections["tests"]["error"] == "RuntimeError: no such thing" and sections["cl"]["dry_run"] == "again"
    assert "RuntimeError: no such thing" in (tmp_path / "gpu.md").read_text()


def test_the_device_run_measures_a_110m_llama_and_smollm2s_shape():
    with torch.device("meta"):
        params = {name: sum(p.numel() for p in gpu.build(name, dry=False).parameters()) for name in gpu.MODELS}
    assert params["smollm2-135m"] == 134_515_008  # SmolLM2-135M-Instruct's own count
    assert 100e6 < params["llama-110m"] < 120e6


def test_pytest_outcomes_are_read_with_and_without_xdist():
    parsed = gpu.parse_pytest("\n".join([
        "[gw0] [ 50%] PASSED tests/test_a.py::test_x[engine bf16]",
        "[gw1] [100%] FAILED tests/test_b.py::test_y",
        "tests/test_c.py::test_z SKIPPED (no GPU)                [ 10%]",
        "FAILED tests/test_b.py::test_y - AssertionError: 1 != 2",
        "ERROR tests/test_d.py - ModuleNotFoundError: No module named 'mlflow'",
    ]))
    assert parsed["counts"] == {"ERROR": 1, "FAILED": 1, "PASSED": 1, "SKIPPED": 1}
    assert parsed["failures"] == [{"test": "tests/test_b.py::test_y", "outcome": "FAILED", "message": "AssertionError: 1 != 2"},
                                  {"test": "tests/test_d.py", "outcome": "ERROR", "message": "ModuleNotFoundError: No module named 'mlflow'"}]


def test_a_device_gets_the_peak_of_the_longest_name_in_the_table():
    assert [gpu.datasheet_tflops(name) for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H200", "NVIDIA A100-SXM4-80GB",
                                                     "NVIDIA L40S", "NVIDIA L4", "Tesla T4")] == [989, 756, 989, 312, 362, 121, None]
