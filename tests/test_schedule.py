"""Scheduled retraining against a real `prefect server start` with its scheduler service ON.

The other deployment tests switch the scheduler off, so they never saw that Prefect 3.8.8 with
SQLAlchemy 2.1 creates no scheduled run at all ("Can't evaluate bulk DML statement"): the nightly
never fired. Here the scheduler creates the runs and a process worker (or the `serve` runner)
executes them, end to end with real S3 and MLflow.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest
import yaml

from tests.test_deployments import PREFECT, PREFECT_YAML, ROOT, _stop, deployments, pointed_at, running_prefect_server
from tests.test_security import _jsonl, nightly_config, publish_incoming

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def scheduling_server(tmp_path_factory):
    """A real Prefect server whose scheduler runs every 2 s instead of every 60 s."""
    with running_prefect_server(tmp_path_factory.mktemp("prefect-sched"),
                                PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="true",
                                PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",
                                PREFECT_RUNNER_POLL_FREQUENCY="1") as server:
        yield server


@pytest.fixture
def scheduling_api(scheduling_server, monkeypatch):
    with pointed_at(scheduling_server, monkeypatch) as server:
        yield server


def _flow_runs(client, deployment_id):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def _nightly_setup(services, tmp_path, bucket: str):
    """A bucket with a first night's incoming objects, and the nightly config (micro sizes) as a file."""
    from perennial.config import StorageConfig
    from perennial.storage import ObjectStore

    store = ObjectStore(StorageConfig(endpoint_url=services.s3_endpoint, bucket=bucket))
    store.ensure_bucket()
    publish_incoming(store)
    cfg = nightly_config(services, tmp_path, bucket)
    path = tmp_path / "nightly.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return store, cfg, path


def _versions(mlflow_uri: str, model: str) -> list:
    from mlflow.tracking import MlflowClient

    return sorted(MlflowClient(mlflow_uri).search_model_versions(f"name='{model}'"), key=lambda v: int(v.version))


def test_scheduler_creates_nightly_runs_and_a_worker_executes_one(services, scheduling_api, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.client.schemas.schedules import IntervalSchedule

    from app.cli import ensure_work_pools, main

    monkeypatch.chdir(ROOT)  # `make deploy` runs from the project root
    assert ensure_work_pools(PREFECT_YAML) == ["perennial-process"]
    assert main(["deploy", "--name", "nightly"]) == 0
    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("continual-retrain/nightly")
        # 1. The scheduler service fills in the cron's upcoming 02:00 UTC runs by itself.
        deadline = time.time() + 90
        scheduled = []
        while time.time() < deadline and not scheduled:
            scheduled = [run for run in _flow_runs(client, nightly.id) if run.auto_scheduled]
            time.sleep(1)
        assert scheduled, f"the scheduler created no run of the nightly:\n{scheduling_api['log'].read_text()[-3000:]}"
        for run in scheduled:
            assert run.state.is_scheduled()
            when = run.state.state_details.scheduled_time.astimezone(timezone.utc)
            assert (when.hour, when.minute) == (2, 0) and when > datetime.now(timezone.utc), when

        # 2. The same deployment, pointed at a micro config and a schedule due in a few seconds:
        #    the scheduler creates the run and a process worker executes the real retrain.
        _, cfg, config_path = _nightly_setup(services, tmp_path, "sched-nightly")
        client.update_deployment(nightly.id, DeploymentUpdate(
            parameters={"config_path": str(config_path), "overrides": [], "run_key": nightly.parameters["run_key"]}))
        for schedule in client.read_deployment_schedules(nightly.id):
            client.delete_deployment_schedule(nightly.id, schedule.id)
        due = datetime.now(timezone.utc) + timedelta(seconds=5)
        client.create_deployment_schedules(nightly.id, [(IntervalSchedule(interval=timedelta(days=1), anchor_date=due), True)])

    log = tmp_path / "worker.log"
    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "perennial-process", "--limit", "1"],
                              cwd=tmp_path, env=dict(os.environ), stdout=log.open("w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        with get_client(sync_client=True) as client:
            deadline = time.time() + 540
            finished = []
            while time.time() < deadline and not finished:
                runs = [run for run in _flow_runs(client, nightly.id) if run.auto_scheduled]
                finished = [run for run in runs if run.state.is_final()]
                time.sleep(2)
    finally:
        _stop(worker)
    assert finished, f"no scheduled run finished:\n{log.read_text()[-4000:]}"
    (run,) = finished
    assert run.state.is_completed(), (run.state, log.read_text()[-4000:])
    night = run.expected_start_time.astimezone(timezone.utc).strftime("%Y%m%d")
    (version,) = _versions(services.mlflow_uri, cfg.tracking.registered_model)
    assert version.tags["run_key"] == f"nightly-{night}"


def test_served_nightly_trains_every_night_on_that_nights_data(services, scheduling_api, tmp_path):
    """Two nights in a row through `python -m deployments.serve`, with new data in between: two models."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from deployments.serve import NIGHTLY_RUN_KEY

    # the served nightly and the worker nightly key their runs the same way
    assert deployments()["nightly"]["parameters"]["run_key"] == NIGHTLY_RUN_KEY

    store, cfg, config_path = _nightly_setup(services, tmp_path, "served-nightly")
    log = tmp_path / "serve.log"
    served = subprocess.Popen([sys.executable, "-m", "deployments.serve", "--config", str(config_path)],
                              cwd=ROOT, env=dict(os.environ), stdout=log.open("w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        with get_client(sync_client=True) as client:
            deadline = time.time() + 120
            while True:
                try:
                    deployment = client.read_deployment_by_name("continual-retrain/nightly-served")
                    break
                except Exception:
                    assert served.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                    time.sleep(1)
        assert deployment.parameters["run_key"] == NIGHTLY_RUN_KEY

        today = datetime.now(timezone.utc).replace(hour=2, minute=0, second=0, microsecond=0)
        nights = [today - timedelta(days=2), today - timedelta(days=1)]
        runs = []
        for night, new_task in zip(nights, [None, "reverse"]):
            if new_task:  # the second night brings a new task
                from perennial import demo_data

                records = demo_data.task_records(demo_data.demo_tasks(7)[new_task], 48, 8, 7)
                store.put_bytes(f"incoming/tasks/{night:%Y%m%d}.jsonl", _jsonl(records))
            runs.append(run_deployment("continual-retrain/nightly-served", scheduled_time=night, timeout=540, poll_interval=2))
    finally:
        _stop(served)
    for run in runs:
        assert run.state is not None and run.state.is_completed(), (run.state, log.read_text()[-4000:])

    versions = _versions(services.mlflow_uri, cfg.tracking.registered_model)
    assert [v.tags["run_key"] for v in versions] == [f"nightly-{night:%Y%m%d}" for night in nights]
    # the second model was trained on the second night's data, in that night's own run
    first, second = (v.tags for v in versions)
    assert first["dataset.tasks"] != second["dataset.tasks"]
    for tags in (first, second):
        assert f"/runs/{tags['run_key']}/stages/cit-" in tags["checkpoint_uri"], tags
