"""Prefect events of ingestion, so a lineage retrains when data arrives rather than only at 02:00.

`perennial ingest` emits, for each dataset version it commits:
- `perennial.dataset.committed` (resource `perennial.dataset.<bucket>.<storage prefix>.<name>`): the
  version, the records this ingest added and the records no committed model was trained on yet
  (`pending_records`);
- `perennial.retrain.due` (resource `perennial.lineage.<registered model>`) when the pending records
  of the lineage's datasets reach `lineage.retrain_after_records`.
A deployment trigger on the second (deployments/prefect.yaml, `continual-retrain/on-data`) starts the
continuing retrain: Prefect's own events and automations, no poller of ours. Events go to the Prefect
API of PREFECT_API_URL; without one nothing is sent (a plain `perennial ingest` on a laptop).
"""

from __future__ import annotations

from perennial.config import Config
from perennial.ingest.core import IngestResult
from perennial.ingest.incremental import pending_records
from perennial.storage import ObjectStore

DATASET_COMMITTED = "perennial.dataset.committed"
RETRAIN_DUE = "perennial.retrain.due"


def lineage_resource(registered_model: str) -> str:
    """The resource id of a lineage's retrain-due events (what a deployment trigger matches)."""
    return f"perennial.lineage.{registered_model}"


def announce(cfg: Config, store: ObjectStore, results: list[IngestResult]) -> list[dict]:
    """Emit the events of the versions in ``results`` that were created; returns them (name and payload).

    Nothing is emitted (an empty list) when no Prefect API is configured. The events are sent before
    this returns (the Prefect events worker is drained), so a short-lived command loses none.
    """
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        return []
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    sent: list[dict] = []
    prefix = cfg.storage.prefix
    pending = {spec.name: pending_records(store, prefix, spec.name) for spec in cfg.data.datasets if spec.incremental}
    for result in results:
        if not result.created:
            continue
        payload = {"dataset": result.name, "version": result.digest, "uri": result.uri,
                   "new_records": int(result.counts.get("accepted", 0)), "pending_records": pending.get(result.name)}
        resource = {"prefect.resource.id": f"perennial.dataset.{store.bucket}.{prefix.replace('/', '.')}.{result.name}",
                    "prefect.resource.name": result.name}
        emit_event(DATASET_COMMITTED, resource=resource, payload=payload)
        sent.append({"event": DATASET_COMMITTED, **payload})
    due = sum(count for count in pending.values() if count)
    if sent and due >= cfg.lineage.retrain_after_records:
        payload = {"lineage": cfg.tracking.registered_model, "pending_records": due, "datasets": pending}
        emit_event(RETRAIN_DUE, resource={"prefect.resource.id": lineage_resource(cfg.tracking.registered_model),
                                          "prefect.resource.name": cfg.tracking.registered_model}, payload=payload)
        sent.append({"event": RETRAIN_DUE, **payload})
    EventsWorker.drain_all()
    return sent
