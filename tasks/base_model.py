"""Base model stage: a tiny Llama pretrained here, a GGUF file converted once, or a given model folder / hub id.

Each is committed to S3 under ``base-models/<source>-<key>``, the key a digest of everything the
model depends on (for GGUF, the file's sha256), so a second run with the same inputs reuses it.
"""

from __future__ import annotations

import hashlib
import shutil

from models.engine import set_seed
from models.gguf import converted_dir, file_sha256, resolve_gguf
from models.loading import load_model_and_tokenizer, save_model
from models.tiny import build_tiny_llama, train_tokenizer
from perennial.config import TuningConfig, canonical_json
from perennial.storage import join_key
from tasks.ingest import DatasetRef, read_records
from tasks.launch import run_stage
from tasks.runtime import RunContext, committed_uri
from tasks.stage import StageData, stage_spec

PRETRAIN_STAGE = "pretrain-base"


def base_model_key(run: RunContext, general: DatasetRef | None) -> str:
    """Everything the base model depends on; the same key means the same model, so it is reused."""
    model_cfg = run.config.model
    if model_cfg.source == "tiny":
        inputs = {"general": general.digest, "tiny": model_cfg.tiny.model_dump(), "pretrain": model_cfg.pretrain.model_dump(exclude={"activation_checkpointing"}), "seed": run.config.stage_seed("pretrain")}
    elif model_cfg.source == "gguf":
        inputs = {"gguf_sha256": file_sha256(resolve_gguf(model_cfg.gguf_file))}
    else:
        inputs = {"name_or_path": model_cfg.name_or_path, "revision": model_cfg.revision}
    return hashlib.sha256(canonical_json(inputs).encode()).hexdigest()


def prepare_base_model(run: RunContext, general: DatasetRef | None) -> str:
    """The committed base model's URI: pretrained (tiny), converted (gguf) or copied (local, hub) once per key."""
    cfg = run.config
    store, tracker = run.store, run.tracker
    key = base_model_key(run, general)
    prefix = join_key(cfg.storage.prefix, "base-models", f"{cfg.model.source}-{key[:24]}")
    if cfg.model.source == "tiny":
        cached = committed_uri(store, f"{prefix}/model")
        uri = cached or _pretrain_tiny(run, general, prefix)
    else:
        cached = committed_uri(store, prefix)
        uri = cached or _copy_base_model(run, prefix, key)
    # `base_model_uri`: the committed copy in S3 (a version's `base_model` tag names the model in words).
    tracker.set_tags(run.parent_run_id, {"base_model_uri": uri, "base_model_cached": "true" if cached else "false"})
    return uri


def _pretrain_tiny(run: RunContext, general: DatasetRef, prefix: str) -> str:
    """Build the tiny Llama and its tokenizer (committed under ``<prefix>/init``), then pretrain it
    as a stage: checkpointed and resumable like DAP and CIT, its output at ``<prefix>/model``."""
    cfg = run.config
    seed = cfg.stage_seed("pretrain")
    init_prefix = f"{prefix}/init"
    init_uri = committed_uri(run.store, init_prefix)
    if init_uri is None:
        set_seed(seed)
        texts = [record["text"] for record in read_records(run.store, general, run.services.cache_dir, split="train")]
        tokenizer = train_tokenizer(texts, cfg.model.tiny.vocab_size)
        model = build_tiny_llama(tokenizer, cfg.model.tiny, cfg.model.attn_implementation)
        local = save_model(model, tokenizer, run.work_dir / "base-model-init")
        init_uri = run.store.upload_dir(local, init_prefix, meta={"stage": "init", "source": "tiny"})["uri"]
        shutil.rmtree(local, ignore_errors=True)
    with run.tracker.stage_run(PRETRAIN_STAGE, run.parent_run_id) as child:
        spec = stage_spec(
            run, PRETRAIN_STAGE, stage_root=prefix, input_model_uri=init_uri,
            data=StageData(encoding="packed", datasets=[general]), optim=cfg.model.pretrain,
            tuning=TuningConfig(method="full"), seed=seed, mlflow_run_id=child,
        )
        return run_stage(spec, run.services)


def _copy_base_model(run: RunContext, prefix: str, key: str) -> str:
    cfg = run.config
    if cfg.model.source == "gguf":
        # Already a plain model folder (converted once per file content, kept in the local cache): upload it as is.
        local, _ = converted_dir(cfg.model.gguf_file, run.services.cache_dir / "gguf")
    else:
        model, tokenizer = load_model_and_tokenizer(cfg.model.name_or_path, cfg.model.revision, cfg.model.attn_implementation)
        local = save_model(model, tokenizer, run.work_dir / "base-model")
    manifest = run.store.upload_dir(local, prefix, meta={"key": key, "source": cfg.model.source})
    if cfg.model.source != "gguf":
        shutil.rmtree(local, ignore_errors=True)
    return manifest["uri"]
