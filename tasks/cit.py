"""Continual instruction tuning: one stage per task, with replay from a versioned buffer in S3."""

from __future__ import annotations

import shutil

from pydantic import BaseModel

from models.cl.registry import build_plugins
from models.cl.replay import ReplayBuffer, mix_examples
from models.data import encode_instruction
from perennial.config import ReplayConfig
from tasks.ingest import DataBundle, read_records
from tasks.runtime import RunContext, committed_uri, fetch_dir, open_store, open_tracker, uri_to_prefix
from tasks.training import run_stage

BUFFER_FILE = "buffer.jsonl"


class CITStep(BaseModel):
    model_uri: str
    replay_uri: str | None
    stage: str


def stage_name(index: int, task: str) -> str:
    return f"cit-{index + 1:02d}-{task}"


def _load_buffer(run: RunContext, replay_uri: str | None) -> ReplayBuffer:
    if not replay_uri:
        return ReplayBuffer()
    store = open_store(run.config)
    return ReplayBuffer.from_jsonl(fetch_dir(store, replay_uri, run.config.work_dir / "cache") / BUFFER_FILE)


def train_task(run: RunContext, model_uri: str, data: DataBundle, index: int, previous: CITStep | None) -> CITStep:
    cfg = run.config
    store = open_store(cfg)
    task = data.tasks[index]
    stage = stage_name(index, task.name)
    records = read_records(store, task, cfg.work_dir / "cache", split="train")
    replay: ReplayConfig = cfg.cit.replay
    buffer = _load_buffer(run, previous.replay_uri if previous else None)
    replay_records = buffer.records() if replay.enabled else []

    def encode(tokenizer):
        max_length = cfg.cit.optim.max_length
        current = [encode_instruction(tokenizer, r["prompt"], r["response"], max_length) for r in records]
        replayed = [encode_instruction(tokenizer, r["prompt"], r["response"], max_length) for r in replay_records]
        return mix_examples(current, replayed, mode=replay.mixing, seed=cfg.seed)

    tracker = open_tracker(cfg)
    child = tracker.start_run(stage, parent_id=run.parent_run_id, tags={"stage": stage, "task": task.name})
    tracker.log_params(child, {"task": task.name, "train_records": len(records), "replay_records": len(replay_records), "dataset_digest": task.digest})
    plugins = build_plugins(cfg.cit.methods)
    model_out = run_stage(
        run,
        stage,
        model_uri,
        encode,
        cfg.cit.optim,
        cfg.cit.tuning,
        plugins=plugins,
        plugin_state_uri=previous.model_uri if previous and plugins else None,
        task_index=index,
        mlflow_run_id=child,
    )
    tracker.finish(child)

    replay_uri = None
    if replay.enabled:
        replay_prefix = f"{run.prefix}/replay/after-{index + 1:02d}"
        replay_uri = committed_uri(store, replay_prefix)
        if replay_uri is None:
            buffer.add_task(task.name, records, budget=replay.budget, strategy=replay.strategy, seed=cfg.seed)
            local = run.work_dir / "replay" / f"after-{index + 1:02d}"
            shutil.rmtree(local, ignore_errors=True)
            local.mkdir(parents=True)
            buffer.to_jsonl(local / BUFFER_FILE)
            replay_uri = store.upload_dir(local, replay_prefix, meta={"tasks": buffer.task_names(), "strategy": replay.strategy})["uri"]
    return CITStep(model_uri=model_out, replay_uri=replay_uri, stage=stage)


__all__ = ["CITStep", "train_task", "stage_name", "uri_to_prefix"]
