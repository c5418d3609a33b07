"""The retraining pipeline: ingest -> base model -> DAP -> CIT over tasks (with replay) -> evaluate -> register."""

from __future__ import annotations

from prefect import flow

from perennial.config import Config, load_config
from perennial.locks import lineage_lock
from tasks.runtime import failed_on_error
from tasks.wrappers import (
    base_model_stage,
    cit_stage,
    dap_stage,
    evaluation_stage,
    finish_stage,
    ingest_stage,
    inputs_stage,
    preflight_stage,
    register_stage,
    report_stage,
)


@flow(name="continual-retrain", log_prints=True)
def continual_retrain(config_path: str | None = None, overrides: list[str] | None = None, config: dict | None = None, run_key: str | None = None) -> dict:
    cfg = Config.model_validate(config) if config is not None else load_config(config_path, overrides)
    with lineage_lock(cfg.tracking.registered_model):  # one retrain per model lineage at a time
        run = preflight_stage(cfg, run_key, holds_lineage_lock=True)
        with failed_on_error(run):
            data = ingest_stage(run)
            # A key names its data too: a key reused after new data arrived trains it under a derived key.
            run = inputs_stage(run, data)
        with failed_on_error(run):
            model = base_model_stage(run, data.general)
            if cfg.dap.enabled and data.domain is not None:
                model = dap_stage(run, model, data)
            evaluations = [evaluation_stage(run, model, data, 0, "before-cit")]
            step = None
            checkpoints = {"start": model}
            for index in range(len(data.tasks)):
                step = cit_stage(run, model, data, index, step)
                model = step.model_uri
                checkpoints[step.stage] = model
                evaluations.append(evaluation_stage(run, model, data, index + 1, step.stage))
            summary = report_stage(run, data, evaluations)
            registered = register_stage(run, model, data, summary) if cfg.registry.enabled else None
            finish_stage(run, data)  # marks the new data processed: a committed model trained on it
        return {
            "run_key": run.run_key,
            "mlflow_run_id": run.parent_run_id,
            "tracking_uri": cfg.tracking.tracking_uri,
            "s3_prefix": f"s3://{cfg.storage.bucket}/{run.prefix}",
            "tasks": summary.tasks,
            "accuracy_matrix": summary.matrix,
            "metrics": summary.metrics,
            "general_tasks": summary.general_tasks,
            "chance": {task.name: task.chance for task in [*data.tasks, *data.heldout]},
            "checkpoints": checkpoints,
            "registered_model": registered,
        }
