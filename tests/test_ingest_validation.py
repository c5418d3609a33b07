"""Validation, quarantine (against a golden report), dedup, leakage, splitting, errors, versioning."""

from __future__ import annotations

import json
import os
import uuid
from collections import Counter
from pathlib import Path

import pytest

from perennial.config import ConfigError, IngestDatasetConfig, build_config, load_config
from perennial.ingest import (
    EmptyDatasetError,
    IngestError,
    ingest_dataset,
    ingest_records,
    iter_jsonl,
    log_dataset_to_mlflow,
    record_id,
    version_digest,
)
from perennial.ingest.cli import main_ingest
from perennial.storage import MANIFEST_NAME, join_key, sha256_file

GOLDEN = Path(__file__).parent / "golden" / "ingest_quarantine.json"
LABELS = ["World", "Sports"]


def ingest(spec: dict, store, work: Path):
    return ingest_dataset(IngestDatasetConfig.model_validate(spec), store, work, "perennial")


def jsonl(path: Path, rows: list) -> Path:
    path.write_bytes(b"".join(row if isinstance(row, bytes) else (json.dumps(row) + "\n").encode() for row in rows))
    return path


# -- every kind of bad record, against the golden report --------------------------------------------


def classification_inputs(folder: Path) -> dict:
    """Each line's comment says why it is (or is not) rejected. Files are read in name order:
    broken.json, corrupt.parquet, test.jsonl, train.jsonl."""
    folder.mkdir()
    jsonl(folder / "train.jsonl", [
        {"sentence": "Election results are in.", "label": "World"},  # ok
        b'{"sentence": "broken", "label": \n',  # invalid_json
        ["a", "list"],  # wrong_type: not an object
        {"label": "World"},  # missing_field
        {"sentence": 42, "label": "World"},  # wrong_type: field
        {"sentence": "", "label": "World"},  # empty
        {"sentence": " \t ", "label": "Sports"},  # empty: whitespace only
        b'{"sentence": "caf\xe9 au lait", "label": "World"}\n',  # not_utf8: a Latin-1 byte
        {"sentence": "x" * 300, "label": "World"},  # too_long (max_chars 200)
        {"sentence": "Stocks rally.", "label": "Business"},  # label_not_in_set
        {"sentence": "Odd index.", "label": 7},  # label_not_in_set: index out of range
        {"sentence": "Team wins.", "label": "Sports", "split": "holdout"},  # bad_split
        {"sentence": " Election   results are in.", "label": "World"},  # duplicate after normalization
        {"sentence": "Cup final tonight.", "label": "Sports"},  # ok
        {"sentence": "Cup final tonight.", "label": "Sports", "split": "test"},  # duplicate: test.jsonl has it in test
    ])  # fmt: skip
    jsonl(folder / "test.jsonl", [
        {"sentence": "Cup final tonight.", "label": "Sports"},  # leakage: also in train
        {"sentence": "Peace talks resume.", "label": "World"},  # ok
        {"sentence": "Peace  talks resume.", "label": "World"},  # duplicate within test
    ])  # fmt: skip
    (folder / "broken.json").write_text('[{"sentence": "Rain stops play.", "label": "Sports"}, {"sentence": ')
    (folder / "corrupt.parquet").write_bytes(b"definitely not parquet")  # unreadable
    return {
        "name": "golden-cls", "shape": "classification", "labels": LABELS, "instruction": "Topic?",
        "max_chars": 200, "sources": [{"uri": str(folder)}],
    }  # fmt: skip


def chat_inputs(folder: Path) -> dict:
    folder.mkdir()
    jsonl(folder / "chats.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},  # ok
        {"messages": [{"role": "user", "content": "Anyone?"}]},  # bad_messages: no assistant
        {"messages": [{"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}]},  # bad_messages
        {"messages": ["not a message"]},  # wrong_type
        {"messages": "a string"},  # wrong_type
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "   "}]},  # empty
    ])  # fmt: skip
    return {"name": "golden-chat", "shape": "chat", "sources": [{"uri": str(folder), "split": "train"}]}


def report(result) -> dict:
    """The deterministic part of a run: counts, and (file, record, reason, detail) per rejection."""
    quarantine = [
        [Path(q["source"]).name, q["record"], q["reason"], q["detail"]] for q in iter_jsonl(result.quarantine_path)
    ]
    return {"counts": {k: result.counts[k] for k in ("train", "test", "read", "accepted")},
            "rejected": result.rejected, "quarantine": quarantine}  # fmt: skip


def test_quarantine_matches_golden_report(store, tmp_path):
    actual = {
        "classification": report(ingest(classification_inputs(tmp_path / "cls"), store, tmp_path / "w1")),
        "chat": report(ingest(chat_inputs(tmp_path / "chat"), store, tmp_path / "w2")),
    }
    if os.environ.get("PERENNIAL_UPDATE_GOLDEN"):  # regenerate after an intended change, then review the diff
        GOLDEN.write_text(json.dumps(actual, indent=1, ensure_ascii=False) + "\n")
    assert actual == json.loads(GOLDEN.read_text())
    # The golden covers every reason a single full ingest can produce.
    reasons = set(actual["classification"]["rejected"]) | set(actual["chat"]["rejected"])
    from perennial.ingest import REASONS

    assert reasons == set(REASONS) - {"duplicate_previous"}  # that one needs a parent: see incremental tests


def test_quarantine_and_data_files_are_well_formed(store, tmp_path):
    result = ingest(classification_inputs(tmp_path / "cls"), store, tmp_path / "w")
    rows = list(iter_jsonl(result.local_path))
    assert all(row["id"] == record_id(row) for row in rows)
    assert len({row["id"] for row in rows}) == len(rows)  # no duplicates left
    train = {row["id"] for row in rows if row["split"] == "train"}
    assert not any(row["id"] in train for row in rows if row["split"] == "test")  # no leakage left
    quarantined = list(iter_jsonl(result.quarantine_path))
    assert Counter(q["reason"] for q in quarantined) == result.rejected
    not_utf8 = next(q for q in quarantined if q["reason"] == "not_utf8")
    assert "\udce9" in not_utf8["value"]["sentence"]  # the bad byte is kept, escaped, for inspection


def test_truncate_instead_of_reject(store, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    jsonl(folder / "a.jsonl", [{"text": "word " * 100}, {"text": "short"}])
    result = ingest({"name": "t", "shape": "text", "max_chars": 50, "over_long": "truncate",
                     "sources": [{"uri": str(folder)}]}, store, tmp_path / "w")  # fmt: skip
    lengths = sorted(len(row["text"]) for row in iter_jsonl(result.local_path))
    assert lengths == [5, 49]  # cut at 50 characters, trailing space stripped
    assert result.counts["truncated"] == 1 and result.rejected == {}


# -- clear errors ---------------------------------------------------------------------------------


def test_all_invalid_file_raises_naming_file_and_first_bad_record(store, tmp_path):
    path = jsonl(tmp_path / "bad.jsonl", [{"sentence": "ok", "label": "Nope"}, {"label": "World"}])
    spec = {"name": "bad", "shape": "classification", "labels": LABELS, "instruction": "Topic?", "sources": [{"uri": str(path)}]}
    with pytest.raises(EmptyDatasetError) as caught:
        ingest(spec, store, tmp_path / "w")
    message = str(caught.value)
    assert str(path) in message and "record 1" in message and "label_not_in_set" in message
    assert "missing_field=1" in message
    assert not list(store.list(join_key("perennial", "datasets", "bad")))  # nothing was versioned


def test_empty_file_raises(store, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(EmptyDatasetError, match="no records at all"):
        ingest({"name": "e", "shape": "text", "sources": [{"uri": str(path)}]}, store, tmp_path / "w")


def test_missing_source_raises(store, tmp_path):
    with pytest.raises(ValueError, match="no such file or folder"):
        ingest({"name": "m", "shape": "text", "sources": [{"uri": str(tmp_path / "nope.jsonl")}]}, store, tmp_path / "w")


# -- integer labels (docs/ingestion.md "Integer labels") --------------------------------------------

STARS = ["1", "2", "3", "4", "5"]


def labelled(store, tmp_path: Path, name: str, labels: list[str], values: list, **spec) -> list[str]:
    """Each record's stored label in input order, or the reason it was quarantined for."""
    rows = [{"sentence": f"review number {index}", "label": value} for index, value in enumerate(values)]
    path = jsonl(tmp_path / f"{name}.jsonl", rows)
    result = ingest({"name": name, "shape": "classification", "labels": labels, "instruction": "Stars?",
                     "sources": [{"uri": str(path), "split": "train"}], **spec}, store, tmp_path / name)  # fmt: skip
    kept = {row["prompt"].rsplit("Input: ", 1)[1]: row["response"] for row in iter_jsonl(result.local_path)}
    dropped = {entry["value"]["sentence"]: entry["reason"] for entry in iter_jsonl(result.quarantine_path)}
    return [kept.get(row["sentence"]) or dropped[row["sentence"]] for row in rows]


def test_integer_labels_are_names_when_a_label_name_is_an_integer(store, tmp_path):
    values = [1, 5, "3", 2.0, " 4 ", 6, -1, 1.5, True, "five"]
    assert labelled(store, tmp_path, "stars", STARS, values) == [
        "1", "5", "3", "2", "4", "label_not_in_set", "label_not_in_set", "wrong_type", "wrong_type", "label_not_in_set",
    ]  # fmt: skip


def test_integer_labels_are_indexes_when_no_label_name_is_an_integer(store, tmp_path):
    values = [0, 1, "1", 1.0, "positive", 2, True, 0.5]
    assert labelled(store, tmp_path, "sentiment", ["negative", "positive"], values) == [
        "negative", "positive", "positive", "positive", "positive", "label_not_in_set", "wrong_type", "wrong_type",
    ]  # fmt: skip


def test_integer_labels_that_read_as_both_are_refused_until_declared(store, tmp_path):
    # 0 is no name of 1..5 stars but a valid index: the data may be 0-based indexes, and 1 then means "2"
    with pytest.raises(IngestError, match=r"dataset 'zero': label 0 is not a label name but is a valid index \(-> '1'\)\. "
                                          r".*Declare which it is: integer_labels: names .* or integer_labels: indexes"):
        labelled(store, tmp_path, "zero", STARS, [1, 0])
    assert not list(store.list(join_key("perennial", "datasets", "zero")))  # nothing was versioned
    assert labelled(store, tmp_path, "as-indexes", STARS, [0, 4, "4", 1.0, 5], integer_labels="indexes") == [
        "1", "5", "5", "2", "label_not_in_set"]
    assert labelled(store, tmp_path, "as-names", STARS, [0, 1, "5", 5.0], integer_labels="names") == [
        "label_not_in_set", "1", "5", "5"]


# -- dedup, leakage and hash splitting --------------------------------------------------------------


def test_hash_split_is_deterministic_and_follows_test_fraction(store, tmp_path):
    records = [{"text": f"document number {n} about topic {n % 7}"} for n in range(400)]
    first = ingest_records("split", "text", records, store, tmp_path / "w1", "perennial", test_fraction=0.25)
    second = ingest_records("split", "text", reversed(records), store, tmp_path / "w2", "perennial", test_fraction=0.25)
    split_of = lambda result: {row["id"]: row["split"] for row in iter_jsonl(result.local_path)}  # noqa: E731
    assert split_of(first) == split_of(second)  # input order does not move a record across splits
    assert 60 <= first.counts["test"] <= 140  # 25% of 400 = 100, binomial sd ~ 8.7
    assert first.digest != second.digest  # the JSONL keeps input order, so the digest sees the order


def test_duplicates_across_files_and_leakage_from_record_split(store, tmp_path):
    records = [
        {"prompt": "2+2?", "response": "4", "split": "train"},
        {"prompt": "2 + 2?", "response": "4", "split": "train"},  # not a duplicate: different content
        {"prompt": "2+2? ", "response": "4", "split": "train"},  # duplicate after normalization
        {"prompt": "2+2?", "response": "4", "split": "test"},  # leakage
        {"prompt": "3+3?", "response": "6", "split": "test"},
        {"prompt": "3+3?", "response": "6", "task": "other", "split": "test"},  # same content, other task: duplicate
    ]
    result = ingest_records("dd", "instruction", records, store, tmp_path / "w", "perennial", task="sums")
    assert result.rejected == {"duplicate": 2, "leakage": 1}
    assert result.counts["train"] == 2 and result.counts["test"] == 1


# -- versioning and lineage -----------------------------------------------------------------------


def test_digest_stable_across_runs_and_changes_with_data(store, tmp_path):
    path = jsonl(tmp_path / "a.jsonl", [{"text": f"line {n}"} for n in range(20)])
    spec = {"name": "v", "shape": "text", "sources": [{"uri": str(path)}]}
    first = ingest(spec, store, tmp_path / "w1")
    again = ingest(spec, store, tmp_path / "w2")
    assert again.digest == first.digest and first.created and not again.created
    assert again.skipped and again.counts["read"] == 0  # unchanged sources: nothing parsed
    # the digest is over the shards' sha256s (one shard per split here): a function of the records alone
    assert [shard["split"] for shard in first.manifest["shards"]] == ["train", "test"]
    assert first.digest == version_digest([shard["sha256"] for shard in first.manifest["shards"]])

    jsonl(path, [{"text": f"line {n}"} for n in range(19)] + [{"text": "line 19 changed"}])
    changed = ingest(spec, store, tmp_path / "w3")
    assert changed.digest != first.digest and changed.created


def test_version_is_committed_with_lineage_manifest(store, tmp_path):
    path = jsonl(tmp_path / "train.jsonl", [{"text": "alpha"}, {"text": "beta"}, {"text": ""}])
    result = ingest({"name": "lin", "shape": "text", "sources": [{"uri": str(path)}]}, store, tmp_path / "w")
    prefix = join_key("perennial", "datasets", "lin", result.digest)
    assert result.uri == store.uri(prefix)
    keys = sorted(info.key.rsplit("/", 1)[1] for info in store.list(prefix + "/"))
    assert keys == [MANIFEST_NAME, "index.sqlite", "quarantine.jsonl"]
    meta = store.read_manifest(prefix)["meta"]
    (shard,) = meta["shards"]
    assert store.exists(join_key("perennial", "datasets", "lin", "shards", shard["sha256"] + ".jsonl"))
    assert shard["sha256"] == sha256_file(result.local_path) and shard["records"] == 2
    assert meta["digest"] == result.digest and meta["counts"] == {"train": 2, "test": 0}
    assert meta["rejected"] == {"empty": 1}
    assert meta["sources"][0]["uri"] == str(path) and len(meta["sources"][0]["sha256"]) == 64
    assert meta["schema"]["fields"] == ["id", "text", "split"]
    assert meta["filters"]["max_chars"] == 20000
    assert store.get_json(join_key("perennial", "datasets", "lin", "LATEST.json"))["digest"] == result.digest


def test_ingest_records_takes_demo_style_records(store, tmp_path):
    from perennial.demo_data import demo_tasks, task_records

    task = demo_tasks(seed=3)["arithmetic"]
    records = task_records(task, train_count=30, eval_count=8, seed=3)
    result = ingest_records("arithmetic", "instruction", records, store, tmp_path / "w", "perennial")
    assert result.counts["train"] == 30 and result.counts["test"] == 8
    assert result.tasks == ["arithmetic"] and result.rejected == {}


def test_log_dataset_to_mlflow_uses_the_content_digest(services, store, tmp_path):
    import mlflow

    result = ingest_records("logged", "text", [{"text": "one"}, {"text": "two"}], store, tmp_path / "w", "perennial")
    mlflow.set_tracking_uri(services.mlflow_uri)
    mlflow.set_experiment(f"ingest-{uuid.uuid4().hex[:6]}")
    with mlflow.start_run() as run:
        log_dataset_to_mlflow(result)
    (logged,) = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    assert logged.dataset.digest == result.digest and logged.dataset.name == "logged"
    assert result.uri in logged.dataset.source


# -- config ---------------------------------------------------------------------------------------


def test_demo_default_is_unchanged_and_dataset_configs_are_checked():
    assert build_config({}).data.source == "demo"
    with pytest.raises(ConfigError, match="at least one dataset"):
        build_config({"data": {"source": "datasets"}})
    bad = [
        ({"name": "x", "shape": "text", "sources": [{"uri": "a"}], "fields": {"prompt": "p"}}, "do not apply"),
        ({"name": "x", "shape": "classification", "sources": [{"uri": "a"}], "instruction": "q"}, "exactly one of labels"),
        ({"name": "x", "shape": "classification", "sources": [{"uri": "a"}], "labels": ["a"], "instruction": "q",
          "template": "{question}"}, "placeholders"),  # fmt: skip
        ({"name": "../x", "shape": "text", "sources": [{"uri": "a"}]}, "name"),
        ({"name": "x", "shape": "text", "sources": [{"uri": "a", "colour": 1}]}, "unknown key"),
        ({"name": "x", "shape": "text", "sources": [{"uri": "a"}], "incremental": {"new_data": "next_task"}}, "no tasks"),
    ]
    for dataset, message in bad:
        with pytest.raises(ConfigError, match=message):
            build_config({"data": {"source": "datasets", "datasets": [dataset]}})


@pytest.mark.parametrize("name", ["cl-benchmark-ingest.yaml", "wikitext-ingest.yaml"])
def test_shipped_ingest_configs_load(name):
    cfg = load_config(Path(__file__).parents[1] / "configs" / name)
    assert cfg.data.source == "datasets" and cfg.data.datasets


def test_cli_ingests_a_config_and_fails_clearly(services, store, tmp_path, capsys):
    data = jsonl(tmp_path / "train.jsonl", [{"text": "cli one"}, {"text": "cli two"}])
    config = tmp_path / "ingest.yaml"
    config.write_text(json.dumps({
        "work_dir": str(tmp_path / "work"),
        "storage": {"endpoint_url": services.s3_endpoint, "bucket": store.bucket},
        "data": {"source": "datasets", "datasets": [{"name": "cli", "shape": "text", "sources": [{"uri": str(data)}]}]},
    }))  # fmt: skip  (JSON is valid YAML)
    assert main_ingest([str(config)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    summary = next(line for line in lines if "event" not in line)  # the events it announced follow the summaries
    assert summary["counts"]["train"] == 2 and summary["name"] == "cli"
    assert store.read_manifest(join_key("perennial", "datasets", "cli", summary["digest"])) is not None

    assert main_ingest([str(config), f"data.datasets=[{{name: cli, shape: text, sources: [{{uri: {tmp_path}/none.txt}}]}}]"]) == 2
    assert "no such file or folder" in capsys.readouterr().err


# -- max_chars bounds what the model sees: the assembled prompt and response (issue #22) ----------


@pytest.mark.parametrize("over_long", ["reject", "truncate"])
def test_max_chars_bounds_the_assembled_prompt_not_just_each_field(store, tmp_path, over_long):
    half = "word " * 3000  # 15,000 characters: each field alone is under max_chars
    (tmp_path / "a").mkdir(), (tmp_path / "c").mkdir()
    alpaca = jsonl(tmp_path / "a" / "train.jsonl", [
        {"instruction": half, "input": half, "output": "ok"},  # a 30,002-character prompt
        {"instruction": "short", "input": "also short", "output": "fine"},
    ])  # fmt: skip
    chat = jsonl(tmp_path / "c" / "train.jsonl", [
        {"messages": [{"role": "user", "content": half}, {"role": "user", "content": half}, {"role": "assistant", "content": "ok"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ])  # fmt: skip
    for shape, path in [("alpaca", alpaca), ("chat", chat)]:
        spec = {"name": f"long-{shape}", "shape": shape, "max_chars": 20000, "over_long": over_long,
                "sources": [{"uri": str(path)}]}  # fmt: skip
        result = ingest(spec, store, tmp_path / f"w-{shape}")
        rows = list(iter_jsonl(result.local_path))
        assert all(len(row["prompt"]) <= 20000 and len(row["response"]) <= 20000 for row in rows), shape
        if over_long == "reject":
            assert len(rows) == 1 and result.rejected == {"too_long": 1}, shape
            (entry,) = iter_jsonl(result.quarantine_path)
            assert "assembled prompt has 30" in entry["detail"], entry["detail"]
        else:
            assert len(rows) == 2 and result.counts["truncated"] == 1, shape
