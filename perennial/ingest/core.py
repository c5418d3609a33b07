"""The ingestion pipeline: read -> shape and validate -> dedup -> split -> leakage -> version -> S3.

Each dataset version lives at ``<storage_prefix>/datasets/<name>/<digest>/`` as ``data.jsonl``
(the canonical records), ``quarantine.jsonl`` (every rejected record with its reason) and
``MANIFEST.json`` (written last by ObjectStore.upload_dir; its ``meta`` is the lineage manifest).
``<storage_prefix>/datasets/<name>/LATEST.json`` points at the most recently ingested version.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from perennial.config import IngestDatasetConfig, IngestSourceConfig
from perennial.ingest.readers import IngestError, RawRecord, SourceReader
from perennial.ingest.records import Rejected, Shaper, load_labels, record_id
from perennial.storage import ObjectStore, join_key, sha256_file

log = logging.getLogger(__name__)

DATA_FILE = "data.jsonl"
QUARANTINE_FILE = "quarantine.jsonl"
LATEST_FILE = "LATEST.json"
DIGEST_CHARS = 32  # 128 bits of sha256; also fits MLflow's 36-character dataset digest limit
# Reasons that mean "a valid record we already have", as opposed to a broken record.
_SEEN_BEFORE = {"duplicate", "duplicate_previous", "leakage"}


class EmptyDatasetError(IngestError):
    """A dataset with no valid record: the message names the first bad record and its reason."""


@dataclass
class IngestResult:
    name: str
    kind: Literal["text", "instruction"]
    digest: str  # content digest of data.jsonl (first 32 hex digits of its sha256)
    uri: str  # s3://bucket/<prefix>/datasets/<name>/<digest>
    local_path: Path  # the normalized JSONL on local disk
    counts: dict[str, int]  # train/test records in this version; read/accepted/truncated/... in this run
    rejected: dict[str, int]  # rejected records of this run, per reason
    quarantine_path: Path | None
    manifest: dict  # the lineage manifest (MANIFEST.json's "meta")
    created: bool = True  # False when an identical version already existed (nothing uploaded)
    tasks: list[str] = field(default_factory=list)  # instruction tasks in sequence order


def content_digest(path: str | Path) -> str:
    """The dataset digest: sha256 of the normalized JSONL, shortened to DIGEST_CHARS."""
    return sha256_file(path)[:DIGEST_CHARS]


def iter_jsonl(path: str | Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def _dumps(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def _quarantine_line(raw: RawRecord, reason: str, detail: str, record: Any = None) -> str:
    # ensure_ascii: a lone surrogate (a byte that was not UTF-8) is written as \udcXX, not refused.
    entry = {"source": raw.source, "record": raw.index, "reason": reason, "detail": detail,
             "value": raw.value if record is None else record}  # fmt: skip
    return json.dumps(entry, ensure_ascii=True, default=repr) + "\n"


class _Builder:
    """Streams canonical records into per-split staging files, dropping duplicates and leakage.

    Memory holds the ids (one per accepted record), not the records.
    """

    def __init__(self, staging: Path, shaper: Shaper, test_fraction: float, previous_ids: dict[str, str]):
        self.staging, self.shaper, self.test_fraction, self.previous_ids = staging, shaper, test_fraction, previous_ids
        self.parts = {split: open(staging / f"{split}.part", "w", encoding="utf-8") for split in ("train", "test")}
        self.quarantine = open(staging / QUARANTINE_FILE, "w", encoding="utf-8")
        self.ids: dict[str, set[str]] = {"train": set(), "test": set()}
        self.test_where: dict[str, tuple[str, int]] = {}  # where each test record came from, for leakage reports
        self.rejected: Counter = Counter()
        self.first_rejection: tuple[RawRecord, str, str] | None = None
        self.read = 0

    def reject(self, raw: RawRecord, reason: str, detail: str, record: Any = None) -> None:
        self.rejected[reason] += 1
        if self.first_rejection is None:
            self.first_rejection = (raw, reason, detail)
        self.quarantine.write(_quarantine_line(raw, reason, detail, record))

    def _hash_split(self, record_id: str) -> str:
        # The id's leading 60 bits as a number in [0, 1): the same content always lands in the same split.
        return "test" if int(record_id[:15], 16) / 16**15 < self.test_fraction else "train"

    def add(self, raw: RawRecord) -> None:
        self.read += 1
        if raw.error is not None:
            self.reject(raw, *raw.error)
            return
        try:
            record = self.shaper(raw.value)
            # Precedence: the config's split, then the record's split field, then the file name, then hash.
            split = raw.split if raw.split in {"train", "test"} else None
            if split is None and raw.split != "hash":
                split = self.shaper.split_of(raw.value) or raw.split_hint
        except Rejected as rejection:
            self.reject(raw, rejection.reason, rejection.detail)
            return
        rid = record_id(record)
        split = split or self._hash_split(rid)
        canonical = {"id": rid, **record, "split": split}
        if rid in self.previous_ids:
            self.reject(raw, "duplicate_previous", f"id {rid[:12]} is already in the parent version ({self.previous_ids[rid]})", canonical)
        elif rid in self.ids[split]:
            self.reject(raw, "duplicate", f"id {rid[:12]} already appeared in {split}", canonical)
        else:
            self.ids[split].add(rid)
            if split == "test":
                self.test_where[rid] = (raw.source, raw.index)
            self.parts[split].write(_dumps(canonical))

    def finish(self, out: Path, previous_data: Path | None) -> int:
        """Write data.jsonl: the parent's records, then train, then test minus leakage. Returns records added."""
        for handle in self.parts.values():
            handle.close()
        added = 0
        with open(out, "w", encoding="utf-8") as sink:
            if previous_data is not None:
                with open(previous_data, encoding="utf-8") as parent:
                    shutil.copyfileobj(parent, sink)
            with open(self.staging / "train.part", encoding="utf-8") as train:
                for line in train:
                    sink.write(line)
                    added += 1
            with open(self.staging / "test.part", encoding="utf-8") as test:
                for line in test:
                    record = json.loads(line)
                    if record["id"] in self.ids["train"]:
                        source, index = self.test_where[record["id"]]
                        where = RawRecord(source, index, None, "test")
                        self.reject(where, "leakage", f"test record {record['id'][:12]} is also in train", record)
                        continue
                    sink.write(line)
                    added += 1
        self.quarantine.close()
        for split in ("train", "test"):
            (self.staging / f"{split}.part").unlink()
        return added

    def saw_no_valid_record(self) -> bool:
        """True when not one valid record was seen (duplicates of valid records count as valid)."""
        return not any(self.rejected[reason] for reason in _SEEN_BEFORE)

    def close(self) -> None:
        for handle in [*self.parts.values(), self.quarantine]:
            if not handle.closed:
                handle.close()


def _summarize(path: Path) -> tuple[dict[str, int], list[dict]]:
    """Records per split, and per task in order of first appearance (the task sequence)."""
    splits: Counter = Counter()
    tasks: dict[str, Counter] = {}
    for record in iter_jsonl(path):
        splits[record["split"]] += 1
        if "task" in record:
            tasks.setdefault(record["task"], Counter())[record["split"]] += 1
    counts = {"train": splits["train"], "test": splits["test"]}
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
        "over_long": spec.over_long,
        "test_fraction": spec.test_fraction,
        "labels": labels,
    }


def _schema(kind: str) -> dict:
    fields = ["id", "text", "split"] if kind == "text" else ["id", "task", "prompt", "response", "options", "split"]
    return {"kind": kind, "fields": fields, "format": "JSON lines, UTF-8, one canonical record per line"}


def _version_prefix(storage_prefix: str, name: str, digest: str | None = None) -> str:
    return join_key(storage_prefix, "datasets", name, *([digest] if digest else []))


def result_from(spec_name: str, kind: str, manifest: dict, local_dir: Path, created: bool, run: dict | None = None) -> IngestResult:
    """An IngestResult for a version's local copy; ``run`` adds this run's counts and rejections."""
    run = run or {}
    quarantine = local_dir / QUARANTINE_FILE
    return IngestResult(
        name=spec_name,
        kind=kind,
        digest=manifest["digest"],
        uri=manifest["uri"],
        local_path=local_dir / DATA_FILE,
        counts={**manifest["counts"], **run.get("counts", {})},
        rejected=dict(run.get("rejected", manifest["rejected"])),
        quarantine_path=quarantine if quarantine.is_file() else None,
        manifest=manifest,
        created=created,
        tasks=[task["name"] for task in manifest.get("tasks", [])],
    )


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
    parent_data: Path | None = None,
    sources: list[dict] | None = None,
) -> tuple[IngestResult | None, dict]:
    """Validate and version ``records``.

    Returns the result (None when every valid record was already in ``parent``: no new version)
    and this run's counts and rejections.
    """
    labels = load_labels(spec)
    shaper = Shaper(spec, labels, task, task_from_record)
    previous_ids = {r["id"]: r["split"] for r in iter_jsonl(parent_data)} if parent_data else {}
    root = Path(work_dir) / "datasets" / spec.name
    staging = root / f".staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    builder = _Builder(staging, shaper, spec.test_fraction, previous_ids)
    try:
        for raw in records:
            builder.add(raw)
        added = builder.finish(staging / DATA_FILE, parent_data)
    except BaseException:
        builder.close()
        shutil.rmtree(staging, ignore_errors=True)  # a failed run leaves no half-written files behind
        raise
    builder.close()
    lineage = sources if sources is not None else (reader.lineage if reader else [])
    stats = dict(reader.stats) if reader else {}
    run_counts = {"read": builder.read, "accepted": added, "truncated": shaper.truncated, **stats}
    run = {"counts": run_counts, "rejected": dict(sorted(builder.rejected.items()))}
    log.info("dataset %s: read %d, accepted %d, rejected %s", spec.name, builder.read, added, run["rejected"] or "none")
    if added == 0:
        shutil.rmtree(staging)
        if parent is None or builder.saw_no_valid_record():
            raise _empty_error(spec, builder, [entry["uri"] for entry in lineage] or [s.uri for s in spec.sources])
        return None, run  # nothing new: every valid record is already in the parent version

    digest = content_digest(staging / DATA_FILE)
    counts, tasks = _summarize(staging / DATA_FILE)
    prefix = _version_prefix(storage_prefix, spec.name, digest)
    manifest = {
        "name": spec.name,
        "kind": spec.kind,
        "shape": spec.shape,
        "role": spec.resolved_role,
        "digest": digest,
        "digest_algorithm": f"sha256 of {DATA_FILE}, first {DIGEST_CHARS} hex digits",
        "uri": store.uri(prefix),
        "parent": parent["digest"] if parent else None,
        "sources": lineage,
        "counts": counts,
        "tasks": tasks if spec.kind == "instruction" else [],
        "run": run_counts,
        "rejected": run["rejected"],
        "filters": _filters(spec, labels),
        "schema": _schema(spec.kind),
        "spec": spec.model_dump(mode="json"),
        "ingested": datetime.now(timezone.utc).isoformat(),
    }
    local_dir = root / digest
    if local_dir.exists():
        shutil.rmtree(local_dir)
    staging.rename(local_dir)

    existing = store.read_manifest(prefix)
    created = existing is None
    if created:
        store.upload_dir(local_dir, prefix, meta=manifest)
    else:
        manifest = existing["meta"]  # same content: the stored version (and its lineage) stands
    store.put_json(join_key(storage_prefix, "datasets", spec.name, LATEST_FILE), {"digest": digest, "uri": manifest["uri"]})
    return result_from(spec.name, spec.kind, manifest, local_dir, created, run), run


def latest_version(store: ObjectStore, storage_prefix: str, name: str) -> dict | None:
    """The lineage manifest of the most recently ingested version of ``name``, or None."""
    pointer_key = join_key(storage_prefix, "datasets", name, LATEST_FILE)
    if not store.exists(pointer_key):
        return None
    pointer = store.get_json(pointer_key)
    stored = store.read_manifest(_version_prefix(storage_prefix, name, pointer["digest"]))
    return stored["meta"] if stored else None


def fetch_version(store: ObjectStore, storage_prefix: str, name: str, digest: str, work_dir: Path) -> IngestResult:
    """A committed version downloaded (and verified against its manifest) into work_dir."""
    local_dir = Path(work_dir) / "datasets" / name / digest
    stored = store.download_dir(_version_prefix(storage_prefix, name, digest), local_dir)
    manifest = stored["meta"]
    return result_from(name, manifest["kind"], manifest, local_dir, created=False)


def ingest_dataset(spec: IngestDatasetConfig | dict, store: ObjectStore, work_dir: str | Path, storage_prefix: str) -> IngestResult:
    """Ingest every source of ``spec`` into one versioned dataset (a full snapshot).

    Re-running on the same inputs yields the same digest and uploads nothing new.
    """
    spec = IngestDatasetConfig.model_validate(spec) if isinstance(spec, dict) else spec
    scratch = Path(work_dir) / "scratch" / spec.name
    scratch.mkdir(parents=True, exist_ok=True)
    reader = SourceReader(store, scratch)

    def records() -> Iterator[RawRecord]:
        for src in spec.sources:
            yield from reader.read(src)

    result, _ = build_version(spec, records(), reader, store, Path(work_dir), storage_prefix, task=spec.task or spec.name)
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
) -> IngestResult:
    """Ingest records generated in memory through the same validation and versioning path.

    ``records`` are canonical-shaped dicts without ids: text {"text", "split"?}; instruction
    {"prompt", "response", "options"?, "task"?, "split"?}. A missing split is decided by hash.
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
    result, _ = build_version(spec, raw, None, store, Path(work_dir), storage_prefix, task=task or name, sources=lineage)
    assert result is not None
    return result
