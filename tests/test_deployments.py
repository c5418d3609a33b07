"""Prefect deployments: the definitions in deployments/prefect.yaml, and the worker path end to end
against a real `prefect server start`, process work pool and `prefect worker start`.

`perennial deploy` registers deployments/prefect.yaml from the project root, exactly as `make deploy`
does; the real `continual-retrain/manual` deployment is then triggered through the Prefect API
with a micro config (tests/test_pipeline.py MICRO) pointing at the session's S3 and MLflow, and
its registered model version and `perennial status` are checked.
"""

from __future__ import annotations

import ast
import json
import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from perennial.config import load_config
from app.services import free_ports, stop_process_group

ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"
PREFECT = str(Path(sys.executable).parent / "prefect")


def deployments() -> dict[str, dict]:
    return {d["name"]: d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}


def test_prefect_yaml_defines_the_five_deployments():
    from prefect.client.schemas.schedules import CronSchedule

    from perennial.ingest.events import RETRAIN_DUE, lineage_resource

    found = deployments()
    assert set(found) == {"nightly", "on-data", "manual", "evaluate-only", "daily"}
    for name, deployment in found.items():
        assert deployment["work_pool"]["name"] == "perennial-process", name
        path, function = deployment["entrypoint"].split(":")
        # the entrypoint names a @flow function in a file of this project (checked without importing torch)
        tree = ast.parse((ROOT / path).read_text())
        flows = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)
                 and any("flow" in ast.unparse(d) for d in node.decorator_list)}
        assert function in flows, (name, deployment["entrypoint"])
        # parameters form a valid configuration before anything is scheduled
        params = deployment["parameters"]
        load_config(ROOT / params["config_path"], params.get("overrides", []))
    nightly = found["nightly"]
    assert nightly["entrypoint"] == "flows/continual_retrain.py:continual_retrain"
    (schedule,) = nightly["schedules"]
    CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # raises on a bad cron
    cfg = load_config(ROOT / "configs/demo.yaml", nightly["parameters"]["overrides"])
    assert cfg.data.source == "datasets" and all(d.incremental for d in cfg.data.datasets)
    assert cfg.lineage.continue_from == "champion"  # the nightly continues the champion (issue #36)
    on_data = found["on-data"]
    assert on_data["parameters"]["overrides"] == nightly["parameters"]["overrides"]  # the same continuing retrain
    (trigger,) = on_data["triggers"]
    assert trigger["expect"] == [RETRAIN_DUE] and trigger["match"]["prefect.resource.id"] == lineage_resource(cfg.tracking.registered_model)
    assert found["evaluate-only"]["parameters"]["model_uri"].startswith("models:/")
    gc = found["daily"]  # garbage collection of the lineage's storage (tasks/gc.py), daily and a real sweep
    assert gc["entrypoint"] == "flows/gc.py:gc" and gc["parameters"]["dry_run"] is False
    (schedule,) = gc["schedules"]
    CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])


# --- the worker path against a real Prefect server ----------------------------------------------


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prefect server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"prefect server not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def running_prefect_server(home: Path, **settings: str):
    """A real `prefect server start` on a free port, with its own PREFECT_HOME and sqlite database.

    Yields {"url", "env", "home", "log"}; `settings` are extra PREFECT_* variables for the server
    (and for the clients that copy `env`).
    """
    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_WORKER_QUERY_SECONDS": "1",  # pick the run up at once, not after the default 10 s
        **settings,
    }
    log = home / "server.log"
    proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(url, proc, log, timeout=120)
        yield {"url": url, "env": env, "home": home, "log": log}
    finally:
        stop_process_group(proc)


@contextlib.contextmanager
def pointed_at(server: dict, monkeypatch):
    """Point this process (settings) and its subprocesses (environment) at a test server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    for key, value in server["env"].items():
        if key.startswith("PREFECT_"):
            monkeypatch.setenv(key, value)
    _stop_concurrency_services()
    try:
        with temporary_settings(updates={PREFECT_API_URL: server["url"]}):
            yield server
    finally:
        _stop_concurrency_services()


def _stop_concurrency_services() -> None:
    """Stop Prefect's process-wide slot-acquisition services, so none outlives the API it was started for.

    Prefect keeps one service per set of limit names, with a client bound to the API URL current when it
    started. A `lineage_lock("lineage-a")` here would otherwise leave one bound to this server, and a later
    test's lock on the same lineage (against the session harness) would talk to a stopped server.
    """
    from prefect.concurrency.services import ConcurrencySlotAcquisitionService, ConcurrencySlotAcquisitionWithLeaseService

    for service in (ConcurrencySlotAcquisitionService, ConcurrencySlotAcquisitionWithLeaseService):
        service.drain_all(timeout=30, at_exit=False)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    # The real nightly deployment is registered too; without the scheduler no 02:00 run can be
    # created for the worker to pick up while a test runs near that hour (tests/test_schedule.py
    # runs the scheduler on a server of its own).
    with running_prefect_server(tmp_path_factory.mktemp("prefect-home"), PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false") as server:
        yield server


@pytest.fixture
def prefect_api(prefect_server, monkeypatch):
    with pointed_at(prefect_server, monkeypatch) as server:
        yield server


def _git_sha() -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


@pytest.mark.integration
def test_manual_retrain_deployment_runs_on_a_process_worker(services, prefect_api, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.flows import load_flow_from_entrypoint

    from app.cli import ensure_work_pools, main
    from tests.test_pipeline import micro_config

    # A micro retrain (two tasks, a few steps per stage) given as a config file plus overrides,
    # the documented `-p config_path=... --params overrides` way of triggering `manual`.
    config_path = tmp_path / "micro.yaml"
    config_path.write_text(yaml.safe_dump(micro_config(services, tmp_path).model_dump(mode="json")))
    overrides = ["run_name=deployed", "data.demo.tasks=[arithmetic, reverse]", "storage.bucket=deploy-test",
                 "tracking.experiment=deploy-test", "tracking.registered_model=deploy-micro"]
    cfg = load_config(config_path, overrides)

    # The worker starts while `perennial deploy` registers the deployments (both take seconds on
    # 2 busy cores); it needs the work pool first, which deploy would create as well. Its
    # environment carries the services' endpoints and S3 keys (conftest `services`) and the
    # Prefect API (`prefect_api`); flow runs inherit it.
    assert ensure_work_pools(PREFECT_YAML) == ["perennial-process"]
    log = tmp_path / "worker.log"
    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "perennial-process", "--limit", "1"],
                              cwd=tmp_path, env=dict(os.environ), stdout=log.open("w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        monkeypatch.chdir(ROOT)  # `make deploy` runs from the project root
        assert main(["deploy"]) == 0
        with get_client(sync_client=True) as client:
            pool = client.read_work_pool("perennial-process")
            assert pool.type == "process"
            for name, spec in deployments().items():
                flow_name = load_flow_from_entrypoint(spec["entrypoint"]).name  # continual-retrain, evaluate-only, gc
                deployed = client.read_deployment_by_name(f"{flow_name}/{name}")
                assert deployed.parameters == spec["parameters"] and deployed.work_pool_name == "perennial-process", name
            # no pull section: flow runs load the code from the folder `perennial deploy` ran in
            manual = client.read_deployment_by_name("continual-retrain/manual")
            assert Path(manual.pull_steps[0]["prefect.deployments.steps.set_working_directory"]["directory"]) == ROOT

        flow_run = run_deployment(
            "continual-retrain/manual",
            parameters={"config_path": str(config_path), "overrides": overrides},
            timeout=540,
            poll_interval=2,
        )
        assert flow_run.state is not None and flow_run.state.is_completed(), (flow_run.state, log.read_text()[-4000:])
    finally:
        stop_process_group(worker)

    # The retrain registered a new version with its lineage, joined to the Prefect flow run.
    client = MlflowClient(services.mlflow_uri)
    version = client.get_model_version_by_alias("deploy-micro", "challenger")
    parent = client.get_run(version.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect.flow_run_id"] == str(flow_run.id)
    tags = version.tags
    assert tags["git_sha"] == _git_sha()
    assert tags["config_digest"] == cfg.digest() == parent.data.tags["config_digest"]
    assert tags["run_key"] == parent.data.tags["perennial.run_key"]
    assert tags["tuning_method"] == cfg.cit.tuning.method
    logged = {d.dataset.name: d.dataset.digest for d in parent.inputs.dataset_inputs}
    assert set(logged) >= {"general", "domain", "arithmetic", "reverse"}
    assert {name: tags[f"dataset.{name}"] for name in logged} == logged
    assert tags["checkpoint_uri"].startswith(f"s3://deploy-test/perennial/runs/deploy-micro/{tags['run_key']}/stages/cit-02-reverse/")

    # `perennial status` joins the Prefect flow run with the MLflow run
    capsys.readouterr()
    assert main(["status", "--experiment", "deploy-test", "--tracking-uri", services.mlflow_uri]) == 0
    out = capsys.readouterr().out
    assert f"prefect: {prefect_api['url']}" in out, out
    assert f"prefect  COMPLETED  flow run {flow_run.name!r}  deployment continual-retrain/manual" in out, out
    assert "mlflow   FINISHED   last stage cit-02-reverse (FINISHED)" in out, out
    assert f"{services.mlflow_uri}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}" in out, out
    assert f"s3       s3://deploy-test/perennial/runs/deploy-micro/{tags['run_key']}" in out, out
    assert "with no MLflow run" not in out, out


@pytest.mark.integration
def test_lineage_lock_lets_one_retrain_per_lineage_train(prefect_api):
    from perennial.locks import lineage_limit_name, lineage_lock

    with lineage_lock("lineage-a"):
        # a second retrain of the same lineage waits (here: gives up after 2 s) ...
        started = time.time()
        with pytest.raises(TimeoutError):
            with lineage_lock("lineage-a", timeout_seconds=2):
                pytest.fail("two retrains of lineage-a held the slot at once")
        assert time.time() - started >= 2
        # ... while another lineage trains at the same time
        with lineage_lock("lineage-b", timeout_seconds=30):
            pass
    with lineage_lock("lineage-a", timeout_seconds=30):  # released on exit
        pass

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(lineage_limit_name("lineage-a"))
        assert limit.limit == 1 and limit.active_slots == 0


@pytest.mark.integration
def test_new_records_start_the_continuing_retrain_through_prefect_events(services, prefect_api, tmp_path, monkeypatch):
    """Issue #36: a retrain starts when data arrives. `perennial ingest` emits Prefect events; the on-data
    deployment's trigger (deployments/prefect.yaml) creates the retrain's flow run from the event alone."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from app.cli import ensure_work_pools, main
    from perennial import demo_data
    from perennial.config import StorageConfig
    from perennial.ingest.events import DATASET_COMMITTED, RETRAIN_DUE
    from perennial.storage import ObjectStore
    from tests.test_security import _jsonl, nightly_config, publish_incoming

    monkeypatch.chdir(ROOT)
    assert ensure_work_pools(PREFECT_YAML) == ["perennial-process"]
    assert main(["deploy", "--name", "on-data"]) == 0
    with get_client(sync_client=True) as client:
        on_data = client.read_deployment_by_name("continual-retrain/on-data")

        def runs() -> list:
            return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[on_data.id])))

        store = ObjectStore(StorageConfig(endpoint_url=services.s3_endpoint, bucket="on-data"))
        store.ensure_bucket()
        publish_incoming(store)
        cfg = nightly_config(services, tmp_path, "on-data").model_dump(mode="json")
        cfg["tracking"]["registered_model"] = deployments()["on-data"]["triggers"][0]["match"]["prefect.resource.id"].split(".", 2)[2]
        config_path = tmp_path / "ingest.yaml"
        config_path.write_text(yaml.safe_dump(cfg))

        def ingest(threshold: int) -> list[dict]:
            done = subprocess.run([sys.executable, "-m", "app.cli", "ingest", str(config_path), f"lineage.retrain_after_records={threshold}"],
                                  cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-3000:]
            return [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"event"')]

        # Fewer records wait for training than the lineage's threshold: the versions are announced, no retrain is due.
        first = ingest(threshold=1000)
        assert {event["event"] for event in first} == {DATASET_COMMITTED}
        pending = max(event["pending_records"] for event in first if event["dataset"] == "tasks")
        assert pending == 56  # the night's 48 train and 8 test records, none trained on yet
        time.sleep(5)
        assert runs() == []

        # A new object brings the waiting records past it: the event alone starts the retrain.
        records = demo_data.task_records(demo_data.demo_tasks(7)["reverse"], 48, 8, 7)
        store.put_bytes("incoming/tasks/day2.jsonl", _jsonl(records))
        second = ingest(threshold=250)
        due = [event for event in second if event["event"] == RETRAIN_DUE]
        assert len(due) == 1 and due[0]["pending_records"] >= 250 and due[0]["datasets"]["tasks"] == 112
        deadline = time.time() + 90
        while time.time() < deadline and not runs():
            time.sleep(1)
        (started,) = runs()
    assert started.parameters["overrides"] == deployments()["on-data"]["parameters"]["overrides"]
    assert "lineage.continue_from=champion" in started.parameters["overrides"]
