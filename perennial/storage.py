"""S3-compatible object storage: digests, manifests, committed directory uploads.

A directory is *committed* when its ``MANIFEST.json`` exists. The manifest is written last and
lists the sha256 of every file, so a reader never sees a partial upload as committed and a
flipped byte is caught on download.

Checkpoint weights are stored by content: a ``.safetensors`` file is cut into its header and its
tensors (small neighbours grouped), and each piece is an object under ``<prefix>/blobs/sha256/``
named by its sha256, uploaded only when no committed directory stored it before. The manifest lists
the pieces; a reader joins them, checks each piece's sha256 and then the whole file's. So a stage
that trained only the attention projections stores only those tensors; the rest are its parent's.
`tasks/gc.py` deletes the pieces no manifest references any more.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import boto3
from boto3.exceptions import RetriesExceededError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from perennial.config import StorageConfig

MANIFEST_NAME = "MANIFEST.json"
BLOBS = "blobs/sha256"  # under StorageConfig.prefix: content-addressed pieces of checkpoint files
PIECE_GROUP_BYTES = 64 * 1024  # tensors smaller than this share a piece (norms, biases): fewer objects
_IN_MEMORY_PIECE = 256 * 1024 * 1024  # larger pieces go through a temporary file, not memory
_KEY_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,127}$")
_TRANSFER = TransferConfig(multipart_threshold=16 * 1024 * 1024, multipart_chunksize=16 * 1024 * 1024, max_concurrency=4)


class StorageError(RuntimeError):
    """Object storage cannot be used; the message says how to fix it."""


class CorruptObjectError(StorageError):
    """An object's bytes do not match the digest recorded in its manifest."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(root: str | Path) -> str:
    """Digest of a directory: relative paths and file digests, order-independent."""
    root = Path(root)
    entries = sorted((p.relative_to(root).as_posix(), sha256_file(p)) for p in root.rglob("*") if p.is_file())
    return sha256_bytes(json.dumps(entries).encode())


def safetensors_pieces(path: str | Path) -> list[tuple[int, int]] | None:
    """Byte ranges ``[start, end)`` that tile a safetensors file: its header, then its tensors' data in file
    order, consecutive tensors under PIECE_GROUP_BYTES grouped; None when the file is not safetensors.

    Format (huggingface/safetensors): an 8-byte little-endian header length N, N bytes of JSON
    ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` with offsets relative to byte 8+N.
    A tensor unchanged since the parent checkpoint is then a piece with the same digest.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else 0
        if not 0 < length <= size - 8:
            return None
        try:
            header = json.loads(handle.read(length))
        except (ValueError, UnicodeDecodeError):
            return None
    if not isinstance(header, dict):
        return None
    base = 8 + length
    cuts = {0, base, size}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return None
        cuts.update(min(max(base + offset, base), size) for offset in offsets)
    bounds = sorted(cuts)
    pieces: list[tuple[int, int]] = []
    for start, end in zip(bounds, bounds[1:]):
        if pieces and pieces[-1][0] >= base and end - pieces[-1][0] <= PIECE_GROUP_BYTES:
            pieces[-1] = (pieces[-1][0], end)  # a small tensor joins the small ones before it
        else:
            pieces.append((start, end))
    return pieces


def _blocks(path: Path, start: int, end: int, chunk: int = 1 << 24) -> Iterator[bytes]:
    """The bytes ``[start, end)`` of ``path``, in blocks of at most ``chunk``."""
    with open(path, "rb") as handle:
        handle.seek(start)
        left = end - start
        while left > 0 and (block := handle.read(min(chunk, left))):
            left -= len(block)
            yield block


# A 403 with the local clock this far off the server's names the clock as the cause (S3 allows 15 minutes).
CLOCK_SKEW_HINT_SECONDS = 5 * 60


def clock_skew_seconds(error: ClientError) -> float | None:
    """Seconds the signing clock is ahead of the server's (negative: behind), from the server's ``Date``
    header on its error reply; None when the reply has none.

    The local clock is the one botocore signs requests with (`botocore.auth.get_current_datetime`,
    the system clock in UTC), read now, so the answer is off by at most the request's round trip.
    """
    date = error.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if not date:
        return None
    from email.utils import parsedate_to_datetime

    import botocore.auth

    server = parsedate_to_datetime(date).astimezone(timezone.utc)
    local = botocore.auth.get_current_datetime(remove_tzinfo=False)
    return (local - server).total_seconds()


def key_component(value: str) -> str:
    """Validate one piece of an object key, so names from data or config cannot traverse paths."""
    if not isinstance(value, str) or not _KEY_COMPONENT.match(value) or value in {".", ".."} or ".." in value:
        raise StorageError(
            f"{value!r} cannot be part of an object key: use letters, digits, '.', '_', '-', '=' "
            "(1-128 characters, starting with a letter or digit, no '..')"
        )
    return value


def join_key(*parts: str) -> str:
    """Join validated key pieces; a piece may itself be a validated a/b/c path."""
    pieces: list[str] = []
    for part in parts:
        for component in str(part).strip("/").split("/"):
            pieces.append(key_component(component))
    return "/".join(pieces)


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    last_modified: datetime


def _credentials(cfg: StorageConfig) -> tuple[str, str]:
    access, secret = os.environ.get(cfg.access_key_env), os.environ.get(cfg.secret_key_env)
    if not access or not secret:
        raise StorageError(
            f"S3 credentials are missing: set the environment variables {cfg.access_key_env} and "
            f"{cfg.secret_key_env} (for the local services: `source .perennial/services/services.env`, written by "
            "`perennial services up`)"
        )
    return access, secret


class ObjectStore:
    """A bucket on an S3-compatible server, with retries on transient errors."""

    def __init__(self, cfg: StorageConfig):
        self.cfg = cfg
        access, secret = _credentials(cfg)
        self.bucket = cfg.bucket
        self.client = boto3.client(
            "s3",
            endpoint_url=cfg.endpoint_url,
            region_name=cfg.region,
            aws_access_key_id=access,
            aws_secret_access_key=secret,
            config=BotoConfig(
                retries={"max_attempts": cfg.max_attempts, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    # -- plumbing ------------------------------------------------------------------------------

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _retry(self, what: str, call, *args, **kwargs):
        """Retry transient failures (server restarting, connection refused) with backoff."""
        delay, attempts = 0.5, self.cfg.max_attempts
        for attempt in range(1, attempts + 1):
            try:
                return call(*args, **kwargs)
            except (ClientError, S3UploadFailedError) as error:
                # upload_file wraps the server's answer (say a 503 while it restarts) in S3UploadFailedError
                cause = error if isinstance(error, ClientError) else error.__context__
                if isinstance(cause, ClientError):
                    code = cause.response.get("Error", {}).get("Code", "")
                    status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                    if code in {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchKey", "404"}:
                        raise
                    if status and status < 500 and code not in {"SlowDown", "RequestTimeout"}:
                        raise
                last = error
            except (BotoCoreError, EndpointConnectionError, ConnectionError, RetriesExceededError) as error:
                last = error
            if attempt < attempts:
                time.sleep(delay)
                delay = min(delay * 2, 8.0)
        hint = "Is the server up? (`perennial services status`)"
        if "InternalError" in str(last):
            # What SeaweedFS answers every PUT once its disk is under 1% free and its volumes turn read-only.
            hint = "If the disk is nearly full (`df -h`), SeaweedFS has made its volumes read-only: free space. " + hint
        raise StorageError(
            f"S3 {what} failed after {attempts} attempts against {self.cfg.endpoint_url}: {last}. {hint}"
        ) from last

    def check(self) -> None:
        """Fail fast with a clear message when the server or bucket cannot be reached.

        Raises StorageError. A 403 from a client whose clock is off the server's by more than
        CLOCK_SKEW_HINT_SECONDS says so: S3 refuses requests signed too far from its own time, and a
        HEAD's 403 carries no error code, so it would otherwise read like wrong credentials.
        """
        try:
            self.ensure_bucket()
        except ClientError as error:
            skew = clock_skew_seconds(error)
            if skew is not None and abs(skew) > CLOCK_SKEW_HINT_SECONDS:
                raise StorageError(
                    f"S3 at {self.cfg.endpoint_url} refused access (403): your clock is {abs(skew) / 60:.0f} minutes "
                    f"{'ahead of' if skew > 0 else 'behind'} the S3 server's, and S3 refuses requests signed more than "
                    "15 minutes off its own time. Set this machine's clock right (NTP: `timedatectl set-ntp true`, or "
                    "chrony), then retry"
                ) from None
            raise StorageError(f"S3 at {self.cfg.endpoint_url} refused access: {error}") from None

    def ensure_bucket(self) -> None:
        try:
            self._retry("head_bucket", self.client.head_bucket, Bucket=self.bucket)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") not in {"404", "NoSuchBucket", "NotFound"}:
                raise
            self._retry("create_bucket", self.client.create_bucket, Bucket=self.bucket)

    # -- objects -------------------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        self._retry("put_object", self.client.put_object, Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
        return sha256_bytes(data)

    def put_json(self, key: str, payload: Any) -> str:
        return self.put_bytes(key, json.dumps(payload, indent=2, sort_keys=True, default=str).encode(), "application/json")

    def put_file(self, path: str | Path, key: str) -> str:
        self._retry("upload_file", self.client.upload_file, str(path), self.bucket, key, Config=_TRANSFER)
        return sha256_file(path)

    def get_bytes(self, key: str) -> bytes:
        response = self._retry("get_object", self.client.get_object, Bucket=self.bucket, Key=key)
        return response["Body"].read()

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def get_file(self, key: str, path: str | Path, expected_sha256: str | None = None) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        self._retry("download_file", self.client.download_file, self.bucket, key, str(partial), Config=_TRANSFER)
        if expected_sha256 is not None:
            actual = sha256_file(partial)
            if actual != expected_sha256:
                partial.unlink(missing_ok=True)
                raise CorruptObjectError(
                    f"{self.uri(key)} is corrupt: sha256 {actual[:12]}... does not match the manifest's "
                    f"{expected_sha256[:12]}...; refusing to use it"
                )
        os.replace(partial, path)
        return path

    def exists(self, key: str) -> bool:
        try:
            self._retry("head_object", self.client.head_object, Bucket=self.bucket, Key=key)
            return True
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                return False
            raise

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._retry("list_objects", lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=prefix)))
        for page in pages:
            for item in page.get("Contents", []):
                yield ObjectInfo(item["Key"], item["Size"], item["ETag"].strip('"'), item["LastModified"])

    def delete_dir(self, prefix: str) -> int:
        """Delete a committed directory, its manifest first: a delete killed half way leaves files that nothing
        reads as committed (and that `perennial gc` lists again). Its checkpoint pieces stay: other directories may
        list them, and gc deletes those no manifest references. Returns how many objects were deleted."""
        self._retry("delete_object", self.client.delete_object, Bucket=self.bucket, Key=f"{prefix}/{MANIFEST_NAME}")
        return 1 + self.delete_prefix(prefix + "/")

    def delete_prefix(self, prefix: str) -> int:
        return self.delete_keys([info.key for info in self.list(prefix)])

    def delete_keys(self, keys: list[str]) -> int:
        """Delete these objects (S3 takes at most 1000 a request); returns how many were asked for."""
        for start in range(0, len(keys), 1000):
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            self._retry("delete_objects", self.client.delete_objects, Bucket=self.bucket, Delete={"Objects": batch})
        return len(keys)

    # -- committed directories -----------------------------------------------------------------

    def blob_key(self, digest: str) -> str:
        return f"{self.cfg.prefix}/{BLOBS}/{digest}"

    def _put_pieces(self, path: Path, pieces: list[tuple[int, int]], whole=None) -> list[list]:
        """Store each byte range of ``path`` as a content-addressed blob unless one with its digest exists;
        returns ``[[sha256, size], ...]`` in file order. ``whole`` (a hashlib object) is fed every byte in
        order, so pieces that tile the file give its sha256 without reading it again."""
        stored = []
        for start, end in pieces:
            digest = hashlib.sha256()
            for block in _blocks(path, start, end):
                digest.update(block)
                if whole is not None:
                    whole.update(block)
            key = self.blob_key(digest.hexdigest())
            if not self.exists(key):
                if end - start <= _IN_MEMORY_PIECE:
                    self.put_bytes(key, b"".join(_blocks(path, start, end)))
                else:  # boto uploads a file in parts; a huge tensor need not sit in memory
                    spill = path.with_name(f".{path.name}.{start}.piece")
                    try:
                        with open(spill, "wb") as target:
                            target.writelines(_blocks(path, start, end))
                        self.put_file(spill, key)
                    finally:
                        spill.unlink(missing_ok=True)
            stored.append([digest.hexdigest(), end - start])
        return stored

    def upload_dir(self, local_dir: str | Path, prefix: str, meta: dict | None = None) -> dict:
        """Upload every file, then the manifest. Returns the manifest (with ``uri`` and ``digest``).

        ``.safetensors`` files are stored as content-addressed pieces (safetensors_pieces): the manifest
        lists them and only pieces no earlier upload stored are sent. After the manifest is written every
        piece is checked once more and any missing one sent again, so a gc sweep that ran between the
        existence check and the commit cannot leave the directory referencing a deleted piece.
        """
        local_dir = Path(local_dir)
        files, split = {}, {}
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            relative = path.relative_to(local_dir).as_posix()
            pieces = safetensors_pieces(path) if path.suffix == ".safetensors" else None
            if pieces is None:
                digest = self.put_file(path, f"{prefix}/{relative}")
                files[relative] = {"sha256": digest, "size": path.stat().st_size}
            else:
                whole = hashlib.sha256()
                stored = self._put_pieces(path, pieces, whole)
                files[relative] = {"sha256": whole.hexdigest(), "size": path.stat().st_size, "pieces": stored}
                split[relative] = (path, pieces)
        manifest = {
            "files": files,
            "digest": sha256_bytes(json.dumps(sorted((k, v["sha256"]) for k, v in files.items())).encode()),
            "created": datetime.now(timezone.utc).isoformat(),
            "meta": meta or {},
            "uri": self.uri(prefix),
        }
        self.put_json(f"{prefix}/{MANIFEST_NAME}", manifest)
        for relative, (path, pieces) in split.items():
            for (start, end), (digest, _) in zip(pieces, files[relative]["pieces"]):
                if not self.exists(self.blob_key(digest)):
                    self._put_pieces(path, [(start, end)])
        return manifest

    def read_manifest(self, prefix: str) -> dict | None:
        key = f"{prefix}/{MANIFEST_NAME}"
        if not self.exists(key):
            return None
        return self.get_json(key)

    def download_dir(self, prefix: str, local_dir: str | Path) -> dict:
        """Download a committed directory, verifying every file against the manifest."""
        manifest = self.read_manifest(prefix)
        if manifest is None:
            raise StorageError(f"{self.uri(prefix)} has no {MANIFEST_NAME}: it was never committed (or was deleted)")
        local_dir = Path(local_dir)
        for relative, entry in manifest["files"].items():
            target = local_dir / relative
            if target.is_file() and sha256_file(target) == entry["sha256"]:
                continue
            self.download_file(prefix, relative, entry, target)
        return manifest

    def download_file(self, prefix: str, relative: str, entry: dict, target: Path) -> None:
        """One file of the committed directory ``prefix``, from its manifest ``entry``, sha256-checked."""
        if "pieces" in entry:
            self._join_pieces(prefix, relative, entry, target)
        else:
            self.get_file(f"{prefix}/{relative}", target, expected_sha256=entry["sha256"])

    def _join_pieces(self, prefix: str, relative: str, entry: dict, target: Path) -> None:
        """Rebuild one file from its content-addressed pieces, each sha256-checked, then the whole file.

        Raises StorageError naming the missing piece, CorruptObjectError naming the corrupt one."""
        target.parent.mkdir(parents=True, exist_ok=True)
        joined = target.with_name(target.name + ".joining")
        piece = target.with_name(target.name + ".piece")
        whole = hashlib.sha256()
        try:
            with open(joined, "wb") as out:
                for digest, _size in entry["pieces"]:
                    key = self.blob_key(digest)
                    try:
                        self.get_file(key, piece, expected_sha256=digest)
                    except CorruptObjectError as error:
                        raise CorruptObjectError(f"{relative} of {self.uri(prefix)}: {error}") from None
                    except ClientError as error:
                        if error.response.get("Error", {}).get("Code") not in {"404", "NoSuchKey", "NotFound"}:
                            raise
                        raise StorageError(
                            f"{relative} of {self.uri(prefix)} needs {self.uri(key)}, which is missing (deleted "
                            "outside `perennial gc`, or never uploaded); the checkpoint cannot be read. Retrain the "
                            "run that wrote it, or restore the object from a backup"
                        ) from None
                    for block in _blocks(piece, 0, piece.stat().st_size):
                        whole.update(block)
                        out.write(block)
            actual = whole.hexdigest()
            if actual != entry["sha256"]:
                raise CorruptObjectError(f"{relative} of {self.uri(prefix)} is corrupt: its pieces join to sha256 "
                                         f"{actual[:12]}..., not the manifest's {entry['sha256'][:12]}...")
            os.replace(joined, target)
        finally:
            joined.unlink(missing_ok=True)
            piece.unlink(missing_ok=True)
