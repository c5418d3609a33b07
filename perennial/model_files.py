"""Registered models stored by content in the lineage's S3: MLflow's ``perennial-s3`` artifact repository.

A registered version's MLflow model (MLmodel, the weights, the tokenizer) is written as a committed folder
(`ObjectStore.upload_dir`) under ``<storage.prefix>/registered-models/<model>/<run id>`` in the lineage's
bucket, and the version's ``source`` is that folder's ``perennial-s3://BUCKET/KEY`` URI. Its weights are
content-addressed pieces like every checkpoint's, so they are the pieces the committed checkpoint already
stored: a version adds its small files, not a second copy of the model (issue #45). Logging the model to
MLflow's own artifact store instead copied it in full for every version.

MLflow finds this repository through the ``mlflow.artifact_repository`` entry point named after the scheme
(pyproject.toml; `perennial.model_files_repository`), so ``mlflow.transformers.load_model("models:/NAME@champion")``, ``mlflow models serve`` and
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


def _parse(uri: str) -> tuple[str, str, list[str]]:
    """(bucket, storage prefix, the path's components after `registered-models/`) of a ``perennial-s3://`` URI."""
    parsed = urlparse(uri)
    key = parsed.path.strip("/")
    marker = f"/{FOLDER}/"
    if parsed.scheme != SCHEME or not parsed.netloc or marker not in f"/{key}/":
        raise MlflowException(f"{uri} is not a {SCHEME}://BUCKET/PREFIX/{FOLDER}/MODEL/RUN_ID URI")
    storage_prefix, _, rest = f"/{key}/".partition(marker)
    return parsed.netloc, storage_prefix.strip("/"), [part for part in rest.split("/") if part]


def _folder_key(storage_prefix: str, *parts: str) -> str:
    return join_key(*([storage_prefix] if storage_prefix else []), FOLDER, *parts)


def registered_folder(source: str) -> str | None:
    """The S3 folder (key prefix) of a version whose ``source`` is a ``perennial-s3://`` URI, else None."""
    if urlparse(source).scheme != SCHEME:
        return None
    _, storage_prefix, parts = _parse(source)
    return _folder_key(storage_prefix, *parts[:2]) if len(parts) >= 2 else None


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
    """Read (list, download) and delete committed folders of Perennial's S3 through MLflow's artifact API.

    ``artifact_uri``: ``perennial-s3://BUCKET/<storage prefix>/registered-models/<model>[/<run id>[/sub/path]]``;
    MLflow roots a repository at the model (when it loads ``source`` itself) or at the version's folder (through
    ``models:/``), so both work. Writing goes through `ObjectStore.upload_dir`, which commits the folder with its
    manifest; MLflow's log calls are refused. Raises MlflowException naming the folder, and the S3 endpoint read,
    when it was never committed or was deleted.
    """

    def __init__(self, artifact_uri: str, tracking_uri: str | None = None, registry_uri: str | None = None) -> None:
        super().__init__(artifact_uri, tracking_uri, registry_uri)
        self.bucket, self.storage_prefix, self.parts = _parse(artifact_uri)
        if not self.parts:
            raise MlflowException(f"{artifact_uri} names no registered model: {SCHEME}://BUCKET/PREFIX/{FOLDER}/MODEL/RUN_ID")
        self._manifests: dict[str, dict] = {}

    @cached_property
    def store(self) -> ObjectStore:
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return ObjectStore(StorageConfig(endpoint_url=_endpoint(), bucket=self.bucket, prefix=self.storage_prefix, region=region))

    def _locate(self, path: str | None) -> tuple[str | None, str, list[str]]:
        """(the committed folder ``path`` lies in, or None above it; the path inside it; all components)."""
        parts = self.parts + [part for part in (path or "").split("/") if part]
        if len(parts) < 2:
            return None, "", parts
        return _folder_key(self.storage_prefix, *parts[:2]), "/".join(parts[2:]), parts

    def files(self, folder: str) -> dict[str, dict]:
        """relative path (from the committed folder) -> its manifest entry (sha256, size, pieces)."""
        if folder not in self._manifests:
            try:
                manifest = self.store.read_manifest(folder)
            except StorageError as error:
                raise MlflowException(str(error)) from None
            if manifest is None:
                raise MlflowException(
                    f"{model_files_uri(self.bucket, folder)} has no {MANIFEST_NAME} at {self.store.cfg.endpoint_url}: the "
                    "model was never committed, or `perennial gc` deleted it because the version is no longer kept "
                    "(retention.keep_last_versions, retention.keep_aliases); or this is not the lineage's S3 endpoint "
                    f"({'/'.join(ENDPOINT_ENVS[:2])}). The version's metrics, tags and decision stay; retrain to get its model back"
                )
            self._manifests[folder] = manifest["files"]
        return self._manifests[folder]

    def list_artifacts(self, path: str | None = None) -> list[FileInfo]:
        """The files and folders right under ``path`` (relative to ``artifact_uri``), paths relative to it too."""
        folder, below, parts = self._locate(path)
        if folder is None:  # the model's folder: one sub-folder per registering run
            root = _folder_key(self.storage_prefix, parts[0]) + "/"
            runs = {info.key[len(root):].split("/", 1)[0] for info in self.store.list(root)}
            return [FileInfo(posixpath.join(path or "", run), True, None) for run in sorted(runs)]
        start = f"{below}/" if below else ""
        entries: dict[str, FileInfo] = {}
        for relative, entry in self.files(folder).items():
            if not relative.startswith(start):
                continue
            head, _, tail = relative[len(start):].partition("/")
            shown = posixpath.join(path, head) if path else head
            entries[head] = FileInfo(shown, True, None) if tail else FileInfo(shown, False, entry["size"])
        return sorted(entries.values(), key=lambda info: info.path)

    def _download_file(self, remote_file_path: str, local_path: str) -> None:
        folder, relative, _ = self._locate(remote_file_path)
        entry = self.files(folder).get(relative) if folder is not None else None
        if entry is None:
            raise MlflowException(f"{self.artifact_uri} has no file {remote_file_path}")
        try:
            self.store.download_file(folder, relative, entry, Path(local_path))
        except StorageError as error:
            raise MlflowException(str(error)) from None

    def delete_artifacts(self, artifact_path: str | None = None) -> None:
        """Delete one whole committed folder, its manifest first (a reader then sees it as never committed).
        Its weight pieces may be shared with checkpoints and other versions: `perennial gc` deletes those that
        no manifest references any more."""
        folder, relative, _ = self._locate(artifact_path)
        if folder is None or relative:
            raise MlflowException(f"{SCHEME}:// deletes one registered model's folder whole, not {artifact_path or self.artifact_uri}")
        self.store.delete_dir(folder)
        self._manifests.pop(folder, None)

    def log_artifact(self, local_file, artifact_path=None):
        raise MlflowException(f"{SCHEME}:// folders are written by Perennial's registration (ObjectStore.upload_dir), "
                              "not through MLflow's log calls")

    def log_artifacts(self, local_dir, artifact_path=None):
        self.log_artifact(local_dir, artifact_path)
