"""Perennial: continual retraining of language models without forgetting."""

from perennial.env import apply_offline_defaults

apply_offline_defaults()

__version__ = "0.1.0"


def model_files_repository(artifact_uri: str, tracking_uri: str | None = None, registry_uri: str | None = None):
    """MLflow's `perennial-s3` artifact repository (perennial/model_files.py), made on first use: MLflow loads its
    `mlflow.artifact_repository` entry points when it is first imported, which may be while perennial.model_files is
    itself importing mlflow; an entry point there would be half made and skipped."""
    from perennial.model_files import CheckpointArtifactRepository

    return CheckpointArtifactRepository(artifact_uri, tracking_uri=tracking_uri, registry_uri=registry_uri)
