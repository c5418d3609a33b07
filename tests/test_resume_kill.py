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
from tests.test_pipeline import micro_config

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
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-child")}
    env.pop("PREFECT_API_URL", None)  # the child runs its own local Prefect API, like a real retrain would
    for endpoint in ("PERENNIAL_S3_ENDPOINT", "PERENNIAL_BUCKET", "MLFLOW_TRACKING_URI"):
        env.pop(endpoint, None)  # the YAML names this test's services; the env defaults would override it
    log = open(tmp_path / "child.log", "wb")
    child = subprocess.Popen([sys.executable, "-m", "perennial.cli", "run", str(config_file)], env=env,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    store = ObjectStore(StorageConfig(endpoint_url=services.s3_endpoint, bucket=bucket))
    marker = "/stages/cit-02-fact_lookup/checkpoints/step-00000010/MANIFEST.json"
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if any(info.key.endswith(marker) for info in store.list("perennial/runs/killed-")):
                break
            time.sleep(0.1)
        assert child.poll() is None, "the run ended before it could be killed:\n" + (tmp_path / "child.log").read_text()[-3000:]
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    stage_model = [i.key for i in store.list("perennial/runs/killed-") if "/stages/cit-02-fact_lookup/model/MANIFEST.json" in i.key]
    assert not stage_model  # killed mid-stage: the stage output was never committed

    resumed = continual_retrain(config=killed_cfg.model_dump(mode="json"))
    training = json.loads(store.get_bytes(
        resumed["checkpoints"]["cit-02-fact_lookup"].removeprefix(f"s3://{bucket}/") + "/training.json"))
    assert training["resumed_from"] >= 10
    ref_training = json.loads(store.get_bytes(
        reference["checkpoints"]["cit-02-fact_lookup"].removeprefix(f"s3://{bucket}/") + "/training.json"))
    assert training["losses"] == ref_training["losses"]  # bit for bit: no repeated or skipped steps
    assert resumed["accuracy_matrix"] == reference["accuracy_matrix"]
