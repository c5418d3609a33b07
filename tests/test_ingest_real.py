"""A real subset of the shipped configs' data (agnews, dbpedia, wikitext-2), when ../shared/datasets exists."""

from __future__ import annotations

from pathlib import Path

import pytest

from perennial.config import load_config
from perennial.ingest import ingest_dataset, iter_jsonl

ROOT = Path(__file__).parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/datasets is not available")


def spec_from(config: str, name: str, limit: int):
    """The dataset as the shipped config defines it, reading only the first ``limit`` records per source."""
    (spec,) = [s for s in load_config(ROOT / "configs" / config).data.datasets if s.name == name]
    return spec.model_copy(update={"sources": [s.model_copy(update={"limit": limit}) for s in spec.sources]})


@pytest.fixture
def in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs' paths are relative to the repository root


def test_agnews_subset(in_repo_root, store, tmp_path):
    spec = spec_from("cl-benchmark-ingest.yaml", "agnews", limit=150)
    result = ingest_dataset(spec, store, tmp_path, "perennial")
    rows = list(iter_jsonl(result.local_path))
    labels = ["World", "Sports", "Business", "Science or Technology"]
    assert result.counts["read"] == 300
    assert 250 <= result.counts["train"] + result.counts["test"] <= 300  # real data: a few duplicates at most
    assert {r["split"] for r in rows} == {"train", "test"}
    assert all(r["response"] in labels and r["options"] == labels for r in rows)
    assert all(r["prompt"].startswith("What is the topic of the following paragraph?") for r in rows)
    assert result.tasks == ["agnews"]


def test_dbpedia_has_no_train_file_so_it_is_hash_split(in_repo_root, store, tmp_path):
    result = ingest_dataset(spec_from("cl-benchmark-ingest.yaml", "dbpedia", limit=200), store, tmp_path, "perennial")
    assert result.counts["train"] > 0 and 10 <= result.counts["test"] <= 70  # test_fraction 0.2 of ~200


def test_wikitext_subset(in_repo_root, store, tmp_path):
    result = ingest_dataset(spec_from("wikitext-ingest.yaml", "wikitext-2", limit=100), store, tmp_path, "perennial")
    rows = list(iter_jsonl(result.local_path))
    assert result.counts["skipped_blank_lines"] > 0  # wikitext separates paragraphs with blank lines
    assert result.counts["train"] > 50 and result.counts["test"] > 50
    assert all(r["text"] == r["text"].strip() and r["text"] for r in rows)
    assert result.manifest["role"] == "general"
