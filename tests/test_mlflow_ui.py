"""What a person sees of a retrain in the MLflow UI, asserted through the MLflow REST API (the
pages read the same calls), and `models:/NAME@ALIAS` loading with MLflow's transformers flavor.

The pages were checked by eye in a headless browser (docs/operations.md, "What the MLflow UI
shows"); these tests keep what they showed without depending on a browser.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from pathlib import Path

import mlflow.transformers
import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM

from flows.continual_retrain import continual_retrain
from perennial import registry
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from perennial.config import StorageConfig, build_config
from perennial.model_files import registered_folder
from perennial.storage import ObjectStore
from perennial.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, RUNS_VIEW_METRICS, RUNS_VIEW_TAG, Tracker, runs_table_link
from tasks.register import HEATMAP
from tasks.runtime import fetch_dir, uri_to_prefix
from tests.test_pipeline import micro_config
from tests.test_registry import new_version

pytestmark = pytest.mark.integration


def test_experiments_open_as_model_training_and_a_chosen_kind_stays(services):
    client = MlflowClient(services.mlflow_uri)
    created = f"ui-new-{uuid.uuid4().hex[:8]}"
    experiment_id = Tracker(services.mlflow_uri, created).experiment_id()
    tags = client.get_experiment(experiment_id).tags
    assert tags[EXPERIMENT_KIND_TAG] == "custom_model_development" == EXPERIMENT_KIND
    # the shared view the runs-table link opens: the summary metrics as columns
    columns = json.loads(tags["mlflow.sharedViewState.perennial"])["selectedColumns"]
    assert RUNS_VIEW_TAG == "mlflow.sharedViewState.perennial" and runs_table_link("7") == "#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=perennial"
    assert {"metrics.`ap`", "metrics.`bwt`", "metrics.`fwt`", "metrics.`drift/kl_mean`"} <= set(columns)

    # an experiment from before (no kind: the UI would infer GenAI) is tagged when first used
    older = client.create_experiment(f"ui-old-{uuid.uuid4().hex[:8]}")
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(older).tags
    assert Tracker(services.mlflow_uri, client.get_experiment(older).name).experiment_id() == older
    assert client.get_experiment(older).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert RUNS_VIEW_TAG in client.get_experiment(older).tags

    # a kind a person chose in the UI is theirs
    chosen = client.create_experiment(f"ui-chosen-{uuid.uuid4().hex[:8]}", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    Tracker(services.mlflow_uri, client.get_experiment(chosen).name).experiment_id()
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def decision(client: MlflowClient, name: str, version: str) -> str:
    """The Decision tag, after checking that the version page lists it first: the page sorts tags
    by code point in a box a few rows high (45 tags on a retrain's version)."""
    tags = client.get_model_version(name, version).tags
    assert sorted(tags)[0] == registry.DECISION_TAG == "Decision", sorted(tags)[:3]
    return tags["Decision"]


def test_the_latest_decision_is_the_first_tag_of_a_version(services):
    client = MlflowClient(services.mlflow_uri)
    name = f"ui-decision-{uuid.uuid4().hex[:8]}"
    new_version(client, name, [0.8, 0.8, 0.8])  # v1: every gate passes, promoted at once
    new_version(client, name, [0.8, 0.6, 0.8], bwt=-0.3)  # v2: fails gates, waits for a person
    assert decision(client, name, "1").startswith("champion: promoted by auto-promote: auto-promotion: all")
    v2 = decision(client, name, "2")
    assert v2.startswith("needs review: failed gates: ") and "min_bwt" in v2 and "max_task_drop" in v2

    registry.promote(client, name, 2, by="dana", reason="fact_lookup was relabelled")
    assert decision(client, name, "2") == "champion: promoted by dana over failed gates min_bwt, max_task_drop: fact_lookup was relabelled"
    assert decision(client, name, "1") == "superseded by v2 (previous-champion)"
    registry.rollback(client, name, by="erin", reason="complaints about reversal")
    assert decision(client, name, "2") == "rolled back by erin: complaints about reversal"
    assert decision(client, name, "1") == "champion again: rollback by erin"
    registry.unpromote(client, name, by="erin", reason="no champion until the relabel")  # v1 replaced nothing
    assert decision(client, name, "1") == "champion withdrawn by erin: no champion until the relabel"
    # the detailed tags the code reads are unchanged
    tags = client.get_model_version(name, "2").tags
    assert tags["promoted_by"] == "dana" and tags["needs-review"] == "false" and tags["rolled_back_by"] == "erin"


def test_a_retrain_is_reviewable_in_the_ui_and_loads_with_the_transformers_flavor(services, prefect_harness, tmp_path):
    name = f"ui-model-{uuid.uuid4().hex[:8]}"
    cfg = build_config(micro_config(services, tmp_path).model_dump(mode="json"),
                       [f"tracking.registered_model={name}", f"tracking.experiment={name}", "storage.bucket=ui-test"])
    summary = continual_retrain(config=cfg.model_dump(mode="json"))
    client = MlflowClient(services.mlflow_uri)

    # the experiment opens on the runs table (model training), not on an empty GenAI traces page
    experiment = client.get_experiment_by_name(name)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"

    # the runs-table view's metric columns are metrics of the parent run, with the report's values
    parent = client.get_run(summary["mlflow_run_id"])
    for key in RUNS_VIEW_METRICS:
        assert key in parent.data.metrics, key
    for key in ("ap", "aip", "bwt", "fwt", "forgetting_mean", "general_ppl_final", "general_task_delta"):
        assert parent.data.metrics[key] == pytest.approx(summary["metrics"][key]), key

    # the version page shows the accuracy heatmap inline and links to the run's report
    version = client.get_model_version_by_alias(name, "challenger")
    assert int(version.version) == summary["registered_model"]["version"]
    # its first tag is the decision, among the lineage, metric and gate tags
    assert len(version.tags) > 30
    expected = "needs review: " if summary["registered_model"]["needs_review"] else "champion: "
    assert decision(client, name, version.version).startswith(expected)
    run_page = f"#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}"
    image = f"get-artifact?path={HEATMAP}&run_uuid={parent.info.run_id}"
    assert f"![accuracy matrix]({image})" in version.description
    assert f"({run_page}/artifactPath/{HEATMAP}?workflowType=machine_learning)" in version.description
    assert f"({run_page}?workflowType=machine_learning)" in version.description
    assert f"({runs_table_link(experiment.experiment_id)})" in version.description
    with urllib.request.urlopen(f"{services.mlflow_uri}/{image}", timeout=30) as response:  # what the page's <img> loads
        assert response.read(8) == b"\x89PNG\r\n\x1a\n"

    # models:/NAME@ALIAS loads with MLflow's transformers flavor, offline, to the checkpoint's weights
    # the MLflow model lies beside the checkpoint (perennial-s3://), its weights the checkpoint's own tensor pieces
    files = get_artifact_repository(version.source)
    assert {a.path for a in files.list_artifacts()} >= {"MLmodel", "model", "components"}
    assert {a.path for a in files.list_artifacts("model")} >= {"model/config.json", "model/model.safetensors"}
    store = ObjectStore(StorageConfig(endpoint_url=services.s3_endpoint, bucket=cfg.storage.bucket))
    pieces = lambda prefix: {d for e in store.read_manifest(prefix)["files"].values() for d, _ in e.get("pieces", ())}  # noqa: E731
    new_pieces = pieces(registered_folder(version.source)) - pieces(uri_to_prefix(store, version.tags["checkpoint_uri"]))
    assert len(new_pieces) <= 1, new_pieces  # only the safetensors header (its metadata) is stored again
    loaded = mlflow.transformers.load_model(f"models:/{name}@challenger", return_type="components")
    checkpoint_uri = version.tags["checkpoint_uri"]
    assert checkpoint_uri == summary["checkpoints"]["cit-03-reverse"]
    checkpoint = AutoModelForCausalLM.from_pretrained(fetch_dir(store, checkpoint_uri, Path(tmp_path) / "verify")).eval()
    ids = loaded["tokenizer"]("What is 30 + 4?", return_tensors="pt").input_ids
    assert ids.shape[1] > 1
    with torch.no_grad():
        assert torch.equal(loaded["model"].eval()(ids).logits, checkpoint(ids).logits)
    # and as a text-generation pipeline, which is what mlflow.pyfunc serves
    pipeline = mlflow.transformers.load_model(f"models:/{name}/{version.version}")
    assert pipeline.task == "text-generation"
    assert isinstance(pipeline("What is 30 + 4?", max_new_tokens=2, do_sample=False)[0]["generated_text"], str)
