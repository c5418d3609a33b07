"""A lineage keeps learning across retrains (issue #36, docs/operations.md "Lineages").

Nightly retrains of the micro config with `lineage.continue_from: champion`, against real SeaweedFS,
MLflow and a Prefect test harness: each night continues the champion with its CL state and trains
only what is new; a rejected night's tasks are trained again; a rollback's champion is continued; a
rebase, a missing CL state and a corrupt checkpoint are refused before anything trains.
"""

from __future__ import annotations

import json
import uuid

import pytest
from mlflow.tracking import MlflowClient

from flows.continual_retrain import continual_retrain
from perennial import demo_data, registry
from perennial.config import ConfigError, StorageConfig, build_config
from perennial.storage import CorruptObjectError, ObjectStore
from tasks.lineage import LineageError
from tests.test_security import _jsonl, nightly_config, publish_incoming

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("single_torch_thread")]


def _night(store: ObjectStore, name: str, task: str, records: int = 48) -> None:
    """A night's new instruction data under the incoming prefix: one demo task's records."""
    store.put_bytes(f"incoming/tasks/{name}.jsonl", _jsonl(demo_data.task_records(demo_data.demo_tasks(7)[task], records, 8, 7)))


def _stage_runs(client: MlflowClient, parent_id: str) -> dict:
    parent = client.get_run(parent_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return {run.data.tags["mlflow.runName"]: run for run in children if run.info.status == "FINISHED"}


@pytest.fixture
def lineage(services, prefect_harness, tmp_path):
    bucket = f"lineage-{uuid.uuid4().hex[:8]}"
    store = ObjectStore(StorageConfig(endpoint_url=services.s3_endpoint, bucket=bucket))
    store.ensure_bucket()
    publish_incoming(store)  # night 1: general and domain text, and the first task's records
    cfg = build_config(nightly_config(services, tmp_path, bucket).model_dump(mode="json"),
                       ["lineage.continue_from=champion", "cit.methods=[{name: ewc, strength: 1000}]"])
    return store, cfg, MlflowClient(services.mlflow_uri)


def test_each_night_continues_the_champion_with_its_cl_state_and_trains_only_what_is_new(lineage, tmp_path):
    store, cfg, client = lineage
    model = cfg.tracking.registered_model
    night1 = continual_retrain(config=cfg.model_dump(mode="json"), run_key="nightly-20990101")
    assert night1["continued_version"] is None and night1["trained"] == ["tasks-1"]  # no champion yet: from the base
    registry.promote(client, model, 1, by="reviewer", reason="night 1 looks fine")

    _night(store, "day2", "reverse")
    night2 = continual_retrain(config=cfg.model_dump(mode="json"), run_key="nightly-20990102")
    # Before: night 2 retrained every task from the base model. Now it continues version 1 and trains tasks-2 only.
    assert night2["continued_version"] == 1 and night2["trained"] == ["tasks-2"]
    assert set(night2["checkpoints"]) == {"start", "cit-02-tasks-2"}
    assert night2["checkpoints"]["start"] == client.get_model_version(model, "1").tags["checkpoint_uri"]
    stages = _stage_runs(client, night2["mlflow_run_id"])
    assert sorted(stages) == ["cit-02-tasks-2"]  # no base model, DAP or earlier task trained again
    params = stages["cit-02-tasks-2"].data.params
    assert int(params["train_records"]) == 48 and int(params["replay_records"]) == 12  # version 1's buffer: 0.25 of tasks-1

    # The lineage's accuracy matrix: night 1's rows read from version 1's record, night 2's row added.
    assert night2["tasks"] == ["tasks-1", "tasks-2"]
    assert night2["row_labels"] == ["before (nightly-20990101)", "after tasks-1 (nightly-20990101)", "after tasks-2 (nightly-20990102)"]
    matrix = night2["accuracy_matrix"]
    assert matrix[:2] == [[night1["accuracy_matrix"][0][0], matrix[0][1]], [night1["accuracy_matrix"][1][0], matrix[1][1]]]
    assert matrix[0][1] is None and matrix[1][1] is not None  # tasks-2 arrived after row 0; row 1 is scored at night 2's start
    assert "bwt" in night2["metrics"]  # over the whole history: tasks-1 was learned a night earlier
    version = client.get_model_version(model, "2")
    assert version.tags["continued_from"] == "1" and version.tags["trained_tasks"] == "tasks-2"
    assert version.tags["task_history"].count("tasks-1@") == 1 and "tasks-2@" in version.tags["task_history"]
    record = json.loads(store.get_bytes(version.tags["lineage_uri"].removeprefix(f"s3://{store.bucket}/") + "/lineage.json"))
    assert [row["task"] for row in record["rows"]] == [None, "tasks-1", "tasks-2"]
    assert [row["run_key"] for row in record["rows"]] == ["nightly-20990101", "nightly-20990101", "nightly-20990102"]
    shown = registry.review(client, model)  # the reviewer sees the lineage's matrix, rows marked by retrain
    assert "Accuracy matrix of the lineage (challenger v2 continued v1" in shown
    assert "after tasks-2 (nightly-20990102)" in shown and "tasks-2@" in shown

    # EWC's state is carried: the same night without it (a method list that does not match version 1's, so
    # every plugin starts fresh; averaging at alpha 0 changes nothing) trains other weights.
    control_cfg = build_config(cfg.model_dump(mode="json"), ["cit.methods=[{name: ewc, strength: 1000}, {name: averaging, alpha: 0.0}]"])
    control = continual_retrain(config=control_cfg.model_dump(mode="json"), run_key="nightly-20990102-control")
    assert control["continued_version"] == 1 and control["trained"] == ["tasks-2"]
    carried, fresh = (store.read_manifest(summary["checkpoints"]["cit-02-tasks-2"].removeprefix(f"s3://{store.bucket}/"))
                      for summary in (night2, control))
    assert carried["files"]["model.safetensors"]["sha256"] != fresh["files"]["model.safetensors"]["sha256"]

    # Nothing new: the next night trains nothing and registers nothing.
    registry.promote(client, model, 2, by="reviewer", reason="night 2 looks fine")
    quiet = continual_retrain(config=cfg.model_dump(mode="json"), run_key="nightly-20990103")
    assert quiet["continued_version"] == 2 and quiet["trained"] == [] and quiet["registered_model"] is None
    assert len(client.search_model_versions(f"name='{model}'")) == 3  # v1, v2 and the control's


def test_a_rejected_night_is_trained_again_a_rollback_is_continued_and_what_cannot_continue_is_refused(lineage, tmp_path):
    store, cfg, client = lineage
    model = cfg.tracking.registered_model
    continual_retrain(config=cfg.model_dump(mode="json"), run_key="nightly-20990101")
    registry.promote(client, model, 1, by="reviewer", reason="ok")
    _night(store, "day2", "reverse")
    rejected = continual_retrain(config=cfg.model_dump(mode="json"), run_key="nightly-20990102")
    assert rejected["trained"] == ["tasks-2"]  # version 2 is never promoted: a reviewer rejected it

    # The next night continues the champion (version 1), so the rejected night's task is trained again with its own.
    _night(store, "day3", "word_count")
    night3 = continual_retrain(config=cfg.model_dump(mode="json"), run_key="nightly-20990103")
    assert night3["continued_version"] == 1 and night3["trained"] == ["tasks-2", "tasks-3"]
    assert set(night3["checkpoints"]) == {"start", "cit-02-tasks-2", "cit-03-tasks-3"}

    # A rollback: version 3 promoted, then rolled back; the next retrain continues the restored champion.
    registry.promote(client, model, 3, by="reviewer", reason="ok")
    registry.rollback(client, model, by="reviewer", reason="regression found later")
    _night(store, "day4", "uppercase")
    night4 = continual_retrain(config=cfg.model_dump(mode="json"), run_key="nightly-20990104")
    assert night4["continued_version"] == 1 and night4["trained"] == ["tasks-2", "tasks-3", "tasks-4"]
    versions = len(client.search_model_versions(f"name='{model}'"))

    # A rebase (another tuning method) cannot continue version 1: refused before training, naming the fix.
    rebased = build_config(cfg.model_dump(mode="json"), ["cit.tuning.method=lora", "cit.optim.lr=0.01"])
    with pytest.raises(ConfigError, match=r"version 1 was trained from another base model, tokenizer or tuning method.*"
                                          r"lineage\.continue_from=none retrains the whole task history"):
        continual_retrain(config=rebased.model_dump(mode="json"), run_key="rebase")

    # Its replay buffer deleted: refused, naming what is missing; a corrupt checkpoint: refused by its sha256.
    champion = client.get_model_version(model, "1").tags
    buffer = champion["replay_uri"].removeprefix(f"s3://{store.bucket}/")
    saved = store.get_bytes(f"{buffer}/MANIFEST.json")
    store.delete_prefix(buffer + "/")
    with pytest.raises(LineageError, match=r"version 1's replay buffer is missing: s3://.*/replay/after-01 has no MANIFEST\.json"):
        continual_retrain(config=cfg.model_dump(mode="json"), run_key="missing-buffer")
    store.put_bytes(f"{buffer}/MANIFEST.json", saved)
    checkpoint = store.read_manifest(champion["checkpoint_uri"].removeprefix(f"s3://{store.bucket}/"))
    digest, _ = max(checkpoint["files"]["model.safetensors"]["pieces"], key=lambda piece: piece[1])  # stored by content
    data = bytearray(store.get_bytes(store.blob_key(digest)))
    data[len(data) // 2] ^= 0xFF
    store.put_bytes(store.blob_key(digest), bytes(data))
    fresh_cache = build_config(cfg.model_dump(mode="json"), [f"work_dir={tmp_path / 'other-machine'}"])  # nothing cached
    with pytest.raises(CorruptObjectError, match="model.safetensors"):
        continual_retrain(config=fresh_cache.model_dump(mode="json"), run_key="corrupt")
    assert len(client.search_model_versions(f"name='{model}'")) == versions  # nothing registered by the refused runs


def test_a_task_whose_dataset_grew_trains_its_new_records_only_with_replay_of_the_old(services, prefect_harness, tmp_path):
    bucket = f"append-{uuid.uuid4().hex[:8]}"
    store = ObjectStore(StorageConfig(endpoint_url=services.s3_endpoint, bucket=bucket))
    store.ensure_bucket()
    publish_incoming(store)
    data = nightly_config(services, tmp_path, bucket).model_dump(mode="json")
    data["data"]["datasets"][2]["incremental"] = {"new_data": "append"}
    cfg = build_config(data, ["lineage.continue_from=champion", "registry.auto_promote=true",
                              "registry.gates={min_bwt: null, max_task_drop: null, min_chance_margin: null, "
                              "max_general_ppl_ratio: null, max_general_ppl_ratio_vs_base: null, max_output_drift_kl: null}"])
    first = continual_retrain(config=cfg.model_dump(mode="json"), run_key="append-1")
    assert first["trained"] == ["tasks"] and first["registered_model"]["promoted"]
    more = demo_data.task_records(demo_data.demo_tasks(11)["arithmetic"], 20, 0, 11)
    store.put_bytes("incoming/tasks/day2.jsonl", _jsonl(more))
    second = continual_retrain(config=cfg.model_dump(mode="json"), run_key="append-2")
    assert second["continued_version"] == 1 and second["trained"] == ["tasks"]
    params = _stage_runs(MlflowClient(services.mlflow_uri), second["mlflow_run_id"])["cit-02-tasks"].data.params
    new = int(params["train_records"])
    assert 0 < new <= 20 and params["new_records_since"]  # the new records only (duplicates of old ones dropped)
    assert int(params["replay_records"]) == 12  # with replay of the old ones
    buffer = second["checkpoints"]["cit-02-tasks"].rsplit("/stages/", 1)[0] + "/replay/after-02"
    rows = store.get_bytes(buffer.removeprefix(f"s3://{bucket}/") + "/buffer.jsonl").decode().splitlines()
    assert 12 < len(rows) < 12 + new  # the old samples kept, samples of the new records added
    assert second["row_labels"][-1] == "after tasks (append-2)" and second["accuracy_matrix"][-1][0] is not None
