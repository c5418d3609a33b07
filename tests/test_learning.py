"""Learning is real: on configs/tiny.yaml (the real default model: tests/test_learning_default_model.py), each task is learned right after training on it.

The margin is wide on purpose (measured at seeds 0, 1, 2: every task gains >= +0.8 over its stage-0 score),
so a library version bump that nudges a few answers cannot flip it; a regression that stops a task
from being learned does.
"""

import pytest

from flows.continual_retrain import continual_retrain
from perennial.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MARGIN = 0.3  # accuracy points above both chance and the stage-0 (before CIT) score


def test_tiny_model_learns_each_task_well_above_chance_and_its_before_score(services, prefect_harness, tmp_path):
    cfg = load_config(
        "configs/tiny.yaml",
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
        just_trained, before = matrix[index + 1][index], matrix[0][index]
        assert just_trained >= summary["chance"][task] + MARGIN, (task, matrix)
        assert just_trained >= before + MARGIN, (task, matrix)
