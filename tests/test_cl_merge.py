"""Merging with the task's starting model, the coefficient chosen on validation data (issue #37, models/cl/merge.py)."""

import pytest
import torch

from models.cl.merge import MergePlugin, token_accuracy
from perennial.config import MergeConfig, build_config
from tests.test_cl_common import HELD_OUT, TRAIN, context, model_after_task1, plain_after_task2, run_task, task_loss

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _task2_context(model, retention=True):
    ctx = context(model, 1)
    ctx.validation_examples = HELD_OUT[1][:24]  # task 2 records never trained on
    ctx.retention_examples = TRAIN[0][:48] if retention else []  # replay: task 1's training samples
    return ctx


def test_the_merged_weights_are_the_chosen_interpolation_and_the_curve_is_kept():
    start = model_after_task1()
    plain = plain_after_task2()
    model = model_after_task1()
    plugin = MergePlugin(coefficients=[0.25, 0.5, 0.75, 1.0], tolerance=0.02)
    ctx = _task2_context(model)
    plugin.before_task(ctx)
    model.load_state_dict(plain.state_dict())  # "training" on task 2 gives the plain model
    plugin.after_task(ctx)
    (curve,) = plugin.curves.values()
    assert [point["coefficient"] for point in curve] == [0.25, 0.5, 0.75, 1.0]
    chosen = next(point for point in curve if point["chosen"])
    best = max(point["score"] for point in curve)
    # the smallest coefficient within the tolerance of the best summed score
    assert chosen["score"] >= best - 0.02 and all(p["score"] < best - 0.02 for p in curve if p["coefficient"] < chosen["coefficient"])
    c = chosen["coefficient"]
    old, new = dict(start.named_parameters()), dict(plain.named_parameters())
    for name, parameter in model.named_parameters():
        assert torch.allclose(parameter, old[name] + c * (new[name] - old[name]), atol=1e-6), name
    # scored on the curve as it was: the kept score falls as c grows (task 2 overwrites task 1)
    assert curve[0]["kept"] > curve[-1]["kept"] and curve[-1]["task"] > curve[0]["task"]
    assert plugin.state_dict().meta["curves"] == plugin.curves


def test_merging_forgets_less_than_plain_fine_tuning_and_still_learns_the_task():
    model = model_after_task1()
    plugin = MergePlugin(coefficients=[0.25, 0.5, 0.75, 1.0])
    ctx = _task2_context(model)
    plugin.before_task(ctx)
    run_task(model, 1, after=False)
    plugin.after_task(ctx)
    plain = plain_after_task2()
    start = model_after_task1()
    assert next(p["coefficient"] for p in plugin.curves["task-1"] if p["chosen"]) < 1.0
    assert task_loss(model, HELD_OUT[0]) < task_loss(plain, HELD_OUT[0]) - 0.5  # keeps task 1
    assert task_loss(model, HELD_OUT[1]) < task_loss(start, HELD_OUT[1]) - 0.5  # learned task 2


def test_without_replay_the_choice_follows_the_task_alone():
    model = model_after_task1()
    plugin = MergePlugin(coefficients=[0.25, 1.0], tolerance=0.0)
    ctx = _task2_context(model, retention=False)
    plugin.before_task(ctx)
    model.load_state_dict(plain_after_task2().state_dict())
    plugin.after_task(ctx)
    (curve,) = plugin.curves.values()
    assert all(point["kept"] is None for point in curve)
    assert next(p for p in curve if p["chosen"])["coefficient"] == 1.0  # the trained model scores the task best
    assert token_accuracy(model, [], 0) is None


def test_merge_config_is_validated_and_the_stage_holds_its_records_out():
    with pytest.raises(ValueError, match=r"every coefficient must be in \(0, 1\]"):
        MergeConfig(name="merge", coefficients=[0.0, 0.5])
    cfg = build_config({}, ["cit.methods=[{name: merge, validation_records: 5}]"])
    assert cfg.cit.methods[0].validation_records == 5

    from tasks.stage import StageData, StageSpec, carve_validation

    spec = StageSpec(name="cit-01-a", stage_root="x", work_dir="w", input_model_uri="s3://b/m", config_digest="d",
                     data=StageData(encoding="instruction"), optim=cfg.cit.optim, tuning=cfg.cit.tuning, seed=3)
    records = [{"id": str(i)} for i in range(40)]
    replay = [{"id": f"r{i}"} for i in range(400)]
    train, held, replay_train, retention = carve_validation(spec, records, replay, 5)
    assert len(held) == 5 and len(train) == 35 and not {r["id"] for r in held} & {r["id"] for r in train}
    # what the model should keep is scored on replay records the stage does not train on either
    assert len(retention) == 64 and len(replay_train) == 336 and not {r["id"] for r in retention} & {r["id"] for r in replay_train}
    assert carve_validation(spec, records, replay, 5) == (train, held, replay_train, retention)  # the same on a resume
    assert [len(part) for part in carve_validation(spec, records[:8], replay[:20], 5)] == [6, 2, 15, 5]  # at most a quarter
    assert carve_validation(spec, records, replay, 0) == (records, [], replay, [])
    assert carve_validation(spec, records, [], 5)[2:] == ([], [])


@pytest.mark.integration
def test_a_retrain_with_merging_records_each_tasks_curve_on_the_version(services, prefect_harness, tmp_path):
    import uuid

    from mlflow.tracking import MlflowClient

    from flows.continual_retrain import continual_retrain
    from tests.test_pipeline import micro_config

    bucket = f"merge-{uuid.uuid4().hex[:8]}"
    data = micro_config(services, tmp_path).model_dump(mode="json")
    data["storage"]["bucket"] = bucket
    data["tracking"].update(experiment=bucket, registered_model=bucket)
    data["data"]["demo"]["tasks"] = ["arithmetic", "reverse"]
    cfg = build_config(data, ["cit.methods=[{name: merge, validation_records: 8}]"])
    summary = continual_retrain(config=cfg.model_dump(mode="json"))
    client = MlflowClient(services.mlflow_uri)
    artifacts = {a.path for a in client.list_artifacts(summary["mlflow_run_id"], "report")}
    assert {"report/merge_curves.png", "report/merge_curves.json"} <= artifacts
    version = client.get_model_version(bucket, str(summary["registered_model"]["version"]))
    for stage in ("cit-01-arithmetic", "cit-02-reverse"):
        assert 0 < float(version.tags[f"metric.merge/{stage}_coefficient"]) <= 1
