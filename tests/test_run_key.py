"""A run key belongs to the config that made its outputs: another config under the same key is refused."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from flows.continual_retrain import continual_retrain
from perennial.config import ConfigError, build_config
from tests.test_pipeline import micro_config

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("single_torch_thread")]


def test_changed_config_under_the_same_run_key_is_refused_and_a_moved_service_is_not(services, prefect_harness, tmp_path):
    base = micro_config(services, tmp_path).model_dump(mode="json")
    base["storage"]["bucket"] = "run-key-test"
    base["tracking"].update(experiment="run-key-test", registered_model="run-key-model")
    base["data"]["demo"]["tasks"] = ["arithmetic"]
    cfg = build_config(base)
    first = continual_retrain(config=cfg.model_dump(mode="json"), run_key="k1")

    # The same key with another learning rate: refused before any work, naming what changed.
    changed = build_config(cfg.model_dump(mode="json"), ["cit.optim.lr=0.05"])
    with pytest.raises(ConfigError, match=r"run key 'k1' belongs to a retrain of a different configuration") as refused:
        continual_retrain(config=changed.model_dump(mode="json"), run_key="k1")
    assert "cit.optim.lr: 0.001 -> 0.05" in str(refused.value)
    assert "--run-key k1-2" in str(refused.value)

    client = MlflowClient(services.mlflow_uri)
    parent = client.get_run(first["mlflow_run_id"])
    assert parent.info.status == "FINISHED"  # the refused attempt is not that run's failure
    assert parent.data.params["cit.optim.lr"] == "0.001" and parent.data.tags["config_digest"] == cfg.digest()
    (version,) = client.search_model_versions("name='run-key-model'")
    assert version.tags["config_digest"] == cfg.digest()

    # Only where things are changed (another work dir): the same outputs, so the key resumes them.
    moved = build_config(cfg.model_dump(mode="json"), [f"work_dir={tmp_path / 'elsewhere'}"])
    assert moved.digest() != cfg.digest() and moved.outputs_digest() == cfg.outputs_digest()
    again = continual_retrain(config=moved.model_dump(mode="json"), run_key="k1")
    assert again["mlflow_run_id"] == first["mlflow_run_id"]
    assert again["accuracy_matrix"] == first["accuracy_matrix"]
    assert len(client.search_model_versions("name='run-key-model'")) == 1

    # The changed config under its own key trains.
    own = continual_retrain(config=changed.model_dump(mode="json"), run_key="k1-2")
    assert own["mlflow_run_id"] != first["mlflow_run_id"]
    assert client.get_run(own["mlflow_run_id"]).data.params["cit.optim.lr"] == "0.05"
