"""Recording a dataset version as an MLflow run input, with the content digest as its digest."""

from __future__ import annotations

from perennial.ingest.core import IngestResult


def _schema(kind: str):
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    if kind == "text":
        return Schema([ColSpec(DataType.string, "id"), ColSpec(DataType.string, "text"), ColSpec(DataType.string, "split")])
    return Schema(
        [
            ColSpec(DataType.string, "id"),
            ColSpec(DataType.string, "task"),
            ColSpec(DataType.string, "prompt"),
            ColSpec(DataType.string, "response"),
            ColSpec(Array(DataType.string), "options", required=False),
            ColSpec(DataType.string, "split"),
        ]
    )


def log_dataset_to_mlflow(result: IngestResult, context: str = "training") -> None:
    """``mlflow.log_input`` on the active run (MLflow starts one if none is active).

    A MetaDataset carries metadata only: the records stay in S3 at ``result.uri``.
    """
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    dataset = MetaDataset(
        source=resolve_dataset_source(result.uri),
        name=result.name,
        digest=result.digest,
        schema=_schema(result.kind),
    )
    counts = {f"perennial.{split}": str(result.counts.get(split, 0)) for split in ("train", "test")}
    mlflow.log_input(dataset, context=context, tags={"perennial.kind": result.kind, **counts})
