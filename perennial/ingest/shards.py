"""Immutable, content-addressed shards and the on-disk dedup index of a dataset version.

A version is a list of shards (JSONL files of canonical records, one split each, at most
``SHARD_RECORDS`` records) stored once at ``<storage_prefix>/datasets/<name>/shards/<sha256>.jsonl``
and referenced by every version that contains them: an incremental tick writes only its new shards.
Reading a version = streaming its shards in manifest order; their concatenation is the version's
``data.jsonl`` (train first, then test, within each build).

The dedup and leakage index is SQLite (stdlib): one segment per build (snapshot or tick), a table
``ids(id BLOB, split INTEGER)`` keyed by (id, split), where id is the first ``ID_BYTES`` bytes of the
record's sha256 (128 bits: the chance of two different records colliding among 10^10 is about
10^-19). It lives on disk beside the version (``index.sqlite``) with a bounded page cache, so memory
does not grow with the number of records. A version's index is its own segment plus its parent's
segments, listed in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

SHARD_RECORDS = 100_000  # records per shard: big enough that a 1M-record version has 10 shards, small enough to re-upload cheaply
ID_BYTES = 16
INDEX_FILE = "index.sqlite"
SPLIT_CODE = {"train": 0, "test": 1}
SPLIT_NAME = {0: "train", 1: "test"}
_CACHE_KIB = 16 * 1024  # SQLite page cache per connection: the index's whole share of memory
_IN_CHUNK = 500  # ids per `IN (...)` query (SQLite's default limit is 32766 variables)


def compact_id(record_id: str) -> bytes:
    """The index key of a record id (64 hex digits): its first ID_BYTES bytes."""
    return bytes.fromhex(record_id[: 2 * ID_BYTES])


def version_digest(shard_shas: Iterable[str], chars: int = 32) -> str:
    """The digest of a version: sha256 over its shards' sha256s, in order (first ``chars`` hex digits).

    It depends only on the records and their order (shard boundaries are a function of the record
    count), so the same records give the same digest whatever the input format, and an incremental
    tick computes it without reading the parent's data.
    """
    return hashlib.sha256(("shards-v1\n" + "\n".join(shard_shas)).encode()).hexdigest()[:chars]


def shard_key(storage_prefix: str, name: str, sha256: str) -> str:
    from perennial.storage import join_key

    return join_key(storage_prefix, "datasets", name, "shards", f"{sha256}.jsonl")


class ShardWriter:
    """Writes canonical JSON lines of one split into shards of at most ``shard_records`` records.

    Each finished shard is renamed to ``<sha256>.jsonl`` in ``shards_dir``; ``entries`` describes
    them in order: ``{"sha256", "split", "records", "bytes", "tasks": [[task, records], ...]}``.
    """

    def __init__(self, shards_dir: Path, split: str, shard_records: int = SHARD_RECORDS, on_shard=None):
        self.dir, self.split, self.limit = Path(shards_dir), split, shard_records
        self.on_shard = on_shard  # called with (path, entry) for each finished shard, e.g. to upload it now
        self.dir.mkdir(parents=True, exist_ok=True)
        self.entries: list[dict] = []
        self.records = 0
        self._handle = None

    def write(self, line: str, task: str | None = None) -> None:
        if self._handle is None:
            self._temp = self.dir / f".writing-{os.getpid()}-{id(self)}-{len(self.entries)}"
            self._handle = open(self._temp, "wb")
            self._hash, self._count, self._bytes, self._tasks = hashlib.sha256(), 0, 0, Counter()
        data = line.encode("utf-8")
        self._handle.write(data)
        self._hash.update(data)
        self._count += 1
        self._bytes += len(data)
        if task is not None:
            self._tasks[task] += 1  # Counter keeps first-appearance order: the task sequence
        self.records += 1
        if self._count >= self.limit:
            self._finish()

    def _finish(self) -> None:
        self._handle.close()
        self._handle = None
        sha = self._hash.hexdigest()
        target = self.dir / f"{sha}.jsonl"
        if target.exists():  # the same content from an earlier run: content-addressed, so identical
            self._temp.unlink()
        else:
            os.replace(self._temp, target)
        self.entries.append({"sha256": sha, "split": self.split, "records": self._count, "bytes": self._bytes,
                             "tasks": [[task, n] for task, n in self._tasks.items()]})  # fmt: skip
        if self.on_shard is not None:
            self.on_shard(target, self.entries[-1])

    def close(self) -> list[dict]:
        if self._handle is not None:
            self._finish()
        return self.entries

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
            self._temp.unlink(missing_ok=True)


def connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    """A connection tuned for a build-once index: no journal, no fsync, a bounded page cache."""
    if readonly:
        connection = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    else:
        connection = sqlite3.connect(path, isolation_level=None)
        connection.execute("PRAGMA journal_mode=OFF")
        connection.execute("PRAGMA synchronous=OFF")
        connection.execute("CREATE TABLE IF NOT EXISTS ids (id BLOB NOT NULL, split INTEGER NOT NULL, PRIMARY KEY (id, split)) WITHOUT ROWID")
        connection.execute("BEGIN")
    connection.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
    return connection


class IndexSegment:
    """The ids one build accepts, on disk: per-split dedup as records arrive, then leakage."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.db = connect(self.path)
        self._insert = "INSERT OR IGNORE INTO ids (id, split) VALUES (?, ?)"

    def add(self, key: bytes, split: str) -> bool:
        """Record ``key`` in ``split``; False when it was already there (a duplicate)."""
        return self.db.execute(self._insert, (key, SPLIT_CODE[split])).rowcount == 1

    def in_train(self, key: bytes) -> bool:
        return self.db.execute("SELECT 1 FROM ids WHERE id = ? AND split = 0", (key,)).fetchone() is not None

    def drop_test(self, key: bytes) -> None:
        self.db.execute("DELETE FROM ids WHERE id = ? AND split = 1", (key,))

    def close(self) -> None:
        if self.db is not None:
            if self.db.in_transaction:
                self.db.execute("COMMIT")
            self.db.close()
            self.db = None


class ParentIndex:
    """Lookups against the index segments of the versions a tick builds on (read-only, on disk)."""

    def __init__(self, segments: list[Path]):
        self.dbs = [connect(path, readonly=True) for path in segments]

    def lookup(self, keys: list[bytes]) -> dict[bytes, str]:
        """The keys present in any segment, with a split they are in."""
        found: dict[bytes, str] = {}
        for db in self.dbs:
            for start in range(0, len(keys), _IN_CHUNK):
                chunk = keys[start : start + _IN_CHUNK]
                query = f"SELECT id, split FROM ids WHERE id IN ({','.join('?' * len(chunk))})"
                for key, split in db.execute(query, chunk):
                    found.setdefault(key, SPLIT_NAME[split])
        return found

    def close(self) -> None:
        for db in self.dbs:
            db.close()
        self.dbs = []


def iter_shard(path: Path, split: str | None = None) -> Iterator[dict]:
    """The records of one local shard; ``split`` filters (shards hold one split, so it is a cheap check)."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if split is None or record["split"] == split:
                yield record
