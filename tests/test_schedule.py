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

from app.services import stop_process_group
from tests.test_deployments import PREFECT, PREFECT_YAML, ROOT, deployments, pointed_at, running_prefect_server
from tests.test_security import _jsonl, nightly_config, publish_incoming

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def scheduling_server(tmp_path_factory):
    """A real Prefect server whose scheduler runs every 2 s instead of every 60 s, and fills in a
    nightly schedule's runs 250 days ahead (default 100), so they cross a DST change in every zone."""
    with running_prefect_server(tmp_path_factory.mktemp("prefect-sched"),
                                PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="true",
                                PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",
                                # it stops at whichever of MIN_RUNS and MIN_SCHEDULED_TIME comes last (3 runs, 1 hour)
                                PREFECT_SERVER_SERVICES_SCHEDULER_MIN_RUNS="250",
                                PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS="260",
                                PREFECT_SERVER_SERVICES_SCHEDULER_MIN_SCHEDULED_TIME="P250D",
                                PREFECT_SERVER_SERVICES_SCHEDULER_MAX_SCHEDULED_TIME="P260D",
                                PREFECT_RUNNER_POLL_FREQUENCY="1") as server:
        yield server


@pytest.fixture
def scheduling_api(scheduling_server, monkeypatch):
    with pointed_at(scheduling_server, monkeypatch) as server:
        yield server


def _flow_runs(client, deployment_id):
    """Every flow run of the deployment, earliest first (the API answers at most 200 a call)."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    runs: list = []
    while page := client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                                        sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=200, offset=len(runs)):
        runs += page
    return runs


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
        stop_process_group(worker)
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
    # Its own schedule twelve hours from now: served with the default 02:00 UTC, a run of this test at 02:00 got that
    # night's run among the two it triggers.
    away = f"0 {(datetime.now(timezone.utc).hour + 12) % 24} * * *"
    served = subprocess.Popen([sys.executable, "-m", "deployments.serve", "--config", str(config_path), "--cron", away],
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
        from perennial import demo_data

        for night, new_task in zip(nights, [None, "reverse"]):
            if new_task:  # the second night brings a new task
                records = demo_data.task_records(demo_data.demo_tasks(7)[new_task], 48, 8, 7)
                store.put_bytes(f"incoming/tasks/{night:%Y%m%d}.jsonl", _jsonl(records))
            runs.append(run_deployment("continual-retrain/nightly-served", scheduled_time=night, timeout=540, poll_interval=2))
        # The second night is triggered again after more data arrived (a retry, a second trigger): that data trains too.
        late = demo_data.task_records(demo_data.demo_tasks(7)["word_count"], 48, 8, 7)
        store.put_bytes(f"incoming/tasks/{nights[1]:%Y%m%d}-late.jsonl", _jsonl(late))
        runs.append(run_deployment("continual-retrain/nightly-served", scheduled_time=nights[1], timeout=540, poll_interval=2))
    finally:
        stop_process_group(served)
    for run in runs:
        assert run.state is not None and run.state.is_completed(), (run.state, log.read_text()[-4000:])

    versions = _versions(services.mlflow_uri, cfg.tracking.registered_model)
    keys = [f"nightly-{night:%Y%m%d}" for night in nights]
    assert [v.tags["run_key"] for v in versions][:2] == keys
    # the second model was trained on the second night's data, in that night's own run; the late data in a run
    # whose key is derived from that night's
    first, second, late_run = (v.tags for v in versions)
    assert late_run["run_key"].startswith(f"{keys[1]}-data-")
    assert len({tags["dataset.tasks"] for tags in (first, second, late_run)}) == 3
    for tags in (first, second, late_run):
        assert f"/runs/{cfg.tracking.registered_model}/{tags['run_key']}/stages/cit-" in tags["checkpoint_uri"], tags

@pytest.mark.parametrize("zone, cron", [("America/Los_Angeles", "30 16 * * *"), ("Europe/London", "30 0 * * *")])
def test_a_local_time_schedule_gives_every_night_its_own_key_across_dst_changes(scheduling_api, zone, cron):
    """`{date}` is the night's date where the schedule runs. Before, it was the UTC date: these crons fall on
    either side of midnight UTC as DST changes, so two nights got one key (the second trained nothing)."""
    from zoneinfo import ZoneInfo

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import CronSchedule

    from tasks.runtime import run_date, schedule_timezone

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("continual-retrain")
        deployment_id = client.create_deployment(
            flow_id=flow_id, name=f"nightly-{zone.replace('/', '-').lower()}", parameters={"run_key": "nightly-{date}"},
            schedules=[DeploymentScheduleCreate(schedule=CronSchedule(cron=cron, timezone=zone), active=True)])
        deadline = time.time() + 90
        runs = []
        while time.time() < deadline and len(runs) < 200:
            runs = [run for run in _flow_runs(client, deployment_id) if run.auto_scheduled]
            time.sleep(1)
        assert len(runs) >= 200, f"the scheduler created {len(runs)} runs:\n{scheduling_api['log'].read_text()[-3000:]}"
        keys = {run.id: run_date(run.expected_start_time, schedule_timezone(client, run)) for run in runs}

    local = {run.id: run.expected_start_time.astimezone(ZoneInfo(zone)) for run in runs}
    offsets = {when.utcoffset() for when in local.values()}
    assert len(offsets) == 2, offsets  # the runs cross a DST change
    assert all(keys[run_id] == when.strftime("%Y%m%d") for run_id, when in local.items())  # the local night
    assert len(set(keys.values())) == len(runs)  # one key per night
    utc_dates = [run.expected_start_time.astimezone(timezone.utc).strftime("%Y%m%d") for run in runs]
    assert len(set(utc_dates)) < len(runs)  # what the UTC date gave: two nights, one key
