"""Incremental ingestion: only objects that are new since the watermark, appended to the latest version.

The watermark lives in S3 at ``<storage_prefix>/datasets/<name>/WATERMARK.json`` (never on local
disk, so any worker can run the next tick): the set of processed object URIs with their ETags. An
object is new when its URI is absent or its ETag changed (it was overwritten).

A tick builds a new version = the latest version's shards + new shards holding the new records,
where new records already present in the latest version are dropped (``duplicate_previous``, looked
up in the parent's on-disk index segments). Nothing of the parent is copied, re-hashed or
re-uploaded, and its records are never downloaded: a tick costs in proportion to the new data.
The watermark is written last: a tick that dies halfway is simply redone, and the redo adds nothing
twice.

Inside a retrain the watermark advances only once a model trained on the data is committed
(``advance=False`` here, then `advance_watermark` when the run finishes): an object is never marked
processed that no committed model was trained on. Until then a later tick reads those objects again
and finds their records already in the latest version, so the version is unchanged.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from perennial.config import IngestDatasetConfig, IncrementalConfig
from perennial.ingest.core import (
    EmptyDatasetError,
    IngestResult,
    _shards_dir,
    build_version,
    latest_version,
    result_from,
)
from perennial.ingest.readers import IngestError, RawRecord, SourceReader, is_s3, list_s3_source
from perennial.storage import ObjectStore, join_key

WATERMARK_FILE = "WATERMARK.json"


def watermark_key(storage_prefix: str, name: str) -> str:
    return join_key(storage_prefix, "datasets", name, WATERMARK_FILE)


def read_watermark(store: ObjectStore, storage_prefix: str, name: str) -> dict:
    key = watermark_key(storage_prefix, name)
    return store.get_json(key) if store.exists(key) else {"processed": {}, "version": None}


def _next_task(spec: IngestDatasetConfig, incremental: IncrementalConfig, parent: dict | None) -> str:
    """The task the new records belong to: the next one in the sequence, or an existing one."""
    base = spec.task or spec.name
    tasks = [task["name"] for task in (parent or {}).get("tasks", [])]
    if incremental.new_data == "next_task":
        number = len(tasks) + 1
        while f"{base}-{number}" in tasks:  # a name taken by hand earlier: never reuse it
            number += 1
        return f"{base}-{number}"
    return incremental.append_to or (tasks[-1] if tasks else base)


def advance_watermark(store: ObjectStore, storage_prefix: str, name: str, processed: dict[str, str], version: str,
                      trained: bool = False) -> None:
    """Mark ``processed`` (object URI -> ETag) as ingested into ``version`` of dataset ``name``;
    ``trained``: a committed model was trained on ``version`` (its ``trained_version``, from which
    `pending_records` counts what is new).

    Merged into the stored watermark, never replacing it, so a run that advances it late loses no
    entry another run added in between; advancing with entries already there changes nothing.
    """
    watermark = read_watermark(store, storage_prefix, name)
    merged = {**watermark["processed"], **processed}
    updated = {**watermark, "processed": merged, "version": version, **({"trained_version": version} if trained else {})}
    if updated == watermark:
        return
    store.put_json(watermark_key(storage_prefix, name), {**updated, "updated": datetime.now(timezone.utc).isoformat()})


def pending_records(store: ObjectStore, storage_prefix: str, name: str) -> int:
    """Records of dataset ``name``'s latest version that no committed model has been trained on: its
    records less those of the watermark's ``trained_version`` (all of them before any was trained)."""
    latest = latest_version(store, storage_prefix, name)
    if latest is None:
        return 0
    trained = read_watermark(store, storage_prefix, name).get("trained_version")
    total = sum(latest["counts"].get(split, 0) for split in ("train", "test"))
    if not trained or trained == latest["digest"]:
        return 0 if trained else total
    stored = store.read_manifest(join_key(storage_prefix, "datasets", name, trained))
    return max(0, total - sum(stored["meta"]["counts"].get(split, 0) for split in ("train", "test"))) if stored else total


def ingest_incremental(
    spec: IngestDatasetConfig | dict, store: ObjectStore, work_dir: str | Path, storage_prefix: str, advance: bool = True
) -> IngestResult:
    """Ingest the objects under the spec's s3:// sources that are new since the last watermark.

    With nothing new (or only records already ingested) the latest version is returned unchanged
    (``created`` False). The first tick of an empty prefix with no earlier version is an error.
    The objects read are in the result's ``watermark`` (URI -> ETag); ``advance`` False leaves the
    stored watermark as it is, for the caller to `advance_watermark` once they are trained on.
    """
    spec = IngestDatasetConfig.model_validate(spec) if isinstance(spec, dict) else spec
    incremental = spec.incremental or IncrementalConfig()
    work_dir = Path(work_dir)
    non_s3 = [src.uri for src in spec.sources if not is_s3(src.uri)]
    if non_s3:
        raise IngestError(f"dataset {spec.name!r}: incremental ingestion reads s3:// sources only; got {non_s3}")

    watermark = read_watermark(store, storage_prefix, spec.name)
    processed: dict[str, str] = watermark["processed"]
    fresh = []  # (source, its store, new objects)
    for src in spec.sources:
        s3, objects = list_s3_source(src, store)
        new = [info for info in objects if processed.get(s3.uri(info.key)) != info.etag]
        if new:
            fresh.append((src, s3, new))
    parent = latest_version(store, storage_prefix, spec.name)

    if parent is not None and "shards" not in parent:
        raise IngestError(
            f"dataset {spec.name!r}: the latest version {parent['digest']} predates sharded versions; "
            "ingest the dataset once more from scratch (delete its LATEST.json and WATERMARK.json)"
        )

    def unchanged(run: dict) -> IngestResult:
        """The latest version as it stands, with this run's counts; nothing downloaded."""
        local_dir = work_dir / "datasets" / spec.name / parent["digest"]
        result = result_from(spec.name, parent["kind"], parent, local_dir, False, run, store, _shards_dir(work_dir, spec.name))
        result.quarantine_path = None  # this run's rejections, not the parent build's, are what it reports
        return result

    if not fresh:
        if parent is None:
            raise EmptyDatasetError(
                f"dataset {spec.name!r}: nothing to ingest: no objects under {[s.uri for s in spec.sources]} "
                "and no earlier version"
            )
        result = unchanged({"counts": {"read": 0, "accepted": 0, "truncated": 0}, "rejected": {}})
        result.watermark = {}
        return result

    scratch = work_dir / "scratch" / spec.name
    scratch.mkdir(parents=True, exist_ok=True)
    reader = SourceReader(store, scratch)

    def records() -> Iterator[RawRecord]:
        for src, s3, new in fresh:
            # limit applies per source, as in a full ingest
            yield from reader.read(src, objects=new, s3=s3)

    result, run = build_version(
        spec,
        records(),
        reader,
        store,
        work_dir,
        storage_prefix,
        task=_next_task(spec, incremental, parent),
        task_from_record=False,  # the sequence decides the task, not the incoming records
        parent=parent,
    )
    if result is None:  # only records we already had: the latest version stands
        result = unchanged(run)

    result.watermark = {s3.uri(info.key): info.etag for _, s3, new in fresh for info in new}
    if advance:
        advance_watermark(store, storage_prefix, spec.name, result.watermark, result.digest)
    return result
