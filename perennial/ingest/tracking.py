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


def log_dataset_to_mlflow(result: IngestResult, context: str = "training", run_id: str | None = None, client=None) -> None:
    """Record the dataset version as an input of a run: ``run_id`` through ``client`` (an MlflowClient),
    else the fluent active run (MLflow starts one if none is active). ``result`` may be any value
    with the version's ``name``, ``kind``, ``digest``, ``uri`` and ``counts`` (a pipeline DatasetRef).

    A MetaDataset carries metadata only: the records stay in S3 at ``result.uri``.
    """
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    dataset = MetaDataset(
        source=resolve_dataset_source(result.uri),
        name=result.name,
        digest=result.digest,
        schema=_schema(result.kind),
    )
    tags = {"mlflow.data.context": context, "perennial.kind": result.kind}
    tags.update({f"perennial.{split}": str(result.counts.get(split, 0)) for split in ("train", "test")})
    if run_id is None:
        mlflow.log_input(dataset, context=context, tags={k: v for k, v in tags.items() if k != "mlflow.data.context"})
        return
    entity = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(k, v) for k, v in tags.items()])
    client.log_inputs(run_id, datasets=[entity])
