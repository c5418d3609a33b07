"""Ingest stage: produce versioned, validated datasets in S3 and return references to them."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from perennial import demo_data
from perennial.ingest import ingest_records
from perennial.storage import ObjectStore
from tasks.runtime import RunContext, fetch_dir, open_store, open_tracker


class DatasetRef(BaseModel):
    name: str
    kind: str  # "text" | "instruction"
    digest: str
    uri: str
    data_file: str
    counts: dict = {}
    chance: float | None = None  # chance-level score of an instruction task, where known


class DataBundle(BaseModel):
    general: DatasetRef
    domain: DatasetRef
    tasks: list[DatasetRef]


def _ref(result, chance: float | None = None) -> DatasetRef:
    return DatasetRef(
        name=result.name,
        kind=result.kind,
        digest=result.digest,
        uri=result.uri,
        data_file=Path(result.local_path).name,
        counts=dict(result.counts),
        chance=chance,
    )


def ingest_demo(run: RunContext) -> DataBundle:
    """Generate the embedded demo data and push it through the same validation and versioning path as user data."""
    cfg = run.config
    demo = cfg.data.demo
    store = open_store(cfg)
    work = run.work_dir / "ingest"

    def publish(name: str, kind: str, records: list[dict], chance: float | None = None) -> DatasetRef:
        result = ingest_records(name, kind, records, store=store, work_dir=work, storage_prefix=cfg.storage.prefix)
        return _ref(result, chance)

    general_docs = demo_data.general_corpus(demo.general_docs + demo.general_eval_docs, demo.seed)
    general = [
        {"text": text, "split": "test" if index < demo.general_eval_docs else "train"} for index, text in enumerate(general_docs)
    ]
    domain = [{"text": text, "split": "train"} for text in demo_data.domain_corpus(demo.domain_docs, demo.seed)]
    catalogue = demo_data.demo_tasks(demo.seed)
    tasks = [
        publish(name, "instruction", demo_data.task_records(catalogue[name], demo.train_per_task, demo.eval_per_task, demo.seed), catalogue[name].chance)
        for name in demo.tasks
    ]
    bundle = DataBundle(general=publish("general", "text", general), domain=publish("domain", "text", domain), tasks=tasks)

    tracker = open_tracker(cfg)
    tracker.log_params(run.parent_run_id, {f"dataset.{ref.name}.digest": ref.digest for ref in [bundle.general, bundle.domain, *bundle.tasks]})
    return bundle


def read_records(store: ObjectStore, ref: DatasetRef, cache_root: Path, split: str | None = None) -> list[dict]:
    local = fetch_dir(store, ref.uri, cache_root)
    records = []
    with open(local / ref.data_file) as handle:
        for line in handle:
            record = json.loads(line)
            if split is None or record.get("split") == split:
                records.append(record)
    return records
