"""The ingestion pipeline: read -> shape and validate -> dedup -> split -> leakage -> version -> S3.

A dataset version is a list of immutable, content-addressed shards (perennial/ingest/shards.py)
stored once under ``<storage_prefix>/datasets/<name>/shards/`` and referenced by every version that
holds them. ``<storage_prefix>/datasets/<name>/<digest>/`` holds ``quarantine.jsonl`` (this build's
rejections), ``index.sqlite`` (this build's dedup index segment) and ``MANIFEST.json`` (written last
by ObjectStore.upload_dir; its ``meta`` is the lineage manifest, listing the shards in order and the
index segments). ``<storage_prefix>/datasets/<name>/LATEST.json`` points at the most recent version.
The concatenation of the shards in order is the version's ``data.jsonl``: train records, then test,
in input order, per build (an incremental tick appends its build after its parent's).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from perennial.config import IngestDatasetConfig, IngestSourceConfig
from perennial.ingest.readers import IngestError, RawRecord, SourceReader, source_identity
from perennial.ingest.records import Rejected, Shaper, canonical_line, load_labels, record_id
from perennial.ingest.shards import (
    INDEX_FILE,
    SHARD_RECORDS,
    IndexSegment,
    ParentIndex,
    ShardWriter,
    compact_id,
    iter_shard,
    shard_key,
    version_digest,
)
from perennial.storage import ObjectStore, join_key, sha256_file

log = logging.getLogger(__name__)

DATA_FILE = "data.jsonl"
QUARANTINE_FILE = "quarantine.jsonl"
LATEST_FILE = "LATEST.json"
LAYOUT = "shards-v1"  # bumps when what a build writes for the same inputs changes; part of the snapshot key
DIGEST_CHARS = 32  # 128 bits of sha256; also fits MLflow's 36-character dataset digest limit
# Reasons that mean "a valid record we already have", as opposed to a broken record.
_SEEN_BEFORE = {"duplicate", "duplicate_previous", "leakage"}
_BATCH = 4096  # records shaped before one batched lookup against the parent's index


class EmptyDatasetError(IngestError):
    """A dataset with no valid record: the message names the first bad record and its reason."""


@dataclass
class IngestResult:
    """One committed version, plus this run's counts.

    ``local_path`` (the version's records as one JSONL file) is assembled from the shards on first
    access (downloading any shard not on this machine, sha256-verified); ``iter_records`` streams
    them without assembling. Building a version never assembles it, so a tick stays cheap.
    """

    name: str
    kind: Literal["text", "instruction"]
    digest: str  # version digest: sha256 over the shards' sha256s, first 32 hex digits
    uri: str  # s3://bucket/<prefix>/datasets/<name>/<digest>
    version_dir: Path  # local folder of this version (quarantine, assembled data.jsonl)
    counts: dict[str, int]  # train/test records in this version; read/accepted/truncated/... in this run
    rejected: dict[str, int]  # rejected records of this run, per reason
    quarantine_path: Path | None
    manifest: dict  # the lineage manifest (MANIFEST.json's "meta")
    created: bool = True  # False when an identical version already existed (nothing uploaded)
    tasks: list[str] = field(default_factory=list)  # instruction tasks in sequence order
    skipped: bool = False  # True when the sources were unchanged since a committed snapshot: nothing was read
    store: ObjectStore | None = field(default=None, repr=False)
    shards_dir: Path | None = None  # the local shard cache of this dataset
    # Incremental ingestion: the source objects this run read (URI -> ETag, empty when none were new), for the
    # watermark; None for a snapshot.
    watermark: dict[str, str] | None = None

    @property
    def local_path(self) -> Path:
        """The version's data.jsonl on local disk (assembled from the shards once, then reused)."""
        path = self.version_dir / DATA_FILE
        if not path.is_file():
            partial = path.with_name(f".{DATA_FILE}.{uuid.uuid4().hex[:8]}")
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as sink:
                for shard in self.manifest["shards"]:
                    with open(self._shard(shard), "rb") as source:
                        shutil.copyfileobj(source, sink, 1 << 20)
            os.replace(partial, path)
        return path

    def iter_records(self, split: str | None = None) -> Iterator[dict]:
        """The version's records in order (only ``split``'s when given), streamed shard by shard."""
        for shard in self.manifest["shards"]:
            if split is None or shard["split"] == split:
                yield from iter_shard(self._shard(shard), split)

    def _shard(self, shard: dict) -> Path:
        return fetch_shard(self.store, self.manifest["shard_prefix"], shard, self.shards_dir)


def fetch_shard(store: ObjectStore | None, shard_prefix: str, shard: dict, shards_dir: Path) -> Path:
    """A shard on local disk: the cached copy, or downloaded and verified against its sha256."""
    local = Path(shards_dir) / f"{shard['sha256']}.jsonl"
    if not local.is_file():
        if store is None:
            raise IngestError(f"shard {shard['sha256'][:12]} is not on this machine and no object store was given")
        store.get_file(join_key(shard_prefix, f"{shard['sha256']}.jsonl"), local, expected_sha256=shard["sha256"])
    return local


def content_digest(path: str | Path) -> str:
    """sha256 of a file, shortened to DIGEST_CHARS (the digest of a pre-shard, single-file version)."""
    return sha256_file(path)[:DIGEST_CHARS]


def iter_jsonl(path: str | Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def _quarantine_line(raw: RawRecord, reason: str, detail: str, record: Any = None) -> str:
    # ensure_ascii: a lone surrogate (a byte that was not UTF-8) is written as \udcXX, not refused.
    entry = {"source": raw.source, "record": raw.index, "reason": reason, "detail": detail,
             "value": raw.value if record is None else record}  # fmt: skip
    return json.dumps(entry, ensure_ascii=True, default=repr) + "\n"


class _Builder:
    """Streams canonical records into shards, dropping duplicates, the parent's records and leakage.

    Memory holds one batch of records and the SQLite page cache, never the ids of all records: the
    per-split dedup index is on disk (IndexSegment). Train records go straight into train shards;
    test records wait in a staging file (with their id and origin beside them) until train is
    complete, because a test record is leakage when its id appears in train anywhere in the build.
    """

    def __init__(self, staging: Path, shards_dir: Path, shaper: Shaper, test_fraction: float,
                 parent: ParentIndex | None, shard_records: int = SHARD_RECORDS, on_shard=None):  # fmt: skip
        self.staging, self.shaper, self.test_fraction, self.parent = staging, shaper, test_fraction, parent
        self.index = IndexSegment(staging / INDEX_FILE)
        self.train = ShardWriter(shards_dir, "train", shard_records, on_shard)
        self.test = ShardWriter(shards_dir, "test", shard_records, on_shard)
        self.test_part = open(staging / "test.part", "w", encoding="utf-8")
        self.test_where = open(staging / "test.where", "w", encoding="utf-8")  # "id\tindex\ttask\t<source as JSON>" per test line
        self.quarantine = open(staging / QUARANTINE_FILE, "w", encoding="utf-8")
        self.rejected: Counter = Counter()
        self.first_rejection: tuple[RawRecord, str, str] | None = None
        self.read = 0
        self.batch: list[RawRecord] = []

    def reject(self, raw: RawRecord, reason: str, detail: str, record: Any = None) -> None:
        self.rejected[reason] += 1
        if self.first_rejection is None:
            self.first_rejection = (raw, reason, detail)
        self.quarantine.write(_quarantine_line(raw, reason, detail, record))

    def _hash_split(self, record_id: str) -> str:
        # The id's leading 60 bits as a number in [0, 1): the same content always lands in the same split.
        return "test" if int(record_id[:15], 16) / 16**15 < self.test_fraction else "train"

    def add(self, raw: RawRecord) -> None:
        self.batch.append(raw)
        if len(self.batch) >= _BATCH:
            self.flush()

    def flush(self) -> None:
        """Shape a batch, look its ids up in the parent's index at once, then decide each in input order."""
        shaped: list[tuple[RawRecord, Any, str | None, str | None]] = []  # (raw, record or rejection, id, split)
        for raw in self.batch:
            self.read += 1
            if raw.error is not None:
                shaped.append((raw, raw.error, None, None))
                continue
            try:
                record = self.shaper(raw.value)
                # Precedence: the config's split, then the record's split field, then the file name, then hash.
                split = raw.split if raw.split in {"train", "test"} else None
                if split is None and raw.split != "hash":
                    split = self.shaper.split_of(raw.value) or raw.split_hint
            except Rejected as rejection:
                shaped.append((raw, (rejection.reason, rejection.detail), None, None))
                continue
            rid = record_id(record)
            shaped.append((raw, record, rid, split or self._hash_split(rid)))
        self.batch = []
        previous = self.parent.lookup([compact_id(rid) for _, _, rid, _ in shaped if rid]) if self.parent else {}
        for raw, record, rid, split in shaped:
            if rid is None:
                self.reject(raw, *record)
                continue
            key = compact_id(rid)
            if key in previous:
                self.reject(raw, "duplicate_previous", f"id {rid[:12]} is already in the parent version ({previous[key]})",
                            {"id": rid, **record, "split": split})  # fmt: skip
            elif not self.index.add(key, split):
                self.reject(raw, "duplicate", f"id {rid[:12]} already appeared in {split}", {"id": rid, **record, "split": split})
            elif split == "train":
                self.train.write(canonical_line(rid, record, split), record.get("task"))
            else:
                self.test_part.write(canonical_line(rid, record, split))
                # the source as JSON: an S3 key may hold a tab or a newline, which would shift the columns or lines
                self.test_where.write(f"{rid}\t{raw.index}\t{record.get('task', '')}\t{json.dumps(raw.source)}\n")

    def finish(self) -> list[dict]:
        """Close the train shards, write the test shards minus leakage; returns the new shards in order."""
        self.flush()
        train = self.train.close()
        self.test_part.close()
        self.test_where.close()
        with open(self.staging / "test.part", encoding="utf-8") as lines, open(self.staging / "test.where", encoding="utf-8") as where:
            for line, origin in zip(lines, where):
                rid, index, task, source = origin.rstrip("\n").split("\t", 3)
                source = json.loads(source)
                key = compact_id(rid)
                if self.index.in_train(key):
                    self.index.drop_test(key)
                    record = json.loads(line)  # parsed only to quarantine it, as the record it is
                    self.reject(RawRecord(source, int(index), None, "test"), "leakage", f"test record {rid[:12]} is also in train", record)
                    continue
                self.test.write(line, task or None)
        test = self.test.close()
        self.quarantine.close()
        self.index.close()
        for name in ("test.part", "test.where"):
            (self.staging / name).unlink()
        return train + test

    def saw_no_valid_record(self) -> bool:
        """True when not one valid record was seen (duplicates of valid records count as valid)."""
        return not any(self.rejected[reason] for reason in _SEEN_BEFORE)

    def close(self) -> None:
        self.train.abort()
        self.test.abort()
        self.index.close()
        for handle in [self.test_part, self.test_where, self.quarantine]:
            if not handle.closed:
                handle.close()


def _summarize(shards: list[dict]) -> tuple[dict[str, int], list[dict]]:
    """Records per split, and per task in order of first appearance (the task sequence), from the
    shard entries (which count as they are written; nothing is re-read)."""
    counts = {"train": 0, "test": 0}
    tasks: dict[str, Counter] = {}
    for shard in shards:
        counts[shard["split"]] += shard["records"]
        for task, number in shard["tasks"]:
            tasks.setdefault(task, Counter())[shard["split"]] += number
    return counts, [{"name": name, "train": c["train"], "test": c["test"]} for name, c in tasks.items()]


def _empty_error(spec: IngestDatasetConfig, builder: _Builder, sources: list[str]) -> EmptyDatasetError:
    where = ", ".join(sources) or "(no sources)"
    if builder.first_rejection is None:
        return EmptyDatasetError(f"dataset {spec.name!r}: no records at all in {where}; check the paths and patterns")
    raw, reason, detail = builder.first_rejection
    preview = json.dumps(raw.value, ensure_ascii=True, default=repr)[:200]
    counts = ", ".join(f"{reason}={n}" for reason, n in sorted(builder.rejected.items()))
    return EmptyDatasetError(
        f"dataset {spec.name!r}: all {builder.read} records are invalid ({counts}). "
        f"First bad record: {raw.source} record {raw.index}: {reason}: {detail}; value {preview}"
    )


def _filters(spec: IngestDatasetConfig, labels: list[str] | None) -> dict:
    return {
        "normalization": "stored: NFC, \\n newlines, stripped; ids: sha256 of NFKC with whitespace collapsed",
        "dedup": "exact duplicates of normalized content (same split) are dropped",
        "leakage": "test records whose id is in train are dropped from test",
        "max_chars": spec.max_chars,
        "max_chars_applies_to": "every text field, and the assembled prompt and response",
        "over_long": spec.over_long,
        "test_fraction": spec.test_fraction,
        "labels": labels,
    }


def _schema(kind: str) -> dict:
    fields = ["id", "text", "split"] if kind == "text" else ["id", "task", "prompt", "response", "options", "split"]
    return {"kind": kind, "fields": fields, "format": "JSON lines, UTF-8, one canonical record per line, in shards read in order"}


def _version_prefix(storage_prefix: str, name: str, digest: str | None = None) -> str:
    return join_key(storage_prefix, "datasets", name, *([digest] if digest else []))


def _shards_dir(work_dir: Path, name: str) -> Path:
    return Path(work_dir) / "datasets" / name / "shards"


def result_from(spec_name: str, kind: str, manifest: dict, local_dir: Path, created: bool, run: dict | None = None,
                store: ObjectStore | None = None, shards_dir: Path | None = None, skipped: bool = False) -> IngestResult:  # fmt: skip
    """An IngestResult for a version; ``run`` adds this run's counts and rejections."""
    run = run or {}
    quarantine = local_dir / QUARANTINE_FILE
    return IngestResult(
        name=spec_name,
        kind=kind,
        digest=manifest["digest"],
        uri=manifest["uri"],
        version_dir=local_dir,
        counts={**manifest["counts"], **run.get("counts", {})},
        rejected=dict(run.get("rejected", manifest["rejected"])),
        quarantine_path=quarantine if quarantine.is_file() else None,
        manifest=manifest,
        created=created,
        tasks=[task["name"] for task in manifest.get("tasks", [])],
        skipped=skipped,
        store=store,
        shards_dir=shards_dir or local_dir.parent / "shards",
    )


def _fetch_segments(store: ObjectStore, manifest: dict, work_dir: Path) -> list[Path]:
    """The parent's index segments on local disk (cached by sha256, so a warm worker downloads none)."""
    paths = []
    cache = Path(work_dir) / "datasets" / manifest["name"] / "index"
    for segment in manifest["index"]:
        local = cache / f"{segment['sha256']}.sqlite"
        if not local.is_file():
            store.get_file(segment["key"], local, expected_sha256=segment["sha256"])
        paths.append(local)
    return paths


def build_shards(spec: IngestDatasetConfig, records: Iterable[RawRecord], store: ObjectStore, work_dir: Path, *, task: str,
                 task_from_record: bool = True, parent: dict | None = None, shard_records: int = SHARD_RECORDS,
                 upload_prefix: str | None = None) -> tuple[Path, list[dict], _Builder, list[str] | None]:  # fmt: skip
    """Validate, dedup and split ``records`` into new local shards.

    With ``upload_prefix`` (the storage prefix), each finished shard is uploaded in the background
    while the next is built (content-addressed, so a shard already stored is skipped); all uploads
    have finished when this returns. Returns (staging folder with quarantine.jsonl and index.sqlite,
    the new shards in order, the builder with its counts, the label set). On error the staging
    folder is removed (shards already uploaded stay: no manifest references them).
    """
    labels = load_labels(spec)
    shaper = Shaper(spec, labels, task, task_from_record)
    root = Path(work_dir) / "datasets" / spec.name
    staging = root / f".staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    uploads: list[Future] = []
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-upload") if upload_prefix is not None else None

    def upload(path: Path, entry: dict) -> None:
        key = shard_key(upload_prefix, spec.name, entry["sha256"])
        uploads.append(pool.submit(lambda: store.exists(key) or store.put_file(path, key)))

    parent_index = ParentIndex(_fetch_segments(store, parent, work_dir)) if parent else None
    builder = _Builder(staging, _shards_dir(work_dir, spec.name), shaper, spec.test_fraction, parent_index, shard_records,
                       upload if pool else None)  # fmt: skip
    try:
        for raw in records:
            builder.add(raw)
        new_shards = builder.finish()
        for future in uploads:
            future.result()  # an upload that failed fails the build, before any manifest is written
    except BaseException:
        builder.close()
        shutil.rmtree(staging, ignore_errors=True)  # a failed run leaves no half-written files behind
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if parent_index is not None:
            parent_index.close()
    return staging, new_shards, builder, labels


def build_version(
    spec: IngestDatasetConfig,
    records: Iterable[RawRecord],
    reader: SourceReader | None,
    store: ObjectStore,
    work_dir: Path,
    storage_prefix: str,
    *,
    task: str,
    task_from_record: bool = True,
    parent: dict | None = None,
    sources: list[dict] | None = None,
    shard_records: int = SHARD_RECORDS,
    snapshot_key: str | None = None,
) -> tuple[IngestResult | None, dict]:
    """Validate and version ``records``: new shards, then the manifest (parent's shards + new ones).

    Returns the result (None when every valid record was already in ``parent``: no new version)
    and this run's counts and rejections. Raises EmptyDatasetError when no record is valid.
    """
    staging, new_shards, builder, labels = build_shards(spec, records, store, work_dir, task=task, task_from_record=task_from_record,
                                                        parent=parent, shard_records=shard_records, upload_prefix=storage_prefix)  # fmt: skip
    shaper = builder.shaper
    lineage = sources if sources is not None else (reader.lineage if reader else [])
    stats = dict(reader.stats) if reader else {}
    added = sum(shard["records"] for shard in new_shards)
    run_counts = {"read": builder.read, "accepted": added, "truncated": shaper.truncated, **stats}
    run = {"counts": run_counts, "rejected": dict(sorted(builder.rejected.items()))}
    log.info("dataset %s: read %d, accepted %d, rejected %s", spec.name, builder.read, added, run["rejected"] or "none")
    if added == 0:
        shutil.rmtree(staging)
        if parent is None or builder.saw_no_valid_record():
            raise _empty_error(spec, builder, [entry["uri"] for entry in lineage] or [s.uri for s in spec.sources])
        return None, run  # nothing new: every valid record is already in the parent version
    return commit_version(spec, store, work_dir, storage_prefix, staging, new_shards, run, lineage, labels,
                          parent=parent, snapshot_key=snapshot_key), run  # fmt: skip


def commit_version(spec: IngestDatasetConfig, store: ObjectStore, work_dir: Path, storage_prefix: str, staging: Path,
                   new_shards: list[dict], run: dict, lineage: list[dict], labels: list[str] | None, *,
                   parent: dict | None = None, snapshot_key: str | None = None, extra_segments: list[Path] = ()) -> IngestResult:  # fmt: skip
    """Upload the new shards (those not already stored) and index segment, then the manifest, last.

    ``staging`` holds this build's quarantine.jsonl and index.sqlite; it becomes the version's
    local folder. ``extra_segments`` are more index files of this build (distributed ingestion:
    one per worker), uploaded beside the version as index-<n>.sqlite.
    """
    shards_dir = _shards_dir(work_dir, spec.name)
    shard_prefix = join_key(storage_prefix, "datasets", spec.name, "shards")
    shards = [*(parent["shards"] if parent else []), *new_shards]
    digest = version_digest([shard["sha256"] for shard in shards], DIGEST_CHARS)
    counts, tasks = _summarize(shards)
    prefix = _version_prefix(storage_prefix, spec.name, digest)
    local_dir = Path(work_dir) / "datasets" / spec.name / digest
    existing = store.read_manifest(prefix)
    created = existing is None
    if created:
        for shard in new_shards:  # normally uploaded while the build ran (build_shards); this covers callers that did not
            key = shard_key(storage_prefix, spec.name, shard["sha256"])
            if not store.exists(key):  # content-addressed: a shard already stored is the same bytes
                store.put_file(shards_dir / f"{shard['sha256']}.jsonl", key)
        segment_files = [name for name in sorted(os.listdir(staging)) if name.endswith(".sqlite")]
        segments = [{"key": join_key(prefix, name), "sha256": sha256_file(staging / name)} for name in segment_files]
        manifest = {
            "name": spec.name,
            "kind": spec.kind,
            "shape": spec.shape,
            "role": spec.resolved_role,
            "digest": digest,
            "digest_algorithm": f"sha256 of '{LAYOUT}' and the shards' sha256s in order, first {DIGEST_CHARS} hex digits",
            "layout": LAYOUT,
            "uri": store.uri(prefix),
            "parent": parent["digest"] if parent else None,
            "shard_prefix": shard_prefix,
            "shards": shards,
            "index": [*(parent["index"] if parent else []), *segments],
            "sources": lineage,
            "counts": counts,
            "tasks": tasks if spec.kind == "instruction" else [],
            "run": run["counts"],
            "rejected": run["rejected"],
            "filters": _filters(spec, labels),
            "schema": _schema(spec.kind),
            "spec": spec.model_dump(mode="json"),
            "ingested": datetime.now(timezone.utc).isoformat(),
        }
        if local_dir.exists():
            shutil.rmtree(local_dir)
        staging.rename(local_dir)
        store.upload_dir(local_dir, prefix, meta=manifest)
    else:
        manifest = existing["meta"]  # same content: the stored version (and its lineage) stands
        if local_dir.exists():
            shutil.rmtree(local_dir)
        staging.rename(local_dir)
    if snapshot_key:
        store.put_json(_snapshot_key(storage_prefix, spec.name, snapshot_key), {"digest": digest})
    store.put_json(join_key(storage_prefix, "datasets", spec.name, LATEST_FILE), {"digest": digest, "uri": manifest["uri"]})
    return result_from(spec.name, spec.kind, manifest, local_dir, created, run, store, shards_dir)


def latest_version(store: ObjectStore, storage_prefix: str, name: str) -> dict | None:
    """The lineage manifest of the most recently ingested version of ``name``, or None."""
    pointer_key = join_key(storage_prefix, "datasets", name, LATEST_FILE)
    if not store.exists(pointer_key):
        return None
    pointer = store.get_json(pointer_key)
    stored = store.read_manifest(_version_prefix(storage_prefix, name, pointer["digest"]))
    return stored["meta"] if stored else None


def fetch_version(store: ObjectStore, storage_prefix: str, name: str, digest: str, work_dir: Path) -> IngestResult:
    """A committed version: its manifest and quarantine; shards are downloaded (verified) when read."""
    local_dir = Path(work_dir) / "datasets" / name / digest
    prefix = _version_prefix(storage_prefix, name, digest)
    stored = store.read_manifest(prefix)
    if stored is None:
        raise IngestError(f"dataset {name!r}: version {digest} is not committed under {store.uri(prefix)}")
    manifest = stored["meta"]
    if "shards" not in manifest:
        raise IngestError(f"dataset {name!r}: version {digest} predates sharded versions; re-ingest it (perennial ingest CONFIG)")
    quarantine = stored["files"].get(QUARANTINE_FILE)
    if quarantine:
        target = local_dir / QUARANTINE_FILE
        if not (target.is_file() and sha256_file(target) == quarantine["sha256"]):
            store.get_file(join_key(prefix, QUARANTINE_FILE), target, expected_sha256=quarantine["sha256"])
    return result_from(name, manifest["kind"], manifest, local_dir, False, store=store, shards_dir=_shards_dir(work_dir, name))


def iter_version(store: ObjectStore, uri: str, cache_dir: Path, split: str | None = None, task: str | None = None,
                 since: str | None = None) -> Iterator[dict]:
    """Stream the records of the committed version at ``uri`` (s3://bucket/...), shards in order.

    ``split`` and ``task`` keep only that split's and that task's records (a shard holding neither is
    never downloaded). ``since``, the URI of an earlier version of the same dataset, keeps only the
    records that version does not hold: for an incremental child, whose manifest lists its parent's
    shards first, those shards are skipped unread; otherwise records are compared by id. Shards are
    cached in ``cache_dir`` by sha256 and verified when downloaded. Raises IngestError when ``uri``
    (or ``since``) is not a committed version.
    """
    meta, stored_digest, prefix = _version_meta(store, uri)
    if "shards" not in meta:  # a version written before shards: one data.jsonl beside the manifest
        if since is not None:
            raise IngestError(f"{uri} predates sharded versions: re-ingest it to continue training on its new records")
        local = Path(cache_dir) / "legacy" / stored_digest[:24]
        store.download_dir(prefix, local)
        for record in iter_jsonl(local / DATA_FILE):
            if (split is None or record.get("split") == split) and (task is None or record.get("task") == task):
                yield record
        return
    skip: set[str] = set()
    seen_ids: set[str] | None = None
    if since is not None:
        earlier = _version_meta(store, since)[0]
        skip = {shard["sha256"] for shard in earlier.get("shards", [])}
        if not skip <= {shard["sha256"] for shard in meta["shards"]}:  # not an ancestor: compare by id
            seen_ids = {record["id"] for record in iter_version(store, since, cache_dir, split, task)}
            skip = set()

    def wanted(shard: dict) -> bool:
        return ((split is None or shard["split"] == split) and shard["sha256"] not in skip
                and (task is None or any(name == task for name, _ in shard["tasks"])))

    for shard in filter(wanted, meta["shards"]):
        for record in iter_shard(fetch_shard(store, meta["shard_prefix"], shard, Path(cache_dir) / "shards"), split):
            if (task is None or record["task"] == task) and (seen_ids is None or record["id"] not in seen_ids):
                yield record


def _version_meta(store: ObjectStore, uri: str) -> tuple[dict, str, str]:
    """A committed version's manifest meta, manifest digest and key prefix. Raises IngestError."""
    bucket_prefix = f"s3://{store.bucket}/"
    if not uri.startswith(bucket_prefix):
        raise IngestError(f"{uri} is not in bucket {store.bucket}")
    prefix = uri[len(bucket_prefix) :]
    stored = store.read_manifest(prefix)
    if stored is None:
        raise IngestError(f"{uri} is not a committed dataset version (no manifest)")
    return stored["meta"], stored["digest"], prefix


def _snapshot_key(storage_prefix: str, name: str, key: str) -> str:
    return join_key(storage_prefix, "datasets", name, "snapshots", f"{key}.json")


def snapshot_digest(spec: IngestDatasetConfig, identity: list[dict]) -> str:
    """What a snapshot's output is a function of: the layout, the spec and each source's content
    (local files by sha256, S3 objects by ETag), so equal keys mean an identical version."""
    payload = json.dumps({"layout": LAYOUT, "spec": spec.model_dump(mode="json"), "sources": identity}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def ingest_dataset(spec: IngestDatasetConfig | dict, store: ObjectStore, work_dir: str | Path, storage_prefix: str,
                   *, shard_records: int = SHARD_RECORDS) -> IngestResult:  # fmt: skip
    """Ingest every source of ``spec`` into one versioned dataset (a full snapshot).

    When every source is unchanged (same sha256 per file, same ETag per object) since a committed
    snapshot of the same spec, nothing is read: that version is returned with ``skipped`` True,
    ``created`` False and zero run counts. Otherwise the same inputs give the same digest, and
    shards already stored are not uploaded again. Raises IngestError / EmptyDatasetError.
    """
    spec = IngestDatasetConfig.model_validate(spec) if isinstance(spec, dict) else spec
    work_dir = Path(work_dir)
    scratch = work_dir / "scratch" / spec.name
    scratch.mkdir(parents=True, exist_ok=True)
    reader = SourceReader(store, scratch)
    identity = source_identity(spec.sources, store, reader)
    key = snapshot_digest(spec, identity) if identity is not None else None
    if key is not None:
        pointer = _snapshot_key(storage_prefix, spec.name, key)
        if store.exists(pointer):
            digest = store.get_json(pointer)["digest"]
            stored = store.read_manifest(_version_prefix(storage_prefix, spec.name, digest))
            if stored is not None:
                log.info("dataset %s: sources unchanged since version %s; nothing read", spec.name, digest)
                run = {"counts": {"read": 0, "accepted": 0, "truncated": 0}, "rejected": {}}
                local_dir = work_dir / "datasets" / spec.name / digest
                store.put_json(join_key(storage_prefix, "datasets", spec.name, LATEST_FILE), {"digest": digest, "uri": stored["meta"]["uri"]})
                return result_from(spec.name, spec.kind, stored["meta"], local_dir, False, run, store,
                                   _shards_dir(work_dir, spec.name), skipped=True)  # fmt: skip

    def records() -> Iterator[RawRecord]:
        for src in spec.sources:
            yield from reader.read(src)

    result, _ = build_version(spec, records(), reader, store, work_dir, storage_prefix, task=spec.task or spec.name,
                              shard_records=shard_records, snapshot_key=key)  # fmt: skip
    assert result is not None  # without a parent, "nothing new" is an error raised above
    return result


def ingest_records(
    name: str,
    kind: Literal["text", "instruction"],
    records: Iterable[dict],
    store: ObjectStore,
    work_dir: str | Path,
    storage_prefix: str,
    *,
    task: str | None = None,
    test_fraction: float = 0.1,
    max_chars: int = 20000,
    over_long: Literal["reject", "truncate"] = "reject",
    role: Literal["general", "domain", "task", "heldout"] | None = None,
    shard_records: int = SHARD_RECORDS,
) -> IngestResult:
    """Ingest records generated in memory through the same validation and versioning path.

    ``records`` are canonical-shaped dicts without ids: text {"text", "split"?}; instruction
    {"prompt", "response", "options"?, "task"?, "split"?}. A missing split is decided by hash.
    ``records`` is consumed lazily, so a generator of any length streams.
    """
    spec = IngestDatasetConfig(
        name=name,
        shape="text" if kind == "text" else "instruction",
        role=role,
        task=task,
        sources=[IngestSourceConfig(uri=f"memory://{name}")],
        test_fraction=test_fraction,
        max_chars=max_chars,
        over_long=over_long,
    )
    raw = (RawRecord(f"memory://{name}", index, value, None) for index, value in enumerate(records, 1))
    lineage = [{"uri": f"memory://{name}", "format": "python"}]
    result, _ = build_version(spec, raw, None, store, Path(work_dir), storage_prefix, task=task or name, sources=lineage,
                              shard_records=shard_records)  # fmt: skip
    assert result is not None
    return result
