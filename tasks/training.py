"""One training stage (base pretraining, DAP, or one CIT task), committed to S3 and resumable.

A stage's output is committed when ``<stage>/model/MANIFEST.json`` exists; a rerun returns it
without training. Mid-stage checkpoints are committed the same way under ``<stage>/checkpoints``;
a rerun after a crash resumes from the newest one, and the engine's step-derived data order
makes the result identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Sequence


from models.cl.base import CLPlugin, TaskContext
from models.engine import TrainResult, load_plugin_states, resolve_device, save_plugin_states, set_seed, train
from models.loading import load_model_and_tokenizer, save_model
from models.tuning import apply_tuning, merge_for_export
from perennial.config import OptimConfig, TuningConfig
from perennial.storage import MANIFEST_NAME, ObjectStore
from tasks.runtime import RunContext, committed_uri, fetch_dir, open_store, open_tracker

PLUGIN_DIR = "perennial_plugins"


def latest_checkpoint(store: ObjectStore, checkpoints_prefix: str) -> str | None:
    """The newest committed checkpoint (one whose manifest exists); partial uploads are ignored."""
    committed = [
        info.key[: -len(MANIFEST_NAME) - 1]
        for info in store.list(checkpoints_prefix + "/")
        if info.key.endswith("/" + MANIFEST_NAME)
    ]
    return max(committed) if committed else None


def download_resume(store: ObjectStore, checkpoints_prefix: str, local: Path) -> Path | None:
    """The newest committed mid-stage checkpoint, downloaded to ``local``; None when there is none."""
    resume_prefix = latest_checkpoint(store, checkpoints_prefix)
    if not resume_prefix:
        return None
    shutil.rmtree(local, ignore_errors=True)
    store.download_dir(resume_prefix, local)
    return local


def checkpoint_committer(store: ObjectStore, checkpoints_prefix: str, stage: str) -> Callable[[int, Path], None]:
    """The engine's checkpoint_fn: upload a mid-stage checkpoint with its manifest, then free the disk."""

    def commit_checkpoint(step: int, state_dir: Path) -> None:
        store.upload_dir(state_dir, f"{checkpoints_prefix}/{state_dir.name}", meta={"stage": stage, "step": step})
        shutil.rmtree(state_dir, ignore_errors=True)  # S3 holds it now; keep local disk bounded

    return commit_checkpoint


def commit_output(
    run: RunContext, stage: str, export_dir: Path, output_prefix: str, result: TrainResult, mlflow_run_id: str | None
) -> str:
    """Commit the exported model (files first, manifest last) and log the stage's final metrics."""
    cfg = run.config
    (export_dir / "training.json").write_text(
        json.dumps({"stage": stage, "steps": result.steps, "resumed_from": result.resumed_from, "losses": result.losses})
    )
    manifest = open_store(cfg).upload_dir(
        export_dir, output_prefix, meta={"stage": stage, "config_digest": cfg.digest(), "steps": result.steps}
    )
    if mlflow_run_id:
        # The spool holds what the training loop could not send (in a launched stage: rank 0's).
        tracker = open_tracker(cfg, spool_dir=run.work_dir / stage)
        tracker.log_metrics(
            mlflow_run_id,
            {"train/final_loss": result.losses[-1], "train/tokens_per_second": result.tokens_per_second, "train/tokens": result.tokens,
             "train/resumed_from": result.resumed_from},
            result.steps,
        )
        tracker.set_tags(mlflow_run_id, {"checkpoint_uri": manifest["uri"], "checkpoint_digest": manifest["digest"]})
        tracker.flush(attempts=5)
    shutil.rmtree(export_dir, ignore_errors=True)
    return manifest["uri"]


def run_stage(
    run: RunContext,
    stage: str,
    input_model_uri: str,
    examples: list[dict] | Callable[[object], list[dict]],
    optim: OptimConfig,
    tuning: TuningConfig,
    plugins: Sequence[CLPlugin] = (),
    plugin_state_uri: str | None = None,
    task_index: int = 0,
    replay_examples: list[dict] | None = None,
    mlflow_run_id: str | None = None,
    shuffle: bool = True,
    stage_root: str | None = None,
) -> str:
    """Train one stage from ``input_model_uri``; returns the committed output model's URI.

    ``examples`` may be a function of the tokenizer, so encoding happens only when training does.
    ``stage_root`` replaces the run's own stage prefix for outputs shared across runs by content
    digest (DAP): any run with the same inputs then finds the committed result.
    With ``distributed.nproc_per_node`` > 1 the training runs under torchrun (tasks/launch.py).
    """
    cfg = run.config
    store = open_store(cfg)
    stage_root = stage_root or run.stage_prefix(stage)
    output_prefix = f"{stage_root}/model"
    done = committed_uri(store, output_prefix)
    if done:
        # An earlier attempt committed the stage but failed to send its last metrics (MLflow down): send them now.
        open_tracker(cfg, spool_dir=run.work_dir / stage).flush(attempts=10)
        return done
    if cfg.distributed.nproc_per_node > 1:
        from tasks.launch import launch_stage  # imports this module

        return launch_stage(
            run, stage, input_model_uri, examples, optim, tuning, plugins=plugins, plugin_state_uri=plugin_state_uri,
            task_index=task_index, replay_examples=replay_examples, mlflow_run_id=mlflow_run_id, shuffle=shuffle,
            stage_root=stage_root,
        )

    cache = Path(cfg.work_dir) / "cache"
    device = resolve_device(cfg.device)
    set_seed(cfg.seed + task_index)  # a fresh adapter per task starts from its own draw (O-LoRA needs that)
    model, tokenizer = load_model_and_tokenizer(
        fetch_dir(store, input_model_uri, cache), attn_implementation=cfg.model.attn_implementation, device=device
    )
    if callable(examples):
        examples = examples(tokenizer)
    if plugin_state_uri:
        load_plugin_states(plugins, fetch_dir(store, plugin_state_uri, cache) / PLUGIN_DIR)

    model = apply_tuning(model, tuning)
    context = TaskContext(
        task_index=task_index,
        task_name=stage,
        model=model,
        tokenizer=tokenizer,
        train_examples=examples,
        device=device,
        batch_size=optim.batch_size,
        pad_token_id=tokenizer.pad_token_id,
        replay_examples=replay_examples or [],
        work_dir=run.work_dir / stage,
    )
    for plugin in plugins:
        plugin.before_task(context)

    checkpoints_prefix = f"{stage_root}/checkpoints"
    resume_dir = download_resume(store, checkpoints_prefix, run.work_dir / stage / "resume")

    tracker = open_tracker(cfg, spool_dir=run.work_dir / stage)
    local_checkpoints = run.work_dir / stage / "checkpoints"

    def log(metrics: dict[str, float], step: int) -> None:
        if mlflow_run_id:
            tracker.log_metrics(mlflow_run_id, {f"train/{k}": v for k, v in metrics.items()}, step)

    result: TrainResult = train(
        model,
        examples,
        optim,
        seed=cfg.seed,
        pad_token_id=tokenizer.pad_token_id,
        device=device,
        plugins=plugins,
        resume_from=resume_dir,
        checkpoint_fn=checkpoint_committer(store, checkpoints_prefix, stage),
        checkpoint_dir=local_checkpoints,
        log_fn=log,
        desc=stage,
        shuffle=shuffle,
        precision=cfg.precision,
    )
    for plugin in plugins:
        plugin.after_task(context)

    export_dir = run.work_dir / stage / "model"
    shutil.rmtree(export_dir, ignore_errors=True)
    save_model(merge_for_export(model), tokenizer, export_dir)
    if plugins:
        save_plugin_states(plugins, export_dir / PLUGIN_DIR)
    tracker.flush(raise_on_error=False)  # what is still unsent stays in the spool commit_output reads
    return commit_output(run, stage, export_dir, output_prefix, result, mlflow_run_id)
