"""Report and register: accuracy-matrix metrics, plots and a summary table in MLflow; a new registry version."""

from __future__ import annotations

import json
import subprocess

from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from perennial import registry
from perennial.cl_metrics import AccuracyMatrix, summarize
from perennial.reports import markdown_summary, plot_accuracy_matrix, plot_drift, plot_task_curves
from tasks.evaluate import StageEval
from tasks.ingest import DataBundle
from tasks.runtime import RunContext, fetch_dir, open_store, open_tracker


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

    tracker = open_tracker(run.config)
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


def register(run: RunContext, model_uri: str, data: DataBundle, summary: Report) -> dict:
    """Log the final model to the run, register it as a new version with alias `challenger`, and
    judge it with the quality gates (perennial/registry.py): promoted when all pass and
    registry.auto_promote is on, else tagged needs-review. The verdict (READY / BLOCKED and why)
    then opens the version's description and the parent run's (registry.register_version).

    A rerun (Prefect retry, or the retrain rerun after a crash) completes an interrupted
    registration instead of skipping it (registry.register_version); the result is what the
    registry holds, read back. Raises registry.RegistryError when another promotion holds the
    registry's promotion lock past its timeout.
    """
    cfg = run.config
    store = open_store(cfg)
    tracker = open_tracker(cfg)
    client: MlflowClient = tracker.client
    name = cfg.tracking.registered_model
    parent = client.get_run(run.parent_run_id)
    source = f"{parent.info.artifact_uri}/model"
    # The version is created after its files are logged: if it exists, they are there.
    if registry.version_of_run(client, name, run.parent_run_id) is None:
        local = fetch_dir(store, model_uri, cfg.work_dir / "cache")
        client.log_artifacts(run.parent_run_id, str(local), "model")
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
        description=summary.markdown,
        by=f"auto-promote ({registry.whoami()})",
    )
