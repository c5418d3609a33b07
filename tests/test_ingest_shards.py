"""Sharded versions: bit-identical data to the single-file layout, ticks that touch only new data,
unchanged snapshots skipped, and readers that stream shards in order."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from bench.ingest_scaling import write_jsonl
from perennial import demo_data
from perennial.config import Config
from perennial.ingest import ingest_dataset, ingest_incremental, ingest_records, iter_jsonl
from perennial.storage import join_key
from tasks.ingest import DatasetRef, read_records

pytestmark = pytest.mark.integration

# sha256 of data.jsonl as the single-file layout (before shards, commit 8df929e) wrote it for the
# same inputs (bench/ingest_data.py's records): the shards, concatenated in manifest order, must be
# these bytes exactly, and the rejections the same per reason.
TICK_SHA256 = ["7900701627fe2335a89e68ce0bd78604940a4564d92056d474e69db09fcb6c3a",
               "5571595392752f6cce4ad383580f764391b09d8427c05b9f74e1c33d1b6b6336"]  # fmt: skip
TICK_REJECTED = [{"duplicate": 77, "invalid_json": 19, "too_long": 1},
                 {"duplicate": 1, "duplicate_previous": 15, "invalid_json": 3}]  # fmt: skip
SNAPSHOT_SHA256 = "9dcc5ae9ade693ccd177f82a7829b98fcc9606bc30cc12587f98fc70a9cb0684"


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _demo_sets() -> dict[str, tuple[str, list[dict]]]:
    demo = Config().data.demo
    docs = demo_data.general_corpus(demo.general_docs + demo.general_eval_docs, demo.seed)
    sets = {
        "general": ("text", [{"text": t, "split": "test" if i < demo.general_eval_docs else "train"} for i, t in enumerate(docs)]),
        "domain": ("text", [{"text": t, "split": "train"} for t in demo_data.domain_corpus(demo.domain_docs, demo.seed)]),
    }
    catalogue = demo_data.demo_tasks(demo.seed)
    for name in demo.tasks:
        sets[name] = ("instruction", demo_data.task_records(catalogue[name], demo.train_per_task, demo.eval_per_task, demo.seed))
    return sets


def _single_file_layout(kind: str, records: list[dict], test_fraction: float = 0.1) -> bytes:
    """data.jsonl as the single-file builder wrote it, restated plainly: per-split dedup in input
    order, train then test, test records whose id is in train dropped, one json.dumps per line."""
    from perennial.config import IngestDatasetConfig
    from perennial.ingest import record_id
    from perennial.ingest.records import Shaper

    spec = IngestDatasetConfig(name="ref", shape="text" if kind == "text" else "instruction", sources=[{"uri": "memory://ref"}])
    shaper = Shaper(spec, None, "ref")
    kept: dict[str, dict[str, dict]] = {"train": {}, "test": {}}
    for value in records:
        record = shaper(value)
        rid = record_id(record)
        split = shaper.split_of(value) or ("test" if int(rid[:15], 16) / 16**15 < test_fraction else "train")
        kept[split].setdefault(rid, {"id": rid, **record, "split": split})
    lines = [*kept["train"].values(), *(r for rid, r in kept["test"].items() if rid not in kept["train"])]
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines).encode()


def test_demo_data_is_bit_identical_through_shards_and_read_records(store, tmp_path):
    for name, (kind, records) in _demo_sets().items():
        records = [dict(r, task=name) if kind == "instruction" and "task" not in r else r for r in records]
        result = ingest_records(name, kind, records, store, tmp_path / "w", "p", shard_records=150)
        assert result.local_path.read_bytes() == _single_file_layout(kind, records), name
        shards = result.manifest["shards"]
        assert len(shards) >= 2 and all(s["records"] <= 150 for s in shards)
        ref = DatasetRef(name=name, kind=kind, digest=result.digest, uri=result.uri, data_file="data.jsonl")
        expected = list(iter_jsonl(result.local_path))
        # a fresh cache: read_records downloads the shards (verified) and streams them in order
        assert read_records(store, ref, tmp_path / "cache") == expected
        assert read_records(store, ref, tmp_path / "cache", split="test") == [r for r in expected if r["split"] == "test"]


def test_incremental_ticks_are_bit_identical_and_reference_the_parents_shards(store, tmp_path):
    spec = {"name": "feed", "shape": "alpaca", "sources": [{"uri": f"s3://{store.bucket}/in/feed/"}],
            "incremental": {"new_data": "next_task"}}  # fmt: skip
    results = []
    for tick, (start, count) in enumerate([(0, 3000), (3000, 500)]):
        store.put_file(write_jsonl(tmp_path / f"tick{tick}.jsonl", count, seed=5, start=start), f"in/feed/part-{tick}.jsonl")
        # a fresh work_dir per tick: a new worker, with nothing of the parent on its disk
        results.append(ingest_incremental(spec, store, tmp_path / f"worker{tick}", "p"))
    for tick, result in enumerate(results):
        assert result.rejected == TICK_REJECTED[tick]
    parent, child = results
    assert child.manifest["shards"][: len(parent.manifest["shards"])] == parent.manifest["shards"]
    # the tick read none of the parent's records: only its index segment came to the second worker
    assert not (tmp_path / "worker1" / "datasets" / "feed" / "shards" / f"{parent.manifest['shards'][0]['sha256']}.jsonl").exists()
    assert [_sha(r.local_path) for r in results] == TICK_SHA256
    assert child.tasks == ["feed-1", "feed-2"] and child.counts["train"] + child.counts["test"] == 3384

    noop = ingest_incremental(spec, store, tmp_path / "worker2", "p")
    assert not noop.created and noop.digest == child.digest
    assert noop.rejected == {} and noop.counts["read"] == 0 and noop.quarantine_path is None
    assert not (tmp_path / "worker2" / "datasets").exists() or not any((tmp_path / "worker2" / "datasets").rglob("*.jsonl"))


def test_unchanged_snapshot_is_skipped_without_parsing(store, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "snap.jsonl", 3000, seed=9)
    spec = {"name": "snap", "shape": "alpaca", "sources": [{"uri": str(path)}]}
    first = ingest_dataset(spec, store, tmp_path / "w1", "p", shard_records=1000)
    assert _sha(first.local_path) == SNAPSHOT_SHA256 and first.created and not first.skipped

    import perennial.ingest.readers as readers

    monkeypatch.setattr(readers, "_read_jsonl", lambda handle: pytest.fail("an unchanged snapshot was parsed"))
    again = ingest_dataset(spec, store, tmp_path / "w2", "p", shard_records=1000)
    assert again.skipped and not again.created and again.digest == first.digest
    assert again.counts["read"] == 0 and again.rejected == {}
    assert again.counts["train"] == first.counts["train"]
    monkeypatch.undo()

    with open(path, "a") as handle:  # one more record: read again, a new version
        handle.write(json.dumps({"instruction": "a new one", "output": "here"}) + "\n")
    changed = ingest_dataset(spec, store, tmp_path / "w3", "p", shard_records=1000)
    assert changed.created and not changed.skipped and changed.counts["read"] == 3001
    # unchanged shards are shared, not uploaded twice: the first full train shards are the same objects
    assert changed.manifest["shards"][0] == first.manifest["shards"][0]
    assert store.exists(join_key("p", "datasets", "snap", "shards", first.manifest["shards"][0]["sha256"] + ".jsonl"))


def test_leakage_is_reported_where_it_came_from_even_for_odd_object_keys(store, tmp_path):
    # an S3 key may hold a tab or a newline: the staging side file must not split on them
    key = "in/odd\tname\nhere/test.jsonl"
    store.put_bytes(f"in/odd\tname\nhere/train.jsonl", b'{"text": "shared doc"}\n{"text": "only train"}\n')
    store.put_bytes(key, b'{"text": "only test"}\n{"text": "shared doc"}\n')
    spec = {"name": "odd", "shape": "text", "sources": [{"uri": f"s3://{store.bucket}/in/"}]}
    result = ingest_dataset(spec, store, tmp_path / "w", "p")
    assert result.rejected == {"leakage": 1} and result.counts["train"] == 2 and result.counts["test"] == 1
    (entry,) = iter_jsonl(result.quarantine_path)
    assert entry["source"] == store.uri(key) and entry["record"] == 2


def test_a_version_from_before_shards_is_still_read_and_a_tick_on_it_says_what_to_do(store, tmp_path):
    from perennial.ingest import IngestError

    rows = [{"id": "a" * 64, "text": "old one", "split": "train"}, {"id": "b" * 64, "text": "old two", "split": "test"}]
    folder = tmp_path / "legacy"
    folder.mkdir()
    (folder / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    prefix = join_key("p", "datasets", "old", "0123456789abcdef")
    store.upload_dir(folder, prefix, meta={"name": "old", "kind": "text", "digest": "0123456789abcdef", "uri": store.uri(prefix)})
    ref = DatasetRef(name="old", kind="text", digest="0123456789abcdef", uri=store.uri(prefix), data_file="data.jsonl")
    assert read_records(store, ref, tmp_path / "cache") == rows
    assert read_records(store, ref, tmp_path / "cache", split="test") == rows[1:]

    store.put_json(join_key("p", "datasets", "old", "LATEST.json"), {"digest": "0123456789abcdef", "uri": store.uri(prefix)})
    store.put_bytes("feed/new.jsonl", b'{"text": "new"}\n')
    spec = {"name": "old", "shape": "text", "sources": [{"uri": f"s3://{store.bucket}/feed/"}], "incremental": {}}
    with pytest.raises(IngestError, match="predates sharded versions; ingest the dataset once more"):
        ingest_incremental(spec, store, tmp_path / "w", "p")
