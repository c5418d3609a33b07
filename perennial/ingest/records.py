"""From one input record of a configured shape to one canonical record, or a rejection with a reason.

Canonical records (models/data.py):
- text:        {"id", "text", "split"}
- instruction: {"id", "task", "prompt", "response", "options", "split"}; a conversation (shape chat with
               more than one user turn, a system message or earlier assistant turns) also has "messages",
               the turns before its response, between "options" and "split"

``id`` is the sha256 of the normalized content, so exact-duplicate removal, leakage checks and the
hash split all agree on what "the same record" means.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import re
import unicodedata
from json.encoder import encode_basestring as _json_string  # the C encoder json.dumps(ensure_ascii=False) uses
from pathlib import Path
from typing import Any

from perennial.config import IngestDatasetConfig
from perennial.ingest.readers import IngestError, split_from_name

# Every reason a record can be quarantined for (docs/ingestion.md explains each).
REASONS = (
    "invalid_json",  # a line or array element that does not parse
    "unreadable",  # a file the reader cannot open as its format (the rest of that file is lost)
    "wrong_type",  # the record or a field has the wrong type (e.g. a number where text belongs)
    "missing_field",  # a required field is absent or null
    "not_utf8",  # a field holds bytes that are not valid UTF-8
    "empty",  # a required text is empty or whitespace only
    "too_long",  # a field is longer than max_chars (with over_long=reject)
    "label_not_in_set",  # a classification label (or a response) outside the declared options
    "bad_messages",  # a chat without an assistant turn, without a user turn before it, or with another role
    "bad_split",  # a split field that is neither train nor test (nor a known alias)
    "duplicate",  # same id as an earlier record of this dataset, same split
    "duplicate_previous",  # same id as a record of the version this run builds on (incremental)
    "leakage",  # a test record whose id is also in train
)
_SURROGATE = re.compile("[\ud800-\udfff]")
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_INTEGER = re.compile(r"^[+-]?[0-9]+$")  # a label name or label text that is an integer


class Rejected(Exception):
    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def clean(text: str) -> str:
    """The stored form: NFC, Unix newlines, no surrounding whitespace (inner layout is kept)."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    # NFC leaves ASCII unchanged, and isascii() is a flag lookup: most text skips the normalizer.
    return (text if text.isascii() else unicodedata.normalize("NFC", text)).strip()


def normalize(text: str) -> str:
    """The compared form for ids: NFKC with all whitespace runs collapsed to one space."""
    return " ".join((text if text.isascii() else unicodedata.normalize("NFKC", text)).split())


def record_id(record: dict) -> str:
    """sha256 of the normalized content. The task name is not content: the same example under two
    task names is a duplicate.

    The hashed bytes are exactly ``json.dumps(content, ensure_ascii=False)`` of the normalized text,
    or of ``[prompt, response, options]``, with ``[[role, content], ...]`` of the messages appended
    for a conversation (so two chats that differ only in an earlier turn are different records);
    they are assembled with the standard library's C string encoder, which is what json.dumps
    calls, without json.dumps' per-call setup (a hot loop).
    """
    if "text" in record:
        content = _json_string(normalize(record["text"]))
    else:
        options = record["options"]
        listed = "null" if options is None else "[" + ", ".join(_json_string(normalize(o)) for o in options) + "]"
        content = "[" + _json_string(normalize(record["prompt"])) + ", " + _json_string(normalize(record["response"])) + ", " + listed
        if record.get("messages"):
            turns = ", ".join("[" + _json_string(m["role"]) + ", " + _json_string(normalize(m["content"])) + "]" for m in record["messages"])
            content += ", [" + turns + "]"
        content += "]"
    return hashlib.sha256(content.encode()).hexdigest()


def canonical_line(record_id: str, record: dict, split: str) -> str:
    """One line of data.jsonl: ``json.dumps({"id", **record, "split"}, ensure_ascii=False) + "\n"``,
    byte for byte, assembled with the same C string encoder (ids and splits need no escaping)."""
    if "text" in record:
        return '{"id": "' + record_id + '", "text": ' + _json_string(record["text"]) + ', "split": "' + split + '"}\n'
    options = record["options"]
    listed = "null" if options is None else "[" + ", ".join(_json_string(o) for o in options) + "]"
    if record.get("messages"):
        listed += ', "messages": [' + ", ".join(
            '{"role": ' + _json_string(m["role"]) + ', "content": ' + _json_string(m["content"]) + "}" for m in record["messages"]
        ) + "]"
    return ('{"id": "' + record_id + '", "task": ' + _json_string(record["task"]) + ', "prompt": ' + _json_string(record["prompt"])
            + ', "response": ' + _json_string(record["response"]) + ', "options": ' + listed + ', "split": "' + split + '"}\n')  # fmt: skip


def load_labels(spec: IngestDatasetConfig) -> list[str] | None:
    """The label set of a classification dataset: inline, or read from labels_file."""
    if spec.shape != "classification":
        return None
    if spec.labels is not None:
        labels = spec.labels
    else:
        path = Path(spec.labels_file)
        try:
            labels = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ValueError(f"dataset {spec.name!r}: cannot read labels_file {path}: {error}") from None
    if not isinstance(labels, list) or not labels or not all(isinstance(label, str) and label.strip() for label in labels):
        raise ValueError(f"dataset {spec.name!r}: the label set must be a non-empty list of non-empty strings")
    labels = [clean(label) for label in labels]
    if len(set(labels)) != len(labels):
        raise ValueError(f"dataset {spec.name!r}: the label set repeats a label: {labels}")
    return labels


class Shaper:
    """Turns input records of one dataset's shape into canonical records (without id and split)."""

    def __init__(self, spec: IngestDatasetConfig, labels: list[str] | None, task: str, task_from_record: bool = True):
        self.spec, self.labels, self.task, self.task_from_record = spec, labels, task, task_from_record
        self.truncated = 0
        # How integer labels are read, decided once per dataset so that every record reads the same
        # way: an integer can only be an index when no label name is an integer.
        self.integers = spec.integer_labels
        if labels is not None and self.integers == "auto":
            self.integers = "names" if any(_INTEGER.match(label) for label in labels) else "indexes"

    def __call__(self, value: Any) -> dict:
        shape = self.spec.shape
        if shape == "text" and isinstance(value, str):  # txt files yield bare lines / documents
            return {"text": self._check("text", value, required=True)}
        if not isinstance(value, dict):
            raise Rejected("wrong_type", f"a record must be an object, got {type(value).__name__}")
        if shape == "text":
            return {"text": self._string(value, "text")}
        if shape == "alpaca":
            instruction = self._string(value, "instruction")
            extra = self._string(value, "input", required=False)
            prompt = f"{instruction}\n\n{extra}" if extra else instruction
            return self._instruction(prompt, self._string(value, "output"), None)
        if shape == "chat":
            return self._chat(value)
        if shape == "classification":
            text = self._string(value, "input")
            label = self._label(value)
            options = ", ".join(self.labels)
            prompt = self.spec.template.format(instruction=self.spec.instruction, options=options, input=text)
            return self._instruction(prompt, label, list(self.labels))
        # shape == "instruction": already canonical fields
        prompt, response = self._string(value, "prompt"), self._string(value, "response")
        options = self._options(value)
        if options is not None and response not in options:
            raise Rejected("label_not_in_set", f"response {response[:80]!r} is not one of the options {options}")
        return self._instruction(prompt, response, options, value)

    def split_of(self, value: Any) -> str | None:
        """A split named by the record itself (train/test and aliases), None when it names none."""
        if not isinstance(value, dict):
            return None
        raw = value.get(self.spec.field("split"))
        if raw is None:
            return None
        split = split_from_name(raw) if isinstance(raw, str) else None
        if split is None:
            raise Rejected("bad_split", f"split {raw!r} is not train or test (or valid/validation/dev/eval)")
        return split

    # -- pieces -------------------------------------------------------------------------------

    def _instruction(self, prompt: str, response: str, options: list[str] | None, value: dict | None = None,
                     messages: list[dict] | None = None) -> dict:
        task = self.task
        if self.task_from_record and value is not None and value.get(self.spec.field("task")) is not None:
            task = value[self.spec.field("task")]
            if not isinstance(task, str) or not _TASK_NAME.match(task):
                raise Rejected("wrong_type", f"task {task!r} is not a name (letters, digits, '.', '_', '-')")
        # Each field passed its own check; the model sees the assembled prompt (an alpaca instruction
        # plus its input, a classification template), so that is what max_chars bounds (a chat's: `_chat`).
        prompt, response = self._limit("prompt", prompt), self._limit("response", response)
        record = {"task": task, "prompt": prompt, "response": response, "options": options}
        if messages:
            record["messages"] = messages
        return record

    def _limit(self, name: str, text: str) -> str:
        limit = self.spec.max_chars
        if len(text) <= limit:
            return text
        if self.spec.over_long == "reject":
            raise Rejected("too_long", f"the assembled {name} has {len(text)} characters > max_chars {limit}")
        self.truncated += 1
        return text[:limit].rstrip()

    def _string(self, value: dict, canonical: str, required: bool = True) -> str:
        name = self.spec.field(canonical)
        raw = value.get(name)
        if raw is None:
            if required:
                raise Rejected("missing_field", f"field {name!r} is missing")
            return ""
        return self._check(name, raw, required)

    def _check(self, name: str, raw: Any, required: bool) -> str:
        """Type, encoding, emptiness and length checks of one text field; returns the cleaned text."""
        if isinstance(raw, bytes):  # binary columns (Parquet, datasets) arrive as bytes
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise Rejected("not_utf8", f"field {name!r} has a byte that is not UTF-8 at offset {error.start}") from None
        if not isinstance(raw, str):
            raise Rejected("wrong_type", f"field {name!r} must be text, got {type(raw).__name__}")
        bad = None if raw.isascii() else _SURROGATE.search(raw)  # ASCII holds no surrogate
        if bad:  # a byte the reader could not decode (surrogateescape) or an unpaired \\u escape
            raise Rejected("not_utf8", f"field {name!r} holds bytes that are not valid UTF-8 (character {bad.start()})")
        text = clean(raw)
        if required and not text:
            raise Rejected("empty", f"field {name!r} is empty or whitespace only")
        limit = self.spec.max_chars
        if len(text) > limit:
            if self.spec.over_long == "reject":
                raise Rejected("too_long", f"field {name!r} has {len(text)} characters > max_chars {limit}")
            text = text[:limit].rstrip()
            self.truncated += 1
        return text

    def _label(self, value: dict) -> str:
        """The label name of a classification record (docs/ingestion.md, "Integer labels").

        Raises Rejected for a label outside the set or of the wrong type, and IngestError when
        integer_labels is auto, a label name is an integer, and a label is an integer that is no
        name but a valid index: the dataset then holds indexes, or both encodings, and the labels
        already read as names may be wrong.
        """
        name = self.spec.field("output")
        raw = value.get(name)
        if raw is None:
            raise Rejected("missing_field", f"field {name!r} is missing")
        if isinstance(raw, bool):  # an int to Python, but neither a name nor an index
            raise Rejected("wrong_type", f"label {raw!r} is a boolean; give the label name or its index")
        if isinstance(raw, numbers.Real):  # numpy scalars from Parquet and datasets count too
            if not float(raw).is_integer():
                raise Rejected("wrong_type", f"label {raw!r} is not a whole number, so neither a label name nor an index")
            number = int(raw)  # 2.0 (an integer column with nulls, read as floats) is 2
            label = str(number)
        else:
            label = self._check(name, raw, required=True)
            number = int(label) if _INTEGER.match(label) else None
        if number is not None and self.integers == "indexes":
            if 0 <= number < len(self.labels):
                return self.labels[number]
            raise Rejected("label_not_in_set", f"label index {number} is outside 0..{len(self.labels) - 1}")
        if label in self.labels:
            return label
        if number is not None and self.spec.integer_labels == "auto" and 0 <= number < len(self.labels):
            raise IngestError(
                f"dataset {self.spec.name!r}: label {raw!r} is not a label name but is a valid index (-> "
                f"{self.labels[number]!r}). The label set {self.labels} has integer names, so integer labels are read "
                "as names; this dataset also has labels that look like indexes. Declare which it is: "
                "integer_labels: names (such labels are then quarantined) or integer_labels: indexes "
                f"(0 -> {self.labels[0]!r}, the ClassLabel encoding)"
            )
        raise Rejected("label_not_in_set", f"label {label[:80]!r} is not in the label set {self.labels}")

    def _options(self, value: dict) -> list[str] | None:
        name = self.spec.field("options")
        raw = value.get(name)
        if raw is None:
            return None
        if not isinstance(raw, list) or not raw:
            raise Rejected("wrong_type", f"field {name!r} must be a non-empty list of strings or null")
        return [self._check(name, option, required=True) for option in raw]

    def _chat(self, value: dict) -> dict:
        """A chat's turns up to its last assistant turn: that turn is the response, the ones before it the
        conversation (``messages``, kept whole: system message, user turns and earlier assistant turns);
        ``prompt`` is its last user turn. A chat of one user turn and the answer is a plain record."""
        name = self.spec.field("messages")
        messages = value.get(name)
        if messages is None:
            raise Rejected("missing_field", f"field {name!r} is missing")
        if not isinstance(messages, list):
            raise Rejected("wrong_type", f"field {name!r} must be a list of messages, got {type(messages).__name__}")
        role_key, content_key = self.spec.field("role"), self.spec.field("content")
        turns = []
        for number, message in enumerate(messages, 1):
            if not isinstance(message, dict) or not isinstance(message.get(role_key), str):
                raise Rejected("wrong_type", f"{name}[{number}] must be an object with a string {role_key!r}")
            if message[role_key] not in ("system", "user", "assistant"):
                raise Rejected("bad_messages", f"{name}[{number}] has role {message[role_key]!r}; a chat holds system, "
                                               "user and assistant turns")
            turns.append((message[role_key], message.get(content_key), number))
        last = max((i for i, (role, _, _) in enumerate(turns) if role == "assistant"), default=None)
        if last is None:
            raise Rejected("bad_messages", "the conversation has no assistant turn")
        if not any(role == "user" for role, _, _ in turns[:last]):
            raise Rejected("bad_messages", "no user turn before the last assistant turn")
        context = [{"role": role, "content": self._check(f"{name}[{n}].{content_key}", content, True)}
                   for role, content, n in turns[:last]]
        _, content, number = turns[last]
        context = self._fit_conversation(context)
        prompt = next(message["content"] for message in reversed(context) if message["role"] == "user")
        conversation = context if len(context) > 1 else None
        return self._instruction(prompt, self._check(f"{name}[{number}].{content_key}", content, True), None, messages=conversation)

    def _fit_conversation(self, context: list[dict]) -> list[dict]:
        """max_chars bounds the assembled conversation (its turns joined by blank lines): over it, the
        record is rejected, or (over_long=truncate) loses whole earliest exchanges, then its system
        message, as training drops turns that do not fit max_length."""
        limit = self.spec.max_chars
        length = lambda turns: len("\n\n".join(message["content"] for message in turns))  # noqa: E731
        if length(context) <= limit:
            return context
        if self.spec.over_long == "reject":
            raise Rejected("too_long", f"the assembled prompt has {length(context)} characters > max_chars {limit}")
        self.truncated += 1
        lead = next((i for i, message in enumerate(context) if message["role"] != "system"), len(context))
        system, rest = context[:lead], context[lead:]
        while length(system + rest) > limit and sum(message["role"] == "user" for message in rest) > 1:
            first_user_after = next(i for i, message in enumerate(rest) if i > 0 and message["role"] == "user")
            rest = rest[first_user_after:]
        return system + rest if length(system + rest) <= limit else rest
