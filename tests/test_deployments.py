"""Prefect deployments: the definitions in deployments/prefect.yaml, and the worker path end to end
against a real `prefect server start`, process work pool and `prefect worker start`.

The run goes through a probe flow registered as deployment `continual-retrain/manual`, with the
`manual` deployment's own definition from deployments/prefect.yaml (pool, parameters) and the
real `perennial deploy` command. The real retrain is not run here: on 2 busy cores importing
torch alone takes ~30 s in the flow-run process (tests/test_pipeline.py runs the flow itself).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from perennial.config import load_config
from perennial.services import free_ports

ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"
PREFECT = str(Path(sys.executable).parent / "prefect")


def deployments() -> dict[str, dict]:
    return {d["name"]: d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}


def test_prefect_yaml_defines_the_three_deployments():
    from prefect.client.schemas.schedules import CronSchedule

    found = deployments()
    assert set(found) == {"nightly", "manual", "evaluate-only"}
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
    assert found["evaluate-only"]["parameters"]["model_uri"].startswith("models:/")


# --- the worker path against a real Prefect server ----------------------------------------------

PROBE_FLOW = '''
"""Stands in for flows/continual_retrain.py: same flow name and parameters, no training."""
import json
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from perennial.config import load_config


@flow(name="continual-retrain")
def continual_retrain(config_path: str | None = None, overrides: list[str] | None = None,
                      config: dict | None = None, run_key: str | None = None) -> dict:
    cfg = load_config(config_path, overrides)
    result = {"run_name": cfg.run_name, "digest": cfg.digest(), "cwd": str(Path.cwd())}
    Path("probe-out").mkdir(exist_ok=True)
    Path("probe-out", f"{flow_run.id}.json").write_text(json.dumps(result))
    return result
'''


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


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process group this test started (the server and the worker spawn children)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on a free port, with its own PREFECT_HOME and sqlite database."""
    home = tmp_path_factory.mktemp("prefect-home")
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
    }
    log = home / "server.log"
    proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(url, proc, log, timeout=120)
        yield {"url": url, "env": env, "home": home}
    finally:
        _stop(proc)


@pytest.fixture
def prefect_api(prefect_server, monkeypatch):
    """Point this process (settings) and its subprocesses (environment) at the test server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    for key, value in prefect_server["env"].items():
        if key.startswith("PREFECT_"):
            monkeypatch.setenv(key, value)
    with temporary_settings(updates={PREFECT_API_URL: prefect_server["url"]}):
        yield prefect_server


@pytest.mark.integration
def test_manual_deployment_runs_on_a_process_worker(prefect_api, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from perennial.cli import ensure_work_pools, main

    # A project folder holding the probe flow, configs/demo.yaml and the `manual` deployment as
    # defined in deployments/prefect.yaml, with only the entrypoint swapped for the probe.
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    shutil.copy(ROOT / "configs" / "demo.yaml", project / "configs" / "demo.yaml")
    (project / "probe_flow.py").write_text(PROBE_FLOW)
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    manual = dict(deployments()["manual"], entrypoint="probe_flow.py:continual_retrain")
    spec["deployments"] = [manual]
    (project / "prefect.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(project)

    # The worker starts while `perennial deploy` registers the deployment (both take seconds to
    # start on 2 busy cores); it needs the work pool first, which deploy would create as well.
    assert ensure_work_pools(project / "prefect.yaml") == ["perennial-process"]
    log = tmp_path / "worker.log"
    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "perennial-process", "--limit", "1"],
                              cwd=project, env=dict(os.environ), stdout=log.open("w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        assert main(["deploy", "--prefect-file", "prefect.yaml"]) == 0
        with get_client(sync_client=True) as client:
            pool = client.read_work_pool("perennial-process")
            assert pool.type == "process"
            deployment = client.read_deployment_by_name("continual-retrain/manual")
            assert deployment.parameters == {"config_path": "configs/demo.yaml", "overrides": []}
            assert deployment.work_pool_name == "perennial-process"

        # exactly the documented `prefect deployment run 'continual-retrain/manual' -p config_path=...`
        flow_run = run_deployment(
            "continual-retrain/manual",
            parameters={"config_path": "configs/demo.yaml", "overrides": ["run_name=deploy-probe"]},
            timeout=150,
            poll_interval=1,
        )
        assert flow_run.state is not None and flow_run.state.is_completed(), (flow_run.state, log.read_text()[-4000:])
    finally:
        _stop(worker)

    # the worker ran the flow in the deployed project folder with the given parameters
    result = json.loads((project / "probe-out" / f"{flow_run.id}.json").read_text())
    assert result["run_name"] == "deploy-probe" and Path(result["cwd"]).resolve() == project.resolve()
    assert result["digest"] == load_config("configs/demo.yaml", ["run_name=deploy-probe"]).digest()


@pytest.mark.integration
def test_lineage_lock_lets_one_retrain_per_lineage_train(prefect_api):
    from perennial.registry import lineage_limit_name, lineage_lock

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
