"""`perennial compare`: recipes x seeds as continual-retrain subflows, resumed by run key, one report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from perennial import compare

ROOT = Path(__file__).resolve().parents[1]


def run(recipe, seed, ap, bwt, ppl_final, heldout=None):
    result = {"recipe": recipe, "seed": seed, "tasks": ["a", "b"], "accuracy_matrix": [[0.1, 0.1], [0.8, 0.1], [ap, 0.9]],
              "metrics": {"ap": ap, "bwt": bwt, "fwt": 0.0, "forgetting_max": -bwt, "general_ppl_base": 10.0, "general_ppl_final": ppl_final}}
    if heldout is not None:
        result["general_tasks"] = {"h": {"base": 0.5, "final": 0.5 + heldout, "delta": heldout}}
    return result


def test_a_recipes_file_is_names_and_overrides_seeds_and_diagnostics(tmp_path):
    spec = compare.load_spec(ROOT / "configs" / "cl-benchmark-methods.yaml")  # `methods:` reads as recipes
    assert spec.recipes["attn-proj"] == ["cit.tuning.method=attn-proj", "cit.optim.lr=3.0e-4"]
    assert "head-only" in spec.diagnostics and "head-only" not in spec.recipes
    pairs = compare.run_pairs(spec, ["full", "ewc"])
    assert pairs == [("full", 0), ("ewc", 0), ("full", 1), ("full", 2)]  # extra seeds for the recipes the file names
    assert compare.run_pairs(spec, ["full", "ewc"], [3]) == [("full", 3), ("ewc", 3)]

    sweep = compare.load_spec(ROOT / "configs" / "cl-benchmark-sweep.yaml")  # a sweep file: each tuning method at each rate
    assert sweep.sweep and sweep.recipes["lora@0.003"] == ["cit.tuning.method=lora", "cit.optim.lr=0.003", "cit.optim.max_steps=40"]
    (tmp_path / "bad.yaml").write_text("recipes: {a: []}\nbaseline: b\n")
    with pytest.raises(compare.ConfigError, match="baseline 'b'"):
        compare.load_spec(tmp_path / "bad.yaml")


def test_each_run_key_follows_its_recipe_and_seed_not_where_the_services_are():
    def key(overrides, seed, where=()):
        cfg = compare.recipe_config(ROOT / "configs" / "tiny.yaml", [*overrides, *where], seed, lineage="perennial-tiny-x")
        assert cfg.registry.enabled is False and cfg.lineage.continue_from == "none"
        return compare.run_key(cfg, "replay-10%", seed)

    first = key(["cit.replay.budget=0.1"], 0)
    assert first.startswith("tiny-replay-10pct-s0-")
    assert key(["cit.replay.budget=0.1"], 0, ["work_dir=/elsewhere", "tracking.tracking_uri=http://127.0.0.1:9"]) == first
    assert key(["cit.replay.budget=0.2"], 0) != first and key(["cit.replay.budget=0.1"], 1) != first


def test_verdicts_use_one_margin_rule_and_say_it():
    rows = compare.aggregate([run("full", 0, 0.5, -0.3, 500.0, -0.2), run("full", 1, 0.52, -0.1, 500.0, -0.2),
                              run("attn-proj", 0, 0.45, -0.05, 20.0, -0.01), run("lora", 0, 0.51, -0.2, 480.0, -0.19)],
                             ["full", "attn-proj", "lora"], {"a": 0.5, "b": 0.5})
    found = {(v["recipe"], v["measure"]): v for v in compare.verdicts(rows, "full", compare.Spec(recipes={}).resolution)}
    # BWT: attn-proj -0.05 vs full -0.2 ± 0.141: the summed seed std (0.141 + 0) is the margin, larger than the resolution
    assert found["attn-proj", "bwt"]["margin"] == pytest.approx(math.sqrt(0.02)) and found["attn-proj", "bwt"]["verdict"] == "better"
    assert found["attn-proj", "log_ppl_ratio"]["verdict"] == "better" and found["attn-proj", "ap"]["verdict"] == "worse"
    # one seed each on the held-out change: the test sets' resolution is the margin, so 0.01 apart is no result
    assert found["lora", "heldout_delta"] == {**found["lora", "heldout_delta"], "margin": 0.03, "verdict": "too close to call"}
    lines = compare.verdict_lines(list(found.values()), rows)
    assert lines[0].startswith("- attn-proj (1 seed) vs full (2 seeds): AP 0.450 vs 0.510 ± 0.014 -> **full better** (margin 0.030)")
    assert "BWT -0.050 vs -0.200 ± 0.141 -> **attn-proj better** (margin 0.141)" in lines[0]
    assert "general perplexity x2.00 vs x50.00 -> **attn-proj better** (margin 5%)" in lines[0]
    assert "the larger of the two rows' summed seed std and the test sets' resolution" in compare.margin_rule(compare.Spec(recipes={}).resolution)


def test_the_learning_rate_sweep_is_the_same_comparison_with_a_sweep_file():
    """A sweep file's runs train the first task alone on records the config's tasks never read, scored on a
    validation split of them; the report is the rates table with the best rate (the lower on a tie) in bold."""
    from tasks.compare import plan_comparison

    plan = plan_comparison(str(ROOT / "configs" / "cl-benchmark.yaml"), str(ROOT / "configs" / "cl-benchmark-sweep.yaml"), seeds=[0])
    sweep = compare.load_spec(ROOT / "configs" / "cl-benchmark-sweep.yaml").sweep
    assert len(plan.jobs) == sum(len(rates) for rates in sweep["rates"].values()) and plan.sweep == sweep
    for job in plan.jobs:
        tasks = [d for d in job.config["data"]["datasets"] if d.get("role") in (None, "task") and d.get("shape") != "text"]
        assert [t["name"] for t in tasks] == ["dbpedia"] and tasks[0]["test_fraction"] == sweep["validation_fraction"]
        assert tasks[0]["sources"][0]["skip"] == sweep["skip"] and not any(d.get("role") == "heldout" for d in job.config["data"]["datasets"])
    runs = [{"recipe": name, "seed": 0, "accuracy_matrix": [[0.1], [score]], "precision": "fp32", "wall_s": 60.0}
            for name, score in {"full@1e-05": 0.5, "full@3e-05": 0.7, "lora@0.001": 0.6, "lora@0.003": 0.6}.items()]
    report = compare.summarize({"sweep": {**sweep, "rates": {"full": [1e-5, 3e-5], "lora": [1e-3, 3e-3]}}, "runs": runs, "tasks": ["dbpedia"],
                                "command": "perennial compare", "load": "", "machine": {}, "wall_minutes": 1.0})
    text = compare.markdown({**report, "runs": [{**r, "machine": {"cpu_model": "x", "logical_cores": 2, "platform": "p", "python": "3"}} for r in runs]})
    assert "| full | 0.100 | 0.500 | **0.700** |  |  |" in text and "| lora | 0.100 |  |  | **0.600** | 0.600 |" in text


def test_the_command_explains_itself_and_refuses_a_bad_recipes_file_before_running(tmp_path, capsys):
    from app.cli import main

    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    shown = capsys.readouterr().out
    for words in ("--recipes", "--seeds", "--workers", "too close to call", "summed seed std", "run key", "sweep file"):
        assert words in " ".join(shown.split()), words
    (tmp_path / "recipes.yaml").write_text("recipes: {a: [cit.optim.lr=1e-3]}\nbaseline: nope\n")
    assert main(["compare", str(ROOT / "configs" / "tiny.yaml"), "--recipes", str(tmp_path / "recipes.yaml")]) == 2
    assert "baseline 'nope' is not one of its recipes" in capsys.readouterr().err


def test_an_interrupted_run_resumes_under_its_key_and_its_cost_sums_the_attempts(tmp_path):
    """Killed mid-run, the next invocation resumes the same run key (the flow finds its parent run and committed
    stages again); the interrupted attempt's wall time is recorded on the parent run and summed into the cost;
    a finished run is then collected from MLflow, never trained again."""
    import time

    from mlflow.tracking import MlflowClient

    from perennial.tracking import LINEAGE_TAG, RUN_KEY_TAG, Tracker
    from tasks.compare import Job, plan_comparison, run_recipe

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "recipes.yaml").write_text(yaml.safe_dump({"recipes": {"full": [], "lora": ["cit.tuning.method=lora"]}}))
    plan = plan_comparison(str(ROOT / "configs" / "tiny.yaml"), str(tmp_path / "recipes.yaml"), [f"tracking.tracking_uri={uri}"])
    job = plan.jobs[1]
    assert (job.recipe, job.seed) == ("lora", 0) and job.run_key != plan.jobs[0].run_key
    tracker = Tracker(uri, job.config["tracking"]["experiment"])
    keys, parents = [], {}

    def flow(config, run_key):  # the flow's preflight: one parent run per key, reused on a resume
        keys.append(run_key)
        if run_key not in parents:
            parents[run_key] = tracker.start_run("tiny", tags={RUN_KEY_TAG: run_key, LINEAGE_TAG: config["tracking"]["registered_model"]})
        if len(keys) == 1:
            time.sleep(0.5)
            raise KeyboardInterrupt("signal SIGTERM")
        tracker.finish(parents[run_key])
        return {"mlflow_run_id": parents[run_key], "s3_prefix": "s3://b/runs/x", "run_key": run_key, "tasks": ["a"], "trained": ["a"],
                "accuracy_matrix": [[0.1], [0.9]], "metrics": {"ap": 0.9, "general_ppl_base": 9.0, "general_ppl_final": 9.5},
                "general_tasks": {}, "chance": {"a": 0.5}}

    with pytest.raises(KeyboardInterrupt):
        run_recipe(job, flow)
    result = run_recipe(Job(**{**job.model_dump(), "config": {**job.config, "work_dir": str(tmp_path / "moved")}}), flow)
    assert keys == [job.run_key, job.run_key]
    [recorded] = MlflowClient(uri).get_metric_history(parents[job.run_key], "compare/attempt_wall_s")
    assert recorded.value >= 0.5 and result["attempts"] == 2 and result["wall_s"] >= recorded.value
    assert result["peak_rss_mib"] > 0 and result["cpu_s"] >= 0
    again = run_recipe(job, flow)
    assert len(keys) == 2 and again["collected"] and again["accuracy_matrix"] == [[0.1], [0.9]] and again["attempts"] == 2


def test_the_published_cl_tables_rerender_from_their_json_with_the_same_numbers(tmp_path):
    """bench/results/cl_quality*.json through the product's report gives every number of the committed tables and
    lines (a verdict section is added; the words around the numbers may differ)."""
    from bench.cl_quality import main

    for json_path in sorted((ROOT / "bench" / "results").glob("cl_quality*.json")):
        name = json_path.stem
        (tmp_path / json_path.name).write_text(json_path.read_text())
        assert main(["--render", "--name", name, "--output-dir", str(tmp_path), *(["--sweep"] if "sweep" in name else [])]) == 0
        published, rendered = (_numbered_lines((path / f"{name}.md").read_text()) for path in (json_path.parent, tmp_path))
        assert published and _each_found_in_order(published, rendered), name


def _each_found_in_order(published: list[tuple[str, list[str]]], rendered: list[tuple[str, list[str]]]) -> bool:
    """Every published table row has a rendered row with the same numbers, and every published line a rendered line
    holding its numbers in order (a margin may have been added), in the published order."""
    found = iter(rendered)
    return all(any(kind == other and (numbers == theirs if kind == "row" else _is_subsequence(numbers, theirs))
                   for other, theirs in found) for kind, numbers in published)


def _numbered_lines(text: str) -> list[tuple[str, list[str]]]:
    """The numbers of each table row (header and rule rows left out) and of each bulleted line."""
    import re

    lines, kept = text.splitlines(), []
    for i, line in enumerate(lines):
        header = line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---")
        if line.startswith("- ") or (line.startswith("|") and not header and not line.startswith("|---")):
            kept.append(("row" if line.startswith("|") else "line", re.findall(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?", line)))
    return kept


def _is_subsequence(needles: list, haystack: list) -> bool:
    found = iter(haystack)
    return all(any(needle == item for item in found) for needle in needles)


def _nap(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


@pytest.mark.integration
def test_an_interrupted_worker_pool_stops_its_workers_instead_of_waiting_for_every_run(prefect_harness):
    """Ctrl-C (or SIGTERM, which the bench and the workers take as Ctrl-C) in the flow stops the running workers and
    cancels the queued runs: three 60-second runs on two workers do not hold the interrupt for minutes."""
    import time

    from prefect import flow, task

    from tasks.compare import worker_pool

    nap = task(_nap, name="nap")

    @flow
    def interrupted() -> float:
        started = time.time()
        try:
            with worker_pool(2, 1) as runner:
                [runner.submit(nap, {"seconds": 60}) for _ in range(3)]
                time.sleep(5)
                raise KeyboardInterrupt("signal SIGTERM")
        except KeyboardInterrupt:
            return time.time() - started
        raise AssertionError("the interrupt was lost")

    assert interrupted() < 45


@pytest.mark.integration
def test_compare_runs_recipes_as_subflows_concurrently_reports_once_and_never_retrains(services, prefect_harness, tmp_path, monkeypatch):
    """Two recipes on the micro pipeline, full at two seeds: the first run alone (it builds the shared base and DAP
    models), the other two at once in two worker processes. One table, cost and verdicts in the JSON, the markdown,
    one MLflow comparison run and a Prefect artifact; a rerun collects every run and trains nothing."""
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client

    import flows.continual_retrain
    from flows.compare import compare as compare_flow
    from tests.test_pipeline import micro_config

    data = micro_config(services, tmp_path).model_dump(mode="json")
    data["data"]["demo"]["tasks"] = ["arithmetic", "reverse"]
    data["cit"]["optim"].update(max_steps=4, checkpoint_every=2)
    data["tracking"].update(experiment="compare-test", registered_model="compare-micro")
    (tmp_path / "micro.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "recipes.yaml").write_text(yaml.safe_dump({"recipes": {"full": [], "attn-proj": ["cit.tuning.method=attn-proj"]},
                                                           "extra_seeds": {"recipes": ["full"], "seeds": [1]}}, sort_keys=False))
    args = (str(tmp_path / "micro.yaml"), str(tmp_path / "recipes.yaml"))
    report = compare_flow(*args, workers=2, threads=1, name="micro", output_dir=str(tmp_path / "out"))

    assert [(r["recipe"], r["seed"]) for r in report["runs"]] == [("full", 0), ("full", 1), ("attn-proj", 0)]
    assert len({r["run_key"] for r in report["runs"]}) == 3
    assert report["rows"]["full"]["ap"]["n"] == 2 and report["rows"]["attn-proj"]["ap"]["n"] == 1
    for run in report["runs"]:
        assert run["cit_tokens"] > 0 and run["cpu_s"] > 0 and run["peak_rss_mib"] > 0 and run["trainable_params"] > 0
    by = {r["recipe"]: r["trainable_params"] for r in report["runs"]}
    assert by["attn-proj"] < by["full"]
    text = (tmp_path / "out" / "micro.md").read_text()
    assert "| full | 2 |" in text and "| attn-proj | 1 |" in text and "word_count (held out)" in text
    assert "- attn-proj (1 seed) vs full (2 seeds): AP" in text and "the larger of the two rows' summed seed std" in text
    assert json.loads((tmp_path / "out" / "micro.json").read_text())["verdicts"] and (tmp_path / "out" / "micro_matrices.png").exists()

    client = MlflowClient(services.mlflow_uri)
    comparison = client.get_run(report["mlflow_run_id"])
    assert comparison.data.metrics["full/ap"] == pytest.approx(report["rows"]["full"]["ap"]["mean"])
    assert "attn-proj/cpu_s" in comparison.data.metrics and "| attn-proj | 1 |" in comparison.data.tags["mlflow.note.content"]
    assert {a.path for a in client.list_artifacts(comparison.info.run_id)} >= {"comparison.json", "comparison.md", "micro_matrices.png"}
    with get_client(sync_client=True) as prefect:
        assert any(a.key == "compare-micro" and "| attn-proj | 1 |" in a.data for a in prefect.read_artifacts())
        spans = {run.name: (run.start_time, run.end_time) for run in prefect.read_task_runs() if run.name in ("full-seed-1", "attn-proj-seed-0")}
    (a_start, a_end), (b_start, b_end) = spans.values()
    assert a_start < b_end and b_start < a_end  # the two pool runs overlapped in time

    def train_again(**kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(flows.continual_retrain, "continual_retrain", train_again)
    again = compare_flow(*args, name="micro", output_dir=str(tmp_path / "out"))
    assert all(r["collected"] for r in again["runs"]) and again["rows"]["full"]["ap"] == report["rows"]["full"]["ap"]
    assert again["mlflow_run_id"] == report["mlflow_run_id"]  # the same comparison run, updated
