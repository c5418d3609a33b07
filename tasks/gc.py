"""Garbage collection of a lineage's storage under its retention policy (`retention:`, perennial/config.py).

Every stage commits a full checkpoint, and nothing deleted them: a nightly lineage grows by every
intermediate and mid-stage checkpoint it ever wrote. Perennial knows which of them a later read
needs, so gc deletes exactly the others (docs/operations.md, "Storage and retention"):

- **Kept always.** The checkpoint, replay buffer and lineage record of every *kept version* (one
  holding an alias of `retention.keep_aliases`, one of the newest `retention.keep_last_versions`,
  the version `lineage.continue_from` pins); everything an *unfinished* run resumes from (its stage
  outputs, replay buffers, the newest committed mid-stage checkpoint of its stage in progress) and
  the checkpoint it continues; every dataset version and base model; the DAP model of an unfinished
  run or of a kept version's run, and any DAP model no run of this lineage used (DAP models are shared
  by content digest).
- **May go**, once older than `retention.min_age_hours`: mid-stage checkpoints of a stage whose
  output is committed (a rerun returns the output and never reads them), older or never-committed
  mid-stage checkpoints, and, of a run that finished or failed for good, the stage outputs, replay
  buffers and DAP model no kept version references, and the MLflow model of a version not kept. Locally, the work directories of ended runs, and the
  least recently used download-cache entries above `retention.local_cache_max_gb`.

`plan_gc` reads the registry and the runs first and says why each deletion may go; `sweep` deletes.
The caller holds the lineage lock (flows/gc.py, or the retrain flow whose last stage this is), so no
retrain of the lineage runs meanwhile; `collect_garbage` also holds the model's promotion lock, so
no version becomes champion between the plan and the sweep. A folder's MANIFEST.json goes first: a
sweep killed half way leaves uncommitted files, which nothing reads and the next sweep deletes.
"""

from __future__ import annotations

import shutil
import time
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from perennial import registry
from perennial.config import Config
from perennial.model_files import SCHEME, model_files_prefix, registered_folder
from perennial.storage import MANIFEST_NAME, ObjectInfo
from perennial.tracking import ERROR_TAG, LINEAGE_TAG, RUN_KEY_TAG
from tasks.dap import DAP_MODEL_TAG
from tasks.failures import FAILED_FOR_GOOD
from tasks.lineage import CONTINUED_FROM_TAG
from tasks.runtime import RUN_RECORD, Services, run_prefix, uri_to_prefix

UNSENT_METRICS = "unsent-metrics.jsonl"  # a stage's spool of metrics MLflow has not received (perennial/tracking.py)
COMPLETE_MARKERS = (".complete", "config.json")  # what makes a cache entry look whole (fetch_dir, models/gguf.py)
GB = 1024**3


class Deletion(BaseModel):
    """One thing gc deletes (or would, in a dry run), and why it may go."""

    where: Literal["s3", "local", "mlflow"]
    path: str  # an S3 folder prefix, a local path, or a version's MLflow model (its artifact URI)
    bytes: int
    objects: int
    reason: str
    version: str | None = None  # the registry version whose checkpoint this is (tagged once deleted)
    keys: list[str] = []  # single objects (checkpoint pieces no manifest references) rather than a folder
    pieces_bytes: int = 0  # checkpoint pieces only this folder lists (freed with the pieces line, not in `bytes`)
    shared_pieces_bytes: int = 0  # pieces it lists that other folders list too: they stay while those do


class GcPlan(BaseModel):
    lineage: str
    deletions: list[Deletion] = []
    kept_versions: dict[str, str] = {}  # version -> why it is kept
    runs: dict[str, str] = {}  # run key -> finished / failed for good / unfinished (and why)
    waiting: list[str] = []  # what may go once older than retention.min_age_hours
    cache_bytes: int = 0  # the local download cache, before the sweep
    dry_run: bool = False
    min_age_hours: float = 0.0  # the policy's: what was written or used more recently waits
    deleted: int = 0  # deletions done by the sweep
    seconds: float = 0.0  # the plan and sweep, under the promotion lock

    @property
    def bytes(self) -> int:
        return sum(item.bytes for item in self.deletions)


class _Folder(BaseModel):
    prefix: str
    objects: list[str] = []
    bytes: int = 0
    newest: datetime | None = None

    @property
    def committed(self) -> bool:
        return any(key.endswith("/" + MANIFEST_NAME) for key in self.objects)

    def add(self, info: ObjectInfo) -> None:
        self.objects.append(info.key)
        self.bytes += info.size
        self.newest = max(self.newest or info.last_modified, info.last_modified)


def _folders(infos: list[ObjectInfo], root: str, depth: int) -> dict[str, _Folder]:
    """Objects under ``root`` grouped by their first ``depth`` key components below it."""
    found: dict[str, _Folder] = {}
    for info in infos:
        parts = info.key[len(root):].split("/")
        if len(parts) <= depth:
            continue
        relative = "/".join(parts[:depth])
        found.setdefault(relative, _Folder(prefix=root + relative)).add(info)
    return found


def run_state(status: str | None, tags: dict[str, str]) -> tuple[str, str]:
    """("finished" | "failed" | "unfinished", in words): a run is *ended* when it finished, or failed with an
    error that a rerun repeats (FAILED_FOR_GOOD); any other (running, killed, a retryable failure, no MLflow
    run) may still resume, so everything it resumes from is kept."""
    if status == "FINISHED":
        return "finished", "finished"
    error = tags.get(ERROR_TAG, "")
    if status == "FAILED" and error.split(":", 1)[0] in FAILED_FOR_GOOD:
        return "failed", f"failed for good ({error.split(':', 1)[0]}: a rerun fails the same way)"
    return "unfinished", f"unfinished ({(status or 'no MLflow run').lower()}): it may still resume"


def kept_versions(config: Config, services: Services) -> tuple[dict[str, str], dict[str, object]]:
    """(version -> why kept, version -> every version of the registered model)."""
    client, name, policy = services.tracker.client, config.tracking.registered_model, config.retention
    try:
        versions = {str(v.version): v for v in client.search_model_versions(f"name='{name}'")}
    except Exception as error:  # noqa: BLE001 - a model never registered has no versions
        if "RESOURCE_DOES_NOT_EXIST" in str(error):
            return {}, {}
        raise
    kept: dict[str, str] = {}
    for alias in policy.keep_aliases:
        holder = registry.alias_version(client, name, alias)
        if holder is not None:
            kept.setdefault(str(holder.version), f"holds alias {alias}")
    newest = sorted(versions, key=int, reverse=True)[: policy.keep_last_versions]
    for version in newest:
        kept.setdefault(version, f"one of the last {policy.keep_last_versions} versions")
    target = config.lineage.continue_from
    if target.startswith(f"models:/{name}/"):
        kept.setdefault(target.rsplit("/", 1)[1], "lineage.continue_from pins it")
    return kept, versions


def plan_gc(config: Config, services: Services, now: datetime | None = None, dry_run: bool = False) -> GcPlan:
    """What gc deletes for the config's lineage, each with its size and why it may go; deletes nothing.

    Reads the registry (kept versions) and every run of the lineage (its record in S3, its MLflow
    parent run) before deciding anything; a run it cannot classify counts as unfinished."""
    now = now or datetime.now(timezone.utc)
    policy, store, client = config.retention, services.store, services.tracker.client
    cutoff = now - timedelta(hours=policy.min_age_hours)
    lineage = config.tracking.registered_model
    plan = GcPlan(lineage=lineage, dry_run=dry_run, min_age_hours=policy.min_age_hours)

    kept, versions = kept_versions(config, services)
    needed: dict[str, str] = {}  # S3 folder prefix -> why kept
    for version, why in kept.items():
        tags = versions[version].tags if version in versions else {}
        for tag, what in (("checkpoint_uri", "checkpoint"), ("replay_uri", "replay buffer"), ("lineage_uri", "lineage record")):
            uri = tags.get(tag)
            if uri and uri.startswith(f"s3://{store.bucket}/"):
                needed[uri_to_prefix(store, uri)] = f"the {what} of version {version} ({why})"
    plan.kept_versions = kept
    checkpoint_version = {uri_to_prefix(store, v.tags["checkpoint_uri"]): str(v.version) for v in versions.values()
                          if v.tags.get("checkpoint_uri", "").startswith(f"s3://{store.bucket}/")}

    root = run_prefix(config, "x")[: -len("x")]
    infos = list(store.list(root))
    by_run: dict[str, list[ObjectInfo]] = defaultdict(list)
    for info in infos:
        by_run[info.key[len(root):].split("/", 1)[0]].append(info)
    states: dict[str, tuple[str, str, dict]] = {}
    continued: dict[str, str] = {}  # manifest digest of a checkpoint an unfinished run continues -> its run key
    run_ids: dict[str, tuple[str, str]] = {}  # MLflow parent run id -> (run key, state)
    run_tags: dict[str, dict[str, str]] = {}  # MLflow parent run id -> its tags
    dap_unknown: list[str] = []  # why no DAP model may go this time
    for key in sorted(by_run):
        record = store.get_json(root + key + "/" + RUN_RECORD) if any(i.key == root + key + "/" + RUN_RECORD for i in by_run[key]) else {}
        status, tags = None, {}
        if record.get("mlflow_run_id"):
            try:
                found = client.get_run(record["mlflow_run_id"])
                status, tags = found.info.status, found.data.tags
            except Exception:  # noqa: BLE001 - a deleted MLflow run: the key counts as unfinished
                pass
        state, words = run_state(status, tags)
        states[key] = (state, words, tags)
        plan.runs[key] = words
        if record.get("mlflow_run_id"):
            run_ids[record["mlflow_run_id"]] = (key, state)
            run_tags[record["mlflow_run_id"]] = tags
        if state == "unfinished" and (record.get("inputs") or {}).get("continued checkpoint"):
            continued[record["inputs"]["continued checkpoint"]] = key
        elif state == "unfinished" and DAP_MODEL_TAG not in tags:  # it may still train DAP, or read a cached DAP model
            dap_unknown.append(f"unfinished run {key} has not said which DAP model it trains from")

    references = piece_references(store)
    folder_pieces = _pieces_by_folder(references)

    def consider(folder: _Folder, reason: str, version: str | None = None) -> None:
        own, shared = folder_pieces.get(folder.prefix, (0, 0))
        if folder.newest is not None and folder.newest > cutoff:
            plan.waiting.append(f"{store.uri(folder.prefix)} ({_size(folder.bytes)}{_pieces_note(own, shared)}): {reason}")
            return
        plan.deletions.append(Deletion(where="s3", path=folder.prefix, bytes=folder.bytes, objects=len(folder.objects),
                                       reason=reason, version=version, pieces_bytes=own, shared_pieces_bytes=shared))

    for key, objects in sorted(by_run.items()):
        state, words, tags = states[key]
        run_root = root + key + "/"
        stages = _folders([i for i in objects if i.key.startswith(run_root + "stages/")], run_root + "stages/", 1)
        models = {name: _folders(folder_infos(objects, f.prefix + "/model/"), f.prefix + "/", 1).get("model")
                  for name, f in stages.items()}
        registered = tags.get(registry.REGISTERED_VERSION_TAG, "").rpartition("/")[2] or None
        last_stage = max(stages) if stages else None
        for stage in sorted(stages):
            prefix = run_root + f"stages/{stage}/"
            model = models[stage]
            steps = _folders(folder_infos(objects, prefix + "checkpoints/"), prefix + "checkpoints/", 1)
            newest = max((name for name, f in steps.items() if f.committed), default=None)
            for step, folder in sorted(steps.items()):
                if model is not None and model.committed:
                    consider(folder, f"mid-stage checkpoint of {stage}, whose output is committed: a rerun returns the "
                                     "output and never reads it")
                elif state != "unfinished":
                    consider(folder, f"mid-stage checkpoint of {stage}, which the {state} run never completed")
                elif not folder.committed:
                    consider(folder, "never committed (no MANIFEST.json): an interrupted upload that nothing reads")
                elif step != newest:
                    consider(folder, f"older than {newest}, the newest committed checkpoint of {stage}, which a resume reads")
            if model is None or state == "unfinished" or model.prefix in needed:
                continue
            digest = store.get_json(model.prefix + "/" + MANIFEST_NAME)["digest"] if model.committed and continued else None
            if digest in continued:
                plan.waiting.append(f"{store.uri(model.prefix)}: the checkpoint unfinished run {continued[digest]} continues")
                continue
            version = checkpoint_version.get(model.prefix)
            if state == "finished" and registered is None and stage == last_stage:
                continue  # the product of a run that registered no version (registry off)
            if version is not None:
                consider(model, f"checkpoint of version {version}, which holds no alias of retention.keep_aliases and is "
                                f"not among the last {config.retention.keep_last_versions} versions", version)
            else:
                consider(model, f"intermediate output of {stage} of a {state} run: no kept version references it")
        replays = _folders([i for i in objects if i.key.startswith(run_root + "replay/")], run_root + "replay/", 1)
        last_replay = max(replays) if replays else None
        for name, folder in sorted(replays.items()):
            if state == "unfinished" or folder.prefix in needed:
                continue
            if state == "finished" and registered is None and name == last_replay:
                continue
            consider(folder, f"replay buffer {name} of a {state} run that no kept version continues from")

    # The DAP model each run of the lineage trained from (tasks/dap.py tags it): needed while such a run may resume,
    # or its version is kept (a rerun of that version's key reads it); a kept version's own checkpoint holds its weights.
    dap_users: dict[str, list[str]] = defaultdict(list)  # DAP model prefix -> why a run of this lineage keeps it ("" if none)
    for key, (state, _, tags) in states.items():
        uri = tags.get(DAP_MODEL_TAG, "")
        if uri.startswith(f"s3://{store.bucket}/"):
            version = tags.get(registry.REGISTERED_VERSION_TAG, "").rpartition("/")[2]
            why = (f"unfinished run {key} may resume from it" if state == "unfinished" else
                   f"run {key} trained version {version} from it, which is kept" if version in kept else "")
            dap_users[uri_to_prefix(store, uri).rsplit("/", 1)[0]].append(why)
    for version in kept:  # a kept version trained from the base model by a run from before the tag existed
        found = versions.get(version)
        if found is not None and found.tags.get(CONTINUED_FROM_TAG, "none") == "none" and DAP_MODEL_TAG not in run_tags.get(found.run_id, {}):
            dap_unknown.append(f"kept version {version} does not say which DAP model it was trained from")
    for shared in ("base-models", "dap-models"):  # shared by content digest across runs and lineages
        shared_root = f"{config.storage.prefix}/{shared}/"
        shared_infos = list(store.list(shared_root))
        for name, folder in sorted(_folders(shared_infos, shared_root, 1).items()):
            parts = _folders(folder_infos(shared_infos, folder.prefix + "/"), folder.prefix + "/", 1)
            if parts.get("model") is None or not parts["model"].committed:
                continue  # a model still in training (maybe by another lineage): its checkpoints resume it
            users = dap_users.get(folder.prefix)
            if users and not any(users):  # only this lineage's ended runs used it, and no kept version came from it
                others = _other_lineages(client, store.uri(parts["model"].prefix), lineage)
                if dap_unknown or others:
                    plan.waiting.append(f"{store.uri(parts['model'].prefix)}: DAP model no kept version of this lineage came "
                                        f"from, kept while {'; '.join(dap_unknown + others)}")
                else:
                    consider(parts["model"], f"DAP model of {len(users)} ended run(s) of this lineage whose versions are not "
                                             "kept: the kept versions' checkpoints hold their own weights; a retrain with the "
                                             "same base, data and settings trains it again")
            for step, checkpoint in sorted(_folders(folder_infos(shared_infos, folder.prefix + "/checkpoints/"),
                                                    folder.prefix + "/checkpoints/", 1).items()):
                consider(checkpoint, f"mid-stage checkpoint of {shared}/{name}, whose model is committed: never read again")

    if policy.delete_unkept_models:  # before the pieces: a deleted version's folder no longer holds its pieces
        _plan_mlflow_models(config, store, client, kept, versions, plan, cutoff, folder_pieces, run_ids)
    _plan_pieces(store, plan, cutoff, references)
    _plan_local(config, services, plan, states, now)
    return plan


def _other_lineages(client, dap_model_uri: str, lineage: str) -> list[str]:
    """Why another lineage still keeps this DAP model: DAP models are shared by content digest, so a retrain of any
    lineage may have trained from it (its runs' DAP_MODEL_TAG); their gc decides for them."""
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    names: set[str] = set()
    for start in range(0, len(experiments), 100):
        runs = client.search_runs(experiments[start:start + 100], filter_string=f"tags.`{DAP_MODEL_TAG}` = '{dap_model_uri}'",
                                  max_results=1000)
        names |= {run.data.tags.get(LINEAGE_TAG, "(none)") for run in runs}
    return [f"lineage {name} trained from it too" for name in sorted(names - {lineage})]


def _plan_mlflow_models(config: Config, store, client, kept: dict[str, str], versions: dict, plan: GcPlan, cutoff: datetime,
                        folder_pieces: dict[str, tuple[int, int]], run_ids: dict[str, tuple[str, str]]) -> None:
    """The MLflow model (the version's `source`) of versions that are not kept. Under `registry.model_files:
    checkpoint` it is a folder of this bucket whose weights are checkpoint pieces (perennial/model_files.py): its
    own small files go here, its pieces with the pieces line once nothing else lists them; whether it is still
    there is its manifest's say (a sweep killed after tagging the version finds it again). A folder no version
    points to (its registration failed, or the version was deleted) goes once its run has ended. Under `mlflow` it
    is a full copy in MLflow's artifact store, a model a night without this."""
    kept_sources = {versions[v].source for v in kept if v in versions}

    def folder_deletion(folder: str, reason: str, version: str | None) -> Deletion | None:
        manifest = store.read_manifest(folder)
        if manifest is None:
            return None  # never committed, or deleted: its files (if any) go with the next sweep of the prefix
        small = [entry["size"] for entry in manifest["files"].values() if "pieces" not in entry]
        own, shared = folder_pieces.get(folder, (0, 0))
        return Deletion(where="mlflow", path=store.uri(folder), bytes=sum(small), objects=len(small) + 1, reason=reason,
                        version=version, pieces_bytes=own, shared_pieces_bytes=shared)

    for version, found in sorted(versions.items(), key=lambda item: int(item[0])):
        folder = registered_folder(found.source)
        if version in kept or found.source in kept_sources or (folder is None and "perennial.model_deleted" in found.tags):
            continue
        reason = (f"MLflow model of version {version}, which is not kept: models:/{found.name}/{version} stops loading; its "
                  "metrics, tags and decision stay")
        if datetime.fromtimestamp(found.creation_timestamp / 1000, timezone.utc) > cutoff:
            plan.waiting.append(f"{found.source}: {reason}")
            continue
        if folder is not None:
            if not found.source.startswith(f"{SCHEME}://{store.bucket}/"):
                plan.waiting.append(f"{found.source}: {reason}; in another bucket than this lineage's, so not this gc's")
            elif (deletion := folder_deletion(folder, reason, version)) is not None:
                plan.deletions.append(deletion)
            continue
        sizes = model_file_sizes(client, found.source)
        if sizes:
            plan.deletions.append(Deletion(where="mlflow", path=found.source, bytes=sum(sizes), objects=len(sizes),
                                           reason=reason, version=version))

    sources = {registered_folder(found.source) for found in versions.values()}
    root = model_files_prefix(config.storage.prefix, config.tracking.registered_model, "x")[: -len("x")]
    infos = list(store.list(root))
    for run_id, folder in sorted(_folders(infos, root, 1).items()):
        if folder.prefix in sources or not folder.committed:
            continue  # a version's, or an upload in flight (its files go with the run's, or the next registration's)
        key, state = run_ids.get(run_id, (None, "ended"))
        if state == "unfinished":
            continue  # its registration completes the version when the run resumes
        if folder.newest is not None and folder.newest > cutoff:
            continue
        reason = (f"MLflow model of run {key or run_id}, which no version points to (its registration failed, or the "
                  "version was deleted)")
        if (deletion := folder_deletion(folder.prefix, reason, None)) is not None:
            plan.deletions.append(deletion)


def _artifacts(client, uri: str):
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(uri, tracking_uri=client.tracking_uri)


def model_file_sizes(client, source: str) -> list[int]:
    """The size of every file of a registered version's MLflow model (its ``source``), in bytes."""
    repo, sizes, folders = _artifacts(client, source), [], [None]
    while folders:
        for info in repo.list_artifacts(folders.pop()):
            (folders.append(info.path) if info.is_dir else sizes.append(info.file_size or 0))
    return sizes


def piece_references(store) -> dict[str, tuple[int, set[str]]]:
    """digest -> (size, the committed folders whose manifests list it), over every manifest in the bucket: pieces
    are shared by content across runs and lineages."""
    references: dict[str, tuple[int, set[str]]] = {}
    for info in store.list(""):
        if info.key.endswith("/" + MANIFEST_NAME):
            folder = info.key[: -len(MANIFEST_NAME) - 1]
            for entry in store.get_json(info.key).get("files", {}).values():
                for digest, size in entry.get("pieces", ()):
                    references.setdefault(digest, (size, set()))[1].add(folder)
    return references


def _pieces_by_folder(references: dict[str, tuple[int, set[str]]]) -> dict[str, tuple[int, int]]:
    """folder -> (bytes of the pieces only it lists, bytes of those it shares with other folders)."""
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for size, folders in references.values():
        for folder in folders:
            totals[folder][len(folders) > 1] += size
    return {folder: (own, shared) for folder, (own, shared) in totals.items()}


def _pieces_note(own: int, shared: int) -> str:
    if not own and not shared:
        return ""
    return f", and {_size(own)} of tensor pieces only it lists" + (f" ({_size(shared)} shared with other folders stay)" if shared else "")


def _plan_pieces(store, plan: GcPlan, cutoff: datetime, references: dict[str, tuple[int, set[str]]]) -> None:
    """Checkpoint pieces (perennial/storage.py, content-addressed) that no committed directory still references
    once this plan's folders are gone. A piece written after the cutoff may belong to an upload whose manifest is
    not written yet: it waits."""
    going = {item.path for item in plan.deletions if item.where == "s3"}
    going |= {uri_to_prefix(store, item.path) for item in plan.deletions if item.where == "mlflow" and item.path.startswith(f"s3://{store.bucket}/")}
    referenced = {digest for digest, (_, folders) in references.items() if folders - going}
    pieces = list(store.list(store.blob_key("")))
    orphans = [info for info in pieces if info.key.rsplit("/", 1)[1] not in referenced]
    old = [info for info in orphans if info.last_modified <= cutoff]
    if len(old) < len(orphans):
        young = [info for info in orphans if info.last_modified > cutoff]
        plan.waiting.append(f"{len(young)} checkpoint pieces ({_size(sum(i.size for i in young))}) no committed directory "
                            "references yet: written within min_age_hours, maybe by an upload in flight")
    if old:
        plan.deletions.append(Deletion(
            where="s3", path=store.blob_key("").rstrip("/"), bytes=sum(i.size for i in old), objects=len(old),
            keys=[i.key for i in old], reason=f"{len(old)} of the bucket's {len(pieces)} checkpoint pieces (tensors stored by "
            "content, shared by every lineage in the bucket) that no committed directory references once the folders above "
            "are gone: no kept version or unfinished run reads them"))


def folder_infos(infos: list[ObjectInfo], prefix: str) -> list[ObjectInfo]:
    return [info for info in infos if info.key.startswith(prefix)]


def _last_use(path: Path) -> float:
    """When a local entry was last written or read (fetch_dir touches a hit's marker), as a timestamp."""
    stamps = [path.stat().st_mtime, path.stat().st_atime]
    for marker in COMPLETE_MARKERS:
        if (path / marker).exists():
            stamps.append((path / marker).stat().st_mtime)
    return max(stamps)


def _tree_size(path: Path) -> tuple[int, int, float]:
    """(bytes, files, newest modification) of a file or folder."""
    if path.is_file():
        return path.stat().st_size, 1, path.stat().st_mtime
    size = files = 0
    newest = path.stat().st_mtime
    for item in path.rglob("*"):
        if item.is_file():
            stat = item.stat()
            size, files, newest = size + stat.st_size, files + 1, max(newest, stat.st_mtime)
    return size, files, newest


def cache_entries(cache: Path) -> list[Path]:
    """The download cache's entries: folders by manifest digest, dataset shards and legacy versions, converted GGUF folders."""
    if not cache.is_dir():
        return []
    entries = []
    for child in sorted(cache.iterdir()):
        if child.name in ("datasets", "gguf") and child.is_dir():
            for group in sorted(child.iterdir()):
                entries.extend(sorted(group.iterdir()) if group.is_dir() and group.name in ("shards", "legacy") else [group])
        else:
            entries.append(child)
    return entries


def _plan_local(config: Config, services: Services, plan: GcPlan, states: dict, now: datetime) -> None:
    """Work directories of ended runs, then the download cache's least recently used entries above the bound."""
    policy = config.retention
    cutoff = now.timestamp() - policy.min_age_hours * 3600
    work = Path(config.work_dir)
    if work.is_dir():
        for folder in sorted(p for p in work.iterdir() if p.is_dir() and p.name != services.cache_dir.name):
            state = states.get(folder.name, (None,))[0]
            if state not in ("finished", "failed"):
                continue  # another lineage's run, a run that may resume, or not a run's folder
            others = services.tracker.client.search_runs(
                [services.tracker.experiment_id()], filter_string=f"tags.`{RUN_KEY_TAG}` = '{folder.name}'")
            if any(run_state(r.info.status, r.data.tags)[0] == "unfinished" for r in others):
                continue  # the folder is shared with an unfinished run of another lineage under the same key
            if any(p.stat().st_size for p in folder.rglob(UNSENT_METRICS)):
                plan.waiting.append(f"{folder}: metrics MLflow has not received yet")
                continue
            size, files, newest = _tree_size(folder)
            reason = f"work directory of the {state} run {folder.name}"
            if newest > cutoff:
                plan.waiting.append(f"{folder} ({_size(size)}): {reason}")
                continue
            plan.deletions.append(Deletion(where="local", path=str(folder), bytes=size, objects=files, reason=reason))
    entries = [(entry, _last_use(entry), *_tree_size(entry)[:2]) for entry in cache_entries(services.cache_dir)]
    plan.cache_bytes = total = sum(size for _, _, size, _ in entries)
    bound = int(policy.local_cache_max_gb * GB)
    for entry, used, size, files in sorted(entries, key=lambda item: item[1]):  # least recently used first
        if total <= bound:
            break
        if used > cutoff:
            plan.waiting.append(f"the download cache is {_size(total)}, over retention.local_cache_max_gb "
                                f"({policy.local_cache_max_gb:g} GB), but its other entries were used within min_age_hours")
            break
        plan.deletions.append(Deletion(where="local", path=str(entry), bytes=size, objects=files, reason=(
            f"download cache entry last used {datetime.fromtimestamp(used, timezone.utc):%Y-%m-%d %H:%M} UTC: the cache "
            f"({_size(total)}) is over retention.local_cache_max_gb ({policy.local_cache_max_gb:g} GB); it is downloaded "
            "again (sha256-checked) when needed")))
        total -= size


def sweep(plan: GcPlan, config: Config, services: Services) -> GcPlan:
    """Delete what ``plan`` lists. Per S3 folder, its MANIFEST.json first: once it is gone nothing reads the
    folder as committed, so a sweep killed half way leaves only files that nothing reads and the next plan
    lists again. A deleted version checkpoint's version is tagged `perennial.checkpoint_deleted`."""
    store = services.store
    for item in plan.deletions:
        if item.where == "s3" and item.keys:
            # Read again now the folders are gone: a folder committed since the plan (another lineage's, sharing a
            # tensor) keeps its pieces. Uploads also check their pieces once more after writing their manifest.
            still = piece_references(store)
            store.delete_keys([key for key in item.keys if key.rsplit("/", 1)[1] not in still])
        elif item.where == "s3":
            store.delete_dir(item.path)
            if item.version is not None:
                _tag_version(config, services, item, "perennial.checkpoint_deleted")
        elif item.where == "mlflow":
            # tagged first: a sweep killed between the two leaves a version that says so, never one that silently fails to load
            if item.version is not None:
                _tag_version(config, services, item, "perennial.model_deleted")
            if item.path.startswith(f"s3://{store.bucket}/"):  # a registered model folder of this bucket (model_files)
                store.delete_dir(uri_to_prefix(store, item.path))
            else:
                _artifacts(services.tracker.client, item.path).delete_artifacts()
        else:
            path = Path(item.path)
            if path.is_dir():
                for marker in COMPLETE_MARKERS:  # first: a half-deleted entry must not look whole
                    (path / marker).unlink(missing_ok=True)
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        plan.deleted += 1
    return plan


def _tag_version(config: Config, services: Services, item: Deletion, tag: str) -> None:
    """Say on the version what gc deleted of it, when and why."""
    services.tracker.client.set_model_version_tag(config.tracking.registered_model, item.version, tag,
                                                  f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by gc: {item.reason}")


def collect_garbage(config: Config, dry_run: bool = False, services: Services | None = None) -> GcPlan:
    """Plan (and unless ``dry_run``, sweep) the lineage's storage. The caller holds the lineage lock for a
    sweep (flows/gc.py, flows/continual_retrain.py); the plan and the sweep hold the model's promotion
    lock, so a version promoted meanwhile cannot be one whose checkpoint goes."""
    services = services or Services.open(config)
    if dry_run:
        return plan_gc(config, services, dry_run=True)
    client, name = services.tracker.client, config.tracking.registered_model
    started = time.monotonic()
    with registry.promotion_lock(client, name, by=f"gc ({registry.whoami()})"):
        plan = sweep(plan_gc(config, services), config, services)
    plan.seconds = time.monotonic() - started
    return plan


def _size(count: int) -> str:
    for unit, scale in (("GiB", GB), ("MiB", 1024**2), ("KiB", 1024)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def format_plan(plan: GcPlan) -> str:
    """What gc deleted (or, dry, would delete), with sizes and reasons; what it keeps and why."""
    verb = "would delete" if plan.dry_run else "deleted"
    s3 = [item for item in plan.deletions if item.where == "s3"]
    local = [item for item in plan.deletions if item.where == "local"]
    models = [item for item in plan.deletions if item.where == "mlflow"]
    lines = [f"gc {plan.lineage}: {verb} {len(plan.deletions)} items, {_size(plan.bytes)} "
             f"(S3 {_size(sum(i.bytes for i in s3))} in {sum(i.objects for i in s3)} objects, MLflow models "
             f"{_size(sum(i.bytes for i in models))}, local {_size(sum(i.bytes for i in local))})"]
    for item in plan.deletions:
        where = f"s3://.../{item.path}" if item.where == "s3" else item.path
        lines.append(f"  - {where}  {_size(item.bytes)}, {item.objects} files"
                     f"{_pieces_note(item.pieces_bytes, item.shared_pieces_bytes)}: {item.reason}")
    if any(item.pieces_bytes or item.shared_pieces_bytes for item in plan.deletions):
        lines.append("  (tensor pieces are stored by content, shared between folders: they go on the checkpoint pieces line, "
                     "once no remaining folder lists them)")
    lines.append("kept versions: " + (", ".join(f"{v} ({why})" for v, why in sorted(plan.kept_versions.items(), key=lambda i: int(i[0])))
                                      or "none"))
    unfinished = [f"{key} ({words})" for key, words in plan.runs.items() if words.startswith("unfinished")]
    if unfinished:
        lines.append("unfinished runs, kept with everything they resume from: " + ", ".join(unfinished))
    if plan.waiting:
        lines.append(f"kept for now ({len(plan.waiting)}; unless the line says what it waits for, it was written or used "
                     f"within retention.min_age_hours={plan.min_age_hours:g} and goes for the reason given once older):")
        lines.extend(f"  - {item}" for item in plan.waiting[:20])
        if len(plan.waiting) > 20:
            lines.append(f"  ... and {len(plan.waiting) - 20} more")
    lines.append(f"local download cache before: {_size(plan.cache_bytes)}")
    return "\n".join(lines)
