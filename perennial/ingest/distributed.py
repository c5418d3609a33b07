"""Ingestion of a corpus too big for one machine: Prefect task mapping over the input files.

    result = ingest_distributed(spec, storage_cfg, work_dir, storage_prefix)                 # 2 local processes
    result = ingest_distributed(..., runner="dask", workers=4)                               # a local Dask cluster
    result = ingest_distributed(..., runner="dask", address="tcp://scheduler:8786")          # an existing Dask cluster

The same flow runs on every runner: ``process`` is Prefect's ProcessPoolTaskRunner (one machine),
``dask`` is prefect-dask's DaskTaskRunner, whose tasks run on the workers of a Dask cluster
(``dask scheduler`` on one host, ``dask worker tcp://...:8786`` on each), so the corpus spreads over
as many machines as the cluster has. ``perennial ingest CONFIG --distributed dask --address ...``
is the command line.

Three steps (docs/ingestion.md, "Where one machine is not enough"):

1. **map, one task per input file or S3 object** (a *unit*): read, validate, dedup within the unit,
   hash-split, write candidate shards and the unit's index segment, upload them (content-addressed,
   so a retried task uploads nothing twice). Workers share nothing but the object store.
2. **reduce, one step**: merge the units' index segments in input order in SQLite (ids only, 16 bytes
   a record, never the records): a record whose (id, split) an earlier unit holds is a duplicate, a
   test id that any unit holds in train is leakage.
3. **map again, only the units with such records**: rewrite those shards without them. Then one step
   writes the manifest: every unit's train shards in input order, then every unit's test shards.

The records, and their order, are those a single-machine ``ingest_dataset`` of the same spec keeps
(shard boundaries differ, hence the digest); tests/test_ingest_distributed.py checks it on both
runners. A worker reads S3 with the endpoint in the storage config it is sent and the credentials of
its own environment (the variables the config names), never from the driver's memory; its scratch
files go to ``work_dir`` with the process runner and to the worker host's temporary folder
(``TMPDIR``) with Dask, whose workers do not share the driver's disk.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from prefect import flow, task

from perennial.config import ConfigError, IngestDatasetConfig, StorageConfig
from perennial.env import environ_restored
from perennial.ingest.core import (
    QUARANTINE_FILE,
    IngestResult,
    _empty_error,
    _quarantine_line,
    _shards_dir,
    build_shards,
    commit_version,
    fetch_shard,
)
from perennial.ingest.readers import IngestError, RawRecord, SourceReader, is_s3, list_s3_source
from perennial.ingest.shards import INDEX_FILE, SHARD_RECORDS, ShardWriter, connect, shard_key
from perennial.storage import ObjectStore, join_key


def plan_units(spec: IngestDatasetConfig, store: ObjectStore) -> list[dict]:
    """The units of work in input order: one per local file (or Hugging Face folder) or S3 object."""
    units = []
    reader = SourceReader(store, Path("."))
    for number, src in enumerate(spec.sources):
        if src.limit or src.skip:
            raise IngestError(f"dataset {spec.name!r}: `limit` and `skip` count across a source's files, which workers cannot "
                              "share; drop them for distributed ingestion (or ingest a subset with ingest_dataset)")  # fmt: skip
        if is_s3(src.uri):
            s3, objects = list_s3_source(src, store)
            if not objects:
                raise IngestError(f"source {src.uri!r}: no objects matching {src.pattern!r} with a known format")
            units += [{"source": number, "key": info.key, "etag": info.etag, "size": info.size, "bucket": s3.bucket} for info in objects]
        else:
            units += [{"source": number, "path": str(path), "format": fmt} for path, fmt in reader._local_files(src)]
    return units


def _unit_records(spec: IngestDatasetConfig, unit: dict, store: ObjectStore, reader: SourceReader):
    src = spec.sources[unit["source"]]
    if "key" in unit:
        from perennial.storage import ObjectInfo

        s3, _ = list_s3_source(src.model_copy(update={"uri": f"s3://{unit['bucket']}/{unit['key']}"}), store)
        return reader.read(src, objects=[ObjectInfo(unit["key"], unit["size"], unit["etag"], None)], s3=s3)
    return reader.read(src.model_copy(update={"uri": unit["path"], "format": unit["format"], "pattern": "*"}))


@task(name="ingest-unit", retries=1)
def build_unit(spec_json: dict, storage_json: dict, unit: dict, number: int, scratch_dir: str | None, storage_prefix: str,
               run_id: str, shard_records: int = SHARD_RECORDS) -> dict:  # fmt: skip
    """Step 1 on a worker: one unit -> candidate shards + index segment + quarantine, all in S3."""
    spec = IngestDatasetConfig.model_validate(spec_json)
    store = ObjectStore(StorageConfig.model_validate(storage_json))
    work = _scratch(scratch_dir) / f"unit-{number}-{uuid.uuid4().hex[:6]}"  # workers may share a disk: never a folder
    reader = SourceReader(store, work / "scratch")
    (work / "scratch").mkdir(parents=True)
    try:
        staging, shards, builder, _ = build_shards(spec, _unit_records(spec, unit, store, reader), store, work,
                                                   task=spec.task or spec.name, shard_records=shard_records)  # fmt: skip
        for shard in shards:
            key = shard_key(storage_prefix, spec.name, shard["sha256"])
            if not store.exists(key):
                store.put_file(_shards_dir(work, spec.name) / f"{shard['sha256']}.jsonl", key)
        parts = join_key(storage_prefix, "datasets", spec.name, "runs", run_id, f"{number:06d}")
        store.put_file(staging / INDEX_FILE, join_key(parts, INDEX_FILE))
        store.put_file(staging / QUARANTINE_FILE, join_key(parts, QUARANTINE_FILE))
        first = builder.first_rejection
        return {
            "number": number, "shards": shards, "parts": parts, "read": builder.read, "truncated": builder.shaper.truncated,
            "rejected": dict(builder.rejected), "stats": dict(reader.stats), "lineage": reader.lineage,
            "first_rejection": [first[0].source, first[0].index, first[1], first[2]] if first else None,
        }  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


@task(name="ingest-filter", retries=1)
def filter_unit(spec_json: dict, storage_json: dict, built: dict, drops: list[list], scratch_dir: str | None,
                storage_prefix: str, shard_records: int = SHARD_RECORDS) -> dict:  # fmt: skip
    """Step 3 on a worker: the unit's shards without the records the reduce step dropped.

    ``drops`` holds [index key as hex (the id's first 32 hex digits), split, reason]; returns the
    new shards and their quarantine lines.
    """
    spec = IngestDatasetConfig.model_validate(spec_json)
    store = ObjectStore(StorageConfig.model_validate(storage_json))
    wanted = {(rid, split): reason for rid, split, reason in drops}
    work = _scratch(scratch_dir) / f"filter-{built['number']}-{uuid.uuid4().hex[:6]}"
    shards_dir = _shards_dir(work, spec.name)
    shard_prefix = join_key(storage_prefix, "datasets", spec.name, "shards")
    writers = {split: ShardWriter(shards_dir, split, shard_records) for split in ("train", "test")}
    quarantine, position = [], 0
    try:
        for shard in built["shards"]:
            path = fetch_shard(store, shard_prefix, shard, work / "in")
            with open(path, encoding="utf-8") as handle:
                for line in handle:
                    position += 1
                    rid = line[8:72]  # canonical lines start with {"id": "<64 hex digits>"
                    reason = wanted.get((rid[:32], shard["split"]))
                    if reason is None:
                        writers[shard["split"]].write(line, _task_of(line))
                        continue
                    detail = (f"id {rid[:12]} already appeared in {shard['split']} in an earlier file" if reason == "duplicate"
                              else f"test record {rid[:12]} is also in train")  # fmt: skip
                    where = RawRecord(f"{built['parts']} (unit {built['number']})", position, None, shard["split"])
                    quarantine.append(_quarantine_line(where, reason, detail, json.loads(line)))
        shards = writers["train"].close() + writers["test"].close()
        for shard in shards:
            key = shard_key(storage_prefix, spec.name, shard["sha256"])
            if not store.exists(key):
                store.put_file(shards_dir / f"{shard['sha256']}.jsonl", key)
        return {"shards": shards, "quarantine": quarantine}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _scratch(scratch_dir: str | None) -> Path:
    """A worker's folder for its scratch files: the one it was given, else its host's temporary folder."""
    return Path(scratch_dir) if scratch_dir else Path(tempfile.gettempdir()) / "perennial-ingest"


def _task_of(line: str) -> str | None:
    if '"task": ' not in line[:90]:
        return None
    return json.loads(line)["task"]  # only for instruction records, whose task the shard counts


def reduce_indexes(store: ObjectStore, built: list[dict], staging: Path) -> dict[int, list[list]]:
    """Step 2: merge the units' index segments in input order; returns the drops per unit.

    Each segment is downloaded into ``staging`` as index-<n>.sqlite (they become the version's
    index); the merge keeps (id, split) pairs only, in a SQLite file with a bounded cache.
    """
    merged = connect(staging / "merge.tmp")
    merged.execute("COMMIT")  # ATTACH cannot run inside a transaction
    drops: dict[int, list[list]] = {}
    try:
        for item in built:
            segment = staging / f"index-{item['number']:06d}.sqlite"
            store.get_file(join_key(item["parts"], INDEX_FILE), segment)
            merged.execute("ATTACH DATABASE ? AS unit", (str(segment),))
            merged.execute("BEGIN")
            duplicates = merged.execute(
                "SELECT u.id, u.split FROM unit.ids u JOIN main.ids m ON m.id = u.id AND m.split = u.split"
            ).fetchall()
            drops[item["number"]] = [[key.hex(), "train" if split == 0 else "test", "duplicate"] for key, split in duplicates]
            merged.execute("INSERT OR IGNORE INTO main.ids SELECT id, split FROM unit.ids")
            merged.execute("COMMIT")
            merged.execute("DETACH DATABASE unit")
        for item in built:
            segment = staging / f"index-{item['number']:06d}.sqlite"
            merged.execute("ATTACH DATABASE ? AS unit", (str(segment),))
            leaked = merged.execute(
                "SELECT u.id FROM unit.ids u JOIN main.ids m ON m.id = u.id AND m.split = 0 WHERE u.split = 1"
            ).fetchall()
            already = {(rid, split) for rid, split, _ in drops[item["number"]]}
            drops[item["number"]] += [[key.hex(), "test", "leakage"] for (key,) in leaked if (key.hex(), "test") not in already]
            merged.execute("DETACH DATABASE unit")
    finally:
        merged.close()
        (staging / "merge.tmp").unlink(missing_ok=True)
    return drops


@flow(name="ingest-distributed")
def _distributed_flow(spec_json: dict, storage_json: dict, work_dir: str, scratch_dir: str | None, storage_prefix: str,
                      shard_records: int) -> dict:  # fmt: skip
    spec = IngestDatasetConfig.model_validate(spec_json)
    store = ObjectStore(StorageConfig.model_validate(storage_json))
    run_id = uuid.uuid4().hex[:12]
    units = plan_units(spec, store)
    futures = [build_unit.submit(spec_json, storage_json, unit, number, scratch_dir, storage_prefix, run_id, shard_records)
               for number, unit in enumerate(units)]  # fmt: skip
    built = [future.result() for future in futures]
    staging = Path(work_dir) / "datasets" / spec.name / f".staging-{run_id}"
    staging.mkdir(parents=True)
    drops = reduce_indexes(store, built, staging)
    filtered = {item["number"]: filter_unit.submit(spec_json, storage_json, item, drops[item["number"]], scratch_dir,
                                                   storage_prefix, shard_records)
                for item in built if drops[item["number"]]}  # fmt: skip
    final = {number: future.result() for number, future in filtered.items()}
    return {"run_id": run_id, "built": built, "final": final, "staging": str(staging)}


RUNNERS = ("process", "dask")


def make_task_runner(runner: str = "process", workers: int | None = None, address: str | None = None) -> Any:
    """The Prefect task runner for ``runner``; raises ConfigError on a combination that cannot run.

    process: ProcessPoolTaskRunner of ``workers`` (default 2) processes on this machine.
    dask with ``address``: DaskTaskRunner on the existing cluster whose scheduler is there (its
    workers are the cluster's; ``workers`` is refused). dask without: a LocalCluster of ``workers``
    (default 2) single-threaded processes, closed when the flow ends.
    """
    if runner not in RUNNERS:
        raise ConfigError(f"distributed ingestion runner {runner!r}: use one of {list(RUNNERS)}")
    if workers is not None and workers < 1:
        raise ConfigError(f"distributed ingestion needs at least 1 worker, not {workers}")
    if address and runner != "dask":
        raise ConfigError(f"a scheduler address is for runner 'dask', not {runner!r}")
    if address and workers is not None:
        raise ConfigError("an existing Dask cluster has the workers it has: give an address or a number of workers, not both")
    if runner == "process":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=workers or 2)
    from prefect_dask import DaskTaskRunner

    if address:
        _check_api_for_cluster(address)
        return DaskTaskRunner(address=address)
    # one thread per worker process: reading, validating and hashing records holds the GIL
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers or 2, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})  # fmt: skip


# A Dask LocalCluster sets these to 1 in the *driver's* os.environ for its worker processes (distributed's
# nanny pre-spawn-environ) and leaves them there, so every later subprocess of the driver (a torchrun
# stage, say) would run single-threaded. Measured: all three are '1' after a LocalCluster closes.
DASK_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")


def _check_api_for_cluster(address: str) -> None:
    """Workers on other hosts report their task runs to the flow's Prefect API: an ephemeral one
    (PREFECT_API_URL unset) lives in this process's machine only, on a loopback address."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise ConfigError(f"the Dask cluster at {address} reports task runs to the Prefect API, and PREFECT_API_URL is unset "
                          "(an ephemeral API that its workers cannot reach): set it to a Prefect server that every host reaches")  # fmt: skip


def ingest_distributed(spec: IngestDatasetConfig | dict, storage: StorageConfig, work_dir: str | Path, storage_prefix: str, *,
                       runner: str = "process", workers: int | None = None, address: str | None = None,
                       task_runner: Any = None, shard_records: int = SHARD_RECORDS) -> IngestResult:  # fmt: skip
    """Ingest ``spec`` (a full snapshot) with Prefect tasks on the runner that
    ``make_task_runner(runner, workers, address)`` builds (default: 2 local processes), or on
    ``task_runner`` (any Prefect task runner; unless it is a ProcessPoolTaskRunner, its workers put
    their scratch files in their host's temporary folder).

    Needs a Prefect API: a server (PREFECT_API_URL) that every worker reaches, which a Dask cluster
    at ``address`` requires; with PREFECT_API_URL unset each worker process starts its own temporary
    one. And S3 that every worker reaches at ``storage.endpoint_url`` with the credentials of its own
    environment (the variables ``storage`` names). Returns the committed version; raises
    IngestError / EmptyDatasetError like ``ingest_dataset``, ConfigError on a runner that cannot run.
    """
    spec = IngestDatasetConfig.model_validate(spec) if isinstance(spec, dict) else spec
    work_dir = Path(work_dir)
    if task_runner is None:
        task_runner = make_task_runner(runner, workers, address)
    from prefect.task_runners import ProcessPoolTaskRunner

    # local processes share this machine's disk; the workers of a Dask (or other) runner use their host's own
    scratch_dir = str(work_dir) if isinstance(task_runner, ProcessPoolTaskRunner) else None
    with environ_restored(DASK_THREAD_VARIABLES):
        out = _distributed_flow.with_options(task_runner=task_runner)(spec.model_dump(mode="json"), storage.model_dump(mode="json"),
                                                                      str(work_dir), scratch_dir, storage_prefix, shard_records)  # fmt: skip
    store = ObjectStore(storage)
    staging = Path(out["staging"])
    rejected: Counter = Counter()
    read = truncated = 0
    stats: Counter = Counter()
    lineage: list[dict] = []
    train, test = [], []
    with open(staging / QUARANTINE_FILE, "w", encoding="utf-8") as quarantine:
        for item in out["built"]:
            read, truncated = read + item["read"], truncated + item["truncated"]
            rejected.update(item["rejected"])
            stats.update(item["stats"])
            lineage += item["lineage"]
            local = staging / "q.tmp"
            store.get_file(join_key(item["parts"], QUARANTINE_FILE), local)
            with open(local, encoding="utf-8") as handle:
                shutil.copyfileobj(handle, quarantine)
            local.unlink()
            final = out["final"].get(item["number"])
            shards = final["shards"] if final else item["shards"]
            if final:
                quarantine.writelines(final["quarantine"])
                for line in final["quarantine"]:
                    rejected[json.loads(line)["reason"]] += 1
            train += [shard for shard in shards if shard["split"] == "train"]
            test += [shard for shard in shards if shard["split"] == "test"]
    store.delete_prefix(join_key(storage_prefix, "datasets", spec.name, "runs", out["run_id"]) + "/")
    shards = train + test
    added = sum(shard["records"] for shard in shards)
    run = {"counts": {"read": read, "accepted": added, "truncated": truncated, **stats}, "rejected": dict(sorted(rejected.items()))}
    if added == 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise _empty_error(spec, _Summary(read, rejected, out["built"]), [entry["uri"] for entry in lineage])
    from perennial.ingest.records import load_labels

    return commit_version(spec, store, work_dir, storage_prefix, staging, shards, run, lineage, load_labels(spec))


class _Summary:
    """What _empty_error reads from a builder, gathered from the workers' reports."""

    def __init__(self, read: int, rejected: Counter, built: list[dict]):
        self.read, self.rejected = read, rejected
        first = next((item["first_rejection"] for item in built if item["first_rejection"]), None)
        self.first_rejection = (RawRecord(first[0], first[1], None, None), first[2], first[3]) if first else None


__all__ = ["ingest_distributed", "plan_units", "reduce_indexes"]
