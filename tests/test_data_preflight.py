"""Data that a later stage could not use is refused before any training, is not retried, and ends
the MLflow parent run FAILED with the error (issue #17, docs/reliability.md "Bad inputs")."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from uuid import UUID

import pytest
from mlflow.tracking import MlflowClient
from prefect import flow, task

from flows.continual_retrain import continual_retrain
from models.engine import NonFiniteLossError
from models.loading import ModelLoadError
from perennial import demo_data
from perennial.config import ConfigError, StorageConfig, build_config
from perennial.ingest import IngestError
from app.status import FLOW_RUN_ID_TAG, S3_PREFIX_TAG
from perennial.storage import ObjectStore, StorageError
from tasks.ingest import ingest
from tasks.runtime import ERROR_TAG, failed_on_error, start_run
from tasks.wrappers import RETRY
from tests.test_pipeline import MICRO

pytestmark = pytest.mark.integration

# Five records with no split field: hashed with test_fraction 0.1, all five land in train.
FIVE = [{"instruction": f"What is {a} + {a + 1}?", "output": str(2 * a + 1)} for a in range(1, 6)]
NO_TEST = (
    "dataset 'tiny' has 0 test records (5 train, 0 test), but scoring after every stage needs them. Records with no "
    "split field (and none from their source or file name) are split by content hash with test_fraction=0.1: add "
    "records, raise test_fraction, or mark test records with split: test"
)


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def datasets_config(services, tmp_path: Path, tasks: list[dict], **extra):
    """The micro pipeline on data.source=datasets: a general corpus (train and test) plus ``tasks``."""
    texts = demo_data.general_corpus(48, seed=3)
    general = [{"text": text, "split": "test" if index < 8 else "train"} for index, text in enumerate(texts)]
    name = f"pre-{uuid.uuid4().hex[:10]}"
    data = json.loads(json.dumps(MICRO))
    data.update(
        run_name=name,
        work_dir=str(tmp_path / "work"),
        storage={"endpoint_url": services.s3_endpoint, "bucket": name},
        tracking={"tracking_uri": services.mlflow_uri, "experiment": name, "registered_model": name},
        data={"source": "datasets", "datasets": [
            {"name": "general", "shape": "text", "role": "general", "sources": [{"uri": _jsonl(tmp_path / "general.jsonl", general)}]},
            *tasks,
        ]},
        **extra,
    )  # fmt: skip
    cfg = build_config(data)
    ObjectStore(cfg.storage).ensure_bucket()
    return cfg


def test_task_without_test_records_fails_at_ingest_once_and_marks_the_run_failed(services, prefect_harness, tmp_path):
    tiny = {"name": "tiny", "shape": "alpaca", "sources": [{"uri": _jsonl(tmp_path / "tiny.jsonl", FIVE)}]}
    cfg = datasets_config(services, tmp_path, [tiny])
    with pytest.raises(IngestError) as raised:
        continual_retrain(config=cfg.model_dump(mode="json"))
    assert str(raised.value) == NO_TEST

    # MLflow: the parent run alone (no stage run such as pretrain-base was started), FAILED, with the error
    client = MlflowClient(services.mlflow_uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    (parent,) = client.search_runs([experiment.experiment_id])
    assert parent.info.status == "FAILED"
    assert parent.data.tags[ERROR_TAG] == f"IngestError: {NO_TEST}"

    # S3: the datasets were versioned, but no model was built: no base model, and under the run's prefix only
    # the key's identity record (written by preflight), with no inputs bound to it
    store = ObjectStore(StorageConfig(endpoint_url=services.s3_endpoint, bucket=cfg.storage.bucket))
    run_prefix = parent.data.tags[S3_PREFIX_TAG].removeprefix(f"s3://{cfg.storage.bucket}/")
    assert {info.key.split("/")[1] for info in store.list("perennial/")} == {"datasets", "runs"}
    assert [info.key for info in store.list(run_prefix + "/")] == [f"{run_prefix}/RUN.json"]
    assert store.get_json(f"{run_prefix}/RUN.json").get("inputs") is None

    # Prefect: preflight and ingest ran, ingest once (a retry would have waited 2 s, then 10 s)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=[UUID(parent.data.tags[FLOW_RUN_ID_TAG])]))
    with get_client(sync_client=True) as prefect:
        for _ in range(50):  # task run states reach the API as events, shortly after the flow returns
            runs = {run.name.rsplit("-", 1)[0]: run for run in prefect.read_task_runs(flow_run_filter=flow_runs)}
            if runs.get("ingest") and runs["ingest"].state.is_final():
                break
            time.sleep(0.2)
    assert sorted(runs) == ["ingest", "preflight"]
    assert runs["ingest"].state.is_failed() and runs["ingest"].run_count == 1


def test_splits_a_stage_needs_are_checked_after_ingest(services, tmp_path):
    """ingest() itself: the retrain's checks, and evaluate-only's (training=False), which need no train split."""
    all_test = [{**row, "split": "test"} for row in FIVE]
    tiny = {"name": "tiny", "shape": "alpaca", "sources": [{"uri": _jsonl(tmp_path / "tiny.jsonl", all_test)}]}
    run = start_run(datasets_config(services, tmp_path, [tiny]))
    with pytest.raises(IngestError, match=r"^dataset 'tiny' has 0 train records \(0 train, 5 test\), but its continual "
                                          r"tuning stage needs them\. .* add records, lower test_fraction, or mark train"):
        ingest(run)
    assert ingest(run, training=False).tasks[0].counts["test"] == 5  # evaluate-only scores it

    split = [{**row, "split": "train" if index < 3 else "test"} for index, row in enumerate(FIVE)]
    usable = {"name": "usable", "shape": "alpaca", "sources": [{"uri": _jsonl(tmp_path / "usable.jsonl", split)}]}
    probe = {"name": "probe", "shape": "alpaca", "role": "heldout", "sources": [{"uri": _jsonl(tmp_path / "probe.jsonl", FIVE)}]}
    run = start_run(datasets_config(services, tmp_path, [usable, probe]))
    for training in (True, False):
        with pytest.raises(IngestError, match=r"^dataset 'probe' has 0 test records \(5 train, 0 test\), but scoring"):
            ingest(run, training=training)


def test_a_misspelt_rehearsal_pool_is_refused_after_ingest_before_dap(services, tmp_path):
    """cit.ssr.prompts is read when the rehearsal is generated, after DAP: a typo there is found with the data."""
    split = [{**row, "split": "train" if index < 3 else "test"} for index, row in enumerate(FIVE)]
    usable = {"name": "usable", "shape": "alpaca", "sources": [{"uri": _jsonl(tmp_path / "usable.jsonl", split)}]}
    cit = {**MICRO["cit"], "replay": {"enabled": True}, "ssr": {"enabled": True, "prompts": ["facts", "plaecs"]}}
    run = start_run(datasets_config(services, tmp_path, [usable], cit=cit))
    with pytest.raises(ConfigError, match=r"^cit.ssr.prompts: plaecs is not a file; use builtin, facts, places"):
        ingest(run)
    assert ingest(run, training=False).tasks[0].counts["test"] == 2  # evaluate-only generates no rehearsal


def test_option_scoring_of_records_without_options_is_refused_after_ingest(services, tmp_path):
    """Shapes with options or without are known from the config (tests/test_config.py); the instruction
    shape's options are known once its records are read."""
    rows = [{"prompt": "Colour of grass?", "response": "green", "options": ["green", "red"], "split": "test"},
            {"prompt": "Colour of snow?", "response": "white", "options": None, "split": "test"},
            {"prompt": "Colour of sky?", "response": "blue", "options": ["blue", "red"], "split": "train"}]  # fmt: skip
    colours = {"name": "colours", "shape": "instruction", "sources": [{"uri": _jsonl(tmp_path / "colours.jsonl", rows)}]}
    run = start_run(datasets_config(services, tmp_path, [colours], eval={"scoring": "options"}))
    with pytest.raises(ConfigError, match=r"^eval.scoring='options' scores each test record by its options, but 1 of "
                                          r"the 2 test records of dataset 'colours' have none"):
        ingest(run)


def test_an_error_ends_the_parent_run_failed_and_a_rerun_clears_it(services, tmp_path):
    cfg = datasets_config(services, tmp_path, [])
    client = MlflowClient(services.mlflow_uri)
    run = start_run(cfg)
    with pytest.raises(KeyError), failed_on_error(run):
        raise KeyError("general")
    failed = client.get_run(run.parent_run_id)
    assert (failed.info.status, failed.data.tags[ERROR_TAG]) == ("FAILED", "KeyError: 'general'")

    again = start_run(cfg)  # the same key resumes the same parent run
    resumed = client.get_run(again.parent_run_id)
    assert again.parent_run_id == run.parent_run_id
    assert resumed.info.status == "RUNNING" and ERROR_TAG not in resumed.data.tags
    with pytest.raises(KeyboardInterrupt), failed_on_error(again):
        raise KeyboardInterrupt
    assert client.get_run(run.parent_run_id).info.status == "KILLED"


def test_a_stage_that_raises_ends_its_stage_run_failed_and_an_interrupted_one_killed(services, tmp_path):
    """Before, a stage that raised (a non-finite loss, a data error, SIGTERM) left its stage run RUNNING
    under a FAILED or KILLED parent until a resume superseded it."""
    client = MlflowClient(services.mlflow_uri)
    run = start_run(datasets_config(services, tmp_path, []))
    tracker = run.tracker
    with tracker.stage_run("cit-01-a", run.parent_run_id) as done:
        pass
    with pytest.raises(NonFiniteLossError), tracker.stage_run("cit-02-b", run.parent_run_id) as failed:
        raise NonFiniteLossError("cit-02-b: non-finite training loss nan at step 3 of 6")
    with pytest.raises(KeyboardInterrupt), tracker.stage_run("cit-03-c", run.parent_run_id) as interrupted:
        raise KeyboardInterrupt("signal SIGTERM")
    assert client.get_run(done).info.status == "FINISHED" and ERROR_TAG not in client.get_run(done).data.tags
    assert (client.get_run(failed).info.status, client.get_run(failed).data.tags[ERROR_TAG]) == (
        "FAILED", "NonFiniteLossError: cit-02-b: non-finite training loss nan at step 3 of 6")
    assert (client.get_run(interrupted).info.status, client.get_run(interrupted).data.tags[ERROR_TAG]) == (
        "KILLED", "KeyboardInterrupt: signal SIGTERM")


def test_retries_skip_config_and_data_errors_and_keep_transient_ones(prefect_harness):
    calls = {"bad data": 0, "bad config": 0, "bad model": 0, "nan loss": 0, "S3 hiccup": 0}

    def fail(kind: str) -> str:
        calls[kind] += 1
        if kind == "bad data":
            raise IngestError("dataset 'x' is unusable")
        if kind == "bad config":
            raise ConfigError("eval.scoring is unusable")
        if kind == "bad model":
            raise ModelLoadError("tokenizer in DIR has no eos_token")
        if kind == "nan loss":
            raise NonFiniteLossError("cit-1: non-finite training loss nan at step 3 of 6")
        if calls[kind] == 1:
            raise StorageError("S3 answered 503")
        return "recovered"

    step = task(fail, name="step", **RETRY)

    @flow
    def pipeline() -> list:
        return [step(kind, return_state=True).type.value for kind in calls]

    assert pipeline() == ["FAILED", "FAILED", "FAILED", "FAILED", "COMPLETED"]
    assert calls == {"bad data": 1, "bad config": 1, "bad model": 1, "nan loss": 1, "S3 hiccup": 2}
