"""Continuing a lineage: the version a retrain continues, what that version has learned, and what is new.

With `lineage.continue_from: champion` (or a `models:/` reference) a retrain starts continual tuning
from that registered version's checkpoint instead of the base model, with the version's
continual-learning state (its replay buffer and the CL plugins' state, stored with the checkpoint),
and trains only what the version has not learned: tasks absent from its history, and the new
records of a task whose dataset grew since (`new_data: append`), with replay of the old ones. The
version's lineage record (perennial/lineage.py) gives its history and the accuracy-matrix rows of
earlier retrains. docs/operations.md, "Lineages", explains what continues, what is carried, rebase,
rejected nights and rollback.
"""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel

from models.engine import plugin_state_file
from perennial import registry
from perennial.config import Config, ConfigError, canonical_json
from perennial.ingest import iter_version
from perennial.lineage import LINEAGE_FILE, LineageRecord, LineageRow, LineageTask
from perennial.storage import MANIFEST_NAME
from tasks.ingest import DataBundle, DatasetRef
from tasks.runtime import RunContext, fetch_dir, uri_to_prefix
from tasks.stage import PLUGIN_DIR

# Registry version tags a continued retrain reads (tasks/register.py writes them).
LINEAGE_URI_TAG = "lineage_uri"  # the committed folder holding lineage.json
LINEAGE_BASE_TAG = "lineage_base"  # lineage_base(): what the version's weights started from, and how they are tuned
REPLAY_URI_TAG = "replay_uri"  # the replay buffer after the version's last task
MULTITASK_TAG = "cit_multitask"  # "true" on a version a joint (cit.multitask) retrain registered: never continued
CONTINUED_FROM_TAG = "continued_from"  # the version this one continued ("none": trained from the base model)


class LineageError(ValueError):
    """The version a retrain is to continue cannot be continued (its checkpoint, history or CL state
    is missing or corrupt); the message names what and the fix. Not retried."""


class LineageStart(BaseModel):
    """The registered version a retrain continues."""

    version: int
    checkpoint_uri: str
    checkpoint_digest: str  # its manifest digest: part of the run's inputs (tasks.runtime.bind_inputs)
    replay_uri: str | None  # the buffer to go on with (None: start an empty one)
    plugin_state_uri: str | None  # the checkpoint, when it holds the configured CL plugins' state
    last_stage: str


class LineagePlan(BaseModel):
    """What one retrain trains and scores."""

    start: LineageStart | None  # None: from the base model
    record: LineageRecord  # the lineage before this retrain (empty when it starts from the base model)
    train: list[DatasetRef]  # the tasks to train, in order; a learned task that grew reads its new records (`since`)
    score: list[DatasetRef]  # the tasks scored after every stage: the lineage's, then the new ones
    first_index: int  # the lineage position (0-based) of the first task trained here

    @property
    def stage0_tasks(self) -> list[DatasetRef]:
        """The tasks to score before training: all of them from the base model, else those the lineage's
        last row has no score for (its other scores are read from the record, not recomputed)."""
        if self.start is None:
            return self.score
        known = self.record.rows[-1].scores if self.record.rows else {}
        return [task for task in self.score if known.get(task.name) is None]


def lineage_base(cfg: Config) -> str:
    """A digest of what a lineage's weights are: the base model they started from (its file or hub id,
    or the tiny model's shape and pretraining, not the data it read), the tokenizer that comes with it,
    and the tuning method. A version can be continued only by a config with the same."""
    model = cfg.model
    if model.source == "gguf":
        from models.gguf import file_sha256, resolve_gguf

        base = {"gguf_sha256": file_sha256(resolve_gguf(model.gguf_file))}
    elif model.source == "tiny":
        base = {"tiny": model.tiny.model_dump(), "pretrain": model.pretrain.model_dump(), "seed": cfg.stage_seed("pretrain")}
    else:
        base = {"name_or_path": model.name_or_path, "revision": model.revision}
    identity = {"source": model.source, **base, "tuning_method": cfg.cit.tuning.method}
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:24]


def plan_lineage(run: RunContext, data: DataBundle) -> LineagePlan:
    """Resolve `lineage.continue_from` and decide what to train.

    Raises ConfigError when the version was trained from another base model or with another tuning
    method (a rebase: fix `lineage.continue_from=none`), LineageError when its checkpoint, lineage
    record, replay buffer or CL state is missing or corrupt, RegistryError when the reference names
    no version. Nothing is trained or registered before these checks.
    """
    cfg = run.config
    version = _version_to_continue(run)
    if version is None:
        return LineagePlan(start=None, record=LineageRecord(), train=list(data.tasks), score=list(data.tasks), first_index=0)
    start, record = _open_version(run, version)
    train, score = [], _lineage_tasks(record)
    scored = {task.name for task in score}
    for ref in data.tasks:
        last = record.last_trained(ref.name)
        if last is None:
            train.append(ref)
        elif last.digest_of(ref.name) != ref.digest:  # the dataset grew (or changed): its new records, if any
            earlier = record.task(ref.name)
            grown = ref.model_copy(update={"since": earlier.uri})
            if any(True for _ in iter_version(run.store, grown.uri, run.services.cache_dir / "datasets", "train",
                                              task=grown.name if grown.dataset else None, since=grown.since)):
                train.append(grown)
        if ref.name not in scored:
            score.append(ref)
        elif any(task.name == ref.name for task in train):  # retrained: scored on the version it trains on
            score = [ref if task.name == ref.name else task for task in score]
    learned = ", ".join(row.task or " + ".join(row.joint) for row in record.history) or "nothing"
    print(f"lineage {cfg.tracking.registered_model}: continues version {start.version} ({learned}); "
          + (f"trains {', '.join(t.name + (' (new records)' if t.since else '') for t in train)}" if train else "nothing new to train"))
    return LineagePlan(start=start, record=record, train=train, score=score, first_index=len(record.history))


def _version_to_continue(run: RunContext):
    """The registry version `lineage.continue_from` names; None for `none`, and for `champion` while the
    model has none (the lineage's first retrain starts from the base model)."""
    cfg = run.config
    target = cfg.lineage.continue_from
    if target == "none":
        return None
    client = run.tracker.client
    if target == "champion":
        version = registry.alias_version(client, cfg.tracking.registered_model, registry.CHAMPION)
        if version is None:
            print(f"lineage {cfg.tracking.registered_model}: no champion yet, so this retrain starts from the base model")
        return version
    return registry.resolve_version(client, target)


def _open_version(run: RunContext, version) -> tuple[LineageStart, LineageRecord]:
    """The version's checkpoint (downloaded, every file sha256-checked), lineage record, replay buffer and
    CL state, each checked before anything trains."""
    cfg = run.config
    tags = version.tags
    name = f"{version.name} version {version.version}"
    fix = "lineage.continue_from=none retrains the whole task history from the base model"
    base = tags.get(LINEAGE_BASE_TAG)
    if base is None or LINEAGE_URI_TAG not in tags:
        raise LineageError(f"{name} has no lineage record (it was registered before lineages, or by hand): "
                           f"it cannot be continued; {fix}")
    if tags.get(MULTITASK_TAG) == "true":
        raise LineageError(f"{name} is a multi-task upper bound (cit.multitask): every task trained in one stage, with no "
                           "replay buffer or per-task CL state to continue; continue a version of a sequential retrain "
                           f"(lineage.continue_from=models:/{version.name}/N), or {fix}")
    if base != lineage_base(cfg):
        raise ConfigError(
            f"{name} was trained from another base model, tokenizer or tuning method (its tags: base_model "
            f"{tags.get('base_model')!r}, tuning_method {tags.get('tuning_method')!r}; this config: model.source "
            f"{cfg.model.source!r}, cit.tuning.method {cfg.cit.tuning.method!r}), so its weights cannot be continued "
            f"by this config. To rebase the lineage: {fix}")
    checkpoint = tags.get("checkpoint_uri", "")
    manifest = _committed(run, checkpoint, f"{name}'s checkpoint")
    fetch_dir(run.store, checkpoint, run.services.cache_dir)  # downloads it once; every file's sha256 is checked
    record_dir = fetch_dir(run.store, _committed_uri(run, tags[LINEAGE_URI_TAG], f"{name}'s lineage record"), run.services.cache_dir)
    record = LineageRecord.model_validate(json.loads((record_dir / LINEAGE_FILE).read_text()))
    trained_methods = [m for m in tags.get("cl_methods", "none").split(",") if m not in ("", "none")]
    replay_uri = None
    if cfg.cit.replay.enabled and "replay" in trained_methods:
        replay_uri = _committed_uri(run, tags.get(REPLAY_URI_TAG, ""), f"{name}'s replay buffer")
    configured = [method.name for method in cfg.cit.methods]
    plugin_state_uri = None
    if configured and configured == [m for m in trained_methods if m != "replay"]:
        files = [f"{PLUGIN_DIR}/{plugin_state_file(i, method)}" for i, method in enumerate(configured)]
        missing = [file for file in files if file not in manifest["files"]]
        if missing:
            raise LineageError(f"{name} was trained with cit.methods {configured}, but its checkpoint {checkpoint} holds no "
                               f"state for them ({', '.join(missing)}): it cannot be continued with its CL state; {fix}")
        plugin_state_uri = checkpoint
    elif configured:
        print(f"lineage {cfg.tracking.registered_model}: {name} was trained with CL methods {trained_methods or ['none']}; "
              f"cit.methods {configured} start with fresh state")
    start = LineageStart(version=int(version.version), checkpoint_uri=checkpoint, checkpoint_digest=manifest["digest"],
                         replay_uri=replay_uri, plugin_state_uri=plugin_state_uri,
                         last_stage=record.rows[-1].stage if record.rows else "start")
    return start, record


def _committed(run: RunContext, uri: str, what: str) -> dict:
    """The manifest of a committed folder, or LineageError naming what is missing."""
    manifest = None
    if uri.startswith(f"s3://{run.store.bucket}/"):
        manifest = run.store.read_manifest(uri_to_prefix(run.store, uri))
    if manifest is None:
        raise LineageError(f"{what} is missing: {uri or '(no URI recorded)'} has no {MANIFEST_NAME} in bucket "
                           f"{run.store.bucket}; lineage.continue_from=none retrains the whole task history from the base model")
    return manifest


def _committed_uri(run: RunContext, uri: str, what: str) -> str:
    _committed(run, uri, what)
    return uri


def _lineage_tasks(record: LineageRecord) -> list[DatasetRef]:
    """The lineage's tasks as refs to the dataset versions they were last trained on (their test records)."""
    return [DatasetRef(name=task.name, kind="instruction", digest=task.digest, uri=task.uri, data_file="data.jsonl",
                       chance=task.chance, dataset=task.dataset if task.subset else None)
            for task in record.tasks]


def extend_lineage(run: RunContext, plan: LineagePlan, evaluations: list, steps: list) -> tuple[LineageRecord, int]:
    """The lineage record after this retrain, and the row its training started from.

    ``evaluations``: the retrain's StageEval, stage 0 first; ``steps``: its CITStep, one per task of
    ``plan.train``, or one joint step for all of them (cit.multitask: one row naming every task it trained).
    Row 0 is stage 0 when the lineage starts here; when it continues a version, that version's last row is
    the start, and stage 0 only fills in the tasks it had no score for.
    """
    record = plan.record.model_copy(deep=True)
    for ref in plan.score:
        column = LineageTask(name=ref.name, dataset=ref.dataset_name, subset=ref.dataset is not None, digest=ref.digest,
                             uri=ref.uri, chance=ref.chance)
        record.tasks = [column if task.name == ref.name else task for task in record.tasks]
        if record.task(ref.name) is None:
            record.tasks.append(column)
    stage0 = evaluations[0].scores
    corrected0 = _corrected(evaluations[0])
    if plan.start is None:
        record.rows = [LineageRow(stage="before-cit", run_key=run.run_key, mlflow_run_id=run.parent_run_id, scores=stage0,
                                  corrected=corrected0)]
    else:
        last = record.rows[-1]
        last.scores = {**stage0, **{name: score for name, score in last.scores.items() if score is not None}}
        last.corrected = {**corrected0, **{name: score for name, score in last.corrected.items() if score is not None}}
    start_row = len(record.rows) - 1
    by_name = {ref.name: ref for ref in plan.train}
    for ref, step, evaluation in zip(plan.train, steps, evaluations[1:]):
        row = LineageRow(stage=step.stage, run_key=run.run_key, mlflow_run_id=run.parent_run_id, scores=evaluation.scores,
                         corrected=_corrected(evaluation), records=step.records)
        if step.joint:  # one stage trained these tasks together
            row.joint = {name: by_name[name].digest for name in step.joint}
        else:
            row.task, row.dataset_digest = ref.name, ref.digest
        record.rows.append(row)
    return record, start_row


def _corrected(evaluation) -> dict[str, float | None]:
    return {name: detail.get("corrected_accuracy") for name, detail in evaluation.details.items()}
