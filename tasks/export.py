"""Export a committed checkpoint as a plain Hugging Face folder (what `lm_eval --model hf` reads), or as
one GGUF file (what llama.cpp, Ollama and LM Studio read)."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mlflow.tracking import MlflowClient

from perennial.config import Config
from perennial.registry import resolve_checkpoint_uri
from perennial.storage import ObjectStore
from perennial.tracking import check_tracking_server
from tasks.runtime import fetch_dir

PERENNIAL_ONLY = ("perennial_plugins", "training.json", ".complete")


@contextmanager
def _verified_checkpoint(config: Config, model_uri: str, beside: Path) -> Iterator[Path]:
    """The verified checkpoint folder of ``model_uri``, downloaded into a temporary folder beside ``beside``
    (same disk as the export, not the working directory) and removed afterwards."""
    if model_uri.startswith("models:/"):  # fail fast: an unreachable server would read as a missing alias
        check_tracking_server(config.tracking.tracking_uri)
    checkpoint = resolve_checkpoint_uri(MlflowClient(tracking_uri=config.tracking.tracking_uri), model_uri)
    if not checkpoint.startswith("s3://"):
        raise ValueError(f"{model_uri} is not a model URI; pass models:/NAME@ALIAS, models:/NAME/VERSION "
                         "or s3://BUCKET/PREFIX of a committed model folder")
    # The URI names its bucket; the config's bucket is only where new runs write.
    bucket = checkpoint[len("s3://"):].split("/", 1)[0]
    store = ObjectStore(config.storage.model_copy(update={"bucket": bucket}))
    beside.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{beside.name}-download-", dir=beside.parent) as cache:
        yield fetch_dir(store, checkpoint, Path(cache))


def export_model(config: Config, model_uri: str, out_dir: str | Path) -> Path:
    """Copy the verified checkpoint (merged weights, config, tokenizer) without Perennial's own state.

    model_uri is `s3://BUCKET/PREFIX` of a committed model folder, read from BUCKET with the
    config's S3 endpoint and credentials, or `models:/NAME@ALIAS` / `models:/NAME/VERSION`, the
    version's checkpoint_uri tag from the registry at config.tracking.tracking_uri. The download
    goes to a temporary folder beside out_dir, removed afterwards.

    Raises FileExistsError: out_dir exists and is not an empty folder (checked before any
    download). ValueError: model_uri is neither kind. RegistryError: no such model, version or
    alias, or a version without checkpoint_uri. TrackingError: a models:/ URI and the tracking
    server is unreachable. FileNotFoundError: the folder is not committed.
    StorageError: S3 unreachable, credentials missing, or a digest mismatch.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty folder; choose an empty or new folder for the export")
    with _verified_checkpoint(config, model_uri, out_dir) as local:
        shutil.copytree(local, out_dir, ignore=shutil.ignore_patterns(*PERENNIAL_ONLY), dirs_exist_ok=True)
    return out_dir


def export_gguf(config: Config, model_uri: str, out_file: str | Path, dtype: str = "f16") -> Path:
    """The verified checkpoint of ``model_uri`` (as `export_model` resolves it) as one GGUF file, for
    llama.cpp, Ollama and LM Studio: weights in ``dtype`` (f32, f16, bf16), tokenizer and chat template
    in its metadata (models/gguf.py: write_gguf). The GGUF's name is the version's (e.g. perennial-demo-v3).

    Raises what `export_model` raises; FileExistsError when out_file exists, GGUFError for a dtype,
    architecture or tokenizer it cannot write (naming what it can), both before any download where
    they can be known.
    """
    from models.gguf import GGUF_DTYPES, GGUFError, write_gguf

    out_file = Path(out_file)
    if out_file.exists():
        raise FileExistsError(f"{out_file} exists; choose a new file name for the GGUF export")
    if dtype not in GGUF_DTYPES:
        raise GGUFError(f"GGUF export writes the dtypes {', '.join(GGUF_DTYPES)}; got {dtype!r}")
    name = model_uri.removeprefix("models:/").replace("@", "-").replace("/", "-v", 1) if model_uri.startswith("models:/") else None
    with _verified_checkpoint(config, model_uri, out_file) as local:
        return write_gguf(local, out_file, dtype, name=name)


def write_lm_eval_task(model_dir: str | Path, records: list[dict], out_dir: str | Path, name: str, scoring: str,
                       max_new_tokens: int, max_length: int) -> Path:
    """An lm-evaluation-harness task that scores ``records`` as Perennial's `score_task` does, under lm-eval's defaults.

    lm-eval encodes a context with add_special_tokens=False and applies no chat template unless told
    to, so each test record's context is the exact prompt window Perennial feeds (chat template or
    default template, BOS, cut to ``max_length`` tokens), written as text with its special tokens
    (`prompt_window_text`). generate: greedy answers of at most ``max_new_tokens`` tokens up to EOS,
    exact match after stripping surrounding whitespace (`exact_match`). options: the option plus EOS
    with the highest summed log-prob, as `option_logprobs` scores it (lm-eval moves the context's
    trailing whitespace into each choice, which adds the same term to every choice of a record).
    A prompt too long for ``max_length`` is cut for the longest option; Perennial cuts it for each
    option, so only such records can score differently. A record whose answer (``max_new_tokens``, or
    its longest option and EOS) would itself be cut is refused: lm-eval cannot cut one record's answer.

    Writes OUT_DIR/NAME.yaml and OUT_DIR/NAME.jsonl; returns OUT_DIR. Only records with split "test";
    a conversation's context is its whole rendered prompt window. Raises ValueError: no test
    records, an options record without options, a prompt that does not survive decode and
    re-encode, an answer cut by max_length, or an option that types a special token (lm-eval
    would encode it as one).
    """
    import json

    import yaml

    from models.data import encode_text, prompt_of, prompt_window_text
    from models.loading import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    test = [record for record in records if record.get("split", "test") == "test"]
    if not test:
        raise ValueError("no test records to write: pass an ingested data.jsonl (or records) with split 'test'")
    rows = []
    for record in test:
        if scoring == "options":
            if not record.get("options") or record["response"] not in record["options"]:
                raise ValueError(f"record {record.get('id')!r} has no options holding its response; use --scoring generate")
            for option in record["options"]:
                if encode_text(tokenizer, option) != tokenizer.encode(option, add_special_tokens=False):
                    raise ValueError(f"record {record.get('id')!r}: option {option[:60]!r} types a special token, which "
                                     "lm-eval would encode as a control token where Perennial scores text")
            answer = max(len(encode_text(tokenizer, option)) + 1 for option in record["options"])
        else:
            answer = max_new_tokens
        context, kept = prompt_window_text(tokenizer, prompt_of(record), answer, max_length)
        if kept < answer:
            raise ValueError(f"record {record.get('id')!r}: its prompt leaves room for {kept} of {answer} answer tokens "
                             f"within max_length {max_length}, and Perennial cuts that record's answer there, which lm-eval "
                             "cannot do for one record: raise --max-length or lower --max-new-tokens")
        if scoring == "options":
            rows.append({"context": context, "choices": [option + tokenizer.eos_token for option in record["options"]],
                         "answer": record["options"].index(record["response"])})
        else:
            rows.append({"context": context, "answer": record["response"]})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = (out_dir / f"{name}.jsonl").resolve()
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "doc_to_text": "{{context}}", "target_delimiter": ""}
    if scoring == "options":
        task |= {"output_type": "multiple_choice", "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
                 "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    else:
        task |= {"output_type": "generate_until", "doc_to_target": "{{answer}}",
                 "generation_kwargs": {"until": [tokenizer.eos_token], "do_sample": False, "max_gen_toks": max_new_tokens},
                 "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                  "regexes_to_ignore": [r"^\s+", r"\s+$"]}]}
    (out_dir / f"{name}.yaml").write_text(
        f"# Written by `perennial lm-eval-task` for the model in {Path(model_dir).resolve()}: contexts are the exact\n"
        "# prompt windows Perennial scores, so run lm_eval without --apply_chat_template.\n"
        + yaml.safe_dump(task, sort_keys=False)
    )
    return out_dir
