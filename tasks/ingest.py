"""Ingest stage: produce versioned, validated datasets in S3 and return references to them."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from perennial import demo_data
from perennial.config import Config, ConfigError
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
    name: str
    kind: str  # "text" | "instruction"
    digest: str
    uri: str
    data_file: str  # the name of the version's records as one file; read_records streams its shards instead
    counts: dict = {}
    chance: float | None = None  # chance-level score of an instruction task, where known
    # Incremental datasets: the source objects read into this version (URI -> ETag), marked processed
    # only when the run that trains on them finishes (commit_watermarks).
    watermark: dict[str, str] = {}


class DataBundle(BaseModel):
    general: DatasetRef
    domain: DatasetRef | None  # without a domain corpus there is nothing to adapt to: DAP is skipped
    tasks: list[DatasetRef]
    # Held-out general tasks: scored at every stage, never trained on, kept out of the accuracy matrix.
    heldout: list[DatasetRef] = []

    def all(self) -> list[DatasetRef]:
        return [self.general, *([self.domain] if self.domain else []), *self.tasks, *self.heldout]


def _ref(result, chance: float | None = None) -> DatasetRef:
    return DatasetRef(
        name=result.name,
        kind=result.kind,
        digest=result.digest,
        uri=result.uri,
        data_file=DATA_FILE,  # not result.local_path: that would assemble the whole version on disk
        counts=dict(result.counts),
        chance=chance,
        watermark=dict(result.watermark),
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
    if cfg.data.source == "demo":
        demo = cfg.data.demo
        data = DataBundle(
            general=refs["general"], domain=refs["domain"], tasks=[refs[name] for name in demo.tasks],
            heldout=[refs[name] for name in demo.heldout_tasks],
        )
    else:
        roles = {spec.name: spec.resolved_role for spec in cfg.data.datasets}
        general = [refs[name] for name, role in roles.items() if role == "general"]
        domain = [refs[name] for name, role in roles.items() if role == "domain"]
        tasks = [refs[name] for name, role in roles.items() if role == "task"]
        heldout = [refs[name] for name, role in roles.items() if role == "heldout"]
        if len(general) != 1 or len(domain) > 1 or not tasks:
            raise ConfigError(
                "data.datasets must hold exactly one dataset with role: general, at most one with role: domain, "
                f"and at least one instruction task; got general={len(general)}, domain={len(domain)}, tasks={len(tasks)}"
            )
        data = DataBundle(general=general[0], domain=domain[0] if domain else None, tasks=tasks, heldout=heldout)
    check_usable(cfg, data, {result.name: result for result, _ in results}, training)
    return data


def bind_inputs(run: RunContext, data: DataBundle) -> RunContext:
    """The run to go on with, its key bound to these dataset versions (tasks.runtime.bind_inputs: a
    key reused with new data trains it under a derived key), with the versions recorded as its
    MLflow inputs. Returns ``run`` itself when the key trained these versions or none yet."""
    bound = runtime.bind_inputs(run, {ref.name: ref.digest for ref in data.all()})
    for ref in data.all():
        log_dataset_to_mlflow(ref, context=ref.name, run_id=bound.parent_run_id, client=bound.tracker.client)
    return bound


def commit_watermarks(run: RunContext, data: DataBundle) -> None:
    """Mark the source objects of the run's incremental datasets processed: called once the model
    trained on them is committed, so no object counts as ingested that no model was trained on."""
    for ref in data.all():
        if ref.watermark:
            advance_watermark(run.store, run.config.storage.prefix, ref.name, ref.watermark, ref.digest)


def check_usable(cfg: Config, data: DataBundle, results: dict[str, IngestResult], training: bool = True) -> None:
    """Refuse data that a later stage could not use, before any model is built or trained.

    Raises IngestError naming the dataset, its counts and the fix when a split that a stage reads
    is empty, and ConfigError when eval.scoring is 'options' and a scored test record has none.
    """
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
            fraction = results[ref.name].manifest["filters"]["test_fraction"]
            fix = ("add records, raise test_fraction, or mark test records with split: test" if split == "test"
                   else "add records, lower test_fraction, or mark train records with split: train")
            raise IngestError(
                f"dataset {ref.name!r} has 0 {split} records ({ref.counts['train']} train, {ref.counts['test']} test), "
                f"but {reader} needs them. Records with no split field (and none from their source or file name) are "
                f"split by content hash with test_fraction={fraction}: {fix}"
            )
    if cfg.eval.scoring == "options":
        for ref in [*data.tasks, *data.heldout]:
            test = list(results[ref.name].iter_records("test"))
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
    """The records of a committed dataset version (only ``split``'s when given), in version order.

    Streams the version's shards (downloaded once into ``cache_root``, sha256-verified); a shard of
    the other split is not downloaded. Returns canonical records (dicts). Raises IngestError when
    ``ref.uri`` is not a committed version.
    """
    return list(iter_version(store, ref.uri, Path(cache_root) / "datasets", split))
