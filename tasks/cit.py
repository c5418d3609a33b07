"""Continual instruction tuning: one stage per task, with replay from a versioned buffer in S3; or, for the
multi-task upper bound (cit.multitask), one joint stage on every task's records."""

from __future__ import annotations

import math
import shutil

from pydantic import BaseModel

from models.cl.registry import check_requirements
from models.cl.replay import make_loss_fn
from models.data import encode_record
from models.engine import resolve_device
from models.loading import load_model_and_tokenizer
from perennial.config import Config, OptimConfig
from tasks.ingest import DatasetRef, read_records
from tasks.launch import run_stage
from tasks.runtime import RunContext, committed_uri, fetch_dir
from tasks.stage import BUFFER_FILE, StageData, read_replay_buffer, stage_spec


class CITStep(BaseModel):
    """Where a CIT stage left the lineage: the model, the replay buffer after it, and the checkpoint that
    holds the CL plugins' state (its own model; a continued version's checkpoint; None: none to carry)."""

    model_uri: str
    replay_uri: str | None
    stage: str
    plugin_state_uri: str | None = None
    records: int | None = None  # the train records it read (a task trained again: its new records)
    joint: list[str] = []  # a joint stage (cit.multitask): the tasks it trained together; empty: one task


def stage_name(index: int, task: str) -> str:
    return f"cit-{index + 1:02d}-{task}"


JOINT_STAGE = stage_name(0, "joint")  # cit.multitask's one stage


def joint_optim(cfg: Config, tasks: int) -> OptimConfig:
    """The joint stage's optimizer settings: the steps the sequence spends on ``tasks`` tasks (cit.optim.max_steps
    each), in one schedule; everything else as cit.optim."""
    return cfg.cit.optim.model_copy(update={"max_steps": cfg.cit.optim.max_steps * tasks})


def _sampling_options(run: RunContext, model_uri: str) -> dict:
    """`loss-mid` scores the task's records with the model just trained on it."""
    cfg = run.config
    replay = cfg.cit.replay
    options = {"label_key": replay.label_key}
    if replay.strategy == "loss-mid":
        local = fetch_dir(run.store, model_uri, run.services.cache_dir)
        model, tokenizer = load_model_and_tokenizer(local, device=resolve_device(cfg.device))
        encode = lambda r: encode_record(tokenizer, r, cfg.cit.optim.max_length, cfg.cit.supervise)  # noqa: E731
        options.update(loss_fn=make_loss_fn(model, encode, tokenizer.pad_token_id), quantile=replay.loss_quantile)
    return options


def train_cit_stage(run: RunContext, model_uri: str, task: DatasetRef, index: int, previous: CITStep | None) -> CITStep:
    """Train ``task``, the lineage's task at 0-based position ``index`` (its stage name, seed and replay
    buffer follow it), from ``model_uri``: one stage (two with `epoch` replay mixing), then the next
    replay buffer. ``previous``: where the lineage stands (None: the first task, from the base model).
    A task the lineage learned before (``task.since`` set) trains on its new records, and its replay
    samples are added to those it already has."""
    cfg = run.config
    check_requirements(cfg.cit.methods, cfg.cit.tuning.method, cfg.model.attn_implementation)
    stage = stage_name(index, task.name)
    replay = cfg.cit.replay
    buffer = read_replay_buffer(run.services, previous.replay_uri if previous and replay.enabled else None)
    replay_uri = previous.replay_uri if previous and replay.enabled and len(buffer) else None
    separate_replay_phase = replay.mixing == "epoch" and replay_uri is not None
    tracker = run.tracker
    with tracker.stage_run(stage, run.parent_run_id, tags={"stage": stage, "task": task.name}) as child:
        train_records = len(read_records(run.store, task, run.services.cache_dir, split="train")) if task.since else task.counts.get("train")
        tracker.log_params(child, {"task": task.name, "train_records": train_records, "new_records_since": task.since or "",
                                   "replay_records": len(buffer) if replay_uri else 0, "dataset_digest": task.digest})
        spec = stage_spec(
            run, stage, input_model_uri=model_uri,
            data=StageData(encoding="instruction", datasets=[task], replay_uri=None if separate_replay_phase else replay_uri,
                           replay_mixing="concat" if replay.mixing == "epoch" else replay.mixing, supervise=cfg.cit.supervise),
            optim=cfg.cit.optim, tuning=cfg.cit.tuning, methods=cfg.cit.methods,
            plugin_state_uri=previous.plugin_state_uri if previous and cfg.cit.methods else None,
            seed=cfg.stage_seed("cit"), task_index=index, mlflow_run_id=child,
        )
        model_out = run_stage(spec, run.services)
        if separate_replay_phase:
            # `epoch` mixing: one pass over the replay examples after the task, as its own committed stage.
            epoch = cfg.cit.optim.model_copy(
                update={"max_steps": math.ceil(len(buffer) / cfg.cit.optim.batch_size), "warmup_steps": 0, "checkpoint_every": 0}
            )
            replay_spec = stage_spec(
                run, f"{stage}-replay", input_model_uri=model_out,
                data=StageData(encoding="instruction", replay_uri=replay_uri, replay_mixing="only", supervise=cfg.cit.supervise),
                optim=epoch, tuning=cfg.cit.tuning, seed=cfg.stage_seed("cit"), task_index=index, mlflow_run_id=child,
            )
            model_out = run_stage(replay_spec, run.services)

    next_replay_uri = None
    if replay.enabled:
        replay_prefix = f"{run.prefix}/replay/after-{index + 1:02d}"
        next_replay_uri = committed_uri(run.store, replay_prefix)
        if next_replay_uri is None:
            records = read_records(run.store, task, run.services.cache_dir, split="train")
            buffer.add_task(task.name, records, budget=replay.budget, strategy=replay.strategy, seed=cfg.seed,
                            keep_earlier=task.since is not None, **_sampling_options(run, model_out))
            local = run.work_dir / "replay" / f"after-{index + 1:02d}"
            shutil.rmtree(local, ignore_errors=True)
            local.mkdir(parents=True)
            buffer.to_jsonl(local / BUFFER_FILE)
            next_replay_uri = run.store.upload_dir(local, replay_prefix, meta={"tasks": buffer.task_names(), "strategy": replay.strategy})["uri"]
    return CITStep(model_uri=model_out, replay_uri=next_replay_uri, stage=stage, plugin_state_uri=model_out, records=train_records)


def train_joint_stage(run: RunContext, model_uri: str, tasks: list[DatasetRef]) -> CITStep:
    """cit.multitask, the multi-task upper bound: one stage trains the union of every task's training records, which
    the engine shuffles together with the run's seed, for cit.optim.max_steps x len(tasks) optimizer steps (what the
    sequence spends), from ``model_uri``. No replay buffer (the config refuses replay and SSR with cit.multitask);
    lwf, averaging and merge act on the stage's starting model as on a sequence's first task. The stage's MLflow
    run logs what it trained on: every task, its train records and dataset version, and the steps."""
    cfg = run.config
    check_requirements(cfg.cit.methods, cfg.cit.tuning.method, cfg.model.attn_implementation)
    optim = joint_optim(cfg, len(tasks))
    counts = {task.name: len(read_records(run.store, task, run.services.cache_dir, split="train")) for task in tasks}
    tracker = run.tracker
    with tracker.stage_run(JOINT_STAGE, run.parent_run_id, tags={"stage": JOINT_STAGE, "task": "joint"}) as child:
        tracker.log_params(child, {"task": "joint", "tasks": ",".join(counts), "train_records": sum(counts.values()),
                                   "max_steps": optim.max_steps, "replay_records": 0,
                                   **{f"train_records.{name}": count for name, count in counts.items()},
                                   **{f"dataset_digest.{task.name}": task.digest for task in tasks}})
        spec = stage_spec(
            run, JOINT_STAGE, input_model_uri=model_uri,
            data=StageData(encoding="instruction", datasets=list(tasks), supervise=cfg.cit.supervise),
            optim=optim, tuning=cfg.cit.tuning, methods=cfg.cit.methods,
            seed=cfg.stage_seed("cit"), task_index=0, mlflow_run_id=child,
        )
        model_out = run_stage(spec, run.services)
    return CITStep(model_uri=model_out, replay_uri=None, stage=JOINT_STAGE, plugin_state_uri=model_out,
                   records=sum(counts.values()), joint=list(counts))
