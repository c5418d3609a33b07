"""Domain-adaptive pretraining: the domain corpus with a fraction of general text mixed in.

The result depends only on the input model, the two corpora, the DAP settings and the seed, so
it is committed under a key derived from their digests: retrains that change only continual
tuning (another method, another task list) reuse it instead of adapting again.
"""

from __future__ import annotations

import hashlib

from perennial.config import canonical_json
from perennial.storage import join_key
from tasks.ingest import DataBundle
from tasks.launch import run_stage
from tasks.runtime import RunContext, uri_to_prefix
from tasks.stage import StageData, stage_spec

STAGE = "dap"
# On the retrain's parent run: the DAP model it trained from, which `perennial gc` keeps while the run may resume
# or its version is kept (tasks/gc.py)
DAP_MODEL_TAG = "perennial.dap_model"


def dap_key(run: RunContext, base_model_uri: str, data: DataBundle) -> str:
    cfg = run.config
    manifest = run.store.read_manifest(uri_to_prefix(run.store, base_model_uri))
    if manifest is None:
        raise FileNotFoundError(f"{base_model_uri} is not committed (no manifest)")
    inputs = {
        "model": manifest["digest"],
        "domain": data.domain.digest,
        "general": data.general.digest,
        "dap": cfg.dap.model_dump(mode="json", exclude={"seed": True, "optim": {"activation_checkpointing"}}),  # memory only
        "seed": cfg.stage_seed("dap"),
        "attn_implementation": cfg.model.attn_implementation,
    }
    return hashlib.sha256(canonical_json(inputs).encode()).hexdigest()


def train_dap(run: RunContext, base_model_uri: str, data: DataBundle) -> str:
    cfg = run.config
    key = dap_key(run, base_model_uri, data)
    stage_root = join_key(cfg.storage.prefix, "dap-models", key[:24])
    # Said before training: `perennial gc` keeps the DAP model of a run that may still resume from it
    run.tracker.set_tags(run.parent_run_id, {DAP_MODEL_TAG: run.store.uri(f"{stage_root}/model")})
    with run.tracker.stage_run(STAGE, run.parent_run_id, tags={"stage": STAGE, "dap_key": key}) as child:
        run.tracker.log_params(child, {"domain_docs": data.domain.counts.get("train"), "general_mix_fraction": cfg.dap.general_mix_fraction})
        spec = stage_spec(
            run, STAGE, stage_root=stage_root, input_model_uri=base_model_uri,
            data=StageData(encoding="packed", datasets=[data.domain], general=data.general,
                           general_mix_fraction=cfg.dap.general_mix_fraction),
            optim=cfg.dap.optim, tuning=cfg.dap.tuning, seed=cfg.stage_seed("dap"), mlflow_run_id=child,
        )
        return run_stage(spec, run.services)
