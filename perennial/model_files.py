"""Registered models stored by content in the lineage's S3: MLflow's ``perennial-s3`` artifact repository.

A registered version's MLflow model (MLmodel, the weights, the tokenizer) is written as a committed folder
(`ObjectStore.upload_dir`) under ``<storage.prefix>/registered-models/<model>/<run id>`` in the lineage's
bucket, and the version's ``source`` is that folder's ``perennial-s3://BUCKET/KEY`` URI. Its weights are
content-addressed pieces like every checkpoint's, so they are the pieces the committed checkpoint already
stored: a version adds its small files, not a second copy of the model (issue #45). Logging the model to
MLflow's own artifact store instead copied it in full for every version.

MLflow finds this repository through the ``mlflow.artifact_repository`` entry point named after the scheme
(pyproject.toml), so ``mlflow.transformers.load_model("models:/NAME@champion")``, ``mlflow models serve`` and
`perennial export` load a version unchanged. Reading joins each file from its pieces and checks every
piece's sha256 and then the whole file's (`ObjectStore.download_dir`); a missing piece is an error naming it.

A loader reads S3 directly, not through MLflow's artifact proxy, so it needs the bucket's read credentials:
the endpoint from ``PERENNIAL_S3_ENDPOINT`` (else ``MLFLOW_S3_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_S3``,
``AWS_ENDPOINT_URL``) and the keys from ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, as
``.perennial/services/services.env`` sets them. Where readers have MLflow access only, set
``registry.model_files: mlflow`` (a full copy in MLflow's artifact store per version).
"""

from __future__ import annotations

import os
import posixpath
from functools import cached_property
from pathlib import Path
from urllib.parse import urlparse

from mlflow.entities import FileInfo
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repo import ArtifactRepository

from perennial.config import StorageConfig
from perennial.storage import MANIFEST_NAME, ObjectStore, StorageError, join_key, key_component

SCHEME = "perennial-s3"
FOLDER = "registered-models"  # under storage.prefix; the blob pieces live under the same prefix
ENDPOINT_ENVS = ("PERENNIAL_S3_ENDPOINT", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def model_files_prefix(storage_prefix: str, registered_model: str, run_id: str) -> str:
    """The S3 folder of the MLflow model a retrain (its parent MLflow run ``run_id``) registers."""
    return join_key(storage_prefix, FOLDER, key_component(registered_model), key_component(run_id))


def model_files_uri(bucket: str, prefix: str) -> str:
    """A version's ``source``: the folder ``prefix`` of ``bucket`` read through this repository."""
    return f"{SCHEME}://{bucket}/{prefix}"


def registered_folder(source: str) -> str | None:
    """The S3 folder (key prefix) of a version whose ``source`` is a ``perennial-s3://`` URI, else None."""
    if urlparse(source).scheme != SCHEME:
        return None
    return CheckpointArtifactRepository(source).prefix


def _endpoint() -> str:
    for name in ENDPOINT_ENVS:
        if os.environ.get(name):
            return os.environ[name]
    raise MlflowException(
        f"a {SCHEME}:// model is read from S3 directly: set {ENDPOINT_ENVS[0]} (or {', '.join(ENDPOINT_ENVS[1:])}) to the "
        "lineage's S3 endpoint, and AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY to keys that may read its bucket (for the "
        "local services: `source .perennial/services/services.env`)"
    )


class CheckpointArtifactRepository(ArtifactRepository):
    """Read (list, download) and delete one committed folder of Perennial's S3 through MLflow's artifact API.

    ``artifact_uri``: ``perennial-s3://BUCKET/<storage prefix>/registered-models/<model>/<run id>[/sub/path]``.
    Writing goes through `ObjectStore.upload_dir`, which commits the folder with its manifest; MLflow's log
    calls are refused. Raises MlflowException naming the folder when it was never committed or was deleted.
    """

    def __init__(self, artifact_uri: str, tracking_uri: str | None = None, registry_uri: str | None = None) -> None:
        super().__init__(artifact_uri, tracking_uri, registry_uri)
        parsed = urlparse(artifact_uri)
        key = parsed.path.strip("/")
        marker = f"/{FOLDER}/"
        if parsed.scheme != SCHEME or not parsed.netloc or marker not in f"/{key}":
            raise MlflowException(f"{artifact_uri} is not a {SCHEME}://BUCKET/PREFIX/{FOLDER}/MODEL/RUN_ID URI")
        storage_prefix, rest = f"/{key}".split(marker, 1)
        parts = rest.split("/")
        if len(parts) < 2:
            raise MlflowException(f"{artifact_uri} names no model folder: {SCHEME}://BUCKET/PREFIX/{FOLDER}/MODEL/RUN_ID")
        # the committed folder is <model>/<run id>; anything after it is a path inside (MLflow asks for sub-paths)
        self.prefix = join_key(storage_prefix.strip("/"), FOLDER, *parts[:2])
        self.inner = "/".join(parts[2:])
        self.bucket, self.storage_prefix = parsed.netloc, storage_prefix.strip("/")

    @cached_property
    def store(self) -> ObjectStore:
        return ObjectStore(StorageConfig(endpoint_url=_endpoint(), bucket=self.bucket, prefix=self.storage_prefix))

    @cached_property
    def files(self) -> dict[str, dict]:
        """relative path (from the committed folder) -> its manifest entry (sha256, size, pieces)."""
        try:
            manifest = self.store.read_manifest(self.prefix)
        except StorageError as error:
            raise MlflowException(str(error)) from None
        if manifest is None:
            raise MlflowException(
                f"{model_files_uri(self.bucket, self.prefix)} has no {MANIFEST_NAME}: the model was never committed, or "
                "`perennial gc` deleted it because the version is no longer kept (retention.keep_last_versions, "
                "retention.keep_aliases). The version's metrics, tags and decision stay; retrain to get its model back"
            )
        return manifest["files"]

    def _relative(self, path: str | None) -> str:
        return posixpath.join(self.inner, path) if path else self.inner

    def list_artifacts(self, path: str | None = None) -> list[FileInfo]:
        """The files and folders right under ``path`` (relative to ``artifact_uri``), paths relative to it too."""
        below = self._relative(path).strip("/")
        start = f"{below}/" if below else ""
        entries: dict[str, FileInfo] = {}
        for relative, entry in self.files.items():
            if not relative.startswith(start):
                continue
            head, _, tail = relative[len(start):].partition("/")
            shown = posixpath.join(path or "", head) if path else head
            entries[head] = FileInfo(shown, True, None) if tail else FileInfo(shown, False, entry["size"])
        return sorted(entries.values(), key=lambda info: info.path)

    def _download_file(self, remote_file_path: str, local_path: str) -> None:
        relative = self._relative(remote_file_path)
        entry = self.files.get(relative)
        if entry is None:
            raise MlflowException(f"{model_files_uri(self.bucket, self.prefix)} has no file {relative}")
        try:
            self.store.download_file(self.prefix, relative, entry, Path(local_path))
        except StorageError as error:
            raise MlflowException(str(error)) from None

    def delete_artifacts(self, artifact_path: str | None = None) -> None:
        """Delete the whole committed folder, its manifest first (a reader then sees it as never committed).
        Its weight pieces may be shared with checkpoints and other versions: `perennial gc` deletes those that
        no manifest references any more."""
        if artifact_path or self.inner:
            raise MlflowException(f"{SCHEME}:// deletes a registered model's folder whole, not {self._relative(artifact_path)}")
        keys = [info.key for info in self.store.list(self.prefix + "/")]
        manifest = f"{self.prefix}/{MANIFEST_NAME}"
        self.store.delete_keys([k for k in keys if k == manifest])
        self.store.delete_keys([k for k in keys if k != manifest])
        self.__dict__.pop("files", None)

    def log_artifact(self, local_file, artifact_path=None):
        raise MlflowException(f"{SCHEME}:// folders are written by Perennial's registration (ObjectStore.upload_dir), "
                              "not through MLflow's log calls")

    def log_artifacts(self, local_dir, artifact_path=None):
        self.log_artifact(local_dir, artifact_path)
