"""Incremental ingestion against real SeaweedFS: watermark in S3, task sequences, idempotent reruns."""

from __future__ import annotations

import json
import shutil

import pytest

from perennial.config import IngestDatasetConfig
from perennial.ingest import EmptyDatasetError, ingest_incremental, iter_jsonl, read_watermark
from perennial.storage import join_key

PREFIX = "perennial"


def put_jsonl(store, key: str, rows: list[dict]) -> None:
    store.put_bytes(key, "".join(json.dumps(row) + "\n" for row in rows).encode())


def qa(n: int, task_word: str = "q") -> dict:
    return {"instruction": f"{task_word} question {n}?", "output": f"answer {n}"}


def spec_for(store, **incremental) -> IngestDatasetConfig:
    return IngestDatasetConfig(
        name="stream",
        shape="alpaca",
        task="feed",
        test_fraction=0.2,
        sources=[{"uri": f"s3://{store.bucket}/incoming/"}],
        incremental=incremental,
    )


def tick(spec, store, work):
    # A fresh local work dir every tick: everything the next tick needs must come from S3.
    shutil.rmtree(work, ignore_errors=True)
    return ingest_incremental(spec, store, work, PREFIX)


def test_new_objects_become_the_next_task_and_reruns_change_nothing(store, tmp_path):
    spec = spec_for(store, new_data="next_task")
    work = tmp_path / "work"
    put_jsonl(store, "incoming/day1.jsonl", [qa(n) for n in range(10)])

    first = tick(spec, store, work)
    assert first.created and first.tasks == ["feed-1"]
    assert first.counts["train"] + first.counts["test"] == 10
    (day1,) = store.list("incoming/day1.jsonl")
    watermark = read_watermark(store, PREFIX, "stream")
    assert watermark["processed"] == {f"s3://{store.bucket}/incoming/day1.jsonl": day1.etag}
    assert watermark["version"] == first.digest

    stored = lambda: sorted(info.key for info in store.list(join_key(PREFIX, "datasets", "stream") + "/"))  # noqa: E731
    before = stored()
    rerun = tick(spec, store, work)  # the same tick again: no new objects
    assert rerun.digest == first.digest and not rerun.created
    assert stored() == before  # no new version, nothing rewritten but the watermark

    # Day 2: three new records and two already ingested on day 1.
    put_jsonl(store, "incoming/day2.jsonl", [qa(n, "new") for n in range(3)] + [qa(0), qa(1)])
    second = tick(spec, store, work)
    assert second.created and second.digest != first.digest
    assert second.tasks == ["feed-1", "feed-2"]
    assert second.manifest["parent"] == first.digest
    assert second.rejected == {"duplicate_previous": 2}
    assert [s["uri"] for s in second.manifest["sources"]] == [f"s3://{store.bucket}/incoming/day2.jsonl"]
    rows = list(iter_jsonl(second.local_path))
    assert rows[:10] == list(iter_jsonl(first.local_path))  # the parent's records come first, unchanged
    assert [r["task"] for r in rows[10:]] == ["feed-2"] * 3
    assert len({r["id"] for r in rows}) == 13

    again = tick(spec, store, work)
    assert again.digest == second.digest and not again.created
    assert sum(1 for _ in iter_jsonl(again.local_path)) == 13


def test_append_mode_and_overwritten_objects(store, tmp_path):
    spec = spec_for(store, new_data="append", append_to="feed")
    work = tmp_path / "work"
    put_jsonl(store, "incoming/a.jsonl", [qa(n) for n in range(4)])
    first = tick(spec, store, work)
    assert first.tasks == ["feed"]

    # The same key overwritten with more records: a new ETag, so it is read again; old rows are duplicates.
    put_jsonl(store, "incoming/a.jsonl", [qa(n) for n in range(6)])
    second = tick(spec, store, work)
    assert second.tasks == ["feed"] and second.rejected == {"duplicate_previous": 4}
    assert second.counts["train"] + second.counts["test"] == 6

    # Objects whose records were all ingested already: the watermark moves on, no new version.
    put_jsonl(store, "incoming/b.jsonl", [qa(1), qa(2)])
    third = tick(spec, store, work)
    assert third.digest == second.digest and not third.created
    assert third.rejected == {"duplicate_previous": 2}
    assert f"s3://{store.bucket}/incoming/b.jsonl" in read_watermark(store, PREFIX, "stream")["processed"]


def test_invalid_new_object_fails_and_keeps_the_watermark(store, tmp_path):
    spec = spec_for(store)
    work = tmp_path / "work"
    put_jsonl(store, "incoming/good.jsonl", [qa(1)])
    first = tick(spec, store, work)
    put_jsonl(store, "incoming/bad.jsonl", [{"instruction": "no output"}])
    with pytest.raises(EmptyDatasetError, match=r"incoming/bad\.jsonl record 1: missing_field"):
        tick(spec, store, work)
    assert read_watermark(store, PREFIX, "stream")["version"] == first.digest
    assert f"s3://{store.bucket}/incoming/bad.jsonl" not in read_watermark(store, PREFIX, "stream")["processed"]


def test_first_tick_on_an_empty_prefix_is_an_error(store, tmp_path):
    with pytest.raises(EmptyDatasetError, match="nothing to ingest"):
        tick(spec_for(store), store, tmp_path / "work")
