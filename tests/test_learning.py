"""Learning is real: on the embedded default config, each task beats chance right after training on it."""

import pytest

from flows.continual_retrain import continual_retrain
from perennial.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_model_beats_chance_on_each_task_after_training_on_it(services, prefect_harness, tmp_path):
    cfg = load_config(
        "configs/demo.yaml",
        [
            f"storage.endpoint_url={services.s3_endpoint}",
            "storage.bucket=learning-test",
            f"tracking.tracking_uri={services.mlflow_uri}",
            "tracking.experiment=learning-test",
            f"work_dir={tmp_path}",
            "cit.optim.checkpoint_every=0",
        ],
    )
    summary = continual_retrain(config=cfg.model_dump(mode="json"))
    matrix = summary["accuracy_matrix"]
    for index, task in enumerate(summary["tasks"]):
        just_trained = matrix[index + 1][index]
        assert just_trained > summary["chance"][task], (task, just_trained, matrix)
        assert just_trained > matrix[0][index], (task, matrix)  # better than before CIT
