"""Report and register: accuracy-matrix metrics, plots and a summary table in MLflow; a new registry version."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from models.loading import load_model_and_tokenizer
from perennial import registry
from perennial.cl_metrics import AccuracyMatrix, summarize
from perennial.reports import markdown_summary, plot_accuracy_matrix, plot_drift, plot_task_curves
from perennial.tracking import UI_WORKFLOW, runs_table_link
from tasks.evaluate import StageEval
from tasks.ingest import DataBundle
from tasks.runtime import RunContext, fetch_dir


HEATMAP = "report/accuracy_matrix.png"


def report_links(experiment_id: str, run_id: str) -> str:
    """Markdown for the version's description: the accuracy heatmap shown inline, and links to the
    run and its report. Relative to the MLflow UI's own address, so they work however it is reached."""
    run_page = f"#/experiments/{experiment_id}/runs/{run_id}"
    return "\n".join([
        "Report of the retrain:",
        "",
        f"![accuracy matrix](get-artifact?path={HEATMAP}&run_uuid={run_id})",
        "",
        f"[accuracy heatmap]({run_page}/artifactPath/{HEATMAP}?{UI_WORKFLOW}) "
        f"| [all report files]({run_page}/artifactPath/report?{UI_WORKFLOW}) | [run (metrics, stages)]({run_page}?{UI_WORKFLOW}) "
        f"| [all retrains, metrics as columns]({runs_table_link(experiment_id)})",
    ])


class Report(BaseModel):
    tasks: list[str]
    matrix: list[list[float]]
    metrics: dict[str, float]
    markdown: str
    # Held-out general tasks: name -> {"base": stage-0 score, "final": last-stage score, "delta": final - base}.
    general_tasks: dict[str, dict[str, float]] = {}


def report(run: RunContext, data: DataBundle, evaluations: list[StageEval]) -> Report:
    tasks = [task.name for task in data.tasks]
    rows = [[evaluation.scores[name] for name in tasks] for evaluation in evaluations]
    matrix = AccuracyMatrix(tasks=tasks, rows=rows)
    base, final = evaluations[0], evaluations[-1]
    metrics = summarize(
        matrix,
        general_ppl_base=base.general_ppl,
        general_ppl_final=final.general_ppl,
        general_scores_base=base.general_scores,
        general_scores_final=final.general_scores,
    )
    general = [evaluation.general_scores for evaluation in evaluations]
    general_tasks = {
        name: {"base": base.general_scores[name], "final": final.general_scores[name], "delta": final.general_scores[name] - base.general_scores[name]}
        for name in base.general_scores
        if name in final.general_scores
    }
    drift = [evaluation.drift for evaluation in evaluations]
    markdown = markdown_summary(matrix, metrics, drift=drift, general=general)

    tracker = run.tracker
    tracker.log_metrics(run.parent_run_id, {k: v for k, v in metrics.items() if v is not None}, step=len(evaluations) - 1)
    out = run.work_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    plot_accuracy_matrix(matrix, out / "accuracy_matrix.png")
    plot_task_curves(matrix, out / "task_curves.png", general=general)
    plot_drift(drift, out / "drift.png")
    (out / "summary.md").write_text(markdown)
    (out / "accuracy_matrix.json").write_text(json.dumps({"tasks": tasks, "rows": rows}))
    if general_tasks:
        (out / "general_tasks.json").write_text(json.dumps({"tasks": list(general_tasks), "rows": general, "summary": general_tasks}))
    for path in sorted(out.iterdir()):
        tracker.log_artifact(run.parent_run_id, path, "report")
    tracker.flush(attempts=5)
    return Report(
        tasks=tasks, matrix=rows, metrics={k: v for k, v in metrics.items() if v is not None}, markdown=markdown, general_tasks=general_tasks
    )


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def save_mlflow_model(checkpoint: Path, out: Path, card: str) -> Path:
    """The checkpoint as an MLflow transformers-flavor folder (MLmodel, model/, components/tokenizer/),
    so `mlflow.transformers.load_model("models:/NAME@ALIAS")` loads it; the S3 checkpoint stays the
    source of truth (the version's checkpoint_uri tag).

    Built from the already downloaded checkpoint: nothing comes from the hub, and Perennial's own
    files (plugins, training state) are left out because only the model and tokenizer are saved.
    """
    # Imported here: the flavor is needed once per retrain, not at every flow's start-up.
    import mlflow
    import mlflow.transformers
    import torch
    import transformers
    from huggingface_hub import ModelCard

    model, tokenizer = load_model_and_tokenizer(checkpoint)
    mlflow.transformers.save_model(
        {"model": model, "tokenizer": tokenizer},
        out,
        task="text-generation",
        # A card of our own: MLflow would otherwise look the model up on the hub (offline here).
        model_card=ModelCard(card),
        # Stated, not inferred: inference loads the model again in a subprocess, for the same answer.
        pip_requirements=[f"mlflow=={mlflow.__version__}", f"transformers=={transformers.__version__}",
                          f"torch=={torch.__version__.split('+')[0]}"],
    )
    return out


def register(run: RunContext, model_uri: str, data: DataBundle, summary: Report) -> dict:
    """Log the final model to the run (MLflow transformers flavor, save_mlflow_model), register it as
    a new version with alias `challenger` and links to the run's report (report_links), and
    judge it with the quality gates (perennial/registry.py): promoted when all pass and
    registry.auto_promote is on, else tagged needs-review. The verdict (READY / BLOCKED and why)
    then opens the version's description and the parent run's (registry.register_version).

    A rerun (Prefect retry, or the retrain rerun after a crash) completes an interrupted
    registration instead of skipping it (registry.register_version); the result is what the
    registry holds, read back. Raises registry.RegistryError when another promotion holds the
    registry's promotion lock past its timeout.
    """
    cfg = run.config
    store, tracker = run.store, run.tracker
    client: MlflowClient = tracker.client
    name = cfg.tracking.registered_model
    parent = client.get_run(run.parent_run_id)
    source = f"{parent.info.artifact_uri}/model"
    # The version is created after its files are logged: if it exists, they are there.
    if registry.version_of_run(client, name, run.parent_run_id) is None:
        local = fetch_dir(store, model_uri, run.services.cache_dir)
        cfg.work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="mlflow-model-", dir=cfg.work_dir) as scratch:
            folder = save_mlflow_model(local, Path(scratch) / "model", summary.markdown)
            client.log_artifacts(run.parent_run_id, str(folder), "model")
    tags = {
        "git_sha": _git_sha(),
        "config_digest": cfg.digest(),
        "base_model": cfg.model.name_or_path or f"tiny-llama({cfg.model.tiny.hidden_size}x{cfg.model.tiny.num_hidden_layers})",
        "tuning_method": cfg.cit.tuning.method,
        "cl_methods": ",".join(["replay"] * cfg.cit.replay.enabled + [m.name for m in cfg.cit.methods]) or "none",
        "checkpoint_uri": model_uri,
        "checkpoint_manifest": f"{model_uri}/MANIFEST.json",
        "run_key": run.run_key,
        **{f"dataset.{ref.name}": ref.digest for ref in data.all()},
    }
    # evaluate_stage logs drift/kl_mean at step = stage index; the run keeps the last stage's value.
    metrics = registry.candidate_metrics(summary.tasks, summary.matrix, summary.metrics, parent.data.metrics.get("drift/kl_mean"),
                                         chance={ref.name: ref.chance for ref in data.tasks})
    return registry.register_version(
        client,
        name,
        source,
        metrics,
        cfg.registry.gates,
        auto_promote=cfg.registry.auto_promote,
        run_id=run.parent_run_id,
        tags=tags,
        description=f"{report_links(run.experiment_id, run.parent_run_id)}\n\n{summary.markdown}",
        by=f"auto-promote ({registry.whoami()})",
    )
