"""What every task needs: the run's identity, its object keys, the store, the tracker, local caches.

A run is identified by a key derived from the config digest (or given explicitly), so re-running
the same retrain after a crash finds its own committed stage outputs and checkpoints in S3 and
continues from them instead of starting over.

A key names exactly one piece of work (docs/reliability.md, "What a run key names"):
- one lineage: its outputs live under ``<prefix>/runs/<registered model>/<key>``, so two lineages
  that use the same key (two nightly deployments with ``nightly-{date}``) never share a folder;
- one configuration: the key's identity record in S3 (``RUN.json``, RUN_RECORD) and its MLflow
  parent run hold the outputs digest, and another configuration under the key is refused before
  anything runs;
- one set of inputs: the dataset versions its ingest produced (`bind_inputs`). A key reused after
  the data changed trains the new data under a key derived from it, never resumes the old outputs.
"""

from __future__ import annotations

import hashlib
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator
from zoneinfo import ZoneInfo

from pydantic import BaseModel, PrivateAttr

from perennial.config import NOT_OUTPUT_KEYS, Config, ConfigError, canonical_json
from perennial.storage import ObjectStore, join_key, key_component
from perennial.tracking import (ERROR_TAG, FLOW_RUN_ID_TAG, FLOW_RUN_NAME_TAG, FLOW_RUNS_TAG, LINEAGE_TAG, RUN_KEY_TAG,
                                S3_PREFIX_TAG, SUPERSEDED_BY_TAG, Tracker, flow_run_history)

log = logging.getLogger(__name__)

# The parent run's tag holding Config.outputs_digest(): a run key is resumed only by a config with the same.
OUTPUTS_DIGEST_TAG = "perennial.outputs_digest"
# The parent run's tag holding the digest of its dataset versions (bind_inputs), and, on a run whose key
# was derived because its data differed from the key's first run, the key it was derived from.
INPUTS_DIGEST_TAG = "perennial.inputs_digest"
DERIVED_FROM_TAG = "perennial.derived_from"
# A run key's identity in S3, beside its outputs: lineage, outputs digest, config, dataset versions.
RUN_RECORD = "RUN.json"


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
    # A parent run this attempt resumed: its status and the tags preflight changed, as they were
    # before, so `bind_inputs` can give them back when the inputs send the run to a derived key.
    resumed_from: dict | None = None
    holds_lineage_lock: bool = False  # the flow holds the lineage lock: no other attempt at this key runs
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
        return run_prefix(self.config, self.run_key)

    def stage_prefix(self, stage: str) -> str:
        return join_key(self.prefix, "stages", key_component(stage))

    @property
    def work_dir(self) -> Path:
        path = Path(self.config.work_dir) / self.run_key
        path.mkdir(parents=True, exist_ok=True)
        return path


def secret_values(config: Config) -> list[str]:
    """What the tracker masks ("***") in every param, tag and text it logs: the S3 keys and the MLflow credentials."""
    from perennial.tracking import credential_secrets

    return [os.environ.get(config.storage.access_key_env, ""), os.environ.get(config.storage.secret_key_env, ""),
            *credential_secrets()]


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
    else:
        try:  # the marker's time is the entry's last use: gc evicts least recently used entries first (tasks/gc.py)
            os.utime(marker)
        except OSError:
            pass
    return local


def committed_uri(store: ObjectStore, prefix: str) -> str | None:
    return store.uri(prefix) if store.read_manifest(prefix) is not None else None


def run_prefix(config: Config, run_key: str) -> str:
    """The S3 prefix of a run's outputs: per lineage (the registered model), then per run key."""
    return join_key(config.storage.prefix, "runs", config.tracking.registered_model, run_key)


def find_parent_run(tracker: Tracker, registered_model: str, run_key: str) -> str | None:
    """The parent MLflow run of ``run_key`` in the lineage of ``registered_model`` (the newest), or None."""
    return tracker.find_run({RUN_KEY_TAG: run_key, LINEAGE_TAG: registered_model})


def read_run_record(store: ObjectStore, config: Config, run_key: str) -> dict | None:
    """The key's identity record (RUN_RECORD) in S3, or None before its first run wrote it."""
    key = join_key(run_prefix(config, run_key), RUN_RECORD)
    return store.get_json(key) if store.exists(key) else None


def _write_run_record(run: "RunContext", record: dict) -> None:
    run.store.put_json(join_key(run.prefix, RUN_RECORD), record)


def start_run(config: Config, run_key: str | None = None, holds_lineage_lock: bool = False) -> RunContext:
    """Preflight (storage and tracking reachable, before any training) and the parent MLflow run.

    A parent run with the same key in the same lineage is reused, so a crashed retrain continues
    in place and a finished one is a no-op rerun. ``holds_lineage_lock``: the caller holds the
    lineage lock (perennial.locks), so no other attempt at this key can be running, and earlier
    flow runs that Prefect still shows RUNNING are marked CRASHED.

    Raises ConfigError when the key belongs to another configuration (read from the key's record in
    S3 and from its MLflow run), StorageError when S3 refuses (a skewed clock named as such).
    """
    from perennial.tracking import check_tracking_server

    check_tracking_server(config.tracking.tracking_uri)
    services = Services.open(config)
    services.store.check()
    run_key = key_component(_expand_run_key(run_key) or f"{config.run_name}-{config.digest()[:12]}")
    return open_run(services, config, run_key, holds_lineage_lock=holds_lineage_lock)


# The parent run's tags that an attempt sets when it resumes the run (open_run), given back by bind_inputs.
_RESUME_TAGS = (ERROR_TAG, S3_PREFIX_TAG, FLOW_RUN_ID_TAG, FLOW_RUN_NAME_TAG, FLOW_RUNS_TAG)


def open_run(services: Services, config: Config, run_key: str, tags: dict[str, str] | None = None,
             holds_lineage_lock: bool = False) -> RunContext:
    """Create or resume the parent run of ``run_key`` in the config's lineage: its MLflow run (``tags``
    go on a new one) and its identity record in S3. Raises ConfigError as `start_run`."""
    store, tracker = services.store, services.tracker
    lineage = config.tracking.registered_model
    record = read_run_record(store, config, run_key)
    if record is not None:  # S3 holds the key's outputs: they are what decides, whatever MLflow holds
        _refuse_other_config(config, run_key, record["outputs_digest"], record.get("config", {}),
                             f"its record s3://{store.bucket}/{run_prefix(config, run_key)}/{RUN_RECORD}")
    parent = find_parent_run(tracker, lineage, run_key)
    resumed_from = None
    if parent is None:
        parent = tracker.start_run(config.run_name, tags={
            RUN_KEY_TAG: run_key, LINEAGE_TAG: lineage, "config_digest": config.digest(),
            OUTPUTS_DIGEST_TAG: config.outputs_digest(), **(tags or {})})
        tracker.log_params(parent, _flatten(config.model_dump(mode="json")))
        earlier_tags: dict[str, str] = {}
    else:
        earlier = tracker.client.get_run(parent)
        earlier_tags = earlier.data.tags
        _refuse_other_config(config, run_key, earlier_tags.get(OUTPUTS_DIGEST_TAG), earlier.data.params, f"MLflow run {parent}")
        resumed_from = {"status": earlier.info.status, "tags": {tag: earlier_tags.get(tag) for tag in _RESUME_TAGS}}
        tracker.client.update_run(parent, status="RUNNING")
        if ERROR_TAG in earlier_tags:  # an earlier attempt's error is not this one's
            tracker.client.delete_tag(parent, ERROR_TAG)
        if holds_lineage_lock:
            _crash_abandoned_flow_runs(flow_run_history(earlier_tags), run_key)
    context = RunContext(config=config, run_key=run_key, parent_run_id=parent, experiment_id=tracker.experiment_id(),
                         resumed_from=resumed_from, holds_lineage_lock=holds_lineage_lock)
    context._services = services  # the run's connections, opened once here
    if record is None or record.get("mlflow_run_id") != parent:
        _write_run_record(context, {
            **(record or {}), "run_key": run_key, "lineage": lineage, "experiment": config.tracking.experiment,
            "mlflow_run_id": parent, "outputs_digest": config.outputs_digest(), "config": _identity_params(config),
            "derived_from": (tags or {}).get(DERIVED_FROM_TAG) or (record or {}).get("derived_from"),
        })
    # For `perennial status`: where the run's files are, and the Prefect flow run to join it with
    # (on a resume, the flow run that resumed it).
    tracker.set_tags(parent, {S3_PREFIX_TAG: f"s3://{config.storage.bucket}/{context.prefix}", **_flow_run_tags(earlier_tags)})
    return context


def inputs_digest(inputs: dict[str, str]) -> str:
    """The digest of a run's inputs: dataset name -> version digest."""
    return hashlib.sha256(canonical_json(inputs).encode()).hexdigest()


def derived_run_key(run_key: str, digest: str) -> str:
    """The key a run gets when its data differs from what ``run_key`` trained: the same for the same data,
    so a rerun of it resumes."""
    return key_component(f"{run_key[:100]}-data-{digest[:10]}")


def bind_inputs(run: RunContext, inputs: dict[str, str]) -> RunContext:
    """Bind the run's key to its inputs (dataset name -> version digest); returns the run to go on with.

    The key's first run records them (RUN_RECORD, INPUTS_DIGEST_TAG). A later run under the key with
    the same inputs resumes it. With other inputs (new data arrived under a reused key: a nightly
    triggered twice in one night, two manual runs of one config), resuming would return the old
    outputs and the new data would never be trained: the run goes on under `derived_run_key`
    instead, as a parent run of its own tagged DERIVED_FROM_TAG, and the key's own run is given
    back the status it had.
    """
    digest = inputs_digest(inputs)
    record = read_run_record(run.store, run.config, run.run_key) or {}
    recorded = record.get("inputs")
    if recorded is None or record.get("inputs_digest") == digest:
        if recorded is None:
            _write_run_record(run, {**record, "inputs": inputs, "inputs_digest": digest})
        run.tracker.set_tags(run.parent_run_id, {INPUTS_DIGEST_TAG: digest})
        return run
    derived = derived_run_key(run.run_key, digest)
    changed = [f"{name} {str(recorded.get(name, '(none)'))[:12]} -> {str(inputs.get(name, '(none)'))[:12]}"
               for name in sorted(set(recorded) | set(inputs)) if recorded.get(name) != inputs.get(name)]
    message = (f"run key {run.run_key!r} trained other dataset versions than this run ingested ({', '.join(changed)}): "
               f"this run trains its own data under the run key {derived!r}, derived from it, instead of resuming that run")
    log.warning(message)
    print(message)
    derived_run = open_run(run.services, run.config, derived, tags={DERIVED_FROM_TAG: run.run_key},
                           holds_lineage_lock=run.holds_lineage_lock)
    _give_back(run, derived_run.parent_run_id)
    return bind_inputs(derived_run, inputs)


def _give_back(run: RunContext, derived_parent: str) -> None:
    """The key's own parent run as it was before this attempt took it up: its status and tags.

    A parent run that this attempt created (the key's S3 record outlived its MLflow run) holds
    nothing and is deleted; one that was still RUNNING (its process died) ends KILLED, superseded.
    """
    client = run.tracker.client
    if run.resumed_from is None:
        client.delete_run(run.parent_run_id)
        return
    for tag, value in run.resumed_from["tags"].items():
        if value is None:
            if tag in client.get_run(run.parent_run_id).data.tags:
                client.delete_tag(run.parent_run_id, tag)
        else:
            client.set_tag(run.parent_run_id, tag, value)
    status = run.resumed_from["status"]
    if status == "RUNNING":
        client.set_tag(run.parent_run_id, SUPERSEDED_BY_TAG, derived_parent)
        status = "KILLED"
    client.set_terminated(run.parent_run_id, status=status)


def _identity_params(config: Config) -> dict[str, str]:
    """The config as the key's record keeps it: flat keys, values as MLflow params hold them, NOT_OUTPUT_KEYS left out."""
    return {k: str(v) for k, v in _flatten(config.model_dump(mode="json")).items()
            if not any(k == key or k.startswith(key + ".") for key in NOT_OUTPUT_KEYS)}


def _refuse_other_config(config: Config, run_key: str, recorded_digest: str | None, recorded: dict[str, str], where: str) -> None:
    """Raise ConfigError when the run under this key was made from a config that computes something else.

    A key's committed stage outputs, checkpoints and registered version belong to the config that
    made them; resuming them under another config would return outputs made from other inputs
    (a re-triggered nightly with corrected overrides, say). Location keys may differ. ``recorded``:
    the earlier config's flat params (MLflow's, or the S3 record's), to name what changed.
    """
    if recorded_digest is None or recorded_digest == config.outputs_digest():
        return
    changed = [
        f"{key}: {recorded.get(key, '(unset)')} -> {value}"
        for key, value in sorted(_identity_params(config).items())
        if value != recorded.get(key) and not (recorded and key not in recorded and value == _default_param(config, key))
    ]
    if recorded and not changed:
        # Only settings newer than the record differ, each at its default (which keeps the earlier behaviour):
        # the same computation, so upgrading Perennial does not strand every run key made before.
        return
    raise ConfigError(
        f"run key {run_key!r} belongs to a retrain of a different configuration ({where}"
        f"{'; changed: ' + ', '.join(changed[:5]) if changed else ''}), and its outputs were made from that one. "
        f"Rerun with the configuration it was made with to resume it, or give this configuration its own run key "
        f"(--run-key {run_key}-2, or no --run-key: the key then follows the config digest)."
    )


def _crash_abandoned_flow_runs(history: list[str], run_key: str) -> None:
    """Mark CRASHED the earlier flow runs of this parent run that Prefect still shows RUNNING.

    The caller holds the lineage lock, so none of them can still be working: their process was
    killed (kill -9, a lost node) before Prefect heard of it. MLflow already ends their stage runs
    KILLED, superseded (Tracker._start_stage_run); Prefect should not show them running for ever.
    A flow run of another Prefect API (a local run's own ephemeral one) is not found, and left alone.
    """
    from prefect.runtime import flow_run

    current = str(flow_run.id) if flow_run.id else None
    earlier = [run_id for run_id in history if run_id != current]
    if not earlier:
        return
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        for run_id in earlier:
            try:
                found = client.read_flow_run(UUID(run_id))
            except (ObjectNotFound, ValueError):
                continue
            if found.state is not None and found.state.is_running():
                client.set_flow_run_state(found.id, Crashed(
                    message=f"its process is gone: flow run {flow_run.name!r} took over run key {run_key!r} and resumed it"),
                    force=True)
                log.warning("flow run %s (%s) was still RUNNING in Prefect with its process gone: marked CRASHED", found.name, run_id)


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
    """`{date}` in a run key becomes the flow run's scheduled date in its schedule's timezone, so a
    nightly schedule gets one run key per night (outside a scheduled run: today's date in UTC)."""
    if not run_key or "{date}" not in run_key:
        return run_key
    from prefect.runtime import flow_run

    if not flow_run.id:
        return run_key.replace("{date}", run_date(datetime.now(timezone.utc), "UTC"))
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        current = client.read_flow_run(flow_run.id)
        zone = schedule_timezone(client, current)
    when = current.expected_start_time or datetime.now(timezone.utc)
    return run_key.replace("{date}", run_date(when, zone))


def run_date(when: datetime, zone: str) -> str:
    """``when`` as the calendar date (YYYYMMDD) it is in ``zone`` (an IANA name)."""
    return when.astimezone(ZoneInfo(zone)).strftime("%Y%m%d")


def schedule_timezone(client, flow_run) -> str:
    """The timezone of the schedule that created ``flow_run`` (a Prefect FlowRun), "UTC" when none does.

    Prefect's scheduler keys a scheduled run `scheduled <deployment> <schedule id> <time>` (its
    idempotency key), which names the schedule. A run started by hand (`run_deployment`) takes the
    zone of its deployment's schedules when they share one. A cron of 16:30 in America/Los_Angeles
    falls on two UTC dates, one each side of midnight UTC as DST changes; the local date is the night.
    """
    if flow_run.deployment_id is None:
        return "UTC"
    schedules = client.read_deployment_schedules(flow_run.deployment_id)
    parts = (flow_run.idempotency_key or "").split(" ")
    if len(parts) >= 3 and parts[0] == "scheduled":
        schedules = [s for s in schedules if str(s.id) == parts[2]] or schedules
    zones = {getattr(s.schedule, "timezone", None) or "UTC" for s in schedules}
    return zones.pop() if len(zones) == 1 else "UTC"


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


def _default_param(config: Config, dotted: str) -> str | None:
    """The default of the setting ``dotted`` (as `_identity_params` writes values), or None when it has none."""
    from pydantic import BaseModel, TypeAdapter

    *parents, last = dotted.split(".")
    node = config
    for key in parents:
        node = getattr(node, key, None)
    if not isinstance(node, BaseModel) or last not in type(node).model_fields:
        return None
    field = type(node).model_fields[last]
    if field.is_required():
        return None
    try:
        return str(TypeAdapter(field.annotation).dump_python(field.get_default(call_default_factory=True), mode="json"))
    except Exception:  # noqa: BLE001 - a default that does not serialise alone: treated as a change
        return None


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
