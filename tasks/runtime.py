"""What every task needs: the run's identity, its object keys, the store, the tracker, local caches.

A run is identified by a key derived from the config digest (or given explicitly), so re-running
the same retrain after a crash finds its own committed stage outputs and checkpoints in S3 and
continues from them instead of starting over.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pydantic import BaseModel, PrivateAttr

from perennial.config import LOCATION_KEYS, Config, ConfigError
from perennial.storage import ObjectStore, join_key, key_component
from perennial.tracking import FLOW_RUN_ID_TAG, FLOW_RUN_NAME_TAG, FLOW_RUNS_TAG, RUN_KEY_TAG, S3_PREFIX_TAG, flow_run_history
from perennial.tracking import ERROR_TAG, Tracker

log = logging.getLogger(__name__)

# The parent run's tag holding Config.outputs_digest(): a run key is resumed only by a config with the same.
OUTPUTS_DIGEST_TAG = "perennial.outputs_digest"


@dataclass(frozen=True)
class Services:
    """The run's open connections and local cache, opened once per process (`Services.open`)."""

    store: ObjectStore
    tracker: Tracker  # without a spool: a stage's own metrics go through `stage_tracker`
    cache_dir: Path  # downloads keyed by manifest digest (fetch_dir), shared by every run of this work_dir
    config: Config

    @classmethod
    def open(cls, config: Config) -> "Services":
        return cls(ObjectStore(config.storage), open_tracker(config), Path(config.work_dir) / "cache", config)

    def stage_tracker(self, spool_dir: Path) -> Tracker:
        """A tracker whose unsent metrics survive the process in ``spool_dir`` (one stage's)."""
        return open_tracker(self.config, spool_dir=spool_dir)


class RunContext(BaseModel):
    """Passed between tasks: plain values (paths and URIs, never models); `services` is opened on
    first use in each process and never serialized."""

    config: Config
    run_key: str
    parent_run_id: str
    experiment_id: str = "0"
    _services: Services | None = PrivateAttr(default=None)

    @property
    def services(self) -> Services:
        if self._services is None:
            self._services = Services.open(self.config)
        return self._services

    @property
    def store(self) -> ObjectStore:
        return self.services.store

    @property
    def tracker(self) -> Tracker:
        return self.services.tracker

    def __getstate__(self) -> dict:
        # A pickled context (a Dask worker, Prefect's cache key) carries values, not connections.
        state = super().__getstate__()
        return {**state, "__pydantic_private__": {"_services": None}}

    @property
    def prefix(self) -> str:
        return join_key(self.config.storage.prefix, "runs", self.run_key)

    def stage_prefix(self, stage: str) -> str:
        return join_key(self.prefix, "stages", key_component(stage))

    @property
    def work_dir(self) -> Path:
        path = Path(self.config.work_dir) / self.run_key
        path.mkdir(parents=True, exist_ok=True)
        return path


def secret_values(config: Config) -> list[str]:
    return [os.environ.get(config.storage.access_key_env, ""), os.environ.get(config.storage.secret_key_env, "")]


def open_tracker(config: Config, spool_dir: Path | None = None) -> Tracker:
    return Tracker(config.tracking.tracking_uri, config.tracking.experiment, spool_dir=spool_dir, secrets=secret_values(config))


def uri_to_prefix(store: ObjectStore, uri: str) -> str:
    expected = f"s3://{store.bucket}/"
    if not uri.startswith(expected):
        raise ValueError(f"{uri} is not in bucket {store.bucket}")
    return uri[len(expected) :]


def fetch_dir(store: ObjectStore, uri: str, cache_root: Path) -> Path:
    """Download a committed directory once (digest-verified) into a cache keyed by its manifest digest."""
    prefix = uri_to_prefix(store, uri)
    manifest = store.read_manifest(prefix)
    if manifest is None:
        raise FileNotFoundError(f"{uri} is not committed (no manifest)")
    local = cache_root / manifest["digest"][:24]
    marker = local / ".complete"
    if not marker.exists():
        store.download_dir(prefix, local)
        marker.write_text(uri)
    return local


def committed_uri(store: ObjectStore, prefix: str) -> str | None:
    return store.uri(prefix) if store.read_manifest(prefix) is not None else None


def start_run(config: Config, run_key: str | None = None) -> RunContext:
    """Preflight (storage and tracking reachable, before any training) and the parent MLflow run.

    A parent run with the same key is reused, so a crashed retrain continues in place and a
    finished one is a no-op rerun.
    """
    from perennial.tracking import check_tracking_server

    check_tracking_server(config.tracking.tracking_uri)
    services = Services.open(config)
    services.store.check()
    run_key = key_component(_expand_run_key(run_key) or f"{config.run_name}-{config.digest()[:12]}")
    tracker = services.tracker
    parent = tracker.find_run(RUN_KEY_TAG, run_key)
    earlier_tags: dict[str, str] = {}
    if parent is None:
        tags = {RUN_KEY_TAG: run_key, "config_digest": config.digest(), OUTPUTS_DIGEST_TAG: config.outputs_digest()}
        parent = tracker.start_run(config.run_name, tags=tags)
        flat = config.model_dump(mode="json")
        tracker.log_params(parent, _flatten(flat))
    else:
        earlier = tracker.client.get_run(parent).data
        earlier_tags = earlier.tags
        _refuse_other_config(config, run_key, parent, earlier)
        tracker.client.update_run(parent, status="RUNNING")
        if ERROR_TAG in earlier.tags:  # an earlier attempt's error is not this one's
            tracker.client.delete_tag(parent, ERROR_TAG)
    context = RunContext(config=config, run_key=run_key, parent_run_id=parent, experiment_id=tracker.experiment_id())
    context._services = services  # the run's connections, opened once here
    # For `perennial status`: where the run's files are, and the Prefect flow run to join it with
    # (on a resume, the flow run that resumed it).
    tracker.set_tags(parent, {S3_PREFIX_TAG: f"s3://{config.storage.bucket}/{context.prefix}", **_flow_run_tags(earlier_tags)})
    return context


def _refuse_other_config(config: Config, run_key: str, parent: str, earlier) -> None:
    """Raise ConfigError when the run under this key was made from a config that computes something else.

    A key's committed stage outputs, checkpoints and registered version belong to the config that
    made them; resuming them under another config would return outputs made from other inputs
    (a re-triggered nightly with corrected overrides, say). Location keys may differ.
    """
    recorded = earlier.tags.get(OUTPUTS_DIGEST_TAG)
    if recorded is None or recorded == config.outputs_digest():
        return
    current = {k: v for k, v in _flatten(config.model_dump(mode="json")).items() if k not in LOCATION_KEYS}
    changed = [
        f"{key}: {earlier.params.get(key, '(unset)')} -> {value}"
        for key, value in sorted(current.items())
        if str(value) != earlier.params.get(key)
    ]
    raise ConfigError(
        f"run key {run_key!r} belongs to a retrain of a different configuration (MLflow run {parent}"
        f"{'; changed: ' + ', '.join(changed[:5]) if changed else ''}), and its outputs were made from that one. "
        f"Rerun with the configuration it was made with to resume it, or give this configuration its own run key "
        f"(--run-key {run_key}-2, or no --run-key: the key then follows the config digest)."
    )


def _flow_run_tags(earlier: dict[str, str]) -> dict[str, str]:
    """The current flow run, and every flow run that worked on this parent run (oldest first, at most 50)."""
    from prefect.runtime import flow_run

    if not flow_run.id:  # called outside a Prefect flow run
        return {}
    history = flow_run_history(earlier)
    if str(flow_run.id) not in history:
        history.append(str(flow_run.id))
    return {FLOW_RUN_ID_TAG: str(flow_run.id), FLOW_RUN_NAME_TAG: str(flow_run.name), FLOW_RUNS_TAG: ",".join(history[-50:])}


def _expand_run_key(run_key: str | None) -> str | None:
    """`{date}` in a run key becomes the flow run's scheduled date, so a nightly schedule gets one run per night."""
    if not run_key or "{date}" not in run_key:
        return run_key
    from datetime import datetime, timezone

    from prefect.runtime import flow_run

    scheduled = flow_run.scheduled_start_time or datetime.now(timezone.utc)
    return run_key.replace("{date}", scheduled.strftime("%Y%m%d"))


def finish_run(run: RunContext, status: str = "FINISHED") -> None:
    run.tracker.finish(run.parent_run_id, status)


@contextmanager
def failed_on_error(run: RunContext) -> Iterator[None]:
    """Ends the parent MLflow run FAILED (KILLED on an interrupt) when the body raises, with the
    error in the run's ERROR_TAG; the error is then raised again."""
    try:
        yield
    except BaseException as error:
        run.tracker.end_failed(run.parent_run_id, error)
        raise


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
