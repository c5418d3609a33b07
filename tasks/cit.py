"""Continual instruction tuning: one stage per task, with replay from a versioned buffer in S3."""

from __future__ import annotations

import math
import shutil

from pydantic import BaseModel

from models.cl.registry import build_plugins, check_requirements
from models.cl.replay import ReplayBuffer, make_loss_fn, mix_examples
from models.data import encode_instruction
from models.engine import resolve_device
from models.loading import load_model_and_tokenizer
from perennial.config import Config
from tasks.ingest import DataBundle, read_records
from tasks.runtime import RunContext, committed_uri, fetch_dir, open_store, open_tracker
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


def _encoder(cfg: Config, records: list[dict]):
    def encode(tokenizer):
        return [encode_instruction(tokenizer, r["prompt"], r["response"], cfg.cit.optim.max_length) for r in records]

    return encode


def _sampling_options(run: RunContext, model_uri: str) -> dict:
    """`loss-mid` scores the task's records with the model just trained on it."""
    cfg = run.config
    replay = cfg.cit.replay
    options = {"label_key": replay.label_key}
    if replay.strategy == "loss-mid":
        local = fetch_dir(open_store(cfg), model_uri, cfg.work_dir / "cache")
        model, tokenizer = load_model_and_tokenizer(local, device=resolve_device(cfg.device))
        encode = lambda r: encode_instruction(tokenizer, r["prompt"], r["response"], cfg.cit.optim.max_length)  # noqa: E731
        options.update(loss_fn=make_loss_fn(model, encode, tokenizer.pad_token_id), quantile=replay.loss_quantile)
    return options


def train_task(run: RunContext, model_uri: str, data: DataBundle, index: int, previous: CITStep | None) -> CITStep:
    cfg = run.config
    check_requirements(cfg.cit.methods, cfg.cit.tuning.method, cfg.model.attn_implementation)
    store = open_store(cfg)
    task = data.tasks[index]
    stage = stage_name(index, task.name)
    records = read_records(store, task, cfg.work_dir / "cache", split="train")
    replay = cfg.cit.replay
    buffer = _load_buffer(run, previous.replay_uri if previous else None)
    replay_records = buffer.records() if replay.enabled else []
    separate_replay_phase = replay.mixing == "epoch" and bool(replay_records)

    def encode(tokenizer):
        current = _encoder(cfg, records)(tokenizer)
        if separate_replay_phase or not replay_records:
            return current
        return mix_examples(current, _encoder(cfg, replay_records)(tokenizer), mode=replay.mixing, seed=cfg.seed)

    tracker = open_tracker(cfg)
    child = tracker.start_stage_run(stage, run.parent_run_id, tags={"stage": stage, "task": task.name})
    tracker.log_params(child, {"task": task.name, "train_records": len(records), "replay_records": len(replay_records), "dataset_digest": task.digest})
    plugins = build_plugins(cfg.cit.methods, seed=cfg.seed + index)
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
        # interleave builds its own alternating order of replay and current examples: keep it
        shuffle=not (replay.mixing == "interleave" and replay_records),
    )
    if separate_replay_phase:
        # `epoch` mixing: one pass over the replay examples after the task, as its own committed stage.
        epoch = cfg.cit.optim.model_copy(
            update={"max_steps": math.ceil(len(replay_records) / cfg.cit.optim.batch_size), "warmup_steps": 0, "checkpoint_every": 0}
        )
        model_out = run_stage(run, f"{stage}-replay", model_out, _encoder(cfg, replay_records), epoch, cfg.cit.tuning, task_index=index, mlflow_run_id=child)
    tracker.finish(child)

    replay_uri = None
    if replay.enabled:
        replay_prefix = f"{run.prefix}/replay/after-{index + 1:02d}"
        replay_uri = committed_uri(store, replay_prefix)
        if replay_uri is None:
            buffer.add_task(task.name, records, budget=replay.budget, strategy=replay.strategy, seed=cfg.seed, **_sampling_options(run, model_out))
            local = run.work_dir / "replay" / f"after-{index + 1:02d}"
            shutil.rmtree(local, ignore_errors=True)
            local.mkdir(parents=True)
            buffer.to_jsonl(local / BUFFER_FILE)
            replay_uri = store.upload_dir(local, replay_prefix, meta={"tasks": buffer.task_names(), "strategy": replay.strategy})["uri"]
    return CITStep(model_uri=model_out, replay_uri=replay_uri, stage=stage)
