"""The reviewer's commands against the real MLflow server (issue #44): what changed since the champion,
overriding a failed gate only with a reason, review's headline after a decision, NEEDS REVIEW when the
champion moved, and `perennial status` naming each retrain's version and verdict."""

from __future__ import annotations

import uuid

from mlflow.tracking import MlflowClient

from app.cli import main
from perennial import registry
from tests.test_registry import GATES, TASKS, metrics, retrain_run


def version(client, name, final, params, datasets, auto_promote=True, **kw) -> dict:
    run = retrain_run(client, name)
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    tags = {"base_model": "tiny-llama(32x2)", "checkpoint_uri": f"s3://bucket/runs/{run.info.run_id}/final",
            **{f"dataset.{task}": digest for task, digest in datasets.items()}}
    return registry.register_version(client, name, f"{run.info.artifact_uri}/model", metrics(final, **kw), GATES,
                                     auto_promote=auto_promote, run_id=run.info.run_id, tags=tags, description="run summary")


def test_review_shows_what_changed_and_overriding_a_failed_gate_takes_a_reason(services, capsys, monkeypatch):
    client = MlflowClient(services.mlflow_uri)
    name = f"review-{uuid.uuid4().hex[:8]}"
    uri = ["--tracking-uri", services.mlflow_uri]
    same = {task: "d" * 16 for task in TASKS}
    version(client, name, [0.8, 0.8, 0.8], {"cit.optim.lr": "0.0003", "seed": "0", "storage.endpoint_url": "http://a:1"}, same)
    v2 = version(client, name, [0.8, 0.6, 0.8], {"cit.optim.lr": "0.001", "seed": "0", "storage.endpoint_url": "http://b:2"},
                 {**same, "zorbish": "z" * 16})
    assert v2["verdict"] == "BLOCKED" and registry.failed(registry.stored_gates(client.get_model_version(name, "2").tags["gate_results"])) == ["max_task_drop"]

    # what changed since champion v1: config key old -> new (not where the services are), the new dataset, per-task columns
    text = registry.review(client, name)
    changed = text[text.index("What changed since champion v1"):]
    assert "config cit.optim.lr: 0.0003 -> 0.001" in changed and "storage.endpoint_url" not in changed and "seed" not in changed.split("task")[0]
    assert "dataset.zorbish: (none) -> zzzzzzzzzzzzzzzz (new)" in changed
    assert next(line for line in changed.splitlines() if line.startswith("fact_lookup ")).split() == ["fact_lookup", "0.8000", "0.6000", "-0.2000"]
    page = client.get_model_version(name, "2").description.replace("&ensp;", "")
    assert "**What changed since champion v1**" in page and "- `cit.optim.lr`: 0.0003 → 0.001" in page
    assert "| task | chance | stage 0 | champion v1 | candidate v2 | change |" in page
    assert "| fact_lookup | — | 0.1000 | 0.8000 | 0.6000 | -0.2000 |" in page

    # promoting a BLOCKED version without a reason: a warning naming the gate, then a refusal; nothing moves
    monkeypatch.setenv("USER", "dana")
    capsys.readouterr()
    assert main(["promote", name, "2", *uri]) == 1
    err = capsys.readouterr().err
    assert f"warning: {name} v2 is BLOCKED: promoting it overrides 1 failed gate(s):" in err
    assert "  - max_task_drop: value 0.2000, threshold 0.0500: worst drop: fact_lookup" in err
    assert "is BLOCKED: 1 gate(s) failed: max_task_drop 0.2000 (threshold 0.0500). Promoting it overrides them: say why with --reason" in err
    assert client.get_model_version_by_alias(name, "champion").version == "1"

    assert main(["promote", name, "2", "--reason", "fact_lookup was relabelled", *uri]) == 0
    assert "champion is now v2 (previous-champion: v1); overridden gates: max_task_drop" in capsys.readouterr().out
    tags = client.get_model_version(name, "2").tags
    assert tags["overridden_gates"] == "max_task_drop" and tags["promoted_reason"] == "fact_lookup was relabelled"
    assert tags["Decision"] == "champion: promoted by dana over failed gates max_task_drop: fact_lookup was relabelled"
    # review's headline describes the new state, then the verdict it had when registered
    lines = registry.review(client, name).splitlines()
    assert lines[0] == f"{name} challenger v2 is the champion: promoted by dana over failed gates max_task_drop: fact_lookup was relabelled"
    assert lines[1].startswith("  at registration: BLOCKED: 1 of 7 gates fail against champion v1: max_task_drop")

    # v3 passes against champion v2 but waits for a person; then v2 is rolled back: its judgement is stale
    v3 = version(client, name, [0.85, 0.6, 0.8], {"cit.optim.lr": "0.001", "seed": "1"}, same, auto_promote=False)
    assert v3["verdict"] == "READY" and not v3["promoted"]
    registry.rollback(client, name, by="erin", reason="complaints")
    head = registry.review(client, name).splitlines()[0]
    assert head.startswith(f"{name} challenger v3: NEEDS REVIEW: all 5 checked gates pass against champion v2, but the champion "
                           "has changed since (now: champion v1)")
    assert registry.registered(client, name, 3)["verdict"] == "NEEDS REVIEW"


def test_status_names_each_retrains_version_verdict_and_latest_decision(services, capsys):
    from app.services import free_ports

    client = MlflowClient(services.mlflow_uri)
    experiment_id = client.create_experiment(f"status-reg-{uuid.uuid4().hex[:8]}")
    name = f"status-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    client.create_model_version(name, "s3://b/m", tags={"Decision": "champion: promoted by dana: relabelled"})
    parent = client.create_run(experiment_id, run_name="demo", tags={
        "perennial.run_key": "demo-abc", registry.REGISTERED_VERSION_TAG: f"{name}/1",
        registry.VERDICT_TAG: "BLOCKED: 2 of 7 gates fail against no champion: min_chance_margin, max_output_drift_kl"})
    client.set_terminated(parent.info.run_id)
    (closed,) = free_ports(1)
    assert main(["status", "--experiment", client.get_experiment(experiment_id).name, "--tracking-uri", services.mlflow_uri,
                 "--prefect-api-url", f"http://127.0.0.1:{closed}/api"]) == 0
    out = capsys.readouterr().out
    assert (f"    registry {name} v1  BLOCKED: 2 of 7 gates fail against no champion: min_chance_margin, max_output_drift_kl"
            f"  now: champion: promoted by dana: relabelled  {services.mlflow_uri}/#/models/{name}/versions/1?workflowType=machine_learning") in out
