"""Perennial against MLflow with its basic-auth app (`perennial services up --auth`), on a real server.

Three identities with generated passwords: retrain (EDIT on the experiment and the registered model), reviewer
(MANAGE on the model) and admin. Changing `champion` takes MANAGE, checked before anything changes, by Perennial
and by the server itself (app perennial-auth: a raw REST or UI call is refused too); decisions name the
authenticated user; missing or wrong credentials get one clear error, never a retry loop; the credentials appear
in no param, tag, log line or artifact. Versions are registered directly (no training), as in
tests/test_registry.py, except in the one real retrain.
"""

from __future__ import annotations

import base64
import json
import logging
import stat
import time
import urllib.error
import urllib.request
import uuid
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from app.cli import main
from app.services import AUTH_APP, running_services
from perennial import registry
from perennial.tracking import MlflowAuthError, Tracker, authenticated_user
from tests.test_registry import GATES, metrics, CHANCE, TASKS

pytestmark = pytest.mark.integration

EXPERIMENT = "auth-test"


@pytest.fixture(scope="module")
def auth_services(services, tmp_path_factory):
    # running_services gives os.environ back as it found it. The session's services (conftest) start first, so
    # the two lifetimes nest: started inside this module, the session's S3 keys would be removed with these,
    # and a later module of the same worker would find none.
    with running_services(tmp_path_factory.mktemp("auth-services"), timeout=120, auth=True) as local:
        yield local


def act_as(monkeypatch, services, identity: str | None, password: str | None = None) -> MlflowClient:
    """A client acting as one identity (None: anonymous), through the variables MLflow's client reads."""
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    if identity is not None:
        user = services.auth_identities()[identity]
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user["username"])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password or user["password"])
    return MlflowClient(services.mlflow_uri)


def lineage(services, auto_promote: bool = False) -> str:
    """A fresh registered model, created by the admin, with the documented grants."""
    name = f"auth-{uuid.uuid4().hex[:8]}"
    services.grant_lineage(EXPERIMENT, name, auto_promote=auto_promote)
    return name


def register(client: MlflowClient, name: str, auto_promote: bool = True) -> dict:
    """A version whose gates all pass, registered the way a retrain does."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    run = client.create_run(experiment.experiment_id, run_name=f"{name}-retrain")
    tags = {"base_model": "tiny", "checkpoint_uri": f"s3://bucket/runs/{run.info.run_id}/final",
            **{f"dataset.{task}": "d" * 16 for task in TASKS}}
    return registry.register_version(client, name, f"{run.info.artifact_uri}/model", metrics([0.9, 0.9, 0.9], chance=CHANCE),
                                     GATES, auto_promote=auto_promote, run_id=run.info.run_id, tags=tags,
                                     by=f"auto-promote ({registry.whoami()})")


def http(services, identity: str, method: str, endpoint: str, body: dict) -> tuple[int, str]:
    """One raw request to MLflow as ``identity``, as a script or the UI's browser would send it: (status, body)."""
    user = services.auth_identities()[identity]
    token = base64.b64encode(f"{user['username']}:{user['password']}".encode()).decode()
    request = urllib.request.Request(f"{services.mlflow_uri}{endpoint}", method=method, data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def snapshot(client: MlflowClient, name: str) -> dict:
    """Everything a promotion could touch: the model's aliases, every version's tags, the lock models."""
    model = client.get_registered_model(name)
    versions = client.search_model_versions(f"name = '{name}'")
    locks = sorted(m.name for m in client.search_registered_models(max_results=1000) if m.name.startswith(f"{name}.promotion-lock"))
    return {"aliases": dict(model.aliases), "versions": {v.version: dict(v.tags) for v in versions}, "locks": locks}


def test_secrets_are_files_only_their_owner_reads_and_no_password_is_printed(auth_services, capsys):
    root = auth_services.root
    for path in ["mlflow-auth.json", "mlflow-auth.ini", "mlflow-auth.db", "services.env", "admin.env", "retrain.env", "reviewer.env",
                 "credentials.json"]:
        assert stat.S_IMODE((root / path).stat().st_mode) == 0o600, path
    identities = auth_services.auth_identities()
    assert set(identities) == {"admin", "retrain", "reviewer"}
    assert "MLFLOW_TRACKING_USERNAME=retrain" in (root / "services.env").read_text()
    assert "MLFLOW_TRACKING_USERNAME=reviewer" in (root / "reviewer.env").read_text()
    assert main(["services", "status", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "auth: on" in out
    passwords = [user["password"] for user in identities.values()]
    log = (root / "mlflow.log").read_text(errors="replace")
    assert not any(password in out or password in log for password in passwords)
    assert "admin_password" not in (root / "mlflow-auth.ini").read_text()  # the admin's goes by environment, once


def test_retrain_registers_but_auto_promotion_without_the_grant_waits_for_review(auth_services, monkeypatch):
    name = lineage(auth_services)
    retrain = act_as(monkeypatch, auth_services, "retrain")
    result = register(retrain, name)
    assert (result["version"], result["promoted"], result["needs_review"]) == (1, False, True)
    assert "challenger" in result["aliases"] and "champion" not in result["aliases"]
    reason = result["review_reason"]
    assert "auto-promotion refused" in reason and "'retrain'" in reason and "MANAGE" in reason and repr(name) in reason
    assert registry.alias_version(retrain, name, registry.CHAMPION) is None
    assert retrain.get_model_version(name, "1").tags[registry.DECISION_TAG].startswith("needs review: auto-promotion refused")

    # granted MANAGE on the model, the retrain identity's auto-promotion goes through, under its own name
    auth_services.grant_lineage(EXPERIMENT, name, auto_promote=True)
    promoted = register(retrain, name)
    assert promoted["promoted"] and promoted["version"] == 2
    tags = retrain.get_model_version(name, "2").tags
    assert tags["promoted_by"] == "auto-promote (retrain)"
    assert tags[registry.DECISION_TAG].startswith("champion: promoted by auto-promote (retrain)")


def test_reviewer_promotes_and_is_recorded_and_by_cannot_claim_another_name(auth_services, monkeypatch, capsys):
    name = lineage(auth_services)
    register(act_as(monkeypatch, auth_services, "retrain"), name)
    reviewer = act_as(monkeypatch, auth_services, "reviewer")
    monkeypatch.setenv("USER", "someone-else")
    uri = ["--tracking-uri", auth_services.mlflow_uri]

    before = snapshot(reviewer, name)
    assert main(["promote", name, "1", "--reason", "looked at the samples", "--by", "alice", *uri]) == 1
    err = capsys.readouterr().err
    assert "--by 'alice'" in err and "'reviewer'" in err
    assert snapshot(reviewer, name) == before

    assert main(["promote", name, "1", "--reason", "looked at the samples", *uri]) == 0
    tags = reviewer.get_model_version(name, "1").tags
    assert tags["promoted_by"] == "reviewer"
    assert tags[registry.DECISION_TAG] == "champion: promoted by reviewer: looked at the samples"
    assert registry.alias_version(reviewer, name, registry.CHAMPION).version == "1"
    assert main(["unpromote", name, "--reason", "withdrawn", *uri]) == 0
    assert reviewer.get_model_version(name, "1").tags["unpromoted_by"] == "reviewer"


def test_retrain_identity_is_refused_promote_rollback_unpromote_and_nothing_changes(auth_services, monkeypatch, capsys):
    name = lineage(auth_services)
    retrain = act_as(monkeypatch, auth_services, "retrain")
    register(retrain, name)
    register(retrain, name)
    reviewer = act_as(monkeypatch, auth_services, "reviewer")
    registry.promote(reviewer, name, 1, reason="first")
    registry.promote(reviewer, name, 2, reason="second")  # champion v2, previous-champion v1: rollback could act

    retrain = act_as(monkeypatch, auth_services, "retrain")
    uri = ["--tracking-uri", auth_services.mlflow_uri]
    before = snapshot(retrain, name)
    for command in (["promote", name, "1", "--reason", "mine"], ["rollback", name], ["unpromote", name]):
        assert main([*command, *uri]) == 1, command
        err = capsys.readouterr().err
        assert f"{command[0]} refused: MLflow user 'retrain' lacks MANAGE permission on registered model {name!r} (holds EDIT)" in err
        assert "Nothing was changed" in err
        assert snapshot(retrain, name) == before, command
    with pytest.raises(registry.PermissionDenied):
        registry.promote(retrain, name, 1, reason="library call")
    assert snapshot(retrain, name) == before


def test_perennial_auth_is_the_mlflow_app_the_services_run():
    """`mlflow server --app-name perennial-auth` resolves through the installed entry points (`pip install -e .`),
    to MLflow's basic-auth app with the alias routes guarded; its client is MLflow's basic-auth client."""
    from perennial import auth_app

    assert AUTH_APP == auth_app.APP_NAME == "perennial-auth"
    apps = {entry.name: entry.value for entry in entry_points(group="mlflow.app")}
    assert apps[AUTH_APP] == "perennial.auth_app:create_app"
    clients = {entry.name: entry.value for entry in entry_points(group="mlflow.app.client")}
    assert clients[AUTH_APP] == clients["basic-auth"]
    routes = auth_app.guarded_routes()
    assert {route for route, request in routes.items() if request is not auth_app.auth.RenameRegisteredModel} == {
        (f"{prefix}/mlflow/registered-models/alias", method) for prefix in ("/api/2.0", "/ajax-api/2.0") for method in ("POST", "DELETE")}


def test_the_server_itself_refuses_alias_changes_and_renames_without_manage(auth_services, monkeypatch):
    """Not only Perennial's commands: MLflow refuses the retrain identity's raw calls (Python client, REST, the UI's
    ajax routes) that would change an alias but `challenger`, or rename the model, and nothing changes; the
    reviewer's raw calls go through."""
    name = lineage(auth_services)
    retrain = act_as(monkeypatch, auth_services, "retrain")
    register(retrain, name)
    register(retrain, name)
    reviewer = act_as(monkeypatch, auth_services, "reviewer")
    registry.promote(reviewer, name, 1, reason="first")  # champion v1, challenger v2

    retrain = act_as(monkeypatch, auth_services, "retrain")
    before = snapshot(retrain, name)
    assert before["aliases"] == {"champion": "1", "challenger": "2"}
    for attempt, args in [(retrain.set_registered_model_alias, (name, "champion", "2")),
                          (retrain.delete_registered_model_alias, (name, "champion")),
                          (retrain.set_registered_model_alias, (name, "previous-champion", "2")),
                          (retrain.set_registered_model_alias, (name, "production", "2")),  # any alias but challenger
                          (retrain.rename_registered_model, (name, f"{name}-moved"))]:
        with pytest.raises(MlflowException) as refused:
            attempt(*args)
        assert refused.value.error_code == "PERMISSION_DENIED", (attempt.__name__, args)
        assert "failed with error code 403 != 200. Response body: 'Permission denied'" in str(refused.value)
    alias = {"name": name, "alias": "champion", "version": "2"}
    for prefix in ("/api/2.0", "/ajax-api/2.0"):  # REST, and the routes the UI's alias editor calls
        for method in ("POST", "DELETE"):
            assert http(auth_services, "retrain", method, f"{prefix}/mlflow/registered-models/alias", alias) == (403, "Permission denied")
    assert snapshot(retrain, name) == before

    retrain.set_registered_model_alias(name, "challenger", "1")  # what every retrain does keeps MLflow's rule (EDIT)
    assert registry.alias_version(retrain, name, registry.CHALLENGER).version == "1"

    reviewer = act_as(monkeypatch, auth_services, "reviewer")
    reviewer.set_registered_model_alias(name, "champion", "2")
    assert registry.alias_version(reviewer, name, registry.CHAMPION).version == "2"
    reviewer.delete_registered_model_alias(name, "champion")
    assert registry.alias_version(reviewer, name, registry.CHAMPION) is None
    assert http(auth_services, "admin", "POST", "/ajax-api/2.0/mlflow/registered-models/alias", alias)[0] == 200  # admins pass
    assert registry.alias_version(reviewer, name, registry.CHAMPION).version == "2"


@pytest.mark.usefixtures("single_torch_thread")
def test_a_real_retrain_as_the_retrain_identity_registers_and_waits_for_review(auth_services, prefect_harness, monkeypatch, tmp_path):
    """The continual_retrain flow, one micro task, acting as the retrain identity with auto-promotion on and every
    gate passing: the version is registered as `challenger`, auto-promotion is refused for want of MANAGE, and the
    version waits for a reviewer (needs-review)."""
    from flows.continual_retrain import continual_retrain
    from perennial.config import build_config
    from tests.test_pipeline import micro_config

    name = lineage(auth_services)
    act_as(monkeypatch, auth_services, "retrain")
    no_gates = ", ".join(f"{gate}: null" for gate in ("min_bwt", "max_task_drop", "min_chance_margin", "max_general_ppl_ratio",
                                                     "max_general_ppl_ratio_vs_base", "max_general_task_drop", "max_output_drift_kl"))
    cfg = build_config(micro_config(auth_services, tmp_path).model_dump(mode="json"), [
        "data.demo.tasks=[arithmetic]", "data.demo.heldout_tasks=[]", f"storage.bucket={auth_services.bucket}",
        f"tracking.experiment={EXPERIMENT}", f"tracking.registered_model={name}", "registry.auto_promote=true",
        f"registry.gates={{{no_gates}}}"])
    summary = continual_retrain(config=cfg.model_dump(mode="json"))

    result = summary["registered_model"]
    assert (result["version"], result["aliases"], result["promoted"], result["needs_review"]) == (1, ["challenger"], False, True)
    reason = result["review_reason"]
    assert "auto-promotion refused" in reason and "'retrain'" in reason and "MANAGE" in reason
    tags = MlflowClient(auth_services.mlflow_uri).get_model_version(name, "1").tags
    assert tags[registry.NEEDS_REVIEW_TAG] == "true"
    assert tags[registry.DECISION_TAG].startswith("needs review: auto-promotion refused")
    assert not any(gate.get("passed") is False for gate in result["gates"])  # refused for the permission, not a gate


def test_anonymous_and_wrong_password_each_get_one_clear_error_at_once(auth_services, monkeypatch, capsys):
    name = lineage(auth_services)
    uri = ["--tracking-uri", auth_services.mlflow_uri]
    act_as(monkeypatch, auth_services, None)
    started = time.monotonic()
    assert main(["promote", name, "1", *uri]) == 1
    err = capsys.readouterr().err
    assert time.monotonic() - started < 10
    assert err.count("error:") == 1 and "requires authentication" in err and "no credentials" in err and "Not retried" in err

    wrong = "not-" + auth_services.auth_identities()["reviewer"]["password"]
    act_as(monkeypatch, auth_services, "reviewer", password=wrong)
    started = time.monotonic()
    assert main(["review", name, *uri]) == 1
    err = capsys.readouterr().err
    assert time.monotonic() - started < 10
    assert err.count("error:") == 1 and "refused the credentials of user 'reviewer'" in err and wrong not in err
    with pytest.raises(MlflowAuthError):
        authenticated_user(auth_services.mlflow_uri)

    # a retrain's metric buffer gives up at once on a refusal (it retries a restarting server for a minute)
    tracker = Tracker(auth_services.mlflow_uri, EXPERIMENT)
    tracker._pending.append(("0" * 32, Metric("loss", 1.0, 0, 0)))
    started = time.monotonic()
    with pytest.raises(MlflowAuthError):
        tracker.flush(attempts=10)
    assert time.monotonic() - started < 10

    # and Prefect does not retry a stage that MLflow refused
    from tasks.wrappers import retryable

    class State:
        def __init__(self, error):
            self.error = error

        def result(self, raise_on_failure=False):
            return self.error

    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, PERMISSION_DENIED

    refused = MlflowException("denied", error_code=PERMISSION_DENIED)
    assert not retryable(None, None, State(refused)) and not retryable(None, None, State(MlflowAuthError("x")))
    assert retryable(None, None, State(MlflowException("busy", error_code=INTERNAL_ERROR)))


def test_credentials_appear_in_no_param_tag_log_line_or_artifact(auth_services, monkeypatch, tmp_path, caplog, capsys):
    name = lineage(auth_services)
    retrain = act_as(monkeypatch, auth_services, "retrain")
    user = auth_services.auth_identities()["retrain"]
    password = user["password"]
    caplog.set_level(logging.DEBUG)
    tracker = Tracker(auth_services.mlflow_uri, EXPERIMENT)  # no secrets passed: MLflow's are always scrubbed
    run_id = tracker.start_run("leaky", tags={"env": f"MLFLOW_TRACKING_PASSWORD={password}"})
    # a config or environment dump that carries them, as a careless caller might log it
    environment = {"MLFLOW_TRACKING_USERNAME": user["username"], "MLFLOW_TRACKING_PASSWORD": password,
                   "url": f"https://{user['username']}:{password}@mlflow.example/"}
    tracker.log_params(run_id, {"environment": json.dumps(environment), "password": password})
    tracker.set_tags(run_id, {"note": f"pw {password}"})
    tracker.log_text(run_id, f"env dump: {environment}", "report/env.txt")
    tracker.log_metrics(run_id, {"loss": 1.0})
    tracker.finish(run_id)
    logging.getLogger("perennial.test").info("run %s logged", run_id)
    register(retrain, name)

    run = retrain.get_run(run_id)
    recorded = [*run.data.params.values(), *run.data.tags.values()]
    assert "***" in run.data.params["password"] and run.data.params["password"] == "***"
    downloaded = retrain.download_artifacts(run_id, "report", str(tmp_path))
    texts = [path.read_text(errors="replace") for path in Path(downloaded).rglob("*") if path.is_file()]
    versions = retrain.search_model_versions(f"name = '{name}'")
    recorded += [value for version in versions for value in version.tags.values()] + [v.description or "" for v in versions]
    captured = capsys.readouterr()
    everything = "\n".join([*recorded, *texts, caplog.text, captured.out, captured.err])
    assert texts and password not in everything
    assert "***" in texts[0]


def test_up_with_auth_refuses_a_root_whose_mlflow_runs_without_it(services, capsys):
    """`up` leaves running servers as they are: turning auth on for a root whose MLflow already runs without it would
    leave the registry open while the root said auth is on."""
    ports = (services.root / "ports.json").read_text()
    assert main(["services", "up", "--auth", "--root", str(services.root)]) == 1
    err = capsys.readouterr().err
    assert f"error: MLflow of {services.root} is running without auth, so `up --auth` would leave it open; nothing was changed" in err
    assert "Traceback" not in err and (services.root / "ports.json").read_text() == ports
    assert not (services.root / "mlflow-auth.json").exists()
