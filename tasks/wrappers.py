"""Thin Prefect task wrappers around the plain functions (retries for transient service errors).

Each is a pipeline *stage* (named ``*_stage``): in Perennial "task" means a continual-learning task,
so the Prefect task objects are not called tasks here. Prefect's UI shows their ``name``."""

from prefect import task
from prefect.artifacts import create_markdown_artifact

from models.engine import NonFiniteLossError
from models.loading import ModelLoadError
from perennial.config import ConfigError
from perennial.ingest import IngestError
from tasks.base_model import prepare_base_model
from tasks.cit import stage_name, train_cit_stage
from tasks.compare import plan_comparison, report_comparison, run_recipe
from tasks.dap import train_dap
from tasks.evaluate import evaluate_stage
from tasks.ingest import bind_inputs, commit_watermarks, ingest
from tasks.lineage import LineageError, plan_lineage
from tasks.register import register, report
from tasks.runtime import finish_run, start_run
from tasks.ssr import synthesize

# Errors that a retry cannot fix: the same config, data and model fail the same way, so they fail at once.
# A non-finite loss recurs at the same step (the retry resumes from the last committed checkpoint).
NOT_RETRIED = (ConfigError, IngestError, LineageError, ModelLoadError, NonFiniteLossError)


def retryable(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn: retry unless the task failed with one of NOT_RETRIED."""
    return not isinstance(state.result(raise_on_failure=False), NOT_RETRIED)


RETRY = {"retries": 2, "retry_delay_seconds": [2, 10], "retry_condition_fn": retryable}

preflight_stage = task(start_run, name="preflight")
ingest_stage = task(ingest, name="ingest", **RETRY)
lineage_stage = task(plan_lineage, name="lineage", **RETRY)
ssr_stage = task(synthesize, name="self-synthesized-rehearsal", **RETRY)
inputs_stage = task(bind_inputs, name="inputs", **RETRY)
base_model_stage = task(prepare_base_model, name="base-model", **RETRY)
dap_stage = task(train_dap, name="dap", **RETRY)
def _cit_run_name() -> str:
    """A CIT task run is named as its stage (cit-01-fact_lookup), as its MLflow run is."""
    from prefect.runtime import task_run

    parameters = task_run.parameters
    return stage_name(parameters["index"], parameters["task"].name)


cit_stage = task(train_cit_stage, name="cit", task_run_name=_cit_run_name, **RETRY)
evaluation_stage = task(evaluate_stage, name="evaluate", task_run_name="evaluate-{stage}", **RETRY)


@task(name="report", **RETRY)
def report_stage(run, data, evaluations, plan=None, steps=()):
    """The report, plus the same table as a Prefect markdown artifact linking to the MLflow run."""
    summary = report(run, data, evaluations, plan, steps)
    link = f"{run.config.tracking.tracking_uri.rstrip('/')}/#/experiments/{run.experiment_id}/runs/{run.parent_run_id}"
    create_markdown_artifact(
        key=f"retrain-{run.run_key}".lower().replace("_", "-").replace(".", "-"),
        markdown=f"{summary.markdown}\n\n[MLflow run]({link})",
        description="accuracy matrix and continual-learning metrics",
    )
    return summary


register_stage = task(register, name="register", **RETRY)


@task(name="finish")
def finish_stage(run, data=None):
    """End the parent run FINISHED; with ``data`` (a retrain's), its model is committed, so the
    incremental datasets' new objects are marked processed first (commit_watermarks)."""
    if data is not None:
        commit_watermarks(run, data)
    finish_run(run)


# --- comparing recipes (flows/compare.py) ---------------------------------------------------------

compare_plan_stage = task(plan_comparison, name="compare-plan")
# A retry resumes the run under its key (its committed stages are not trained again).
recipe_run_stage = task(run_recipe, name="recipe-run", task_run_name="{job.recipe}-seed-{job.seed}", **RETRY)


@task(name="compare-report", **RETRY)
def compare_report_stage(plan, results, started_at, load_before, extra=None):
    """The comparison's report and MLflow run, plus the same table as a Prefect markdown artifact."""
    report = report_comparison(plan, results, started_at, load_before, extra)
    create_markdown_artifact(
        key=f"compare-{plan.name}".lower().replace("_", "-").replace(".", "-").replace("%", "pct")[:100],
        markdown=report["markdown"] + (f"\n\nMLflow comparison run: {report['mlflow_run_id']}" if report.get("mlflow_run_id") else ""),
        description="recipes compared: table, cost and verdicts",
    )
    return report
