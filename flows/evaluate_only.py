"""Evaluation only: score a given model on the configured evaluation sets, no training.

Composes the existing tasks: preflight -> ingest -> evaluate -> report. The model is an S3
checkpoint URI (s3://bucket/.../MANIFEST-committed folder) or a registry reference,
`models:/NAME@champion` or `models:/NAME/7`, resolved to the version's `checkpoint_uri` tag.
Use it to re-score the champion after the evaluation data changed, or to compare a checkpoint
with the registry before promoting it by hand.
"""

from __future__ import annotations

import hashlib

from mlflow.tracking import MlflowClient
from prefect import flow

from perennial.config import Config, load_config
from perennial.registry import resolve_checkpoint_uri
from tasks.runtime import failed_on_error
from tasks.wrappers import evaluation_stage, finish_stage, ingest_stage, inputs_stage, preflight_stage, report_stage


@flow(name="evaluate-only", log_prints=True)
def evaluate_only(
    model_uri: str,
    config_path: str | None = None,
    overrides: list[str] | None = None,
    config: dict | None = None,
    run_key: str | None = None,
) -> dict:
    cfg = Config.model_validate(config) if config is not None else load_config(config_path, overrides)
    checkpoint = resolve_checkpoint_uri(MlflowClient(tracking_uri=cfg.tracking.tracking_uri), model_uri)
    # Its own run key: the retrain's key (run_name + config digest) would find the retrain's run
    # and its cached stage-0 evaluation. The same model and config evaluated twice is a cached no-op.
    digest = hashlib.sha256(f"{checkpoint}|{cfg.digest()}".encode()).hexdigest()[:12]
    run = preflight_stage(cfg, run_key or f"{cfg.run_name}-eval-{digest}")
    with failed_on_error(run):
        data = ingest_stage(run, training=False)
        run = inputs_stage(run, data)  # new evaluation data under a used key is scored under a derived key
    with failed_on_error(run):
        # Stage 0 is the only stage, so output drift is measured against the model itself (zero);
        # scores and general perplexity are what this flow is for.
        evaluation = evaluation_stage(run, checkpoint, data, 0, "evaluate-only")
        summary = report_stage(run, data, [evaluation])
        finish_stage(run)
    scores = {**evaluation.scores, **evaluation.general_scores}
    print(f"{model_uri} -> {checkpoint}: " + ", ".join(f"{task}={score:.3f}" for task, score in scores.items())
          + f", general_ppl={evaluation.general_ppl:.3f}")
    return {
        "run_key": run.run_key,
        "mlflow_run_id": run.parent_run_id,
        "model_uri": model_uri,
        "checkpoint_uri": checkpoint,
        "scores": evaluation.scores,
        "general_scores": evaluation.general_scores,
        "general_ppl": evaluation.general_ppl,
        "metrics": summary.metrics,
    }
