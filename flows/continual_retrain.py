"""The retraining pipeline: ingest -> base model -> DAP -> CIT over tasks (with replay) -> evaluate -> register.

With `lineage.continue_from: champion` a retrain continues the registered champion instead: CIT
starts from its checkpoint and CL state, and trains only the tasks (or new records) it has not
learned (tasks/lineage.py). With `cit.multitask` CIT is one joint stage on every task (the multi-task
upper bound), scored once after it.
"""

from __future__ import annotations

from prefect import flow

from perennial.config import Config, load_config
from perennial.locks import lineage_lock
from tasks.cit import CITStep
from tasks.runtime import failed_on_error
from tasks.wrappers import (
    base_model_stage,
    cit_stage,
    dap_stage,
    evaluation_stage,
    finish_stage,
    gc_stage,
    ingest_stage,
    inputs_stage,
    joint_cit_stage,
    lineage_stage,
    preflight_stage,
    register_stage,
    report_stage,
    ssr_stage,
)


@flow(name="continual-retrain", log_prints=True)
def continual_retrain(config_path: str | None = None, overrides: list[str] | None = None, config: dict | None = None, run_key: str | None = None) -> dict:
    cfg = Config.model_validate(config) if config is not None else load_config(config_path, overrides)
    with lineage_lock(cfg.tracking.registered_model):  # one retrain per model lineage at a time
        run = preflight_stage(cfg, run_key, holds_lineage_lock=True)
        with failed_on_error(run):
            data = ingest_stage(run)
            plan = lineage_stage(run, data)  # the version it continues (or none), and what is new
            # A key names its data and starting point too: reused after they changed, it trains under a derived key.
            run = inputs_stage(run, data, plan.start.checkpoint_digest if plan.start else None)
        with failed_on_error(run):
            if plan.start is None:
                model = base_model_stage(run, data.general)
                if cfg.dap.enabled and data.domain is not None:
                    model = dap_stage(run, model, data)
                step = None
            else:
                model = plan.start.checkpoint_uri
                step = CITStep(model_uri=model, replay_uri=plan.start.replay_uri, stage=plan.start.last_stage,
                               plugin_state_uri=plan.start.plugin_state_uri)
            checkpoints = {"start": model}
            summary = registered = None
            if plan.train and cfg.cit.ssr.enabled:  # the starting model's own answers join the replay buffer
                replay_uri = ssr_stage(run, model, step.replay_uri if step else None)
                step = CITStep(model_uri=model, replay_uri=replay_uri, stage=step.stage if step else "start",
                               plugin_state_uri=step.plugin_state_uri if step else None)
            if plan.train:
                evaluations = [evaluation_stage(run, model, data, 0, "before-cit", plan.stage0_tasks)]
                steps = []
                if cfg.cit.multitask:  # one joint stage (the config refuses a continued lineage, replay and SSR with it)
                    step = joint_cit_stage(run, model, plan.train)
                    steps.append(step)
                    model = checkpoints[step.stage] = step.model_uri
                    evaluations.append(evaluation_stage(run, model, data, 1, step.stage, plan.score))
                else:
                    for offset, task in enumerate(plan.train):
                        step = cit_stage(run, model, task, plan.first_index + offset, step)
                        steps.append(step)
                        model = checkpoints[step.stage] = step.model_uri
                        evaluations.append(evaluation_stage(run, model, data, offset + 1, step.stage, plan.score))
                summary = report_stage(run, data, evaluations, plan, steps)
                registered = register_stage(run, model, data, summary, plan, step) if cfg.registry.enabled else None
            finish_stage(run, data)  # marks the new data processed: a committed model trained on it
        # Still under the lineage lock: no retrain of the lineage starts while gc deletes (tasks/gc.py).
        swept = gc_stage(cfg, after_retrain=True) if cfg.retention.enabled else None
        return {
            "run_key": run.run_key,
            "mlflow_run_id": run.parent_run_id,
            "tracking_uri": cfg.tracking.tracking_uri,
            "s3_prefix": f"s3://{cfg.storage.bucket}/{run.prefix}",
            "continued_version": plan.start.version if plan.start else None,
            "trained": [task.name for task in plan.train],
            "tasks": summary.tasks if summary else [task.name for task in plan.score],
            "accuracy_matrix": summary.matrix if summary else [],
            "row_labels": summary.row_labels if summary else [],
            "trained_by_row": summary.trained if summary else [],
            "start_row": summary.start_row if summary else 0,
            "metrics": summary.metrics if summary else {},
            "general_tasks": summary.general_tasks if summary else {},
            "bias": summary.bias if summary else {},
            "chance": {task.name: task.chance for task in [*plan.score, *data.heldout]},
            "checkpoints": checkpoints,
            "registered_model": registered,
            "gc": {"deleted": swept.deleted, "bytes": swept.bytes} if swept is not None else None,
        }
