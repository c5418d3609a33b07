"""Export a committed checkpoint as a plain Hugging Face folder (what `lm_eval --model hf` reads)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

from perennial.config import Config
from perennial.registry import resolve_checkpoint_uri
from perennial.storage import ObjectStore
from perennial.tracking import check_tracking_server
from tasks.runtime import fetch_dir

PERENNIAL_ONLY = ("perennial_plugins", "training.json", ".complete")


def export_model(config: Config, model_uri: str, out_dir: str | Path) -> Path:
    """Copy the verified checkpoint (merged weights, config, tokenizer) without Perennial's own state.

    model_uri is `s3://BUCKET/PREFIX` of a committed model folder, read from BUCKET with the
    config's S3 endpoint and credentials, or `models:/NAME@ALIAS` / `models:/NAME/VERSION`, the
    version's checkpoint_uri tag from the registry at config.tracking.tracking_uri. The download
    goes to a temporary folder beside out_dir, removed afterwards.

    Raises FileExistsError: out_dir exists and is not an empty folder (checked before any
    download). ValueError: model_uri is neither kind. RegistryError: no such model, version or
    alias, or a version without checkpoint_uri. TrackingError: a models:/ URI and the tracking
    server is unreachable. FileNotFoundError: the folder is not committed.
    StorageError: S3 unreachable, credentials missing, or a digest mismatch.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty folder; choose an empty or new folder for the export")
    if model_uri.startswith("models:/"):  # fail fast: an unreachable server would read as a missing alias
        check_tracking_server(config.tracking.tracking_uri)
    checkpoint = resolve_checkpoint_uri(MlflowClient(tracking_uri=config.tracking.tracking_uri), model_uri)
    if not checkpoint.startswith("s3://"):
        raise ValueError(f"{model_uri} is not a model URI; pass models:/NAME@ALIAS, models:/NAME/VERSION "
                         "or s3://BUCKET/PREFIX of a committed model folder")
    # The URI names its bucket; the config's bucket is only where new runs write.
    bucket = checkpoint[len("s3://"):].split("/", 1)[0]
    store = ObjectStore(config.storage.model_copy(update={"bucket": bucket}))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Beside out_dir, not in the working directory: same disk as the export, and gone afterwards.
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}-download-", dir=out_dir.parent) as cache:
        local = fetch_dir(store, checkpoint, Path(cache))
        shutil.copytree(local, out_dir, ignore=shutil.ignore_patterns(*PERENNIAL_ONLY), dirs_exist_ok=True)
    return out_dir
