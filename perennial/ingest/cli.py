"""``perennial ingest CONFIG [key=value ...]``: ingest every dataset listed under data.datasets.

``--distributed process|dask`` builds each snapshot with Prefect tasks on several workers
(perennial.ingest.distributed): local processes, or a Dask cluster (``--address`` of its scheduler,
else a local one of ``--workers`` processes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from perennial.config import ConfigError, load_config
from perennial.ingest.core import ingest_dataset
from perennial.ingest.incremental import ingest_incremental
from perennial.ingest.readers import IngestError
from perennial.storage import ObjectStore, StorageError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="perennial ingest",
        description="Validate, deduplicate, split and version the datasets of a config into S3.",
    )
    parser.add_argument("config", help="YAML config with data.datasets (e.g. configs/wikitext-ingest.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. storage.bucket=mine")
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="ingest only this dataset (repeatable)")
    parser.add_argument("--log-mlflow", action="store_true", help="log each version as an input of an MLflow run")
    parser.add_argument("--no-events", action="store_true",
                        help="send no Prefect events (by default, with PREFECT_API_URL set, each new version sends "
                        "perennial.dataset.committed, and perennial.retrain.due once lineage.retrain_after_records records "
                        "wait for a retrain: the trigger of the continual-retrain/on-data deployment)")
    parser.add_argument(
        "--distributed", choices=("process", "dask"), metavar="RUNNER",  # perennial.ingest.distributed.RUNNERS (imports Prefect)
        help="build each snapshot with Prefect tasks, one per input file or S3 object, on several workers: process (local "
        "processes) or dask (a Dask cluster); refused for incremental datasets (docs/ingestion.md, 'Where one machine is not enough')",
    )  # fmt: skip
    parser.add_argument("--address", metavar="ADDR", help="--distributed dask: the scheduler of an existing Dask cluster, "
                        "e.g. tcp://10.0.0.5:8786; default: a Dask cluster of --workers processes on this machine")  # fmt: skip
    parser.add_argument("--workers", type=int, metavar="N", help="--distributed: worker processes on this machine "
                        "(process, or dask without --address); default 2")  # fmt: skip
    return parser


def main_ingest(argv: list[str] | None = None) -> int:
    """Returns the exit status: 0 on success, 2 when a config, source or dataset is unusable."""
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        specs = [spec for spec in cfg.data.datasets if not args.only or spec.name in args.only]
        if not specs:
            known = [spec.name for spec in cfg.data.datasets]
            raise ConfigError(f"no datasets to ingest: data.datasets lists {known}, --only asked for {args.only}")
        if args.distributed is None and (args.address or args.workers is not None):
            raise ConfigError("--address and --workers are for --distributed")
        if args.distributed:
            from perennial.ingest.distributed import ingest_distributed, make_task_runner

            make_task_runner(args.distributed, args.workers, args.address)  # refuses a runner that cannot run, before any work
            incremental = [spec.name for spec in specs if spec.incremental]
            if incremental:
                raise ConfigError(f"--distributed builds full snapshots; datasets {incremental} are incremental (ingest them without it)")
        store = ObjectStore(cfg.storage)
        store.check()
        work_dir = Path(cfg.work_dir) / "ingest"
        results = []
        for spec in specs:
            if args.distributed:
                result = ingest_distributed(spec, cfg.storage, work_dir, cfg.storage.prefix, runner=args.distributed,
                                            workers=args.workers, address=args.address)  # fmt: skip
            else:
                ingest = ingest_incremental if spec.incremental else ingest_dataset
                result = ingest(spec, store, work_dir, cfg.storage.prefix)
            summary = {"name": result.name, "digest": result.digest, "uri": result.uri, "created": result.created, "skipped": result.skipped,
                       "counts": result.counts, "rejected": result.rejected, "tasks": result.tasks}  # fmt: skip
            print(json.dumps(summary), flush=True)
            results.append(result)
            if args.log_mlflow:
                _log(cfg, result)
        if not args.no_events:
            from perennial.ingest.events import announce

            for event in announce(cfg, store, results):
                print(json.dumps(event), flush=True)
    except (ConfigError, IngestError, StorageError) as error:
        print(f"perennial ingest: {error}", file=sys.stderr)
        return 2
    return 0


def _log(cfg, result) -> None:
    import mlflow

    from perennial.ingest.tracking import log_dataset_to_mlflow

    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    mlflow.set_experiment(cfg.tracking.experiment)
    with mlflow.start_run(run_name=f"ingest-{result.name}"):
        log_dataset_to_mlflow(result, context="ingest")


if __name__ == "__main__":
    sys.exit(main_ingest())
