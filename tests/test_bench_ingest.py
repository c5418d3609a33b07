"""The ingestion scaling benchmark at smoke size: the same work as the baseline, skipped re-runs,
ticks that download nothing when nothing is new, and a report that says so."""

from __future__ import annotations

import pytest

from bench import ingest_scaling

pytestmark = pytest.mark.integration


def test_ingest_scaling_smoke_run_measures_the_same_work_side_by_side(services, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_BUCKET", "bench-ingest-smoke")
    results = ingest_scaling.measure([900], [400, 900], 150, tmp_path, before=False)

    for row in results["rows"]:
        perennial, baseline = row["perennial"], row["baseline"]
        assert (perennial["counts"]["train"], perennial["counts"]["test"]) == (baseline["counts"]["train"], baseline["counts"]["test"])
        assert perennial["counts"]["read"] == row["records"] and perennial["peak_rss_bytes"] > 10_000_000
        assert row["rerun"]["skipped"] and row["rerun"]["counts"]["read"] == 0
    inc = results["incremental"]["now"]
    assert inc["tick"]["created"] and inc["tick"]["counts"]["read"] == 150
    assert inc["tick"]["counts"]["accepted"] == inc["standalone"]["counts"]["accepted"] - inc["tick"]["rejected"].get("duplicate_previous", 0)
    noop = inc["noop"]
    assert not noop["created"] and noop["counts"]["read"] == 0 and noop["rejected"] == {} and noop["work_dir_bytes"] == 0
    assert [run["records"] for run in results["rss"]] == [400, 900]

    report = {"command": "python -m bench.ingest_scaling --quick", "measured_at": "now", "total_wall_s": 1.0,
              "machine": {"cpu_model": "cpu", "logical_cores": 2, "memory_gib": 1, "torch_threads": 1, "python": "3",
                          "platform": "linux"},
              "load_average_1min": {"before": 0.0, "after": 0.0}, "before_commit": "x", "results": results}  # fmt: skip
    text = ingest_scaling.markdown(report)
    assert "| 900 |" in text and "agree at every size" in text
    assert "900: skipped" in text and "Largest / smallest peak RSS" in text and "| 400 |" in text
