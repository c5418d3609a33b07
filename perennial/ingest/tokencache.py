"""A tokenization cache keyed on (dataset digest, tokenizer digest, max_length, kind).

Tokenizing is the slow part of loading data for training; a dataset version never changes, so
its token ids are computed once per tokenizer and length and read back afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal

from perennial.ingest.core import content_digest, iter_jsonl

CACHE_FORMAT = 2  # bump when the cached layout or the encoding functions change meaning (2: no second BOS before a chat template)


def tokenizer_digest(tokenizer) -> str:
    """Content hash of a tokenizer: its tokenizer.json (fast) or vocabulary (slow), special ids and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    identity = {
        "class": type(tokenizer).__name__,
        "vocabulary": vocabulary,
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "chat_template": getattr(tokenizer, "chat_template", None),  # changes the rendered prompts
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def cache_key(dataset_digest: str, tokenizer_hash: str, max_length: int, kind: str) -> str:
    identity = [CACHE_FORMAT, dataset_digest, tokenizer_hash, max_length, kind]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]


def tokenize_cached(
    dataset_jsonl: str | Path,
    tokenizer,
    max_length: int,
    cache_dir: str | Path,
    kind: Literal["text", "instruction"],
) -> dict[str, list[dict]]:
    """Token ids per split: {"train": [...], "test": [...]}.

    instruction: one {"input_ids", "labels", "task"} per record (labels only on the response);
    text: packed blocks of ``max_length`` tokens, {"input_ids"} each (documents closed by EOS).
    A second call with the same inputs reads the cache file and tokenizes nothing.
    """
    from models.data import encode_instruction, pack_texts  # imports torch: only when needed

    dataset_jsonl = Path(dataset_jsonl)
    key = cache_key(content_digest(dataset_jsonl), tokenizer_digest(tokenizer), max_length, kind)
    path = Path(cache_dir) / f"{kind}-{key}.json"
    if path.is_file():
        return json.loads(path.read_text())

    splits: dict[str, list[dict]] = {"train": [], "test": []}
    if kind == "instruction":
        for record in iter_jsonl(dataset_jsonl):
            encoded = encode_instruction(tokenizer, record["prompt"], record["response"], max_length)
            splits[record["split"]].append({**encoded, "task": record["task"]})
    else:
        for split in splits:  # one streaming pass per split keeps the texts out of memory
            texts = (record["text"] for record in iter_jsonl(dataset_jsonl) if record["split"] == split)
            splits[split] = [{"input_ids": block} for block in pack_texts(tokenizer, texts, max_length)]

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(splits))
    os.replace(partial, path)  # a crash mid-write never leaves a truncated cache entry
    return splits
