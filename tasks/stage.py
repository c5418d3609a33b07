"""One training stage (base pretraining, DAP, or one CIT task): a `StageSpec` run by `execute_stage`.

The spec is a plain value (it crosses a process boundary as spec.json): where the input model
and data are in S3, how to encode the data, the optimizer, tuning and CL method configs, the seed.
`execute_stage` is the stage's whole lifecycle: load, tune, build the CL plugins, train, export,
commit. In-process it is world size 1; under torchrun (tasks/launch.py) every rank runs it and
rank 0 writes and commits.

A stage's output is committed when ``<stage_root>/model/MANIFEST.json`` exists. Mid-stage
checkpoints are committed the same way under ``<stage_root>/checkpoints``; a rerun after a crash
resumes from the newest one, and the engine's step-derived data order makes the result identical
to an uninterrupted run.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Callable, Literal

import torch.distributed as dist
from pydantic import BaseModel

from models.cl.base import TaskContext
from models.cl.registry import build_plugins
from models.cl.replay import ReplayBuffer, mix_examples, mix_general
from models.data import Supervise, encode_record, pack_texts
from models.engine import (TrainResult, full_state_dict, is_sharded, load_plugin_states, plugin_states, resolve_device,
                           save_plugin_states, set_seed, shard_model, train)
from models.loading import load_causal_lm, load_model_and_tokenizer, save_model
from models.tuning import TuningPlan, apply_tuning, count_parameters, merge_for_export, plan_tuning
from perennial.config import CLMethodConfig, DistributedStrategy, OptimConfig, TuningConfig, stream_seed, task_seed
from perennial.storage import MANIFEST_NAME, ObjectStore
from tasks.ingest import DatasetRef, read_records
from tasks.runtime import RunContext, Services, committed_uri, fetch_dir, uri_to_prefix

PLUGIN_DIR = "perennial_plugins"
BUFFER_FILE = "buffer.jsonl"


class StageData(BaseModel):
    """What a stage trains on, as dataset versions in S3 and how to encode them.

    ``packed``: the text records of ``datasets`` (with ``general`` mixed in at
    ``general_mix_fraction`` of them, DAP), tokenized and packed into blocks of optim.max_length.
    ``instruction``: the prompt/response records of ``datasets`` plus, with ``replay_uri``, the
    replay buffer's records mixed in by ``replay_mixing`` (``only``: the buffer's records alone,
    the separate pass of `epoch` mixing).
    """

    encoding: Literal["packed", "instruction"]
    datasets: list[DatasetRef] = []
    general: DatasetRef | None = None
    general_mix_fraction: float = 0.0
    replay_uri: str | None = None
    replay_mixing: Literal["interleave", "concat", "only"] = "concat"
    supervise: Supervise = "all"  # instruction: which assistant turns of a conversation carry loss (cit.supervise)


class StageSpec(BaseModel):
    """Everything one stage needs, as values: the same on every rank, and the same across retries."""

    name: str
    stage_root: str  # S3 prefix: <stage_root>/model is the output, <stage_root>/checkpoints the mid-stage ones
    work_dir: Path  # this stage's local folder (exports, checkpoints, the metrics spool)
    input_model_uri: str
    data: StageData
    optim: OptimConfig
    tuning: TuningConfig
    methods: list[CLMethodConfig] = []  # CL methods, built into plugins on each rank
    plugin_state_uri: str | None = None  # the previous CIT stage's output, which holds the plugins' state
    seed: int
    task_index: int = 0
    mlflow_run_id: str | None = None
    config_digest: str
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    attn_implementation: Literal["eager", "sdpa"] = "eager"
    processes: int = 1  # per node
    strategy: DistributedStrategy = "ddp"
    nodes: int = 1  # > 1: `launcher` runs torchrun on every node; they meet at `rdzv_endpoint` (tasks/launch.py)
    rdzv_endpoint: str | None = None
    launcher: list[str] = []

    @property
    def output_prefix(self) -> str:
        return f"{self.stage_root}/model"

    @property
    def checkpoints_prefix(self) -> str:
        return f"{self.stage_root}/checkpoints"


def stage_spec(run: RunContext, name: str, *, stage_root: str | None = None, **fields) -> StageSpec:
    """A spec for stage ``name`` of this run: the run's device, precision, processes and config
    digest; ``stage_root`` defaults to the run's own stage prefix (DAP and the base model share
    theirs across runs by content digest). ``fields`` are the stage's own (data, optim, ...)."""
    cfg = run.config
    return StageSpec(
        name=name, stage_root=stage_root or run.stage_prefix(name), work_dir=run.work_dir / name,
        config_digest=cfg.digest(), device=cfg.device, precision=cfg.precision,
        attn_implementation=cfg.model.attn_implementation, processes=cfg.distributed.nproc_per_node,
        strategy=cfg.distributed.strategy, nodes=cfg.distributed.nnodes, rdzv_endpoint=cfg.distributed.rdzv_endpoint,
        launcher=cfg.distributed.launcher, **fields,
    )


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
    shutil.rmtree(local, ignore_errors=True)  # an earlier attempt's download is not this one's
    resume_prefix = latest_checkpoint(store, checkpoints_prefix)
    if not resume_prefix:
        return None
    store.download_dir(resume_prefix, local)
    return local


def checkpoint_committer(store: ObjectStore, checkpoints_prefix: str, stage: str) -> Callable[[int, Path], None]:
    """The engine's checkpoint_fn: upload a mid-stage checkpoint with its manifest, then free the disk."""

    def commit_checkpoint(step: int, state_dir: Path) -> None:
        store.upload_dir(state_dir, f"{checkpoints_prefix}/{state_dir.name}", meta={"stage": stage, "step": step})
        shutil.rmtree(state_dir, ignore_errors=True)  # S3 holds it now; keep local disk bounded

    return commit_checkpoint


def finished_stage(spec: StageSpec, services: Services) -> str | None:
    """The committed output's URI when an earlier attempt committed it, else None.

    Such an attempt may have failed to send its last metrics (MLflow down): they are sent now.
    """
    done = committed_uri(services.store, spec.output_prefix)
    if done:
        services.stage_tracker(spec.work_dir).flush(attempts=10)
    return done


def read_replay_buffer(services: Services, replay_uri: str | None) -> ReplayBuffer:
    if not replay_uri:
        return ReplayBuffer()
    return ReplayBuffer.from_jsonl(fetch_dir(services.store, replay_uri, services.cache_dir) / BUFFER_FILE)


def _stage_records(spec: StageSpec, services: Services) -> tuple[list, list[dict]]:
    """The stage's raw records (texts for packed, dicts for instruction) and the replay records."""
    data = spec.data
    own = [r for ref in data.datasets for r in read_records(services.store, ref, services.cache_dir, split="train")]
    if data.encoding == "packed":
        texts = [r["text"] for r in own]
        if data.general is not None:
            general = [r["text"] for r in read_records(services.store, data.general, services.cache_dir, split="train")]
            texts = mix_general(texts, general, data.general_mix_fraction, seed=spec.seed)
        return texts, []
    return own, read_replay_buffer(services, data.replay_uri).records()


def encode_stage_data(spec: StageSpec, tokenizer, records: list, replay: list[dict]) -> tuple[list[dict], bool]:
    """The encoded examples and whether the engine shuffles them (interleaved replay keeps its order)."""
    data, max_length = spec.data, spec.optim.max_length
    if data.encoding == "packed":
        return [{"input_ids": block} for block in pack_texts(tokenizer, records, max_length)], True

    def encode(rows: list[dict]) -> list[dict]:
        return [encode_record(tokenizer, r, max_length, data.supervise) for r in rows]

    if data.replay_mixing == "only":
        return encode(replay), True
    if not replay:
        return encode(records), True
    return mix_examples(encode(records), encode(replay), mode=data.replay_mixing, seed=spec.seed), data.replay_mixing != "interleave"


# Replay records a plugin that asks for validation data scores what the model keeps on (MergePlugin).
RETENTION_EXAMPLES = 64


def hold_out(spec: StageSpec, rows: list, count: int) -> tuple[list, list]:
    """(the rows to train on, ``count`` rows held out of training), drawn with the stage's seed so a resumed
    stage holds out the same; at most a quarter of the rows."""
    count = min(count, len(rows) // 4)
    if count <= 0:
        return rows, []
    held = set(random.Random(stream_seed(spec.seed, spec.task_index)).sample(range(len(rows)), count))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def carve_validation(spec: StageSpec, records: list, replay: list[dict], count: int) -> tuple[list, list[dict], list[dict], list[dict]]:
    """(the task's records to train on, ``count`` of them held out, the replay records to train on, up to
    RETENTION_EXAMPLES of them held out): the validation sets of a plugin that asks for ``count`` > 0
    (MergePlugin), none of which the stage trains on, so a score on them is not a score on training data.
    Nothing is held out of a packed (DAP) or replay-only stage."""
    if count <= 0 or spec.data.encoding != "instruction" or spec.data.replay_mixing == "only":
        return records, [], replay, []
    records, validation = hold_out(spec, records, count)
    replay, retention = hold_out(spec, replay, RETENTION_EXAMPLES) if validation else (replay, [])
    return records, validation, replay, retention


def _fetch_inputs(spec: StageSpec, services: Services, download: bool):
    """(input model folder, records, replay records, resume checkpoint folder or None, plugin state folder or None).

    Only rank 0 downloads (``download``): the others then find every file in the local cache.
    """
    model_dir = fetch_dir(services.store, spec.input_model_uri, services.cache_dir)
    local_resume = spec.work_dir / "resume"
    if download:
        resume = download_resume(services.store, spec.checkpoints_prefix, local_resume)
    else:
        resume = local_resume if (local_resume / "state.json").exists() else None
    plugin_dir = None
    if spec.plugin_state_uri and spec.methods:
        plugin_dir = fetch_dir(services.store, spec.plugin_state_uri, services.cache_dir) / PLUGIN_DIR
    return (model_dir, *_stage_records(spec, services), resume, plugin_dir)


def _rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def execute_stage(spec: StageSpec, services: Services) -> str:
    """Train the stage and commit its output; returns the committed model's URI on rank 0 ("" on the others).

    Every rank of a torchrun job calls it with the same spec (torch.distributed initialised, the
    model wrapped in DDP or sharded with FSDP2 by the engine); in-process it is world size 1.
    Rank 0 fills the local caches (input model, data, resume checkpoint) before the other ranks
    read them. Raises what loading or training raises (FileNotFoundError for an uncommitted
    input, NonFiniteLossError, ...); nothing is committed then.
    """
    rank, world = _rank()
    device = resolve_device(spec.device)
    sharded = world > 1 and spec.strategy == "fsdp"
    if rank == 0:
        inputs = _fetch_inputs(spec, services, download=True)
    if world > 1:
        dist.barrier()
    if rank != 0:
        inputs = _fetch_inputs(spec, services, download=False)
    model_dir, records, replay, resume, plugin_dir = inputs

    set_seed(task_seed(spec.seed, spec.task_index))  # every rank draws the same fresh adapter (O-LoRA needs a new one per task)
    # FSDP: loaded on the CPU; the engine shards it, so it reaches the device one block at a time.
    model, tokenizer = load_model_and_tokenizer(model_dir, attn_implementation=spec.attn_implementation,
                                                device="cpu" if sharded else device)
    plugins = build_plugins(spec.methods, seed=task_seed(spec.seed, spec.task_index))
    records, validation, replay, retention = carve_validation(spec, records, replay, max((p.validation_records for p in plugins), default=0))
    examples, shuffle = encode_stage_data(spec, tokenizer, records, replay)
    if plugin_dir is not None:
        load_plugin_states(plugins, plugin_dir)
    plan = plan_tuning(model, spec.tuning)  # refuses a method this architecture cannot take, before any step
    model = apply_tuning(model, spec.tuning, plan)
    trainable = count_parameters(model)[0]  # before any sharding: whole tensors
    if sharded:
        # Before the plugins' first hook, so the state they build from the weights (task-start copies, LwF's
        # teacher values) is sharded like them from the start: 1/W per rank. The engine then trains it as it is.
        shard_model(model, device)
        model.to(device)
    context = TaskContext(task_index=spec.task_index, task_name=spec.name, model=model, train_examples=examples,
                          pad_token_id=tokenizer.pad_token_id,
                          validation_examples=[encode_record(tokenizer, r, spec.optim.max_length, spec.data.supervise) for r in validation],
                          retention_examples=[encode_record(tokenizer, r, spec.optim.max_length, spec.data.supervise) for r in retention])
    for plugin in plugins:
        plugin.before_task(context)

    tracker = services.stage_tracker(spec.work_dir) if rank == 0 and spec.mlflow_run_id else None

    def log(metrics: dict[str, float], step: int) -> None:
        tracker.log_metrics(spec.mlflow_run_id, {f"train/{k}": v for k, v in metrics.items()}, step)

    # Under FSDP every rank passes checkpoint_fn (gathering is a collective); the engine calls it on rank 0 only.
    result = train(
        model, examples, spec.optim, seed=spec.seed, pad_token_id=tokenizer.pad_token_id, device=device,
        plugins=plugins, resume_from=resume, checkpoint_fn=checkpoint_committer(services.store, spec.checkpoints_prefix, spec.name),
        checkpoint_dir=spec.work_dir / "checkpoints", log_fn=log if tracker else None, desc=spec.name, shuffle=shuffle,
        strategy=spec.strategy, precision=spec.precision,
    )
    for plugin in plugins:
        plugin.after_task(context)
    state = full_state_dict(model) if is_sharded(model) else None  # a collective: before the rank-0 branch
    states = plugin_states(plugins)  # likewise under FSDP (their sharded state is gathered)
    uri = ""
    if rank == 0:
        if state is not None:
            # A sharded module cannot be saved as one model; a plain copy of the same tuning can.
            model = apply_tuning(load_causal_lm(model_dir, attn_implementation=spec.attn_implementation), spec.tuning)
            model.load_state_dict(state)
        export_dir = spec.work_dir / "model"
        shutil.rmtree(export_dir, ignore_errors=True)
        adapter = spec.work_dir / ADAPTER_DIR
        save_adapter(model, adapter, spec.input_model_uri, services)  # before merging folds it away
        save_model(merge_for_export(model), tokenizer, export_dir)
        if adapter.is_dir():
            adapter.rename(export_dir / ADAPTER_DIR)
        if plugins:
            save_plugin_states(plugins, export_dir / PLUGIN_DIR, states)
        uri = _commit_output(spec, services, export_dir, result, tracker, plan, trainable)
    if world > 1:
        dist.barrier()  # no rank exits (and ends the job) before the output is committed
    return uri


ADAPTER_DIR = "adapter"  # in a LoRA / MoRA stage's output, beside the merged model that loaders read


def save_adapter(model, folder: Path, base_uri: str, services: Services) -> None:
    """A LoRA / MoRA stage's adapter alone (peft's `save_pretrained`: adapter_config.json, adapter_model.safetensors),
    with `base.json` naming the checkpoint it applies to (its URI and manifest digest): a few MB that rebuild the
    stage from its base with `PeftModel.from_pretrained`. Nothing for other tuning methods."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(str(folder))
    manifest = services.store.read_manifest(uri_to_prefix(services.store, base_uri)) if base_uri.startswith("s3://") else None
    (folder / "base.json").write_text(json.dumps({"base_model_uri": base_uri, "base_manifest_digest": (manifest or {}).get("digest")}))


def _commit_output(spec: StageSpec, services: Services, export_dir: Path, result: TrainResult, tracker, plan: TuningPlan,
                   trainable: int) -> str:
    """Commit the exported model (files first, manifest last) and log the stage's final metrics and what it trained."""
    (export_dir / "training.json").write_text(json.dumps({
        "stage": spec.name, "steps": result.steps, "resumed_from": result.resumed_from, "losses": result.losses,
        "tuning": plan.params(),
    }))
    if tracker is not None:
        tracker.flush(raise_on_error=False)  # what is still unsent stays in the spool; a retry sends it
    manifest = services.store.upload_dir(
        export_dir, spec.output_prefix, meta={"stage": spec.name, "config_digest": spec.config_digest, "steps": result.steps}
    )
    if tracker is not None:
        tracker.log_metrics(
            spec.mlflow_run_id,
            {"train/final_loss": result.losses[-1], "train/tokens_per_second": result.tokens_per_second,
             "train/tokens": result.tokens, "train/resumed_from": result.resumed_from, "train/trainable_params": trainable},
            result.steps,
        )
        tracker.set_tags(spec.mlflow_run_id, {"checkpoint_uri": manifest["uri"], "checkpoint_digest": manifest["digest"]})
        tracker.log_params(spec.mlflow_run_id, plan.params())  # what the method resolved to on this architecture
        tracker.flush(attempts=5)
    shutil.rmtree(export_dir, ignore_errors=True)
    return manifest["uri"]
