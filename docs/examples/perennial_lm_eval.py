"""process_docs for lm_eval_local_task.yaml: an ingested data.jsonl holds both splits."""


def test_records(dataset):
    """Only the held-out test records: scoring training records would overstate the model."""
    return dataset.filter(lambda record: record["split"] == "test")
