"""The tokenization cache: keyed on dataset digest, tokenizer digest and max_length; hits do no work."""

from __future__ import annotations

import json

import pytest

from perennial.ingest import record_id, tokenize_cached

pytest.importorskip("transformers")


class CountingTokenizer:
    """A real tokenizer that counts its encode calls (the work the cache must avoid)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.calls = 0

    def encode(self, *args, **kwargs):
        self.calls += 1
        return self._tokenizer.encode(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.fixture(scope="module")
def tokenizer():
    from models.tiny import train_tokenizer

    texts = [f"what is {a} plus {b}? the answer is {a + b}." for a in range(20) for b in range(5)]
    return train_tokenizer(texts, vocab_size=300)


def write_dataset(path, kind):
    rows = []
    for n in range(12):
        if kind == "instruction":
            row = {"task": "sums", "prompt": f"what is {n} plus 2?", "response": str(n + 2), "options": None}
        else:
            row = {"text": f"the answer is {n}. " * 3}
        row = {"id": record_id(row), **row, "split": "test" if n % 4 == 0 else "train"}
        rows.append(json.dumps(row))
    path.write_text("\n".join(rows) + "\n")
    return path


def test_second_call_reads_the_cache_and_encodes_nothing(tokenizer, tmp_path):
    from models.data import IGNORE_INDEX

    data = write_dataset(tmp_path / "data.jsonl", "instruction")
    cache = tmp_path / "cache"
    first_tok = CountingTokenizer(tokenizer)
    first = tokenize_cached(data, first_tok, 32, cache, "instruction")
    assert first_tok.calls >= 24  # prompt and response of 12 records
    assert len(first["train"]) == 9 and len(first["test"]) == 3
    example = first["train"][0]
    assert example["task"] == "sums" and IGNORE_INDEX in example["labels"] and len(example["input_ids"]) <= 32
    (entry,) = cache.iterdir()
    mtime = entry.stat().st_mtime_ns

    again_tok = CountingTokenizer(tokenizer)
    again = tokenize_cached(data, again_tok, 32, cache, "instruction")
    assert again == first and again_tok.calls == 0
    assert entry.stat().st_mtime_ns == mtime and len(list(cache.iterdir())) == 1

    # Any part of the key changing means new work and a new entry.
    other_length = CountingTokenizer(tokenizer)
    tokenize_cached(data, other_length, 16, cache, "instruction")
    assert other_length.calls > 0 and len(list(cache.iterdir())) == 2

    data.write_text(data.read_text().replace("what is 1 plus", "what is one plus"))
    changed_data = CountingTokenizer(tokenizer)
    tokenize_cached(data, changed_data, 32, cache, "instruction")
    assert changed_data.calls > 0 and len(list(cache.iterdir())) == 3


def test_text_is_packed_into_blocks_and_cached(tokenizer, tmp_path):
    from models.tiny import train_tokenizer

    data = write_dataset(tmp_path / "data.jsonl", "text")
    cache = tmp_path / "cache"
    blocks = tokenize_cached(data, tokenizer, 16, cache, "text")
    assert blocks["train"] and all(len(block["input_ids"]) == 16 for block in blocks["train"])
    # A different tokenizer (other vocabulary) is a different key, even for the same data.
    other = CountingTokenizer(train_tokenizer(["completely different words here"] * 20, vocab_size=280))
    tokenize_cached(data, other, 16, cache, "text")
    assert other.calls > 0 and len(list(cache.iterdir())) == 2
