"""Thin Prefect task wrappers around the plain functions (retries for transient service errors).

Each is a pipeline *stage* (named ``*_stage``): in Perennial "task" means a continual-learning task,
so the Prefect task objects are not called tasks here. Prefect's UI shows their ``name``."""

import time

from prefect import task
from prefect.artifacts import create_markdown_artifact

from perennial import registry
from perennial.tracking import UI_WORKFLOW, is_auth_refusal
from tasks.base_model import prepare_base_model
from tasks.cit import JOINT_STAGE, joint_optim, stage_name, train_cit_stage, train_joint_stage
from tasks.compare import plan_comparison, report_comparison, run_recipe
from tasks.dap import train_dap
from tasks.evaluate import evaluate_stage
from tasks.failures import NOT_RETRIED
from tasks.gc import collect_garbage, format_plan
from tasks.ingest import bind_inputs, commit_watermarks, ingest
from tasks.lineage import plan_lineage
from tasks.progress import run_logger, stage_progress
from tasks.register import register, report
from tasks.runtime import finish_run, start_run
from tasks.ssr import synthesize

# Errors that a retry cannot fix: the same config, data and model fail the same way, so they fail at once.
# A non-finite loss recurs at the same step (the retry resumes from the last committed checkpoint).
# MLflow's auth app refusing (no or wrong credentials, a missing permission) answers the same way every time.


def retryable(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn: retry unless the task failed with one of NOT_RETRIED, or MLflow refused it
    with 401 / 403 (an MlflowException from its auth app: the same credentials are refused again)."""
    error = state.result(raise_on_failure=False)
    return not isinstance(error, NOT_RETRIED) and not is_auth_refusal(error)


RETRY = {"retries": 2, "retry_delay_seconds": [2, 10], "retry_condition_fn": retryable}

def tag_flow_run(*tags: str) -> None:
    """Add tags to the flow run this task runs in (Prefect's UI filters flow runs by tag): the run key and the
    registered model, so a retrain is found by either. Nothing outside a flow run; never fails the task."""
    from prefect.runtime import flow_run

    flow_run_id = flow_run.id
    if not flow_run_id:
        return
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            current = client.read_flow_run(flow_run_id)
            wanted = sorted(set(current.tags or []) | set(tags))
            if wanted != sorted(current.tags or []):
                client.update_flow_run(flow_run_id, tags=wanted)
    except Exception as error:  # noqa: BLE001  (a tag is a convenience)
        run_logger().warning("could not tag the flow run: %s: %s", type(error).__name__, error)


def _retrain_tags(run) -> list[str]:
    return [f"run-key:{run.run_key}", f"model:{run.config.tracking.registered_model}"]


@task(name="preflight")
def preflight_stage(config, run_key=None, holds_lineage_lock=False):
    """Start (or resume) the retrain's MLflow run; the flow run is tagged with its run key and registered model."""
    run = start_run(config, run_key, holds_lineage_lock)
    tag_flow_run(*_retrain_tags(run))
    run_logger().info("run key %s, MLflow run %s, registered model %s", run.run_key, run.parent_run_id,
                      run.config.tracking.registered_model)
    return run


ingest_stage = task(ingest, name="ingest", **RETRY)
lineage_stage = task(plan_lineage, name="lineage", **RETRY)
ssr_stage = task(synthesize, name="self-synthesized-rehearsal", **RETRY)


@task(name="inputs", **RETRY)
def inputs_stage(run, data, start_model=None):
    """bind_inputs; a key derived for new data (or a new starting point) tags the flow run too."""
    bound = bind_inputs(run, data, start_model)
    if bound.run_key != run.run_key:
        tag_flow_run(*_retrain_tags(bound))
        run_logger().info("inputs changed since run key %s: training under %s", run.run_key, bound.run_key)
    return bound


@task(name="base-model", **RETRY)
def base_model_stage(run, general):
    """The base model: from the S3 cache when committed before (logged "base model from cache, 0.1 s"), else
    converted, copied or pretrained (its training steps logged as they run)."""
    with stage_progress("pretrain-base", run.config.model.pretrain.max_steps if run.config.model.source == "tiny" else None) as progress:
        uri = prepare_base_model(run, general)
    cached = run.tracker.client.get_run(run.parent_run_id).data.tags.get("base_model_cached") == "true"
    run_logger().info("base model %s, %.1f s: %s", "from cache" if cached else "prepared", progress.seconds, uri)
    return uri


@task(name="dap", **RETRY)
def dap_stage(run, model_uri, data):
    with stage_progress("dap", run.config.dap.optim.max_steps):
        return train_dap(run, model_uri, data)


def _cit_run_name() -> str:
    """A CIT task run is named as its stage (cit-01-fact_lookup), as its MLflow run is."""
    from prefect.runtime import task_run

    parameters = task_run.parameters
    return stage_name(parameters["index"], parameters["task"].name)


@task(name="cit", task_run_name=_cit_run_name, **RETRY)
def cit_stage(run, model_uri, task, index, previous):
    with stage_progress(stage_name(index, task.name), run.config.cit.optim.max_steps):
        return train_cit_stage(run, model_uri, task, index, previous)


@task(name="cit-joint", task_run_name=JOINT_STAGE, **RETRY)
def joint_cit_stage(run, model_uri, tasks):
    """cit.multitask: every task in one stage (train_joint_stage)."""
    with stage_progress(JOINT_STAGE, joint_optim(run.config, len(tasks)).max_steps):
        return train_joint_stage(run, model_uri, tasks)


@task(name="evaluate", task_run_name="evaluate-{stage}", **RETRY)
def evaluation_stage(run, model_uri, data, stage_index, stage, tasks=None):
    """evaluate_stage; the log says its scores, or that they came from the S3 cache, and how long it took."""
    cached = run.store.exists(f"{run.prefix}/eval/stage-{stage_index:02d}.json")
    started = time.perf_counter()
    result = evaluate_stage(run, model_uri, data, stage_index, stage, tasks)
    scores = ", ".join(f"{name} {score:.3f}" for name, score in {**result.scores, **result.general_scores}.items())
    run_logger().info("evaluate-%s%s, %.1f s: %s; general perplexity %.2f; drift KL %s", stage, " from cache" if cached else "",
                      time.perf_counter() - started, scores, result.general_ppl,
                      f"{result.drift['kl_mean']:.3f}" if result.drift.get("kl_mean") is not None else "—")
    return result


def _artifact_key(run) -> str:
    return f"retrain-{run.run_key}".lower().replace("_", "-").replace(".", "-")


def _run_link(run) -> str:
    return f"{run.config.tracking.tracking_uri.rstrip('/')}/#/experiments/{run.experiment_id}/runs/{run.parent_run_id}?{UI_WORKFLOW}"


@task(name="report", **RETRY)
def report_stage(run, data, evaluations, plan=None, steps=()):
    """The report, plus the same table as a Prefect markdown artifact linking to the MLflow run; a registration
    that follows writes the artifact's next version, with the version and its verdict first (register_stage)."""
    summary = report(run, data, evaluations, plan, steps)
    create_markdown_artifact(key=_artifact_key(run), markdown=f"{summary.markdown}\n\n[MLflow run]({_run_link(run)})",
                             description="accuracy matrix and continual-learning metrics")
    return summary


@task(name="register", **RETRY)
def register_stage(run, model_uri, data, summary, plan=None, last_step=None):
    """Register the version; then the retrain's Prefect markdown artifact: the verdict and the version first (the
    same words as the terminal, the version page and `perennial review`), its page, then the run's report."""
    registered = register(run, model_uri, data, summary, plan, last_step)
    name, version = registered["name"], registered["version"]
    ui = run.config.tracking.tracking_uri.rstrip("/")
    lines = registered["verdict_lines"]
    page = f"{ui}/#/models/{name}/versions/{version}?{UI_WORKFLOW}"
    head = [f"**{name} version {version}: {lines[0]}**", *lines[1:], "",
            f"[version page]({page}) | [MLflow run]({_run_link(run)}) | next: `perennial review {name}`"]
    samples = registry.run_json(run.tracker.client, run.parent_run_id, registry.SAMPLES_ARTIFACT)
    body = registry.samples_markdown(samples, version) if samples else []
    create_markdown_artifact(key=_artifact_key(run), markdown="\n".join([*head, "", *body, "", summary.markdown]),
                             description=f"{name} v{version}: {registry.verdict_word(lines)}")
    run_logger().info("%s version %s: %s", name, version, "\n".join(lines))
    return registered


@task(name="finish")
def finish_stage(run, data=None):
    """End the parent run FINISHED; with ``data`` (a retrain's), its model is committed, so the
    incremental datasets' new objects are marked processed first (commit_watermarks)."""
    if data is not None:
        commit_watermarks(run, data)
    finish_run(run)


@task(name="gc")
def gc_stage(config, dry_run=False, after_retrain=False):
    """collect_garbage under the caller's lineage lock, its plan logged (what went, its size and why). At the end
    of a retrain (``after_retrain``) a failure is a warning, not the retrain's: its version is registered and
    stands, and the next retrain's gc (or `perennial gc CONFIG`) sweeps again."""
    try:
        plan = collect_garbage(config, dry_run)
    except Exception as error:  # noqa: BLE001
        if not after_retrain:
            raise
        run_logger().warning("gc after the retrain failed (%s: %s); the retrain's results stand, and `perennial gc` "
                             "or the next retrain sweeps again", type(error).__name__, error)
        return None
    run_logger().info("%s", format_plan(plan))
    return plan


# --- comparing recipes (flows/compare.py) ---------------------------------------------------------

compare_plan_stage = task(plan_comparison, name="compare-plan")
# A retry resumes the run under its key (its committed stages are not trained again).
recipe_run_stage = task(run_recipe, name="recipe-run", task_run_name="{job.recipe}-seed-{job.seed}", **RETRY)  # (job, retrain flow)


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
