"""The multi-task upper bound (`cit.multitask`): every task trained jointly in one stage, the same total steps.

Config refusals, the CL metrics and gates of a joint matrix, a real micro retrain, and the comparison table's
multi-task row with its gap to multi-task."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from perennial import compare
from perennial.cl_metrics import AccuracyMatrix, summarize
from perennial.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
JOINT = ["cit.multitask=true", "cit.replay.enabled=false", "cit.ssr.enabled=false", "cit.methods=[]"]  # demo.yaml replays and rehearses


# --- (1) refusals at config load ------------------------------------------------------------------


@pytest.mark.parametrize("overrides, named", [
    (["cit.replay.enabled=true"], ["cit.replay.enabled=true", "cit.replay.enabled=false"]),
    (["cit.methods=[{name: ewc}, {name: lwf}]"], ["cit.methods ['ewc']", "cit.methods=[{name: lwf}]"]),
    (["cit.tuning.method=lora", "cit.methods=[{name: olora}]"], ["cit.methods ['olora']", "cit.methods=[]"]),
    (["cit.methods=[{name: seekr}]"], ["cit.methods ['seekr']"]),
    # SSR needs replay, and the refusal names SSR itself rather than telling the user to turn replay on
    (["cit.ssr.enabled=true"], ["cit.ssr.enabled=true", "cit.ssr.enabled=false"]),
    (["lineage.continue_from=champion"], ["lineage.continue_from=champion", "lineage.continue_from=none"]),
    (["lineage.continue_from=models:/perennial-demo/3"], ["lineage.continue_from=models:/perennial-demo/3"]),
], ids=["replay", "ewc", "olora", "seekr", "ssr", "continue-champion", "continue-version"])
def test_combinations_a_joint_run_cannot_mean_are_refused_naming_the_keys_and_the_fix(overrides, named):
    with pytest.raises(ConfigError) as error:
        load_config(DEMO, [*JOINT, *overrides])
    message = str(error.value)
    assert "cit.multitask=true" in message
    for words in named:
        assert words in message, (words, message)


def test_a_plain_joint_run_and_the_methods_that_act_on_its_starting_model_load():
    cfg = load_config(DEMO, JOINT)
    assert cfg.cit.multitask and not cfg.cit.replay.enabled
    assert load_config(DEMO, JOINT).outputs_digest() != load_config(DEMO, JOINT[1:]).outputs_digest()
    for method in ("lwf", "averaging", "merge"):  # they regularise toward, or merge with, the stage's start model
        assert [m.name for m in load_config(DEMO, [*JOINT[:3], f"cit.methods=[{{name: {method}}}]"]).cit.methods] == [method]
    with pytest.raises(ConfigError):  # the demo's own replay is refused, so a bare switch is no silent replay run
        load_config(DEMO, ["cit.multitask=true"])


def test_the_shipped_recipes_hold_a_multitask_row_that_loads():
    from tasks.compare import plan_comparison

    for config, recipes, steps in (("cl-benchmark.yaml", "cl-benchmark-methods.yaml", 100), ("demo.yaml", "demo-recipes.yaml", 40)):
        plan = plan_comparison(str(ROOT / "configs" / config), str(ROOT / "configs" / recipes), seeds=[0], only=["multitask"])
        [job] = plan.jobs
        assert job.config["cit"]["multitask"] is True and job.config["cit"]["optim"]["max_steps"] == steps
        assert job.config["cit"]["replay"]["enabled"] is False and job.config["cit"]["methods"] == []


# --- metrics and gates of a joint matrix --------------------------------------------------------------


def test_a_joint_matrix_has_ap_and_no_bwt_fwt_or_forgetting():
    joint = AccuracyMatrix(tasks=["a", "b", "c"], rows=[[0.0, 0.1, 0.0], [0.9, 0.6, 0.3]], trained=[["a", "b", "c"]])
    metrics = summarize(joint)
    assert metrics["ap"] == pytest.approx(0.6) and metrics["multitask"] == 1.0
    assert metrics["bwt"] is None and metrics["fwt"] is None and metrics["forgetting_max"] is None
    assert joint.stage_labels() == ["before", "after joint: a + b + c"] and joint.trained_at(2) == [1]
    # the same two rows read as a sequence would claim a BWT and an AP over one task: the joint reading is not that
    sequential = summarize(AccuracyMatrix(tasks=["a", "b", "c"], rows=joint.rows))
    assert sequential["ap"] == pytest.approx(0.9) and "multitask" not in sequential
    with pytest.raises(ValueError, match="not among the columns"):
        AccuracyMatrix(tasks=["a", "b"], rows=[[0, 0], [1, 1]], trained=[["a", "z"]])


def test_min_bwt_is_not_checked_for_a_joint_run_and_still_fails_a_sequence_that_lost_it():
    from perennial.config import GatesConfig
    from perennial.registry import evaluate_gates

    joint = {"ap": 0.6, "multitask": 1.0, "final/a": 0.9, "stage0/a": 0.0}
    [result] = [r for r in evaluate_gates(GatesConfig(), joint, None) if r.name == "min_bwt"]
    assert result.passed is None and "not defined for a joint (multi-task) run" in result.detail
    [lost] = [r for r in evaluate_gates(GatesConfig(), {"ap": 0.6, "final/a": 0.9, "stage0/a": 0.0}, None) if r.name == "min_bwt"]
    assert lost.passed is False and "missing" in lost.detail


# --- (2) a real micro retrain -----------------------------------------------------------------------------


@pytest.mark.integration
def test_a_multitask_retrain_trains_one_stage_on_every_tasks_records_for_the_sequences_steps(services, prefect_harness, tmp_path,
                                                                                              monkeypatch):
    from mlflow.tracking import MlflowClient

    import tasks.stage
    from app.cli import accuracy_table
    from flows.continual_retrain import continual_retrain
    from perennial.config import StorageConfig, build_config
    from perennial.storage import ObjectStore
    from tests.test_pipeline import micro_config

    bucket, model = "multitask-test", "multitask-micro"
    cfg = build_config(micro_config(services, tmp_path).model_dump(mode="json"), [
        *JOINT, "cit.optim.max_steps=4", "cit.optim.checkpoint_every=0", "eval.max_task_records=5", f"storage.bucket={bucket}",
        "tracking.experiment=multitask-test", f"tracking.registered_model={model}", "registry.samples.enabled=false"])
    trained_on = {}  # what each stage's engine was handed: its name -> its records
    encode = tasks.stage.encode_stage_data

    def recording(spec, tokenizer, records, replay):
        trained_on[spec.name] = (list(records), list(replay))
        return encode(spec, tokenizer, records, replay)

    monkeypatch.setattr(tasks.stage, "encode_stage_data", recording)
    summary = continual_retrain(config=cfg.model_dump(mode="json"))

    tasks_ = ["arithmetic", "fact_lookup", "reverse"]
    # one CIT stage, on the union of every task's training records, no replay
    cit_stages = [name for name in trained_on if name.startswith("cit-")]
    assert cit_stages == ["cit-01-joint"] and set(summary["checkpoints"]) == {"start", "cit-01-joint"}
    records, replay = trained_on["cit-01-joint"]
    by_task = collections.Counter(record["task"] for record in records)
    assert set(by_task) == set(tasks_) and replay == []
    client = MlflowClient(services.mlflow_uri)
    parent = client.get_run(summary["mlflow_run_id"])
    [stage] = [run for run in client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
               if run.info.run_name.startswith("cit-")]
    params = stage.data.params
    assert stage.info.run_name == "cit-01-joint" and params["tasks"] == ",".join(tasks_)
    assert {task: int(params[f"train_records.{task}"]) for task in tasks_} == dict(by_task)
    assert int(params["train_records"]) == len(records) and int(params["max_steps"]) == 4 * 3
    # the sequence's total optimizer steps: cit.optim.max_steps x tasks, as the committed stage says
    store = ObjectStore(StorageConfig(endpoint_url=services.s3_endpoint, bucket=bucket))
    manifest = store.read_manifest(summary["checkpoints"]["cit-01-joint"].removeprefix(f"s3://{bucket}/"))
    assert manifest["meta"]["steps"] == 4 * 3

    # the matrix: the before row and one trained row, every task scored in both
    assert summary["tasks"] == tasks_ and summary["trained_by_row"] == [tasks_]
    assert len(summary["accuracy_matrix"]) == 2 and all(score is not None for row in summary["accuracy_matrix"] for score in row)
    metrics = summary["metrics"]
    assert metrics["ap"] == pytest.approx(sum(summary["accuracy_matrix"][1]) / 3) and metrics["multitask"] == 1.0
    for undefined in ("bwt", "fwt", "forgetting_max", "forgetting_mean"):  # absent, not 0
        assert undefined not in metrics and undefined not in parent.data.metrics
    assert parent.data.metrics["ap"] == pytest.approx(metrics["ap"])
    # the gate that reads BWT says it is not defined rather than failing (or passing) a missing value
    version = client.get_model_version_by_alias(model, "challenger")
    assert "metric.bwt" not in version.tags and "min_bwt" not in version.tags.get("failed_gates", "")
    assert "not checked (—): " in summary["registered_model"]["verdict_lines"][0] and "min_bwt" in summary["registered_model"]["verdict_lines"][0]
    # the printed matrix labels the joint row and shows every task's gain from it
    text = accuracy_table(summary)
    assert "after joint: arithmetic + fact_lookup + reverse" in text
    gains = next(line for line in text.splitlines() if line.strip().startswith("gain"))
    assert len(gains.split()) == len("gain R[i][i] - R[0][i]".split()) + 3
    # the lineage record names the joint row, so a later retrain continuing this version finds every task learned
    from perennial.lineage import LineageRecord

    lineage = client.download_artifacts(parent.info.run_id, "report/lineage.json", str(tmp_path))
    record = LineageRecord.model_validate_json(Path(lineage).read_text())
    assert [row.trained for row in record.rows] == [None, tasks_] and all(record.last_trained(task) for task in tasks_)


# --- (3) the comparison table ---------------------------------------------------------------------------------


def _run(recipe, matrix, metrics, trained_by_row):
    return {"recipe": recipe, "seed": 0, "tasks": ["a", "b", "c"], "accuracy_matrix": matrix, "trained_by_row": trained_by_row,
            "metrics": {**metrics, "general_ppl_base": 10.0, "general_ppl_final": 11.0},
            "general_tasks": {"h": {"base": 0.5, "final": 0.4, "delta": -0.1}}}


def test_the_compare_table_shows_the_multitask_row_with_undefined_bwt_and_every_recipes_gap_to_it():
    sequence = [[0.0, 0.0, 0.1], [0.9, 0.1, 0.1], [0.6, 0.8, 0.1], [0.5, 0.6, 0.9]]
    joint = [[0.0, 0.0, 0.1], [0.85, 0.8, 0.85]]
    runs = [_run("full", sequence, {"ap": 2.0 / 3, "bwt": -0.3, "fwt": 0.0, "forgetting_max": 0.4}, ["a", "b", "c"]),
            _run("multitask", joint, {"ap": 2.5 / 3, "multitask": 1.0}, [["a", "b", "c"]])]
    report = compare.summarize({"runs": runs, "chance": {"a": 0.1, "b": 0.1, "c": 0.1}, "baseline": "full"})
    rows = report["rows"]
    assert rows["multitask"]["multitask"] and not rows["full"]["multitask"] and "bwt" not in rows["multitask"]
    # R[i][i] of a joint run is its trained row for every task, not the diagonal of a 2-row matrix
    assert rows["multitask"]["learned_zero_shot"]["mean"] == pytest.approx((0.85 + 0.8 + 0.75) / 3)
    assert rows["full"]["learned_zero_shot"]["mean"] == pytest.approx((0.9 + 0.8 + 0.8) / 3)
    gap = report["multitask_gaps"]["full"]
    assert gap["gap"] == pytest.approx(2.0 / 3 - 2.5 / 3) and gap["verdict"] == "below the bound" and "multitask" not in report["multitask_gaps"]
    assert not [v for v in report["verdicts"] if v["measure"] == "bwt"]  # nothing to judge BWT on against the bound

    text = compare.markdown({**report, "command": "perennial compare x", "wall_minutes": 1.0, "workers": 1, "load": "",
                             "machine": {"cpu_model": "cpu", "logical_cores": 2, "platform": "linux", "python": "3.11"},
                             "model": "tiny", "budget": "4 steps", "seeds": [0], "name": "t", "tasks": ["a", "b", "c"]})
    header = next(line for line in text.splitlines() if line.startswith("| recipe |"))
    cells = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in text.splitlines() if line.startswith(("| full |", "| multitask |"))}
    columns = header.split(" | ")
    assert "AP − multi-task" in columns
    bwt, fwt, forgetting, ap_gap = (columns.index(name) for name in ("BWT", "FWT", "max forgetting", "AP − multi-task"))
    assert cells["multitask"][bwt] == cells["multitask"][fwt] == cells["multitask"][forgetting] == "—"
    assert cells["multitask"][ap_gap] == "—" and cells["full"][ap_gap] == "-0.167" and cells["full"][bwt] == "-0.300"
    assert "**multitask** is the multi-task upper bound" in text
    assert "- full (1 seed): AP 0.667, gap -0.167 -> **below the bound** (margin 0.030)" in text


def test_results_recorded_before_multitask_runs_existed_still_render():
    """Older results have no trained_by_row: one task per row, no multi-task column."""
    old = {k: v for k, v in _run("full", [[0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]], {"ap": 1.0, "bwt": 0.0}, None).items()
           if k != "trained_by_row"}
    report = compare.summarize({"runs": [old], "chance": {}})
    assert report["multitask_gaps"] == {} and not report["rows"]["full"]["multitask"]
    assert report["rows"]["full"]["learned_zero_shot"]["mean"] == pytest.approx(1.0)


def test_a_multitask_version_is_never_continued():
    """A joint retrain's version holds no replay buffer or per-task CL state: continuing it would silently replay
    nothing, so the lineage refuses it, naming the fix (tasks/lineage.py)."""
    from types import SimpleNamespace

    from tasks.lineage import LINEAGE_BASE_TAG, LINEAGE_URI_TAG, MULTITASK_TAG, LineageError, _open_version

    version = SimpleNamespace(name="m", version="3", tags={LINEAGE_BASE_TAG: "b", LINEAGE_URI_TAG: "s3://x/l", MULTITASK_TAG: "true"})
    with pytest.raises(LineageError, match=r"m version 3 is a multi-task upper bound .*\(lineage\.continue_from=models:/m/N\)"):
        _open_version(SimpleNamespace(config=load_config(None)), version)


def test_a_task_scored_but_never_trained_has_no_just_trained_row_and_is_left_out_of_the_gains():
    run = {"tasks": ["a", "b"], "trained_by_row": ["a"], "accuracy_matrix": [[0.1, 0.2], [0.7, 0.3]]}
    assert compare.just_trained(run) == [1, None]
    assert compare.learned_over_zero_shot(run) == pytest.approx(0.6)  # a's 0.1 -> 0.7; b was only scored
    assert compare.learned_over_chance(run, {"a": 0.5, "b": 0.5}) == pytest.approx(0.2)


def test_every_demo_recipe_pins_what_the_default_chooses():
    """A recipe means what it was measured as: each names the tuning, CL methods, replay, rehearsal and steps a task,
    so changing configs/demo.yaml's default (60 steps since the places pool, 4e-4 since) does not change an earlier recipe."""
    from perennial.compare import load_spec

    for name, overrides in load_spec(ROOT / "configs" / "demo-recipes.yaml").recipes.items():
        keys = {override.split("=", 1)[0] for override in overrides}
        if name != "default":
            assert {"cit.tuning.method", "cit.methods", "cit.optim.max_steps", "cit.optim.lr"} <= keys, name
            assert keys & {"cit.replay.budget", "cit.replay.enabled"} and keys & {"cit.ssr.enabled", "cit.ssr.prompts"}, name
