"""Every input format and every record shape, ingested for real into SeaweedFS."""

from __future__ import annotations

import csv
import io
import json
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perennial.config import IngestDatasetConfig, StorageConfig
from perennial.ingest import ingest_dataset, iter_json_array, iter_jsonl, record_id
from perennial.storage import ObjectStore

# Texts with the awkward parts real data has: commas and quotes (CSV), newlines inside a value,
# non-ASCII, surrounding whitespace that cleaning strips.
TEXTS = [
    "The river rose after the storm.",
    'A "quoted" word, with commas, inside.',
    "Ünïcödé café – naïve façade.",
    "  padded on both sides  ",
    "two\nlines",
    "Short.",
]
EXPECTED = [text.strip() for text in TEXTS]


def text_spec(uri: str, **source) -> IngestDatasetConfig:
    return IngestDatasetConfig(name="corpus", shape="text", sources=[{"uri": uri, **source}], test_fraction=0.3)


def ingest(spec, store, tmp_path, **kw):
    return ingest_dataset(spec, store, tmp_path / f"work-{uuid.uuid4().hex[:6]}", "perennial", **kw)


def texts_of(result) -> list[str]:
    return [record["text"] for record in iter_jsonl(result.local_path)]


# -- writers: the same records in each format ------------------------------------------------------


def write_jsonl(folder):
    path = folder / "part.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path, {}


def write_json_array(folder):
    path = folder / "part.json"
    path.write_text(json.dumps([{"text": t} for t in TEXTS], indent=1))
    return path, {}


def write_parquet(folder):
    path = folder / "part.parquet"
    pq.write_table(pa.table({"text": TEXTS}), path, row_group_size=2)  # several row groups
    return path, {}


def write_csv(folder):
    path = folder / "part.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text"])
        writer.writerows([[t] for t in TEXTS])
    return path, {}


def write_txt_files(folder):
    docs = folder / "docs"
    docs.mkdir()
    for number, text in enumerate(TEXTS):
        (docs / f"doc{number}.txt").write_text(text)
    return docs, {"txt_unit": "file"}


def write_hf_disk(folder):
    import datasets

    path = folder / "saved"
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(path))
    return path, {}


def write_hf_load_dataset(folder):
    path, _ = write_jsonl(folder)
    return path, {"format": "hf"}


WRITERS = [write_jsonl, write_json_array, write_parquet, write_csv, write_txt_files, write_hf_disk, write_hf_load_dataset]


def test_every_format_yields_the_same_dataset(store, tmp_path):
    """Same records in every format -> same canonical records, ids and content digest."""
    digests = {}
    for writer in WRITERS:
        folder = tmp_path / writer.__name__
        folder.mkdir()
        path, source = writer(folder)
        result = ingest(text_spec(str(path), **source), store, tmp_path)
        assert sorted(texts_of(result)) == sorted(EXPECTED), writer.__name__
        assert result.counts["train"] + result.counts["test"] == len(TEXTS)
        digests[writer.__name__] = result.digest
    # Folder order (doc0..doc5) and file order agree, so even the digest matches across formats.
    assert len(set(digests.values())) == 1, digests


def test_txt_one_document_per_line_skips_blank_lines(store, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first line\n\n   \nsecond line\r\nthird line\n")
    result = ingest(text_spec(str(path)), store, tmp_path)
    assert sorted(texts_of(result)) == ["first line", "second line", "third line"]
    assert result.counts["skipped_blank_lines"] == 2
    assert result.rejected == {}


def test_json_lines_saved_as_json_with_a_byte_order_mark(store, tmp_path):
    path = tmp_path / "lines.json"
    path.write_bytes("\ufeff".encode() + "".join(json.dumps({"text": t}) + "\n" for t in TEXTS).encode())
    result = ingest(text_spec(str(path)), store, tmp_path)
    assert sorted(texts_of(result)) == sorted(EXPECTED) and result.rejected == {}


def test_s3_prefix_source_with_its_own_bucket_and_credentials(services, store, tmp_path, monkeypatch):
    """An s3:// prefix in another bucket, credentials read from env variables the source names."""
    import os

    monkeypatch.setenv("SOURCE_KEY", os.environ["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("SOURCE_SECRET", os.environ["AWS_SECRET_ACCESS_KEY"])
    other = ObjectStore(StorageConfig(endpoint_url=services.s3_endpoint, bucket=f"src-{uuid.uuid4().hex[:10]}"))
    other.ensure_bucket()
    half = len(TEXTS) // 2
    other.put_bytes("incoming/a.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:half]).encode())
    other.put_bytes("incoming/b.json", json.dumps([{"text": t} for t in TEXTS[half:]]).encode())
    other.put_bytes("incoming/_SUCCESS", b"")  # no known format: ignored
    other.put_bytes("elsewhere/c.jsonl", b'{"text": "not under the prefix"}\n')
    spec = text_spec(
        f"s3://{other.bucket}/incoming",
        endpoint_url=services.s3_endpoint,
        access_key_env="SOURCE_KEY",
        secret_key_env="SOURCE_SECRET",
    )
    result = ingest(spec, store, tmp_path)
    assert sorted(texts_of(result)) == sorted(EXPECTED)
    uris = [entry["uri"] for entry in result.manifest["sources"]]
    assert uris == [f"s3://{other.bucket}/incoming/a.jsonl", f"s3://{other.bucket}/incoming/b.json"]
    assert all(entry["etag"] for entry in result.manifest["sources"])


def test_split_from_file_names_and_hf_dataset_dict(store, tmp_path):
    import datasets

    folder = tmp_path / "splits"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"text": "a train doc"}) + "\n")
    (folder / "valid.jsonl").write_text(json.dumps({"text": "a validation doc"}) + "\n")
    result = ingest(text_spec(str(folder)), store, tmp_path)
    assert {r["text"]: r["split"] for r in iter_jsonl(result.local_path)} == {"a train doc": "train", "a validation doc": "test"}

    saved = tmp_path / "dd"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": ["x train"]}), "test": datasets.Dataset.from_dict({"text": ["y test"]})}
    ).save_to_disk(str(saved))
    result = ingest(text_spec(str(saved)), store, tmp_path)
    assert {r["text"]: r["split"] for r in iter_jsonl(result.local_path)} == {"x train": "train", "y test": "test"}


# -- shapes ----------------------------------------------------------------------------------------


def shaped(store, tmp_path, records, **spec):
    path = tmp_path / f"{uuid.uuid4().hex[:6]}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = IngestDatasetConfig(name="tasky", sources=[{"uri": str(path), "split": "train"}], **spec)
    return ingest(spec, store, tmp_path)


def test_alpaca_shape(store, tmp_path):
    records = [
        {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
    ]
    result = shaped(store, tmp_path, records, shape="alpaca", task="maths")
    rows = list(iter_jsonl(result.local_path))
    assert [(r["task"], r["prompt"], r["response"], r["options"]) for r in rows] == [
        ("maths", "Add 2 and 3.", "5", None),
        ("maths", "Translate to French.\n\ncat", "chat", None),
    ]
    assert all(r["id"] == record_id(r) for r in rows)
    assert result.tasks == ["maths"]


def test_chat_shape_keeps_the_conversation_up_to_the_last_assistant_turn(store, tmp_path):
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "trailing turn, no answer"},
    ]
    result = shaped(store, tmp_path, [{"conv": conversation}], shape="chat", fields={"messages": "conv"})
    (row,) = iter_jsonl(result.local_path)
    assert row["messages"] == conversation[:4]  # every turn before the response, the system message included
    assert row["prompt"] == "Capital of France?"
    assert row["response"] == "Paris."
    assert row["id"] == record_id(row)


def test_classification_shape_with_labels_file_and_index_labels(store, tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(["World", "Sports"]))
    records = [{"sentence": "Match ends 2-1.", "label": "Sports"}, {"sentence": "Summit opens.", "label": 0}]
    result = shaped(
        store, tmp_path, records, shape="classification", labels_file=str(labels),
        instruction="What is the topic?", template="{instruction} Options: {options}. Text: {input}",
    )  # fmt: skip
    rows = list(iter_jsonl(result.local_path))
    assert [(r["prompt"], r["response"], r["options"]) for r in rows] == [
        ("What is the topic? Options: World, Sports. Text: Match ends 2-1.", "Sports", ["World", "Sports"]),
        ("What is the topic? Options: World, Sports. Text: Summit opens.", "World", ["World", "Sports"]),
    ]
    assert result.manifest["filters"]["labels"] == ["World", "Sports"]


def test_classification_field_mapping(store, tmp_path):
    records = [{"body": "Stocks fall.", "topic": "Business"}]
    result = shaped(
        store, tmp_path, records, shape="classification", labels=["Business", "Sports"], instruction="Topic?",
        fields={"input": "body", "output": "topic"},
    )  # fmt: skip
    (row,) = iter_jsonl(result.local_path)
    assert row["response"] == "Business" and "Stocks fall." in row["prompt"]


def test_canonical_instruction_shape_keeps_tasks_and_options(store, tmp_path):
    records = [
        {"task": "colour", "prompt": "Sky?", "response": "blue", "options": ["blue", "red"]},
        {"task": "maths", "prompt": "1+1?", "response": "2"},
    ]
    result = shaped(store, tmp_path, records, shape="instruction")
    rows = list(iter_jsonl(result.local_path))
    assert [(r["task"], r["options"]) for r in rows] == [("colour", ["blue", "red"]), ("maths", None)]
    assert result.tasks == ["colour", "maths"]
    assert [t["train"] for t in result.manifest["tasks"]] == [1, 1]


def test_text_shape_field_mapping(store, tmp_path):
    result = shaped(store, tmp_path, [{"body": "mapped text"}], shape="text", fields={"text": "body"})
    assert texts_of(result) == ["mapped text"]


# -- the streaming JSON array parser -----------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)


@settings(max_examples=100, deadline=None)
@given(values=st.lists(json_values, max_size=8), chunk=st.integers(1, 17), indent=st.sampled_from([None, 1]))
def test_json_array_parser_matches_json_loads(values, chunk, indent):
    """Whatever the chunk boundaries (1 character up), streaming equals loading the whole array."""
    text = json.dumps(values, indent=indent)
    assert list(iter_json_array(io.StringIO(text), chunk_size=chunk)) == json.loads(text)


@pytest.mark.parametrize("broken", ["[1, 2", "[1 2]", "{}", "[1,]"])
def test_json_array_parser_rejects_malformed_input(broken):
    with pytest.raises(ValueError):
        list(iter_json_array(io.StringIO(broken), chunk_size=2))


def test_skip_and_limit_read_disjoint_slices_of_one_file(store, tmp_path):
    path, _ = write_jsonl(tmp_path)
    first = texts_of(ingest(text_spec(str(path), limit=3), store, tmp_path))
    rest = texts_of(ingest(text_spec(str(path), skip=3, limit=2), store, tmp_path))
    assert sorted(first) == sorted(EXPECTED[:3])
    assert sorted(rest) == sorted(EXPECTED[3:5])  # the slice after the first one, and no more than limit
    assert sorted(texts_of(ingest(text_spec(str(path), skip=4), store, tmp_path))) == sorted(EXPECTED[4:])
