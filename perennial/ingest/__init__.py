"""Data ingestion: files, S3 prefixes and Hugging Face datasets -> validated, versioned canonical JSONL.

    result = ingest_dataset(spec, store, work_dir, storage_prefix)       # a full snapshot
    result = ingest_incremental(spec, store, work_dir, storage_prefix)   # only new S3 objects
    result = ingest_records(name, kind, records, store, work_dir, storage_prefix)  # in-memory data

See docs/ingestion.md for the config keys, record formats, quarantine and versioning.
"""

from perennial.ingest.core import (
    DATA_FILE,
    QUARANTINE_FILE,
    EmptyDatasetError,
    IngestResult,
    content_digest,
    fetch_version,
    ingest_dataset,
    ingest_records,
    iter_jsonl,
    iter_version,
    latest_version,
)
from perennial.ingest.incremental import advance_watermark, ingest_incremental, read_watermark
from perennial.ingest.readers import IngestError, iter_json_array
from perennial.ingest.records import REASONS, record_id
from perennial.ingest.shards import SHARD_RECORDS, version_digest
from perennial.ingest.tracking import log_dataset_to_mlflow

__all__ = [
    "DATA_FILE",
    "advance_watermark",
    "QUARANTINE_FILE",
    "REASONS",
    "EmptyDatasetError",
    "IngestError",
    "IngestResult",
    "content_digest",
    "fetch_version",
    "ingest_dataset",
    "ingest_incremental",
    "ingest_records",
    "iter_json_array",
    "iter_jsonl",
    "iter_version",
    "latest_version",
    "log_dataset_to_mlflow",
    "read_watermark",
    "record_id",
    "SHARD_RECORDS",
    "version_digest",
]
