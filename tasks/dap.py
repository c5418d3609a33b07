"""Domain-adaptive pretraining: the domain corpus with a fraction of general text mixed in.

The result depends only on the input model, the two corpora, the DAP settings and the seed, so
it is committed under a key derived from their digests: retrains that change only continual
tuning (another method, another task list) reuse it instead of adapting again.
"""

from __future__ import annotations

import hashlib

from models.cl.replay import mix_general
from models.data import pack_texts
from perennial.config import canonical_json
from perennial.storage import join_key
from tasks.ingest import DataBundle, read_records
from tasks.runtime import RunContext, open_store, open_tracker, uri_to_prefix
from tasks.training import run_stage

STAGE = "dap"


def dap_key(run: RunContext, base_model_uri: str, data: DataBundle) -> str:
    cfg = run.config
    store = open_store(cfg)
    manifest = store.read_manifest(uri_to_prefix(store, base_model_uri))
    if manifest is None:
        raise FileNotFoundError(f"{base_model_uri} is not committed (no manifest)")
    inputs = {
        "model": manifest["digest"],
        "domain": data.domain.digest,
        "general": data.general.digest,
        "dap": cfg.dap.model_dump(mode="json", exclude={"seed"}),
        "seed": dap_seed(run),
        "attn_implementation": cfg.model.attn_implementation,
    }
    return hashlib.sha256(canonical_json(inputs).encode()).hexdigest()


def dap_seed(run: RunContext) -> int:
    return run.config.dap.seed if run.config.dap.seed is not None else run.config.seed


def train_dap(run: RunContext, base_model_uri: str, data: DataBundle) -> str:
    cfg = run.config
    if cfg.dap.seed is not None:
        # The stage trains under its own seed; the run (keys, MLflow parent) stays the same.
        run = run.model_copy(update={"config": cfg.model_copy(update={"seed": cfg.dap.seed})})
        cfg = run.config
    store = open_store(cfg)
    cache = cfg.work_dir / "cache"
    domain = [r["text"] for r in read_records(store, data.domain, cache, split="train")]
    general = [r["text"] for r in read_records(store, data.general, cache, split="train")]
    texts = mix_general(domain, general, cfg.dap.general_mix_fraction, seed=dap_seed(run))

    def encode(tokenizer):
        return [{"input_ids": block} for block in pack_texts(tokenizer, texts, cfg.dap.optim.max_length)]

    key = dap_key(run, base_model_uri, data)
    tracker = open_tracker(cfg)
    child = tracker.start_stage_run(STAGE, run.parent_run_id, tags={"stage": STAGE, "dap_key": key})
    tracker.log_params(child, {"domain_docs": len(domain), "general_mix_fraction": cfg.dap.general_mix_fraction, "mixed_docs": len(texts)})
    uri = run_stage(
        run, STAGE, base_model_uri, encode, cfg.dap.optim, cfg.dap.tuning, mlflow_run_id=child,
        stage_root=join_key(cfg.storage.prefix, "dap-models", key[:24]),
    )
    tracker.finish(child)
    return uri
