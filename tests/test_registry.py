"""Registry workflow against the real MLflow server: gates, auto-promotion, review, promote, rollback.

Versions are created directly (a run with a small artifact folder and hand-built metrics), so no
training is needed.
"""

from __future__ import annotations

import threading
import uuid

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from perennial import registry
from perennial.cli import main
from perennial.config import GatesConfig, build_config

GATES = GatesConfig(min_target_score=0.5, min_bwt=-0.1, max_task_drop=0.05, max_general_ppl_increase=0.1, max_output_drift_kl=0.5)
TASKS = ["arithmetic", "fact_lookup", "reverse"]


def metrics(final: list[float], bwt: float = -0.02, ppl: float = 20.0, kl: float = 0.1) -> dict[str, float]:
    """Metrics shaped like a real retrain's: the accuracy matrix's final row plus summary values."""
    matrix = [[0.1, 0.1, 0.1], final]
    summary = {"ap": sum(final) / len(final), "bwt": bwt, "general_ppl_final": ppl, "general_ppl_base": 18.0}
    return registry.candidate_metrics(TASKS, matrix, summary, drift_kl_mean=kl)


def by_name(results: list[registry.GateResult]) -> dict[str, registry.GateResult]:
    return {result.name: result for result in results}


# --- gates (pure) -----------------------------------------------------------------------------


def test_gates_pass_against_a_comparable_champion():
    results = registry.evaluate_gates(GATES, metrics([0.8, 0.7, 0.9]), metrics([0.8, 0.72, 0.85], ppl=19.5))
    assert registry.failed(results) == [], results
    drop = by_name(results)["max_task_drop"]
    assert drop.value == pytest.approx(0.02) and "fact_lookup" in drop.detail
    assert by_name(results)["min_target_score"].value == pytest.approx(0.8)


def test_each_gate_fails_on_its_own_cause():
    champion = metrics([0.8, 0.8, 0.8], ppl=20.0)
    cases = {
        "min_target_score": metrics([0.4, 0.4, 0.45]),
        "min_bwt": metrics([0.8, 0.8, 0.8], bwt=-0.3),
        "max_general_ppl_increase": metrics([0.8, 0.8, 0.8], ppl=23.0),  # +15% > +10%
        "max_output_drift_kl": metrics([0.8, 0.8, 0.8], kl=0.9),
    }
    for gate, challenger in cases.items():
        results = registry.evaluate_gates(GATES, challenger, champion)
        if gate == "min_target_score":  # a 0.4 score also drops 0.4 on every task
            assert registry.failed(results) == ["min_target_score", "max_task_drop"]
        else:
            assert registry.failed(results) == [gate], (gate, results)
    drop = by_name(registry.evaluate_gates(GATES, metrics([0.8, 0.6, 0.8]), champion))["max_task_drop"]
    assert not drop.passed and drop.value == pytest.approx(0.2) and "fact_lookup" in drop.detail


def test_without_champion_only_absolute_gates_apply():
    results = by_name(registry.evaluate_gates(GATES, metrics([0.6, 0.6, 0.6], ppl=500.0), None))
    assert results["max_task_drop"].passed and "no champion" in results["max_task_drop"].detail
    assert results["max_general_ppl_increase"].passed and "no champion" in results["max_general_ppl_increase"].detail
    assert not registry.evaluate_gates(GATES, metrics([0.3, 0.3, 0.3]), None)[0].passed


def test_missing_metric_fails_and_changed_eval_sets_are_not_compared():
    challenger = metrics([0.8, 0.5, 0.8])
    del challenger["bwt"]  # e.g. a one-task retrain: BWT is undefined
    results = by_name(registry.evaluate_gates(GATES, challenger, metrics([0.8, 0.8, 0.8]), changed_eval_sets={"fact_lookup"}))
    assert not results["min_bwt"].passed and "missing" in results["min_bwt"].detail
    # fact_lookup's evaluation data changed: its 0.3 drop is not a like-for-like comparison
    assert results["max_task_drop"].passed and "fact_lookup" in results["max_task_drop"].detail
    unconfigured = registry.evaluate_gates(GatesConfig(), challenger, None)
    assert all(r.passed and r.detail == "not configured" for r in unconfigured) and len(unconfigured) == 6


def test_general_task_drop_gate_compares_with_stage_0_not_the_champion():
    gates = GatesConfig(max_general_task_drop=0.1)
    challenger = {**metrics([0.8, 0.8, 0.8]), "general/digit_count_delta": -0.05, "general/uppercase_delta": -0.15}
    result = by_name(registry.evaluate_gates(gates, challenger, None))["max_general_task_drop"]
    # worst held-out task: uppercase lost 0.15 since stage 0 > 0.1, even with no champion
    assert not result.passed and result.value == pytest.approx(0.15) and "uppercase" in result.detail
    challenger["general/uppercase_delta"] = 0.2
    result = by_name(registry.evaluate_gates(gates, challenger, None))["max_general_task_drop"]
    assert result.passed and result.value == pytest.approx(0.05) and "digit_count" in result.detail
    # configured but the run had no held-out general tasks: cannot check, so it fails
    missing = by_name(registry.evaluate_gates(gates, metrics([0.8, 0.8, 0.8]), None))["max_general_task_drop"]
    assert not missing.passed and "cannot check" in missing.detail


# --- registry against the real MLflow server --------------------------------------------------
# Every MLflow call is a round trip (about a second on a loaded 2-core machine), so one lineage
# walks through its whole life in one test instead of many tests building their own versions.


def retrain_run(client, name):
    experiment = client.get_experiment_by_name("registry-test") or client.get_experiment(client.create_experiment("registry-test"))
    return client.create_run(experiment.experiment_id, run_name=f"{name}-retrain")


def new_version(client, name, final, gates=GATES, auto_promote=True, datasets=None, **kw) -> dict:
    """Register a version the way a retrain does. Its run has no artifacts: the registry never reads them."""
    run = retrain_run(client, name)
    tags = {
        "base_model": "tiny-llama(32x2)",
        "config_digest": uuid.uuid4().hex,
        "checkpoint_uri": f"s3://bucket/runs/{run.info.run_id}/final",
        **{f"dataset.{task}": digest for task, digest in (datasets or {t: "d" * 16 for t in TASKS}).items()},
    }
    return registry.register_version(client, name, f"{run.info.artifact_uri}/model", metrics(final, **kw), gates,
                                     auto_promote=auto_promote, run_id=run.info.run_id, tags=tags, description="run summary")


def test_lineage_life_gates_review_promote_rollback(services, tmp_path, capsys, monkeypatch):
    client = MlflowClient(services.mlflow_uri)
    name = f"reg-{uuid.uuid4().hex[:8]}"
    uri = ["--tracking-uri", services.mlflow_uri]

    # v1: no champion yet, every absolute gate passes -> promoted automatically
    v1 = new_version(client, name, [0.8, 0.8, 0.8])
    assert v1["promoted"] and v1["version"] == 1 and all(g["passed"] for g in v1["gates"])
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == "1" and client.get_model_version_by_alias(name, "challenger").version == "1"
    assert champion.tags["promoted_by"] == "auto-promote" and "all 6 gates passed" in champion.tags["promoted_reason"]
    assert champion.tags["promoted_at"] and "needs-review" not in champion.tags
    # metric values travel as tags, so review needs no run lookups
    assert float(champion.tags["metric.final/reverse"]) == pytest.approx(0.8)
    assert float(champion.tags["metric.drift_kl_mean"]) == pytest.approx(0.1)
    assert "| max_task_drop |" in champion.description and "run summary" in champion.description
    assert registry.resolve_checkpoint_uri(client, f"models:/{name}@champion") == champion.tags["checkpoint_uri"]

    # v2: fact_lookup drops 0.2 and BWT is below the floor -> challenger, flagged for review
    v2 = new_version(client, name, [0.8, 0.6, 0.8], bwt=-0.3, ppl=21.0, datasets={"arithmetic": "a" * 16, "reverse": "d" * 16})
    assert not v2["promoted"] and v2["version"] == 2
    tags = client.get_model_version(name, "2").tags
    assert tags["needs-review"] == "true" and tags["failed_gates"] == "min_bwt,max_task_drop"
    assert tags["gates_against"] == "1"
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    assert client.get_model_version_by_alias(name, "challenger").version == "2"

    # review: both versions side by side, gates, lineage, and the command to act
    monkeypatch.setenv("USER", "dana")
    assert main(["review", name, *uri]) == 0
    text = capsys.readouterr().out
    assert "champion: v1" in text and "challenger: v2" in text
    metric_line = next(line for line in text.splitlines() if line.startswith("final/fact_lookup "))
    assert "0.8000" in metric_line and "0.6000" in metric_line and "-0.2000" in metric_line
    assert "21.0000" in text and "20.0000" in text  # general perplexity side by side
    gate_rows = {line.split()[1]: line.split()[0] for line in text.splitlines() if line.startswith(("PASS", "FAIL"))}
    assert gate_rows == {"min_target_score": "PASS", "min_bwt": "FAIL", "max_task_drop": "FAIL",
                         "max_general_ppl_increase": "PASS", "max_general_task_drop": "PASS", "max_output_drift_kl": "PASS"}
    assert "against champion v1" in text
    for version in ("1", "2"):
        lineage = client.get_model_version(name, version).tags
        assert lineage["config_digest"] in text and lineage["checkpoint_uri"] in text
    assert "dataset.arithmetic" in text and "a" * 16 in text and "tiny-llama(32x2)" in text
    assert f"perennial promote {name} 2" in text

    # a person promotes v2 anyway: who ($USER when --by is absent) and why are recorded
    assert main(["promote", name, "2", "--reason", "fact_lookup eval set was relabelled", *uri]) == 0
    assert "champion is now v2" in capsys.readouterr().out
    promoted = client.get_model_version_by_alias(name, "champion")
    assert promoted.version == "2" and promoted.tags["promoted_by"] == "dana"
    assert promoted.tags["promoted_reason"] == "fact_lookup eval set was relabelled" and promoted.tags["promoted_at"]
    assert promoted.tags["needs-review"] == "false" and promoted.tags["failed_gates"] == "min_bwt,max_task_drop"
    assert client.get_model_version_by_alias(name, "previous-champion").version == "1"
    assert client.get_model_version(name, "1").tags["superseded_by"] == "2"
    assert main(["promote", name, "2", *uri]) == 1
    assert "already the champion" in capsys.readouterr().err
    with pytest.raises(registry.RegistryError, match="no version 9"):
        registry.promote(client, name, 9, by="dana", reason="typo")

    # rollback: v1 is champion again, v2 records who rolled it back and why
    assert main(["rollback", name, "--by", "erin", "--reason", "complaints about reversal", *uri]) == 0
    assert "back to v1 (v2 demoted)" in capsys.readouterr().out
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    demoted = client.get_model_version(name, "2").tags
    assert demoted["rolled_back_by"] == "erin" and demoted["rolled_back_reason"] == "complaints about reversal"
    assert client.get_model_version(name, "1").tags["restored_from"] == "2"
    # v1 replaced nothing: a second rollback has nowhere to go (and must not re-promote v2)
    with pytest.raises(registry.RegistryError, match="nothing to roll back"):
        registry.rollback(client, name, by="erin", reason="again")

    # v3 passes every gate, but with auto-promotion off a person still decides
    v3 = new_version(client, name, [0.85, 0.8, 0.8], auto_promote=False)
    tags = client.get_model_version(name, "3").tags
    assert not v3["promoted"] and tags["needs-review"] == "true" and "failed_gates" not in tags

    # rollback walks back through successive promotions: v1 -> v3 -> v2, then back twice
    registry.promote(client, name, 3, by="dana", reason="r3")
    registry.promote(client, name, 2, by="dana", reason="r2")
    assert registry.rollback(client, name, by="erin", reason="back1")["champion"] == 3
    assert client.get_model_version_by_alias(name, "previous-champion").version == "1"
    assert registry.rollback(client, name, by="erin", reason="back2")["champion"] == 1


def test_status_without_prefect_still_lists_retrains_with_stages_and_links(services, capsys):
    from perennial.services import free_ports

    client = MlflowClient(services.mlflow_uri)
    experiment_id = client.create_experiment(f"status-{uuid.uuid4().hex[:8]}")
    parent = client.create_run(experiment_id, run_name="nightly-status", tags={
        "perennial.run_key": "nightly-abc", "prefect.flow_run_id": str(uuid.uuid4()), "prefect.flow_run_name": "sleepy-owl"})
    # no perennial.s3_prefix tag (a run from before it existed): the prefix comes from the logged config
    client.log_param(parent.info.run_id, "storage.bucket", "bkt")
    client.log_param(parent.info.run_id, "storage.prefix", "perennial")
    client.create_run(experiment_id, run_name="dap", tags={"mlflow.parentRunId": parent.info.run_id, "stage": "dap"})
    name = client.get_experiment(experiment_id).name
    (closed,) = free_ports(1)  # nothing listens there: the Prefect API is down
    assert main(["status", "--experiment", name, "--tracking-uri", services.mlflow_uri,
                 "--prefect-api-url", f"http://127.0.0.1:{closed}/api"]) == 0
    out = capsys.readouterr().out
    assert f"prefect: column missing: Prefect API http://127.0.0.1:{closed}/api is unreachable" in out
    assert "nightly-status" in out and "key=nightly-abc" in out
    assert "flow run 'sleepy-owl' (state not available)" in out
    assert "mlflow   RUNNING    current stage dap (RUNNING)" in out and "dap=RUNNING" in out
    assert f"{services.mlflow_uri}/#/experiments/{experiment_id}/runs/{parent.info.run_id}" in out
    assert "s3       s3://bkt/perennial/runs/nightly-abc" in out
    assert main(["status", "--experiment", "no-such-experiment", "--tracking-uri", services.mlflow_uri]) == 1


# --- interrupted registration and concurrent promotion (issue #23) ------------------------------


def fail_once(monkeypatch, method: str, argument: str) -> list[str]:
    """Make the first MlflowClient.`method` call whose arguments include `argument` raise, as a
    server that goes away at that step would; later calls reach the real server."""
    real = getattr(MlflowClient, method)
    fired: list[str] = []

    def call(self, *args, **kwargs):
        if not fired and argument in [str(a) for a in (*args, *kwargs.values())]:
            fired.append(f"{method}({argument})")
            raise MlflowException(f"injected: server gone at {method}({argument})")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, method, call)
    return fired


@pytest.mark.parametrize("method, argument", [
    ("set_registered_model_alias", "challenger"),  # just after create_model_version
    ("set_registered_model_alias", "champion"),  # promotion record written, alias not moved
    ("set_model_version_tag", "promoted_at"),  # alias moved, record not finished
])
def test_register_task_interrupted_after_the_version_exists_is_completed_by_the_rerun(services, store, tmp_path, monkeypatch, method, argument):
    from tasks.ingest import DataBundle, DatasetRef
    from tasks.register import Report, register
    from tasks.runtime import RunContext

    name = f"crash-{uuid.uuid4().hex[:8]}"
    cfg = build_config({"work_dir": str(tmp_path / "work"),
                        "storage": {"endpoint_url": services.s3_endpoint, "bucket": store.bucket},
                        "tracking": {"tracking_uri": services.mlflow_uri, "experiment": "registry-test", "registered_model": name},
                        "registry": {"auto_promote": True, "gates": GATES.model_dump()}})
    client = MlflowClient(services.mlflow_uri)
    parent = retrain_run(client, name)
    client.log_metric(parent.info.run_id, "drift/kl_mean", 0.1)  # as evaluate_stage logs it
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "config.json").write_text("{}")
    model_uri = store.upload_dir(tmp_path / "final", "runs/k/final")["uri"]
    ref = lambda task: DatasetRef(name=task, kind="instruction", digest="d" * 16, uri=f"s3://x/{task}", data_file="data.jsonl")  # noqa: E731
    data = DataBundle(general=ref("general"), domain=None, tasks=[ref(task) for task in TASKS])
    summary = Report(tasks=TASKS, matrix=[[0.1, 0.1, 0.1], [0.8, 0.8, 0.8]], markdown="run summary",
                     metrics={"ap": 0.8, "bwt": -0.02, "general_ppl_final": 20.0})
    run = RunContext(config=cfg, run_key="k", parent_run_id=parent.info.run_id, experiment_id=parent.info.experiment_id)

    fired = fail_once(monkeypatch, method, argument)
    with pytest.raises(MlflowException, match="injected"):
        register(run, model_uri, data, summary)
    assert fired and len(client.search_model_versions(f"name = '{name}'")) == 1  # the half-registered version

    result = register(run, model_uri, data, summary)  # the rerun (or a Prefect retry) of the same retrain
    assert len(client.search_model_versions(f"name = '{name}'")) == 1  # completed, not registered twice
    champion = client.get_model_version_by_alias(name, "champion")
    challenger = client.get_model_version_by_alias(name, "challenger")
    assert champion.version == challenger.version == "1"
    # what is reported is what the registry holds
    assert result["version"] == 1 and result["alias"] == "challenger" and result["aliases"] == ["challenger", "champion"]
    assert result["promoted"] and not result["needs_review"]
    tags = champion.tags
    assert tags["promoted_by"].startswith("auto-promote") and "all 6 gates passed against no champion" in tags["promoted_reason"]
    assert tags["promoted_at"] and "needs-review" not in tags and tags["gates_against"] == "none"
    assert tags["config_digest"] == cfg.digest() and tags["checkpoint_uri"] == model_uri and tags["run_key"] == "k"
    assert float(tags["metric.final_mean"]) == pytest.approx(0.8) and "run summary" in champion.description
    assert "model/config.json" in {a.path for a in client.list_artifacts(parent.info.run_id, "model")}
    text = registry.review(client, name)
    assert "champion: v1" in text and "challenger: v1" in text

    # once complete, a further rerun changes nothing and reports the same
    assert register(run, model_uri, data, summary) == result
    assert client.get_model_version(name, "1").tags == tags


def test_concurrent_promotions_form_a_chain_and_none_is_lost(services):
    client = MlflowClient(services.mlflow_uri)
    name = f"race-{uuid.uuid4().hex[:8]}"
    new_version(client, name, [0.8, 0.8, 0.8])  # v1: champion
    contenders = [new_version(client, name, [0.8, 0.8, 0.8], auto_promote=False)["version"] for _ in range(4)]
    start = threading.Barrier(len(contenders))
    outcomes: dict[int, object] = {}

    def person(version: int) -> None:
        own = MlflowClient(services.mlflow_uri)  # one process each, as separate `perennial promote` calls are
        start.wait()
        try:
            outcomes[version] = registry.promote(own, name, version, by=f"user{version}", reason="race")
        except registry.RegistryError as error:
            outcomes[version] = error

    threads = [threading.Thread(target=person, args=(version,)) for version in contenders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert set(outcomes) == set(contenders)
    failures = {v: str(o) for v, o in outcomes.items() if isinstance(o, registry.RegistryError)}
    assert all("still holds registered model" in message for message in failures.values()), failures
    done = {v: o for v, o in outcomes.items() if isinstance(o, dict)}
    assert done, failures

    # each promotion replaced the one before it: following `previous` from v1 visits every success once
    after = {result["previous_champion"]: version for version, result in done.items()}
    assert len(after) == len(done), f"two promotions replaced the same champion: {done}"
    chain, version = [1], 1
    while version in after:
        version = after[version]
        chain.append(version)
    assert sorted(chain[1:]) == sorted(done)
    assert client.get_model_version_by_alias(name, "champion").version == str(chain[-1])
    for before, version in zip(chain, chain[1:]):
        assert client.get_model_version(name, str(version)).tags["previous_champion_version"] == str(before)
        assert client.get_model_version(name, str(before)).tags["superseded_by"] == str(version)

    # rollback walks back through every one of them, down to v1
    for expected in reversed(chain[:-1]):
        assert registry.rollback(client, name, by="erin", reason="walk back")["champion"] == expected
    with pytest.raises(registry.RegistryError, match="nothing to roll back"):
        registry.rollback(client, name, by="erin", reason="past v1")
    assert not client.search_registered_models(f"name = '{registry.promotion_lock_name(name)}'")  # released


def test_auto_promotion_refuses_when_the_champion_changed_after_gating(services, monkeypatch):
    client = MlflowClient(services.mlflow_uri)
    name = f"stale-{uuid.uuid4().hex[:8]}"
    new_version(client, name, [0.8, 0.8, 0.8])  # v1: champion
    new_version(client, name, [0.8, 0.8, 0.8], auto_promote=False)  # v2: awaits review

    # v3 is gated against v1; before its promotion step a person promotes v2
    real = MlflowClient.create_model_version

    def create_then_person_promotes(self, *args, **kwargs):
        version = real(self, *args, **kwargs)
        registry.promote(MlflowClient(services.mlflow_uri), name, 2, by="dana", reason="reviewed")
        return version

    monkeypatch.setattr(MlflowClient, "create_model_version", create_then_person_promotes)
    v3 = new_version(client, name, [0.85, 0.8, 0.8])
    monkeypatch.undo()

    assert client.get_model_version_by_alias(name, "champion").version == "2"  # the person's promotion stands
    assert client.get_model_version_by_alias(name, "challenger").version == "3"
    tags = client.get_model_version(name, "3").tags
    assert tags["gates_against"] == "1" and tags["needs-review"] == "true" and "promoted_at" not in tags
    reason = tags["needs_review_reason"]
    assert "auto-promotion refused" in reason and "champion v1" in reason and "champion v2" in reason
    assert not v3["promoted"] and v3["needs_review"] and v3["review_reason"] == reason and v3["aliases"] == ["challenger"]
    assert "needs_review_reason" in registry.review(client, name)
    # rollback goes back to what v2 replaced: nothing was skipped
    assert registry.rollback(client, name, by="erin", reason="r")["champion"] == 1


def test_promotion_lock_waits_for_its_holder_and_sets_aside_a_stale_one(services, monkeypatch):
    client = MlflowClient(services.mlflow_uri)
    name = f"lock-{uuid.uuid4().hex[:8]}"
    lock = registry.promotion_lock_name(name)
    with registry.promotion_lock(client, name, by="dana"):
        with pytest.raises(registry.RegistryError, match=f"by dana.*still holds registered model {lock}"):
            with registry.promotion_lock(client, name, by="erin", timeout_seconds=1):
                pass
    assert not client.search_registered_models(f"name = '{lock}'")

    # a holder that crashed leaves the lock; once stale it is set aside (kept as the record) and taken
    client.create_registered_model(lock, tags={"token": "crashed", "holder": "dana"})
    monkeypatch.setattr(registry, "LOCK_STALE_SECONDS", -1)
    with registry.promotion_lock(client, name, by="erin", timeout_seconds=30):
        assert client.get_registered_model(lock).tags["holder"] == "erin"
    assert client.get_registered_model(f"{lock}.stale-crashed").tags["holder"] == "dana"
    assert not client.search_registered_models(f"name = '{lock}'")
