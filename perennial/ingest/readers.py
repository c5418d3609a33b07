"""Streaming readers: every supported input yields ``RawRecord``s one at a time.

Local files are read with ``errors="surrogateescape"`` so a byte that is not UTF-8 survives as a lone
surrogate; validation then rejects that record alone (reason ``not_utf8``) instead of failing the
whole file. S3 objects are downloaded to a scratch file (streamed to disk, never held in memory),
read like local files, then deleted.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from collections import Counter
from dataclasses import dataclass
from fnmatch import fnmatch
from itertools import islice
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, TextIO

from botocore.exceptions import ClientError

from perennial.config import IngestSourceConfig, StorageConfig
from perennial.storage import ObjectInfo, ObjectStore, sha256_file


class IngestError(ValueError):
    """Ingestion cannot proceed; the message names the source and what to fix."""


@dataclass
class RawRecord:
    source: str  # file path or s3:// URI the record came from
    index: int  # 1-based: line number for line formats, record number otherwise
    value: Any  # the parsed record (dict), a str for txt, or the raw text when unparseable
    split: str | None  # "train"/"test" fixed by the source, "hash" to force hashing, None = decide later
    error: tuple[str, str] | None = None  # (reason, detail) when the reader could not parse it
    split_hint: str | None = None  # train/test from a file or split name, used when the record names none


EXTENSION_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "txt"}
HF_BUILDERS = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet", "txt": "text"}
SPLIT_NAMES = {"train": "train", "training": "train", "test": "test", "testing": "test", "valid": "test",
               "validation": "test", "val": "test", "dev": "test", "eval": "test"}  # fmt: skip


def split_from_name(name: str | None) -> str | None:
    """train/test from a file stem or a split name; None when the name says nothing."""
    return SPLIT_NAMES.get((name or "").lower())


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def parse_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise IngestError(f"source {uri!r}: an S3 source looks like s3://bucket/prefix")
    return bucket, key


def _format_of(name: str, configured: str) -> str | None:
    if configured != "auto":
        return configured
    return EXTENSION_FORMATS.get(PurePosixPath(name).suffix.lower())


def _is_saved_hf(path: Path) -> bool:
    """A folder written by Dataset.save_to_disk / DatasetDict.save_to_disk."""
    return path.is_dir() and any((path / name).is_file() for name in ("state.json", "dataset_dict.json"))


def source_store(src: IngestSourceConfig, store: ObjectStore, bucket: str) -> ObjectStore:
    """The store for an S3 source: the pipeline's own endpoint and credentials unless the source names others."""
    cfg = store.cfg
    wanted = {
        "endpoint_url": src.endpoint_url or cfg.endpoint_url,
        "access_key_env": src.access_key_env or cfg.access_key_env,
        "secret_key_env": src.secret_key_env or cfg.secret_key_env,
        "bucket": bucket,
    }
    if all(getattr(cfg, key) == value for key, value in wanted.items()):
        return store
    try:
        return ObjectStore(StorageConfig.model_validate({**cfg.model_dump(), **wanted}))
    except ValueError as error:
        raise IngestError(f"source {src.uri!r}: {error}") from None


def list_s3_source(src: IngestSourceConfig, store: ObjectStore) -> tuple[ObjectStore, list[ObjectInfo]]:
    """The objects an S3 source covers, sorted by key: one exact object, or everything under a prefix."""
    if src.format in {"hf_disk", "hf"}:
        raise IngestError(f"source {src.uri!r}: format {src.format!r} reads local folders only; download it first")
    bucket, key = parse_s3(src.uri)
    s3 = source_store(src, store, bucket)
    try:
        listed = list(s3.list(key))
    except ClientError as error:  # e.g. NoSuchBucket, AccessDenied: not worth retrying
        raise IngestError(f"source {src.uri!r}: cannot list objects: {error}") from None
    if key and not key.endswith("/"):
        exact = [info for info in listed if info.key == key]
        if exact:
            return s3, exact
        key += "/"
    objects = [
        info
        for info in listed
        if info.key.startswith(key)
        if not info.key.endswith("/")
        and fnmatch(PurePosixPath(info.key).name, src.pattern)
        and _format_of(info.key, src.format) is not None
    ]
    return s3, sorted(objects, key=lambda info: info.key)


def source_identity(sources: list[IngestSourceConfig], store: ObjectStore | None, reader: "SourceReader") -> list[dict] | None:
    """What every source holds, without parsing it: local files by sha256, S3 objects by ETag.

    None when a source has no such identity (a Hugging Face folder, a memory source), or cannot
    be listed (the read reports that error). The reader keeps the hashes, so reading does not
    hash the files again.
    """
    identity = []
    for src in sources:
        try:
            if is_s3(src.uri):
                if store is None:
                    return None
                s3, objects = list_s3_source(src, store)
                identity.append({"uri": src.uri, "objects": [[s3.uri(info.key), info.etag] for info in objects], "limit": src.limit, "skip": src.skip})
                continue
            files = reader._local_files(src)
        except IngestError:
            return None
        if any(fmt == "hf_disk" or not path.is_file() for path, fmt in files):
            return None
        for path, _ in files:
            reader.file_sha256[path] = sha256_file(path)
        identity.append({"uri": src.uri, "files": [[str(path), reader.file_sha256[path]] for path, _ in files]})
    return identity


class SourceReader:
    """Reads sources into RawRecords and remembers what it read (for the manifest's lineage)."""

    def __init__(self, store: ObjectStore | None, scratch: Path):
        self.store = store
        self.scratch = scratch
        self.stats: Counter = Counter()  # e.g. skipped_blank_lines
        self.lineage: list[dict] = []  # one entry per file or object read
        self.file_sha256: dict[Path, str] = {}  # hashed already (by source_identity): not hashed twice

    def read(self, src: IngestSourceConfig, objects: list[ObjectInfo] | None = None, s3: ObjectStore | None = None) -> Iterator[RawRecord]:
        """All records of one source in a deterministic order: past the first ``src.skip``, at most ``src.limit``.

        For S3 sources, ``objects`` (with their store) restricts reading to those objects (incremental runs).
        """
        if is_s3(src.uri):
            if objects is None:
                if self.store is None:
                    raise IngestError(f"source {src.uri!r}: S3 sources need an object store")
                s3, objects = list_s3_source(src, self.store)
                if not objects:
                    raise IngestError(f"source {src.uri!r}: no objects matching {src.pattern!r} with a known format")
            records = self._read_objects(src, s3, objects)
        else:
            records = self._read_local(src)
        return islice(records, src.skip, src.skip + src.limit if src.limit else None)

    # -- local --------------------------------------------------------------------------------

    def _local_files(self, src: IngestSourceConfig) -> list[tuple[Path, str]]:
        path = Path(src.uri)
        if not path.exists():
            raise IngestError(f"source {src.uri!r}: no such file or folder (relative paths start at {Path.cwd()})")
        if src.format == "hf_disk" or (src.format == "auto" and _is_saved_hf(path)):
            return [(path, "hf_disk")]
        if path.is_file():
            fmt = _format_of(path.name, src.format)
            if fmt is None:
                raise IngestError(f"source {src.uri!r}: unknown file type; set format to one of {sorted(set(EXTENSION_FORMATS.values()))}")
            return [(path, fmt)]
        files = []
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            hidden = any(part.startswith(".") for part in file.relative_to(path).parts)
            fmt = _format_of(file.name, src.format)
            if not hidden and fmt and fnmatch(file.name, src.pattern):
                files.append((file, fmt))
        if not files:
            raise IngestError(f"source {src.uri!r}: the folder holds no files matching {src.pattern!r} with a known format")
        return files

    def _read_local(self, src: IngestSourceConfig) -> Iterator[RawRecord]:
        for path, fmt in self._local_files(src):
            identity = {"sha256": self.file_sha256.get(path) or sha256_file(path)} if path.is_file() else {}
            self.lineage.append({"uri": str(path), "format": fmt, **identity})
            yield from self._read_file(path, fmt, str(path), src)

    # -- s3 -----------------------------------------------------------------------------------

    def _read_objects(self, src: IngestSourceConfig, s3: ObjectStore, objects: list[ObjectInfo]) -> Iterator[RawRecord]:
        for info in objects:
            fmt = _format_of(info.key, src.format)
            # The scratch name is a hash of the key, so a key cannot steer where the download lands.
            local = self.scratch / (hashlib.sha256(info.key.encode()).hexdigest()[:24] + PurePosixPath(info.key).suffix)
            s3.get_file(info.key, local)
            uri = s3.uri(info.key)
            self.lineage.append({"uri": uri, "format": fmt, "etag": info.etag, "size": info.size})
            try:
                yield from self._read_file(local, fmt, uri, src)
            finally:
                local.unlink(missing_ok=True)

    # -- one file -----------------------------------------------------------------------------

    def _splits(self, src: IngestSourceConfig, name: str | None) -> tuple[str | None, str | None]:
        """(split fixed by the config, hint from the file or split name)."""
        if src.split != "auto":
            return src.split, None
        return None, split_from_name(name)

    def _read_file(self, path: Path, fmt: str, label: str, src: IngestSourceConfig) -> Iterator[RawRecord]:
        if fmt == "hf_disk":
            yield from self._read_hf_disk(path, label, src)
            return
        split, hint = self._splits(src, PurePosixPath(label).stem)
        if fmt == "hf":
            rows = self._read_hf_file(path, src)
        elif fmt == "parquet":
            rows = _read_parquet(path)
        else:
            # utf-8-sig drops a byte-order mark; surrogateescape keeps bad bytes for per-record rejection.
            with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
                if fmt == "json":
                    rows = _read_json(handle)
                elif fmt == "jsonl":
                    rows = _read_jsonl(handle)
                elif fmt == "csv":
                    rows = _read_csv(handle)
                else:
                    rows = self._read_txt(handle, src)
                for index, value, error in rows:
                    yield RawRecord(label, index, value, split, error, hint)
            return
        for index, value, error in rows:
            yield RawRecord(label, index, value, split, error, hint)

    def _read_txt(self, handle: TextIO, src: IngestSourceConfig) -> Iterator[tuple[int, Any, None]]:
        if src.txt_unit == "file":
            yield 1, handle.read(), None
            return
        for number, line in enumerate(handle, 1):
            line = line.rstrip("\r\n")
            if src.skip_blank_lines and not line.strip():
                self.stats["skipped_blank_lines"] += 1
                continue
            yield number, line, None

    def _read_hf_disk(self, path: Path, label: str, src: IngestSourceConfig) -> Iterator[RawRecord]:
        import datasets  # slow to import; only needed here

        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as error:  # datasets raises several types for a folder it cannot read
            yield RawRecord(label, 1, None, None, ("unreadable", f"load_from_disk failed: {error}"))
            return
        parts = sorted(loaded.items()) if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
        for split_name, part in parts:
            split, hint = self._splits(src, split_name)
            where = f"{label}[{split_name}]" if split_name else label
            for number, row in enumerate(part, 1):
                yield RawRecord(where, number, row, split, None, hint)

    def _read_hf_file(self, path: Path, src: IngestSourceConfig) -> Iterator[tuple[int, Any, None]]:
        import datasets

        builder = src.hf_builder or HF_BUILDERS.get(EXTENSION_FORMATS.get(path.suffix.lower(), ""))
        if builder is None:
            raise IngestError(f"source {src.uri!r}: set hf_builder (json, csv, parquet or text) for {path.name}")
        # streaming=True iterates the file without building an Arrow cache copy of it.
        rows = datasets.load_dataset(
            builder, data_files=str(path), split="train", streaming=True, cache_dir=str(self.scratch / "hf-cache")
        )
        for number, row in enumerate(rows, 1):
            yield number, row, None


# -- format parsers: each yields (index, value, error) ------------------------------------------


def _read_jsonl(handle: TextIO) -> Iterator[tuple[int, Any, tuple[str, str] | None]]:
    for number, line in enumerate(handle, 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line), None
        except json.JSONDecodeError as error:
            yield number, line.rstrip("\r\n"), ("invalid_json", f"{error.msg} at column {error.colno}")


def _read_json(handle: TextIO) -> Iterator[tuple[int, Any, tuple[str, str] | None]]:
    """A .json file: a top-level array streamed element by element, or JSON lines under a .json name."""
    while (char := handle.read(1)) and char.isspace():
        pass
    handle.seek(0)
    if char != "[":
        yield from _read_jsonl(handle)  # a common mislabelling: JSON lines saved as .json
        return
    number = 0
    try:
        for number, value in enumerate(iter_json_array(handle), 1):
            yield number, value, None
    except ValueError as error:
        # The parser cannot resynchronise inside a broken array: the rest of the file is lost.
        yield number + 1, None, ("invalid_json", f"the JSON array breaks at element {number + 1}: {error}")


def iter_json_array(handle: TextIO, chunk_size: int = 1 << 20) -> Iterator[Any]:
    """Yield the elements of a top-level JSON array one at a time.

    Holds one chunk plus the element being parsed in memory, never the whole array (ijson is not
    installed, so this uses the standard decoder's raw_decode on a sliding buffer); a single element
    larger than a chunk is re-parsed as the buffer grows. Raises ValueError on malformed input.
    """
    decoder = json.JSONDecoder()
    buffer, pos, eof = "", 0, False

    def fill() -> None:
        nonlocal buffer, pos, eof
        chunk = handle.read(chunk_size)
        eof = not chunk
        buffer, pos = buffer[pos:] + chunk, 0

    def next_char() -> str | None:
        """The next non-whitespace character (not consumed), or None at the end of input."""
        nonlocal pos
        while True:
            while pos < len(buffer) and buffer[pos].isspace():
                pos += 1
            if pos < len(buffer):
                return buffer[pos]
            if eof:
                return None
            fill()

    if next_char() != "[":
        raise ValueError("the file is not a JSON array")
    pos += 1
    if next_char() == "]":
        return
    while True:
        if next_char() is None:
            raise ValueError("unexpected end of file inside the array")
        while True:
            try:
                value, end = decoder.raw_decode(buffer, pos)
                # A value is complete once a ',' or ']' follows it: "1" in a buffer holding "[1" may
                # be the start of "12" or "1.5", so read on until the separator is in the buffer.
                after = end
                while after < len(buffer) and buffer[after].isspace():
                    after += 1
                if eof or (after < len(buffer) and buffer[after] in ",]"):
                    break
            except json.JSONDecodeError as error:
                if eof:
                    raise ValueError(error.msg) from None
            fill()
        pos = end
        yield value
        char = next_char()
        if char == ",":
            pos += 1
        elif char == "]":
            return
        else:
            raise ValueError(f"expected ',' or ']' after an element, found {char!r}")


def _read_csv(handle: TextIO) -> Iterator[tuple[int, Any, tuple[str, str] | None]]:
    # The default field limit (128 KiB) would fail the whole file on one long field; length is
    # checked per record later, against max_chars.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.DictReader(handle)
    number = 0
    try:
        for number, row in enumerate(reader, 1):
            yield number, row, None
    except csv.Error as error:
        yield number + 1, None, ("unreadable", f"CSV parse error near line {reader.line_num}: {error}")


def _read_parquet(path: Path) -> Iterator[tuple[int, Any, tuple[str, str] | None]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises ArrowInvalid / OSError for a file it cannot read
        yield 1, None, ("unreadable", f"not a readable Parquet file: {error}")
        return
    number = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            number += 1
            yield number, row, None
