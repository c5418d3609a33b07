"""A run key names exactly one piece of work (issue #43, docs/reliability.md "What a run key names").

Against real SeaweedFS, MLflow and a Prefect test harness, with the micro config:
- a key reused after new data arrived trains that data under a derived key, and no source object
  is marked processed (the watermark) until a committed model was trained on it;
- two lineages (registered models) with one key keep their outputs apart, and a key's record in
  S3 refuses another configuration even where MLflow (another experiment) holds no run of it.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.continual_retrain import continual_retrain
from models.loading import ModelLoadError
from perennial import demo_data
from perennial.config import ConfigError, StorageConfig, build_config, load_config
from perennial.ingest import latest_version, read_watermark
from perennial.storage import ObjectStore
from tasks.runtime import DERIVED_FROM_TAG, INPUTS_DIGEST_TAG, RUN_RECORD, derived_run_key
from tests.test_pipeline import micro_config
from tests.test_security import _jsonl, nightly_config, publish_incoming

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("single_torch_thread")]

KEY = "nightly-20990101"


def _processed(store: ObjectStore, name: str) -> set[str]:
    return set(read_watermark(store, "perennial", name)["processed"])


def _dataset_inputs(client: MlflowClient, run_id: str) -> dict[str, str]:
    return {item.dataset.name: item.dataset.digest for item in client.get_run(run_id).inputs.dataset_inputs}


def test_a_key_reused_after_new_data_trains_it_under_a_derived_key_and_the_watermark_waits_for_a_model(
        services, prefect_harness, tmp_path):
    bucket = f"identity-{uuid.uuid4().hex[:8]}"
    store = ObjectStore(StorageConfig(endpoint_url=services.s3_endpoint, bucket=bucket))
    store.ensure_bucket()
    publish_incoming(store)
    cfg = nightly_config(services, tmp_path, bucket)
    client = MlflowClient(services.mlflow_uri)
    model = cfg.tracking.registered_model

    first = continual_retrain(config=cfg.model_dump(mode="json"), run_key=KEY)
    assert first["run_key"] == KEY
    night1 = {f"s3://{bucket}/incoming/tasks/day1.jsonl"}
    assert _processed(store, "tasks") == night1

    # The same night again, with new records under the incoming prefix in between.
    new_records = demo_data.task_records(demo_data.demo_tasks(7)["reverse"], 48, 8, 7)
    store.put_bytes("incoming/tasks/day1-late.jsonl", _jsonl(new_records))

    # A run that ingests the new data and fails before a model is committed marks nothing processed,
    # though the new dataset version exists (a model-load error after ingest, under its own key).
    broken = build_config(cfg.model_dump(mode="json"), ["model.source=local", f"model.name_or_path={tmp_path / 'no-model'}"])
    with pytest.raises((ModelLoadError, OSError)):
        continual_retrain(config=broken.model_dump(mode="json"), run_key="broken")
    assert _processed(store, "tasks") == night1
    v2 = latest_version(store, "perennial", "tasks")["digest"]
    assert v2 != first_digest(client, model, 1)

    # Before: the rerun resumed the first run's outputs in 16 s, trained nothing, and registered the first
    # model while the new records counted as processed. Now the new data trains, under a derived key.
    second = continual_retrain(config=cfg.model_dump(mode="json"), run_key=KEY)
    assert second["mlflow_run_id"] != first["mlflow_run_id"]
    parent = client.get_run(second["mlflow_run_id"])
    assert parent.data.tags[DERIVED_FROM_TAG] == KEY
    assert second["run_key"] == derived_run_key(KEY, parent.data.tags[INPUTS_DIGEST_TAG])
    # the late records are the next task of the sequence (incremental.new_data: next_task), trained in this run
    assert list(first["checkpoints"]) == ["start", "cit-01-tasks-1"]
    assert list(second["checkpoints"]) == ["start", "cit-01-tasks-1", "cit-02-tasks-2"]
    assert f"/runs/{model}/{second['run_key']}/stages/cit-02-tasks-2/" in second["checkpoints"]["cit-02-tasks-2"]
    assert _dataset_inputs(client, second["mlflow_run_id"])["tasks"] == v2
    version = client.get_model_version(model, str(second["registered_model"]["version"]))
    assert int(version.version) == 2 and version.tags["dataset.tasks"] == v2 and version.tags["run_key"] == second["run_key"]
    # now a committed model has trained on the late object: it is marked processed
    assert _processed(store, "tasks") == night1 | {f"s3://{bucket}/incoming/tasks/day1-late.jsonl"}

    # The key's own run keeps its status, its inputs and its record: nothing of the new data is claimed by it.
    original = client.get_run(first["mlflow_run_id"])
    assert original.info.status == "FINISHED"
    assert _dataset_inputs(client, first["mlflow_run_id"])["tasks"] == first_digest(client, model, 1) != v2
    record = store.get_json(f"perennial/runs/{model}/{KEY}/{RUN_RECORD}")
    assert record["inputs"]["tasks"] == first_digest(client, model, 1) and record["mlflow_run_id"] == first["mlflow_run_id"]

    # Once more with nothing new: the derived key resumes; nothing trains and nothing is registered again.
    third = continual_retrain(config=cfg.model_dump(mode="json"), run_key=KEY)
    assert (third["run_key"], third["mlflow_run_id"]) == (second["run_key"], second["mlflow_run_id"])
    assert third["checkpoints"] == second["checkpoints"]
    assert len(client.search_model_versions(f"name='{model}'")) == 2


def first_digest(client: MlflowClient, model: str, version: int) -> str:
    return client.get_model_version(model, str(version)).tags["dataset.tasks"]


def test_two_lineages_with_one_key_keep_their_outputs_apart_and_s3_refuses_another_config(services, prefect_harness, tmp_path):
    bucket = f"lineages-{uuid.uuid4().hex[:8]}"

    def lineage(model: str, experiment: str, *overrides: str):
        cfg = micro_config(services, tmp_path / model, run_name="nightly").model_dump(mode="json")
        cfg["storage"]["bucket"] = bucket
        cfg["tracking"].update(experiment=experiment, registered_model=model)
        cfg["data"]["demo"]["tasks"] = ["arithmetic"]
        return build_config(cfg, list(overrides))

    client = MlflowClient(services.mlflow_uri)
    a = lineage("lineage-a", f"exp-a-{bucket}")
    b = lineage("lineage-b", f"exp-b-{bucket}", "cit.optim.lr=0.005")
    # Two nightly deployments of two models in one bucket, the same key every night. Before: the second
    # registered the first's checkpoint in 12 s, its params saying otherwise.
    first = continual_retrain(config=a.model_dump(mode="json"), run_key="nightly-20990102")
    second = continual_retrain(config=b.model_dump(mode="json"), run_key="nightly-20990102")
    assert first["mlflow_run_id"] != second["mlflow_run_id"]
    for summary, cfg in ((first, a), (second, b)):
        model = cfg.tracking.registered_model
        assert summary["s3_prefix"] == f"s3://{bucket}/perennial/runs/{model}/nightly-20990102"
        (version,) = client.search_model_versions(f"name='{model}'")
        assert version.tags["config_digest"] == cfg.digest()
        assert version.tags["checkpoint_uri"].startswith(summary["s3_prefix"] + "/stages/")
    assert client.get_run(second["mlflow_run_id"]).data.params["cit.optim.lr"] == "0.005"

    # One lineage, the key reused by another configuration tracked in another experiment: MLflow there holds no
    # run of the key, so only what S3 holds can tell. Refused before anything runs, naming what changed.
    other = lineage("lineage-a", f"exp-c-{bucket}", "cit.optim.lr=0.05", "data.demo.tasks=[reverse]")
    with pytest.raises(ConfigError, match=r"run key 'nightly-20990102' belongs to a retrain of a different configuration "
                                          r"\(its record s3://.*/RUN\.json") as refused:
        continual_retrain(config=other.model_dump(mode="json"), run_key="nightly-20990102")
    assert "cit.optim.lr: 0.001 -> 0.05" in str(refused.value) and "data.demo.tasks" in str(refused.value)
    experiment = client.get_experiment_by_name(f"exp-c-{bucket}")
    assert experiment is None or not client.search_runs([experiment.experiment_id])
    assert len(client.search_model_versions("name='lineage-a'")) == 1


def test_a_key_recorded_before_a_setting_existed_resumes_while_the_setting_keeps_its_default():
    """Upgrading Perennial adds settings; a record without them was made with their default behaviour. The key
    resumes under the default, and is refused (naming the setting) once the new setting is changed."""
    from tasks.runtime import _identity_params, _refuse_other_config

    config = load_config(ROOT / "configs" / "tiny.yaml", [])
    older = {key: value for key, value in _identity_params(config).items() if not key.startswith("cit.ssr.")}
    _refuse_other_config(config, "nightly-1", "digest-of-an-older-schema", older, "its record")
    changed = load_config(ROOT / "configs" / "tiny.yaml", ["cit.ssr.samples=64"])
    with pytest.raises(ConfigError, match=r"cit\.ssr\.samples: \(unset\) -> 64"):
        _refuse_other_config(changed, "nightly-1", "digest-of-an-older-schema", older, "its record")
    with pytest.raises(ConfigError, match=r"cit\.optim\.lr"):  # a setting the record has, changed: refused as before
        _refuse_other_config(load_config(ROOT / "configs" / "tiny.yaml", ["cit.optim.lr=0.5"]), "nightly-1", "d", older, "its record")
