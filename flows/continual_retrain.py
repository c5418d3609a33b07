"""The retraining pipeline: ingest -> base model -> DAP -> CIT over tasks (with replay) -> evaluate -> register."""

from __future__ import annotations

from prefect import flow

from perennial.config import Config, load_config
from perennial.locks import lineage_lock
from tasks.runtime import failed_on_error
from tasks.wrappers import (
    base_model_task,
    cit_task,
    dap_task,
    evaluate_task,
    finish_task,
    ingest_task,
    register_task,
    report_task,
    start_run_task,
)


@flow(name="continual-retrain", log_prints=True)
def continual_retrain(config_path: str | None = None, overrides: list[str] | None = None, config: dict | None = None, run_key: str | None = None) -> dict:
    cfg = Config.model_validate(config) if config is not None else load_config(config_path, overrides)
    with lineage_lock(cfg.tracking.registered_model):  # one retrain per model lineage at a time
        run = start_run_task(cfg, run_key)
        with failed_on_error(run):
            data = ingest_task(run)
            model = base_model_task(run, data.general)
            if cfg.dap.enabled and data.domain is not None:
                model = dap_task(run, model, data)
            evaluations = [evaluate_task(run, model, data, 0, "before-cit")]
            step = None
            checkpoints = {"start": model}
            for index in range(len(data.tasks)):
                step = cit_task(run, model, data, index, step)
                model = step.model_uri
                checkpoints[step.stage] = model
                evaluations.append(evaluate_task(run, model, data, index + 1, step.stage))
            summary = report_task(run, data, evaluations)
            registered = register_task(run, model, data, summary) if cfg.registry.enabled else None
            finish_task(run)
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
