"""Domain-adaptive pretraining: the domain corpus with a fraction of general text mixed in."""

from __future__ import annotations

from models.cl.replay import mix_general
from models.data import pack_texts
from tasks.ingest import DataBundle, read_records
from tasks.runtime import RunContext, open_store, open_tracker
from tasks.training import run_stage

STAGE = "dap"


def train_dap(run: RunContext, base_model_uri: str, data: DataBundle) -> str:
    cfg = run.config
    store = open_store(cfg)
    cache = cfg.work_dir / "cache"
    domain = [r["text"] for r in read_records(store, data.domain, cache, split="train")]
    general = [r["text"] for r in read_records(store, data.general, cache, split="train")]
    texts = mix_general(domain, general, cfg.dap.general_mix_fraction, seed=cfg.seed)

    def encode(tokenizer):
        return [{"input_ids": block} for block in pack_texts(tokenizer, texts, cfg.dap.optim.max_length)]

    tracker = open_tracker(cfg)
    child = tracker.start_run(STAGE, parent_id=run.parent_run_id, tags={"stage": STAGE})
    tracker.log_params(child, {"domain_docs": len(domain), "general_mix_fraction": cfg.dap.general_mix_fraction, "mixed_docs": len(texts)})
    uri = run_stage(run, STAGE, base_model_uri, encode, cfg.dap.optim, cfg.dap.tuning, mlflow_run_id=child)
    tracker.finish(child)
    return uri
