"""kill -9 mid-stage, rerun: the flow resumes from the last committed checkpoint and ends where an uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from flows.continual_retrain import continual_retrain
from perennial.config import StorageConfig
from perennial.storage import ObjectStore
from tests.test_pipeline import MICRO, micro_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_kill_9_mid_stage_then_rerun_matches_uninterrupted_run(services, prefect_harness, tmp_path):
    bucket = "resume-test"
    long_cit = {"cit": {"optim": {"max_steps": 60, "batch_size": 8, "warmup_steps": 1, "max_length": 64, "checkpoint_every": 10},
                        "replay": {"budget": 0.25}}}
    reference_cfg = micro_config(services, tmp_path / "ref", run_name="reference", **long_cit)
    reference_cfg = reference_cfg.model_copy(update={"storage": reference_cfg.storage.model_copy(update={"bucket": bucket})})
    reference = continual_retrain(config=reference_cfg.model_dump(mode="json"))

    killed_cfg = reference_cfg.model_copy(update={"run_name": "killed", "work_dir": tmp_path / "killed"})
    config_file = tmp_path / "killed.yaml"
    config_file.write_text(yaml.safe_dump(killed_cfg.model_dump(mode="json")))
    from prefect.settings import PREFECT_API_URL

    # The child reports to the same Prefect API as the run that resumes it, as a deployment's runs do, so the
    # flow run killed mid-stage is there to see.
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-child"), "PREFECT_API_URL": PREFECT_API_URL.value()}
    for endpoint in ("PERENNIAL_S3_ENDPOINT", "PERENNIAL_BUCKET", "MLFLOW_TRACKING_URI"):
        env.pop(endpoint, None)  # the YAML names this test's services; the env defaults would override it
    log = open(tmp_path / "child.log", "wb")
    child = subprocess.Popen([sys.executable, "-m", "app.cli", "run", str(config_file)], env=env,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    store = ObjectStore(StorageConfig(endpoint_url=services.s3_endpoint, bucket=bucket))
    marker = "/stages/cit-02-fact_lookup/checkpoints/step-00000010/MANIFEST.json"
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if any(info.key.endswith(marker) for info in store.list("perennial/runs/micro-model/killed-")):
                break
            time.sleep(0.1)
        assert child.poll() is None, "the run ended before it could be killed:\n" + (tmp_path / "child.log").read_text()[-3000:]
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    stage_model = [i.key for i in store.list("perennial/runs/micro-model/killed-") if "/stages/cit-02-fact_lookup/model/MANIFEST.json" in i.key]
    assert not stage_model  # killed mid-stage: the stage output was never committed

    resumed = continual_retrain(config=killed_cfg.model_dump(mode="json"))
    training = json.loads(store.get_bytes(
        resumed["checkpoints"]["cit-02-fact_lookup"].removeprefix(f"s3://{bucket}/") + "/training.json"))
    assert training["resumed_from"] >= 10
    ref_training = json.loads(store.get_bytes(
        reference["checkpoints"]["cit-02-fact_lookup"].removeprefix(f"s3://{bucket}/") + "/training.json"))
    # The same steps on the same batches: a repeated or skipped step puts another batch's loss at every later
    # step, 1e-2 and more away. Not bit for bit: in one CI run the killed child's step 10 (before any checkpoint
    # of this stage) came out 1 ulp (5e-7) from the reference's, steps 1-9 equal, so two processes can round one
    # step differently. The message names which earlier stage's weights already differed.
    assert len(training["losses"]) == len(ref_training["losses"]) == 60
    assert training["losses"] == pytest.approx(ref_training["losses"], rel=1e-5, abs=0), weight_differences(store, resumed, reference)
    assert resumed["accuracy_matrix"] == reference["accuracy_matrix"]

    # No attempt stays RUNNING: the killed attempt at cit-02 ends KILLED, superseded by the one that resumed it,
    # and both flow runs are recorded on the parent, so `perennial status` labels the killed one as superseded.
    from mlflow.tracking import MlflowClient

    from app.status import FLOW_RUN_ID_TAG, FLOW_RUNS_TAG, mlflow_side, render
    from perennial.tracking import SUPERSEDED_BY_TAG

    client = MlflowClient(services.mlflow_uri)
    parent = client.get_run(resumed["mlflow_run_id"])
    experiment_id = parent.info.experiment_id
    stages = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert not [run.info.run_name for run in stages if run.info.status == "RUNNING"]
    attempts = sorted((run for run in stages if run.info.run_name == "cit-02-fact_lookup"), key=lambda run: run.info.start_time)
    assert [run.info.status for run in attempts] == ["KILLED", "FINISHED"]
    assert attempts[0].data.tags[SUPERSEDED_BY_TAG] == attempts[1].info.run_id
    flow_runs = parent.data.tags[FLOW_RUNS_TAG].split(",")
    assert len(flow_runs) == 2 and flow_runs[-1] == parent.data.tags[FLOW_RUN_ID_TAG]

    # Prefect: the killed flow run is marked CRASHED by the run that took its key over (before, it stayed RUNNING)
    from uuid import UUID

    from prefect.client.orchestration import get_client

    from app.status import PrefectSide, prefect_side

    with get_client(sync_client=True) as prefect_client:
        killed_flow_run = prefect_client.read_flow_run(UUID(flow_runs[0]))
    assert killed_flow_run.state.type.value == "CRASHED", killed_flow_run.state
    assert "took over run key" in killed_flow_run.state.message
    # The real states, of these two flow runs only: the test harness's API also holds other tests' runs.
    side = prefect_side(PREFECT_API_URL.value(), flow_runs, 10)
    side = PrefectSide(side.url, {key: run for key, run in side.runs.items() if key in flow_runs},
                       [run for run in side.recent if run.id in flow_runs])
    report = render("e", experiment_id, services.mlflow_uri, *mlflow_side(client, experiment_id, 10), side, 10)
    assert "cit-02-fact_lookup=FINISHED (+1 superseded)" in report, report
    assert f"CRASHED    flow run {killed_flow_run.name!r} superseded: resumed by flow run" in report, report
    assert "with no MLflow run" not in report, report


def weight_digests(store: ObjectStore, uri: str) -> dict[str, str]:
    """Weight file -> sha256, from the manifest of the committed folder at ``uri`` (s3://bucket/prefix)."""
    from tasks.runtime import uri_to_prefix

    files = store.read_manifest(uri_to_prefix(store, uri))["files"]
    return {name: entry["sha256"] for name, entry in files.items() if name.endswith(".safetensors")}


def weight_differences(store: ObjectStore, run: dict, reference: dict) -> str:
    """Which stages' committed weight files differ between two runs' summaries."""
    differing = [stage for stage, uri in reference["checkpoints"].items()
                 if stage in run["checkpoints"] and weight_digests(store, uri) != weight_digests(store, run["checkpoints"][stage])]
    return f"stages whose weights differ from the reference's: {differing or 'none'}"


PRETRAIN_ONLY = """
import sys

import yaml

from perennial.config import build_config
from tasks.base_model import prepare_base_model
from tasks.ingest import ingest
from tasks.runtime import start_run

run = start_run(build_config(yaml.safe_load(open(sys.argv[1]))))
print(prepare_base_model(run, ingest(run).general))
"""


def test_kill_9_mid_pretraining_then_rerun_matches_uninterrupted_pretraining(services, tmp_path):
    """Base pretraining is a stage like DAP and CIT: checkpointed, and resumed bit for bit on the CPU (fp32)."""
    from tasks.base_model import prepare_base_model
    from tasks.ingest import ingest
    from tasks.runtime import start_run

    long_pretrain = {"model": {**MICRO["model"], "pretrain": {"max_steps": 400, "batch_size": 8, "warmup_steps": 2,
                                                              "max_length": 64, "checkpoint_every": 10}}}

    def pretrain_config(name: str):
        cfg = micro_config(services, tmp_path / name, run_name=name, **long_pretrain)
        return cfg.model_copy(update={"storage": cfg.storage.model_copy(update={"bucket": f"pretrain-{name}"})})

    reference_run = start_run(pretrain_config("reference"))
    reference_uri = prepare_base_model(reference_run, ingest(reference_run).general)

    killed_cfg = pretrain_config("killed")
    config_file = tmp_path / "killed.yaml"
    config_file.write_text(yaml.safe_dump(killed_cfg.model_dump(mode="json")))
    env = {key: value for key, value in os.environ.items() if key not in ("PERENNIAL_S3_ENDPOINT", "PERENNIAL_BUCKET", "MLFLOW_TRACKING_URI")}
    log = open(tmp_path / "child.log", "wb")
    child = subprocess.Popen([sys.executable, "-c", PRETRAIN_ONLY, str(config_file)], env=env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    store = ObjectStore(killed_cfg.storage)
    store.ensure_bucket()  # polled before the child gets to create it
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if any(info.key.endswith("/checkpoints/step-00000010/MANIFEST.json") for info in store.list("perennial/base-models/")):
                break
            time.sleep(0.05)
        assert child.poll() is None, "pretraining ended before it could be killed:\n" + (tmp_path / "child.log").read_text()[-3000:]
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert not [info.key for info in store.list("perennial/base-models/") if info.key.endswith("/model/MANIFEST.json")]

    killed_run = start_run(killed_cfg)
    resumed_uri = prepare_base_model(killed_run, ingest(killed_run).general)
    reference_store = ObjectStore(reference_run.config.storage)
    resumed = json.loads(store.get_bytes(resumed_uri.removeprefix("s3://pretrain-killed/") + "/training.json"))
    reference = json.loads(reference_store.get_bytes(reference_uri.removeprefix("s3://pretrain-reference/") + "/training.json"))
    assert resumed["resumed_from"] >= 10 and reference["resumed_from"] == 0
    assert resumed["losses"] == reference["losses"]  # bit for bit: no repeated or skipped steps
    weights = weight_digests(store, resumed_uri)
    assert weights and weights == weight_digests(reference_store, reference_uri)
