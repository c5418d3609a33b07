"""Ingest stage: produce versioned, validated datasets in S3 and return references to them."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from perennial import demo_data
from perennial.config import Config, ConfigError
from perennial.general_prompts import load_prompts
from perennial.ingest import (
    DATA_FILE,
    IngestError,
    IngestResult,
    advance_watermark,
    ingest_dataset,
    ingest_incremental,
    ingest_records,
    iter_version,
    log_dataset_to_mlflow,
)
from perennial.storage import ObjectStore
from tasks import runtime
from tasks.runtime import RunContext


class DatasetRef(BaseModel):
    """A committed dataset version, or one continual-learning task of it.

    A task ref names the task (``name``) and, when its records are a subset of the version, the
    dataset it comes from (``dataset``): only records whose ``task`` field is ``name`` are read.
    ``since``: the URI of an earlier version of the dataset; only the records it does not hold are
    read (the new records of a task a continued lineage already learned, lineage.continue_from).
    """

    name: str
    kind: str  # "text" | "instruction"
    digest: str
    uri: str
    data_file: str  # the name of the version's records as one file; read_records streams its shards instead
    counts: dict = {}
    chance: float | None = None  # chance-level score of an instruction task, where known
    # Incremental datasets: the source objects read into this version (URI -> ETag), marked processed
    # only when the run that trains on them finishes (commit_watermarks); None for a snapshot.
    watermark: dict[str, str] | None = None
    dataset: str | None = None
    since: str | None = None

    @property
    def dataset_name(self) -> str:
        return self.dataset or self.name


class DataBundle(BaseModel):
    general: DatasetRef
    domain: DatasetRef | None  # without a domain corpus there is nothing to adapt to: DAP is skipped
    tasks: list[DatasetRef]  # the task sequence, one ref per task (a dataset may hold several: next_task)
    # Held-out general tasks: scored at every stage, never trained on, kept out of the accuracy matrix.
    heldout: list[DatasetRef] = []
    # Every dataset version the run ingested, once each; empty: the general, domain, task and held-out refs.
    datasets: list[DatasetRef] = []

    def all(self) -> list[DatasetRef]:
        """The run's dataset versions (its inputs): one ref per dataset, whatever tasks it holds."""
        return self.datasets or [self.general, *([self.domain] if self.domain else []), *self.tasks, *self.heldout]


def task_refs(dataset: DatasetRef, result: IngestResult) -> list[DatasetRef]:
    """One ref per task of an instruction dataset version, in sequence order (first appearance).

    A dataset whose records all carry its own name is one task, read whole; otherwise each task
    (e.g. `feed-1`, `feed-2` of `incremental.new_data: next_task`) reads its own records.
    """
    tasks = result.manifest.get("tasks", [])
    if [task["name"] for task in tasks] in ([], [dataset.name]):
        return [dataset]
    return [dataset.model_copy(update={"name": task["name"], "dataset": dataset.name, "watermark": None,
                                       "counts": {"train": task["train"], "test": task["test"]}})
            for task in tasks]


def _ref(result, chance: float | None = None) -> DatasetRef:
    return DatasetRef(
        name=result.name,
        kind=result.kind,
        digest=result.digest,
        uri=result.uri,
        data_file=DATA_FILE,  # not result.local_path: that would assemble the whole version on disk
        counts=dict(result.counts),
        chance=chance,
        watermark=None if result.watermark is None else dict(result.watermark),
    )


def ingest(run: RunContext, training: bool = True) -> DataBundle:
    """Generated demo data or the configured datasets, through the same validation and versioning path.

    ``training`` False (evaluate-only) drops the checks of what only training reads. Raises
    ConfigError when the datasets' roles do not form a run, and what check_usable raises.
    """
    cfg = run.config
    store = run.store
    work = run.work_dir / "ingest"
    results = _demo_results(run, store, work) if cfg.data.source == "demo" else _dataset_results(run, store, work)
    refs = {result.name: _ref(result, chance) for result, chance in results}
    by_name = {result.name: result for result, _ in results}

    def tasks_of(names: list[str]) -> list[DatasetRef]:
        return [task for name in names for task in task_refs(refs[name], by_name[name])]

    if cfg.data.source == "demo":
        demo = cfg.data.demo
        data = DataBundle(general=refs["general"], domain=refs["domain"], tasks=tasks_of(demo.tasks),
                          heldout=tasks_of(demo.heldout_tasks), datasets=list(refs.values()))
    else:
        roles = {spec.name: spec.resolved_role for spec in cfg.data.datasets}
        general = [refs[name] for name, role in roles.items() if role == "general"]
        domain = [refs[name] for name, role in roles.items() if role == "domain"]
        tasks = tasks_of([name for name, role in roles.items() if role == "task"])
        heldout = tasks_of([name for name, role in roles.items() if role == "heldout"])
        if len(general) != 1 or len(domain) > 1 or not tasks:
            raise ConfigError(
                "data.datasets must hold exactly one dataset with role: general, at most one with role: domain, "
                f"and at least one instruction task; got general={len(general)}, domain={len(domain)}, tasks={len(tasks)}"
            )
        data = DataBundle(general=general[0], domain=domain[0] if domain else None, tasks=tasks, heldout=heldout,
                          datasets=list(refs.values()))
    _refuse_repeated_tasks(data)
    check_usable(cfg, data, by_name, training)
    return data


def _refuse_repeated_tasks(data: DataBundle) -> None:
    """Task names are the accuracy matrix's columns and the stages' names: two tasks of one name would
    be scored and trained as one. Raises ConfigError naming the datasets that hold it."""
    seen: dict[str, str] = {}
    for ref in [*data.tasks, *data.heldout]:
        if ref.name in seen:
            raise ConfigError(f"task {ref.name!r} is in datasets {seen[ref.name]!r} and {ref.dataset_name!r}: task names must "
                              "be unique across data.datasets (rename a dataset, or set its `task`)")
        seen[ref.name] = ref.dataset_name


def bind_inputs(run: RunContext, data: DataBundle, start_model: str | None = None) -> RunContext:
    """The run to go on with, its key bound to these dataset versions and the checkpoint it continues
    (``start_model``, a manifest digest; tasks.runtime.bind_inputs: a key reused with new data, or
    after the champion changed, trains under a derived key), with the versions recorded as its
    MLflow inputs. Returns ``run`` itself when the key trained these inputs or none yet."""
    inputs = {ref.name: ref.digest for ref in data.all()}
    if start_model is not None:
        inputs["continued checkpoint"] = start_model
    bound = runtime.bind_inputs(run, inputs)
    for ref in data.all():
        log_dataset_to_mlflow(ref, context=ref.name, run_id=bound.parent_run_id, client=bound.tracker.client)
    return bound


def commit_watermarks(run: RunContext, data: DataBundle) -> None:
    """Mark the source objects of the run's incremental datasets processed: called once the model
    trained on them is committed, so no object counts as ingested that no model was trained on."""
    for ref in data.all():
        if ref.watermark is not None:
            advance_watermark(run.store, run.config.storage.prefix, ref.name, ref.watermark, ref.digest, trained=True)


def check_usable(cfg: Config, data: DataBundle, results: dict[str, IngestResult], training: bool = True) -> None:
    """Refuse data that a later stage could not use, before any model is built or trained.

    Raises IngestError naming the dataset, its counts and the fix when a split that a stage reads
    is empty, and ConfigError when eval.scoring is 'options' and a scored test record has none, or when
    cit.ssr.prompts names no shipped pool and no readable prompt file (found here, not after DAP).
    """
    if training and cfg.cit.ssr.enabled:
        load_prompts(cfg.cit.ssr.prompts)
    dap = training and cfg.dap.enabled and data.domain is not None
    needs = [(data.general, "test", "general perplexity and drift probes after every stage")]
    needs += [(ref, "test", "scoring after every stage") for ref in [*data.tasks, *data.heldout]]
    if training:
        needs += [(ref, "train", "its continual tuning stage") for ref in data.tasks]
        if cfg.model.source == "tiny" or (dap and cfg.dap.general_mix_fraction > 0):
            needs.append((data.general, "train", "the tiny base model's tokenizer and pretraining, or DAP's general mix"))
        if dap:
            needs.append((data.domain, "train", "domain-adaptive pretraining (DAP)"))
    for ref, split, reader in needs:
        if ref.counts[split] == 0:
            fraction = results[ref.dataset_name].manifest["filters"]["test_fraction"]
            fix = ("add records, raise test_fraction, or mark test records with split: test" if split == "test"
                   else "add records, lower test_fraction, or mark train records with split: train")
            raise IngestError(
                f"{'dataset' if ref.dataset is None else f'task {ref.name!r} of dataset'} {ref.dataset_name!r} has 0 {split} "
                f"records ({ref.counts['train']} train, {ref.counts['test']} test), "
                f"but {reader} needs them. Records with no split field (and none from their source or file name) are "
                f"split by content hash with test_fraction={fraction}: {fix}"
            )
    if cfg.eval.scoring == "options":
        for ref in [*data.tasks, *data.heldout]:
            test = [record for record in results[ref.dataset_name].iter_records("test") if ref.dataset is None or record["task"] == ref.name]
            without = [record["id"] for record in test if not record["options"]]
            if without:
                raise ConfigError(
                    f"eval.scoring='options' scores each test record by its options, but {len(without)} of the "
                    f"{len(test)} test records of dataset {ref.name!r} have none (e.g. id {without[0][:12]}); use "
                    "eval.scoring='generate', or give every record an options list"
                )


def _demo_results(run: RunContext, store, work) -> list[tuple]:
    cfg = run.config
    demo = cfg.data.demo

    def publish(name: str, kind: str, records: list[dict], role: str | None = None):
        return ingest_records(name, kind, records, store=store, work_dir=work, storage_prefix=cfg.storage.prefix, role=role)

    general_docs = demo_data.general_corpus(demo.general_docs + demo.general_eval_docs, demo.seed)
    general = [{"text": text, "split": "test" if index < demo.general_eval_docs else "train"} for index, text in enumerate(general_docs)]
    domain = [{"text": text, "split": "train"} for text in demo_data.domain_corpus(demo.domain_docs, demo.seed)]
    catalogue = demo_data.demo_tasks(demo.seed)
    results = [(publish("general", "text", general), None), (publish("domain", "text", domain), None)]
    for name in demo.tasks:
        records = demo_data.task_records(catalogue[name], demo.train_per_task, demo.eval_per_task, demo.seed)
        results.append((publish(name, "instruction", records), catalogue[name].chance))
    for name in demo.heldout_tasks:
        # Test records only: a held-out task has nothing to train on, by construction.
        records = demo_data.task_records(catalogue[name], 0, demo.eval_per_task, demo.seed)
        results.append((publish(name, "instruction", records, role="heldout"), catalogue[name].chance))
    return results


def dataset_chance(result: IngestResult) -> float | None:
    """Chance level of an ingested dataset: 1/len(labels) for a classification label set (the score
    of picking a label uniformly, under option scoring and under generation alike); None (unknown)
    for free-form responses, whose answers have no finite set to guess from."""
    labels = result.manifest["filters"].get("labels")
    return 1 / len(labels) if labels else None


def _dataset_results(run: RunContext, store, work) -> list[tuple]:
    cfg = run.config
    results = []
    for spec in cfg.data.datasets:
        if spec.incremental:  # the watermark waits for a committed model (commit_watermarks)
            result = ingest_incremental(spec, store, work, cfg.storage.prefix, advance=False)
        else:
            result = ingest_dataset(spec, store, work, cfg.storage.prefix)
        results.append((result, dataset_chance(result)))
    return results


def read_records(store: ObjectStore, ref: DatasetRef, cache_root: Path, split: str | None = None) -> list[dict]:
    """The records of a committed dataset version (only ``split``'s when given), in version order;
    of a task ref, the task's records (those not in ``ref.since`` when it is set).

    Streams the version's shards (downloaded once into ``cache_root``, sha256-verified); a shard of
    the other split is not downloaded. Returns canonical records (dicts). Raises IngestError when
    ``ref.uri`` is not a committed version.
    """
    return list(iter_version(store, ref.uri, Path(cache_root) / "datasets", split,
                             task=ref.name if ref.dataset else None, since=ref.since))
