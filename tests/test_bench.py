"""The benchmark scripts measure what they say: real flow runs, real transfers, honest arithmetic."""

import json
import time
import types
from pathlib import Path

import pytest
from prefect import flow, task

from bench import engine_throughput, report, system_perf

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@pytest.mark.integration
def test_flow_timing_splits_wall_time_into_task_bodies_and_overhead(prefect_harness):
    tasks = types.SimpleNamespace(short=task(_sleep, name="short"), long=task(_sleep, name="long"))
    original = tasks.short.fn

    @flow
    def toy():
        time.sleep(0.3)  # flow-body work outside any task: it must count as overhead, not as task time
        return tasks.short(0.1) + tasks.long(0.4)

    result, timing = system_perf.measure_flow(toy, tasks)

    assert result == pytest.approx(0.5)
    assert tasks.short.fn is original  # the timing wrappers are gone after the run
    bodies = {row["task"]: row["seconds"] for row in timing["task_bodies"]}
    assert set(bodies) == {"short", "long"}
    assert 0.1 <= bodies["short"] < 0.4 <= bodies["long"]
    assert timing["task_bodies_s"] == pytest.approx(sum(bodies.values()))
    assert timing["overhead_s"] == pytest.approx(timing["wall_s"] - timing["task_bodies_s"])
    assert timing["overhead_s"] >= 0.3
    assert sum(timing["overhead_parts_s"].values()) == pytest.approx(timing["overhead_s"])
    # Prefect's own accounting, read back from its API, brackets the bodies it ran
    assert len(timing["prefect"]["task_runs"]) == 2
    assert timing["prefect"]["task_runs_running_s"] >= 0.5
    assert timing["prefect"]["flow_run_running_s"] >= timing["prefect"]["task_runs_running_s"]


@pytest.mark.integration
def test_s3_benchmark_moves_the_same_bytes_with_every_method(services, tmp_path):
    result = system_perf.bench_s3(services, tmp_path, size_mb=2, rounds=1,
                                  sweep=[{"threshold_mb": 1, "chunk_mb": 1, "concurrency": 2}])

    assert set(result["median_mb_s"]) == {"ObjectStore", "boto3 tuned", "boto3 default"}
    assert result["tuned_transfer_config"] == {"threshold_mb": 1, "chunk_mb": 1, "concurrency": 2}
    assert result["checkpoint_files"]["model.safetensors"] > 2_000_000
    for name, rates in result["median_mb_s"].items():
        assert rates["upload"] > 0 and rates["download"] > 0, name
    assert result["ratios"]["download"]["ObjectStore/boto3 tuned"] == pytest.approx(
        result["median_mb_s"]["ObjectStore"]["download"] / result["median_mb_s"]["boto3 tuned"]["download"])
    markdown = "\n".join(system_perf.s3_markdown(result))
    assert "| ObjectStore |" in markdown and "threshold 1 MiB, chunk 1 MiB, 2 threads" in markdown


def _overhead(pct: float) -> dict:
    bodies = 100.0
    return {"config_name": "configs/demo.yaml", "wall_s": bodies * (1 + pct / 100), "task_bodies_s": bodies,
            "compute_stages_s": 90.0, "bookkeeping_tasks_s": 10.0, "overhead_s": pct, "overhead_pct": pct,
            "overhead_parts_s": {"a": pct}, "task_bodies": [{}] * 14,
            "prefect": {"flow_run_running_s": 100.0, "task_runs_running_s": 100.0},
            "stages": {"ingest": 1.0, "base": 2.0, "dap": 3.0, "cit_total": 4.0, "cit_stages": 3, "eval_total": 5.0,
                       "eval_stages": 4, "bookkeeping": 10.0}}


def test_overhead_verdict_follows_the_five_percent_target():
    assert "target <= 5%: met" in "\n".join(system_perf.overhead_markdown(_overhead(4.9)))
    assert "target <= 5%: NOT met" in "\n".join(system_perf.overhead_markdown(_overhead(5.1)))


def test_scaling_doubles_the_data_counts_and_keeps_training_steps(tmp_path):
    services = types.SimpleNamespace(s3_endpoint="http://127.0.0.1:1", mlflow_uri="http://127.0.0.1:2")
    base = system_perf.scaling_base(quick=False)
    label, config = system_perf.scaled_config(services, tmp_path, ["reverse", "arithmetic"], 4, base)
    assert label == "t2-x4"
    for key in system_perf.DATA_COUNTS:
        assert getattr(config.data.demo, key) == 4 * base["data"]["demo"][key]
    assert config.cit.optim.max_steps == base["cit"]["optim"]["max_steps"]
    assert config.storage.bucket.startswith("bench-t2-x4-")  # a fresh bucket: nothing comes from a cache
    # x4 of the full mode is the demo's training data; reverse has enough distinct examples for it
    assert system_perf.train_records(config)["reverse"] == 400


def test_every_section_is_published_with_its_json():
    assert [name for name, _, _ in report.SECTIONS if (RESULTS / f"{name}.json").exists() and (RESULTS / f"{name}.md").exists()] == \
        [name for name, _, _ in report.SECTIONS]


@pytest.mark.parametrize("name", [name for name, _, _ in report.SECTIONS])
def test_every_published_section_rerenders_from_its_json(name, tmp_path):
    """Each committed <name>.md is what its benchmark's markdown() renders from <name>.json (`python -m bench.report
    --render`): the same text where the benchmark words it; the CL comparisons, worded by `perennial compare`, which has
    gained sections since, give every number of each published table row and line, in order."""
    from tests.test_compare import _each_found_in_order, _numbered_lines

    published, rendered = (RESULTS / f"{name}.md").read_text(), report.render(name)
    if name.startswith("cl_quality"):
        assert _numbered_lines(published) and _each_found_in_order(_numbered_lines(published), _numbered_lines(rendered))
    else:
        assert rendered.rstrip() == published.rstrip()
    (tmp_path / f"{name}.json").write_text((RESULTS / f"{name}.json").read_text())
    assert report.main(["--results", str(tmp_path), "--output", str(tmp_path / "B.md"), "--render", name]) == 0
    assert (tmp_path / f"{name}.md").read_text() == rendered.rstrip() + "\n"


@pytest.mark.usefixtures("single_torch_thread")
def test_engine_benchmark_quick_runs_end_to_end_with_the_fresh_process_runs_stubbed(tmp_path, monkeypatch):
    """`--quick` of both models: the plan (runs, memory rows, settings), the report and its section; the tiny model's
    three loops really train, the runs that need a fresh process each (SmolLM2's, every memory row) are stubbed."""
    calls = []

    def child(module, *args, **_):
        calls.append(args)
        if "--run-child" in args:
            return {"cpu": 100.0, "wall": 90.0, "wall_window": 80.0, "minor_faults_per_step": 5.0}
        kind, name = args[args.index("--rss-child") + 1:][:2]
        return {"kind": kind, "method": name, "tuning": name, "trainable_params": 1, "ru_maxrss_mib": 700.0, "rss_before_model_mib": 500.0,
                "training_peak_above_baseline_mib": 200.0, "steps": int(args[args.index("--rss-steps") + 1]), "tokens_per_s_whole_run": 3.0}

    monkeypatch.setattr(engine_throughput, "child", child)
    assert engine_throughput.main(["--quick", "--output", str(tmp_path / "real.json")]) == 0
    real = json.loads((tmp_path / "real.json").read_text())
    assert list(real["tokens_per_s"]) == ["engine bf16", "engine fp32"] and real["ratios"]["engine / plain (bf16)"] is None
    assert (real["settings"]["steps"], real["settings"]["warmup_steps_excluded"], real["settings"]["threads"]) == (3, 1, 2)
    assert [(row["kind"], row["method"], row["steps"]) for row in real["peak_rss"]] == [("tuning", "full", 2), ("tuning", "attn-proj", 2), ("cl", "lwf", 2)]
    assert (tmp_path / "real.md").read_text() == engine_throughput.markdown(real).rstrip() + "\n"
    assert "| engine bf16 / engine fp32 (full) | 1.00x | >= 1.5x: NOT met |" in engine_throughput.markdown(real)

    calls.clear()
    assert engine_throughput.main(["--model", "tiny", "--quick", "--output", str(tmp_path / "tiny.json")]) == 0
    tiny = json.loads((tmp_path / "tiny.json").read_text())
    assert [args[:4] for args in calls] == [("--model", "tiny", "--rss-child", "tuning")] * 2  # only the memory rows leave the process
    assert set(tiny["tokens_per_s"]) == {"engine", "plain", "trainer"} and tiny["settings"]["steps"] == 8
    assert all(value > 0 for clock in tiny["ratios"].values() for value in clock.values())
    assert (tmp_path / "tiny.md").read_text().startswith("## Training engine: the tiny model")


def test_tiny_engine_section_renders_from_the_committed_numbers():
    report = json.loads((ROOT / "bench" / "results" / "engine_throughput_tiny.json").read_text())
    text = engine_throughput.markdown(report)
    assert text.startswith("## Training engine: the tiny model")
    assert f"| engine/plain | {report['ratios']['cpu']['engine/plain']:.3f} |" in text
    assert report["command"] in text


def test_real_model_engine_section_renders_from_the_committed_numbers():
    report = json.loads((ROOT / "bench" / "results" / "engine_throughput.json").read_text())
    text = engine_throughput.markdown(report)
    assert text.startswith("## Training engine\n") and report["command"] in text
    bf16_over_fp32 = report["ratios"]["engine bf16 / engine fp32 (full)"]
    assert f"| engine bf16 / engine fp32 (full) | {bf16_over_fp32:.2f}x |" in text
    assert {row["method"] for row in report["peak_rss"]} >= {"full", "attn-proj", "ewc", "lwf", "seekr"}


def test_lineage_bench_judges_cost_and_ap_whichever_way_they_go():
    """bench/lineage.py's verdicts: night N against night 1 continuing (every cost key), the final AP gap, and the
    'same scores' line only where every cell the continued lineage measured equals the from-base one."""
    from bench import lineage

    def night(mode, n, tokens, cpu, ap, matrix):
        return {"mode": mode, "night": n, "trained": [], "cit_tokens": tokens, "cit_train_s": cpu, "cpu_s": cpu, "wall_s": cpu,
                "ap": ap, "bwt": None, "capitals": 0.0, "capitals_base": 0.7, "accuracy_matrix": matrix}

    nights = [night("continue", 1, 100, 60, 0.5, [[0.0], [0.5]]), night("from base", 1, 100, 60, 0.5, [[0.0], [0.5]]),
              night("continue", 2, 110, 70, 0.6, [[0.0, None], [0.5, 0.1], [0.4, 0.8]]),
              night("from base", 2, 210, 130, 0.6, [[0.0, 0.0], [0.5, 0.1], [0.4, 0.8]])]
    verdict = lineage.verdicts(nights)
    assert verdict["cost"]["holds"] and verdict["ap"]["holds"] and verdict["from_base_cost_ratio"]["cit_tokens"] == 2.1
    from bench.common import machine

    report = {"command": "x", "measured_at": "t", "machine": machine(), "load": "", "description": "", "wall_minutes": 1.0,
              "nights": nights, "verdicts": verdict}
    assert "score the same after every night" in lineage.markdown(report)

    nights[2].update(cpu_s=90, ap=0.55, accuracy_matrix=[[0.0, None], [0.5, 0.1], [0.3, 0.8]])
    verdict = lineage.verdicts(nights)
    assert not verdict["cost"]["holds"] and not verdict["ap"]["holds"]  # CPU x1.5; AP gap -0.05
    assert "score the same" not in lineage.markdown({**report, "nights": nights, "verdicts": verdict})


def test_retention_bench_judges_the_bound_and_the_stage_size_whichever_way_they_go():
    """bench/retention.py's verdicts: S3 with the policy on against what the kept versions reference plus one checkpoint
    in flight and against 3 full checkpoints; what each night adds with the policy off against 0.4 of one."""
    from bench import retention
    from bench.common import machine

    full = 1000

    def night(policy, n, s3, added, needed):
        return {"policy": policy, "night": n, "s3_bytes": s3, "s3_objects": 1, "added_bytes": added, "local_bytes": 0,
                "mlflow_bytes": 2 * full, "gc": None, "needed": {"bytes": needed, "mlflow_bytes": 2 * full, "full_checkpoint": full}}

    nights = [night("policy off", 1, 2000, 2000, 2000), night("policy off", 2, 2200, 200, 2200), night("policy off", 3, 2400, 200, 2400),
              night("policy on", 3, 2300, 100, 2300)]
    verdict = retention.verdicts(nights)
    assert verdict["bound"]["holds"] and verdict["bound"]["holds_3x"] and verdict["stage"]["holds"]
    assert verdict["stage"]["max_x_full"] == 0.2 and verdict["bound"]["off_with_mlflow"] == 4.4
    report = {"command": "x", "measured_at": "t", "machine": machine(), "description": "", "nights": nights, "verdicts": verdict}
    assert "holds" in retention.markdown(report) and "does not hold" not in retention.markdown(report)

    nights[-1].update(s3_bytes=3500)  # over needed + one checkpoint, and over 3 checkpoints
    nights[2].update(added_bytes=500)
    verdict = retention.verdicts(nights)
    assert not verdict["bound"]["holds"] and not verdict["bound"]["holds_3x"] and not verdict["stage"]["holds"]
    assert "does not hold" in retention.markdown({**report, "nights": nights, "verdicts": verdict})
