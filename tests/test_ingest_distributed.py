"""Distributed ingestion (Prefect task mapping, 2 worker processes) against real SeaweedFS keeps
exactly the records a single-machine ingest keeps, in the same order, across files."""

from __future__ import annotations

import json

import pytest

from bench.ingest_scaling import record, write_jsonl
from perennial.ingest import ingest_dataset, iter_jsonl
from perennial.ingest.distributed import ingest_distributed

pytestmark = pytest.mark.integration


def test_two_workers_keep_what_one_machine_keeps(services, prefect_harness, store, tmp_path):
    # three objects; the generator repeats earlier records (cross-file duplicates), and the fourth
    # resends the first file's records marked test (cross-file leakage, or duplicates in test)
    for number, (start, count) in enumerate([(0, 700), (700, 700), (1400, 600)]):
        store.put_file(write_jsonl(tmp_path / f"part-{number}.jsonl", count, seed=3, start=start), f"in/part-{number}.jsonl")
    resent = [dict(value, split="test") for value in (record(i, seed=3) for i in range(60)) if isinstance(value, dict)]
    (tmp_path / "part-3.jsonl").write_text("".join(json.dumps(value) + "\n" for value in resent))
    store.put_file(tmp_path / "part-3.jsonl", "in/part-3.jsonl")
    spec = {"name": "corpus", "shape": "alpaca", "sources": [{"uri": f"s3://{store.bucket}/in/"}]}

    one = ingest_dataset(spec, store, tmp_path / "single", "p", shard_records=400)
    many = ingest_distributed(spec, store.cfg, tmp_path / "dist", "q", workers=2, shard_records=400)

    assert many.local_path.read_bytes() == one.local_path.read_bytes()  # same records, same order
    assert many.counts == one.counts and many.tasks == one.tasks
    assert many.rejected == one.rejected
    assert many.rejected["leakage"] > 10 and many.rejected["duplicate"] > 30  # the cross-file cases happened
    assert sum(1 for _ in iter_jsonl(many.quarantine_path)) == sum(many.rejected.values())
    # every worker's shards and index segments are in S3; the run's scratch objects are gone
    assert all(store.exists(f"q/datasets/corpus/shards/{shard['sha256']}.jsonl") for shard in many.manifest["shards"])
    assert len(many.manifest["index"]) == 4
    assert not list(store.list("q/datasets/corpus/runs/"))
