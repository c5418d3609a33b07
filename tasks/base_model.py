"""Base model stage: a tiny Llama pretrained here, a GGUF file converted once, or a given model folder / hub id.

Each is committed to S3 under ``base-models/<source>-<key>``, the key a digest of everything the
model depends on (for GGUF, the file's sha256), so a second run with the same inputs reuses it.
"""

from __future__ import annotations

import hashlib
import shutil

from models.data import pack_texts
from models.engine import resolve_device, set_seed, train
from models.gguf import converted_dir, file_sha256, resolve_gguf
from models.loading import load_model_and_tokenizer, save_model
from models.tiny import build_tiny_llama, train_tokenizer
from perennial.config import canonical_json
from perennial.storage import join_key
from tasks.ingest import DatasetRef, read_records
from tasks.runtime import RunContext, committed_uri, open_store, open_tracker


def base_model_key(run: RunContext, general: DatasetRef | None) -> str:
    """Everything the base model depends on; the same key means the same model, so it is reused."""
    model_cfg = run.config.model
    if model_cfg.source == "tiny":
        inputs = {"general": general.digest, "tiny": model_cfg.tiny.model_dump(), "pretrain": model_cfg.pretrain.model_dump(), "seed": pretrain_seed(run)}
    elif model_cfg.source == "gguf":
        inputs = {"gguf_sha256": file_sha256(resolve_gguf(model_cfg.gguf_file))}
    else:
        inputs = {"name_or_path": model_cfg.name_or_path, "revision": model_cfg.revision}
    return hashlib.sha256(canonical_json(inputs).encode()).hexdigest()


def pretrain_seed(run: RunContext) -> int:
    return run.config.model.seed if run.config.model.seed is not None else run.config.seed


def prepare_base_model(run: RunContext, general: DatasetRef | None) -> str:
    cfg = run.config
    store = open_store(cfg)
    key = base_model_key(run, general)
    prefix = join_key(cfg.storage.prefix, "base-models", f"{cfg.model.source}-{key[:24]}")
    cached = committed_uri(store, prefix)
    tracker = open_tracker(cfg)
    if cached:
        tracker.set_tags(run.parent_run_id, {"base_model": cached, "base_model_cached": "true"})
        return cached

    out_dir = run.work_dir / "base-model"
    shutil.rmtree(out_dir, ignore_errors=True)
    if cfg.model.source == "tiny":
        set_seed(pretrain_seed(run))
        texts = [record["text"] for record in read_records(store, general, cfg.work_dir / "cache", split="train")]
        tokenizer = train_tokenizer(texts, cfg.model.tiny.vocab_size)
        model = build_tiny_llama(tokenizer, cfg.model.tiny, cfg.model.attn_implementation)
        blocks = [{"input_ids": block} for block in pack_texts(tokenizer, texts, cfg.model.pretrain.max_length)]
        child = tracker.start_stage_run("pretrain-base", run.parent_run_id)
        result = train(
            model,
            blocks,
            cfg.model.pretrain,
            seed=pretrain_seed(run),
            pad_token_id=tokenizer.pad_token_id,
            device=resolve_device(cfg.device),
            log_fn=lambda metrics, step: tracker.log_metrics(child, {f"train/{k}": v for k, v in metrics.items()}, step),
            desc="pretrain-base",
            precision=cfg.precision,
        )
        tracker.log_metrics(child, {"train/tokens_per_second": result.tokens_per_second}, result.steps)
        tracker.finish(child)
    elif cfg.model.source == "gguf":
        # Already a plain model folder (converted once per file content, kept in the local cache): upload it as is.
        converted, _ = converted_dir(cfg.model.gguf_file, cfg.work_dir / "cache" / "gguf")
        manifest = store.upload_dir(converted, prefix, meta={"key": key, "source": cfg.model.source})
        tracker.set_tags(run.parent_run_id, {"base_model": manifest["uri"], "base_model_cached": "false"})
        return manifest["uri"]
    else:
        model, tokenizer = load_model_and_tokenizer(cfg.model.name_or_path, cfg.model.revision, cfg.model.attn_implementation)
    save_model(model, tokenizer, out_dir)
    manifest = store.upload_dir(out_dir, prefix, meta={"key": key, "source": cfg.model.source})
    shutil.rmtree(out_dir, ignore_errors=True)
    tracker.set_tags(run.parent_run_id, {"base_model": manifest["uri"], "base_model_cached": "false"})
    return manifest["uri"]
